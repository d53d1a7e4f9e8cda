"""Device portability: the portable attention path (TOKENSWIFT_PORTABLE_ATTENTION=1) against the
CPU-tuned one, timing that waits for the device, compiled passes against eager ones."""

from __future__ import annotations

import pytest
import torch

import tokenswift
from conftest import tiny_hf_model
from tokenswift import engine, loading
from tokenswift.cache import KVCache
from tokenswift.config import PAPER_SAMPLING
from tokenswift.loading import load_model

SAMPLERS = [dict(temperature=0.0), dict(PAPER_SAMPLING, seed=11)]


def _passes(m, V: int) -> list[torch.Tensor]:
    """Logits of every kind of pass: chunked prefill (causal new block over a cached prefix),
    one-token decode, a tree block under a mask."""
    torch.manual_seed(0)
    out = []
    with torch.no_grad():
        cache = KVCache(m.cfg, capacity=128)
        out.append(m.logits(m.prefill(torch.randint(0, V, (1, 40)), cache, chunk=16)))
        for p in range(40, 44):
            out.append(m.logits(m(torch.randint(0, V, (1, 1)), torch.tensor([[p]]), cache)))
        tree = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 0, 1, 0, 0], [1, 1, 0, 1, 0], [1, 0, 1, 0, 1]],
                            dtype=torch.bool)
        pos = torch.tensor([[44, 45, 45, 46, 46]])
        out.append(m.logits(m(torch.randint(0, V, (1, 5)), pos, cache, mask=tree)))
    return out


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3", "mistral-window", "llama-mha"])
def test_portable_attention_computes_what_the_cpu_kernel_does(kind, tmp_path, monkeypatch):
    hf = tiny_hf_model(kind, max_position_embeddings=256)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    m = load_model(str(tmp_path), device="cpu", tokenizer=False).model
    V = hf.config.vocab_size
    want = _passes(m, V)
    monkeypatch.setenv("TOKENSWIFT_PORTABLE_ATTENTION", "1")
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    got = _passes(m, V)
    assert calls  # the portable kernel ran
    for i, (a, b) in enumerate(zip(got, want)):
        assert (a - b).abs().max().item() < 1e-4, f"pass {i}"


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama")
    tiny_hf_model("qwen2", seed=1, max_position_embeddings=2048, scale=0.3).save_pretrained(d)
    return tokenswift.load(str(d), heads="none")


def _both_paths(lm, prompt, n, monkeypatch, **kw) -> None:
    """ar on the default path against ar and tokenswift on the portable one (tokenswift == ar
    on the default path is the speculation tests' business)."""
    for sampler in SAMPLERS:
        monkeypatch.delenv("TOKENSWIFT_PORTABLE_ATTENTION", raising=False)
        want = lm.generate(prompt, n, method="ar", ignore_eos=True, **sampler, **kw).tokens
        monkeypatch.setenv("TOKENSWIFT_PORTABLE_ATTENTION", "1")
        for method in ("ar", "tokenswift"):
            got = lm.generate(prompt, n, method=method, ignore_eos=True, **sampler, **kw)
            assert got.tokens == want, (method, sampler)
            if method == "tokenswift":
                assert got.stats["mean_trie_size"] > 1  # multi-token verify passes took the portable path


def test_portable_attention_writes_the_same_tokens_tiny(tiny_lm, monkeypatch):
    _both_paths(tiny_lm, list(range(3, 60)), 300, monkeypatch)


def test_portable_attention_writes_the_same_tokens_smollm2(smollm, monkeypatch):
    # 160 new tokens: past SELF_DRAFT_MIN_TOKENS, so the int4 self-draft runs too
    _both_paths(smollm, "The history of the hacker culture", 160, monkeypatch)


def test_timing_waits_for_the_device(monkeypatch):
    """Every clock reading of the stats (and so of the planner, which reads the loop's clock)
    first waits for a CUDA device; on CPU nothing is waited for."""
    waited = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda d=None: waited.append(d))
    t = engine.Timer(torch.device("cuda", 0))
    t.elapsed()
    t.now()
    assert waited == [torch.device("cuda", 0)] * 3
    waited.clear()
    engine.Timer(torch.device("cpu")).elapsed()
    loading.synchronize(torch.device("cpu"))
    assert waited == []


def test_the_loop_reads_the_clock_that_waits(tiny_lm, monkeypatch):
    """The stage timings come from Timer.now (which synchronizes), not from a bare clock."""
    reads = []
    now = engine.Timer.now
    monkeypatch.setattr(engine.Timer, "now", lambda self: reads.append(1) or now(self))
    res = tiny_lm.generate(list(range(3, 40)), 30, method="tokenswift", ignore_eos=True, temperature=0.0)
    assert len(reads) >= 7 * res.stats["iterations"]


def test_compiled_passes_write_the_eager_tokens(tiny_lm, tmp_path_factory):
    """compile=True: the blocks' dense halves compiled per pass size, the verify pass padded to
    those sizes; ar and tokenswift, greedy and seeded, give the eager tokens. About 45 s with a
    cold compile cache here: each size compiles on first use."""
    d = tmp_path_factory.mktemp("qwen2c")
    tiny_hf_model("qwen2", seed=1, max_position_embeddings=2048, scale=0.3).save_pretrained(d)
    compiled = tokenswift.load(str(d), heads="none", compile=True)
    assert compiled.model.compiled is not None and compiled.model.pass_size(5) == 8
    prompt = list(range(3, 60))
    for sampler in SAMPLERS:
        for method in ("ar", "tokenswift"):
            want = tiny_lm.generate(prompt, 200, method=method, ignore_eos=True, **sampler)
            got = compiled.generate(prompt, 200, method=method, ignore_eos=True, **sampler)
            assert got.tokens == want.tokens, (method, sampler)
            if method == "tokenswift":
                assert got.stats["mean_trie_size"] > 1  # the padded verify pass ran
    from torch._dynamo.utils import counters

    assert counters["stats"]["unique_graphs"] >= 4  # compiled graphs ran: one decode and some verify sizes
