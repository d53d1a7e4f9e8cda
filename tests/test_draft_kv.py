"""`draft_kv`: the self-draft's cache past the budget, above all its int8 copy of the whole cache."""

from __future__ import annotations

import pytest
import torch

import tokenswift
from conftest import tiny_hf_model
from tokenswift import api, drafters, kernels
from tokenswift.cache import KVCache, Q8KVCache
from tokenswift.params import ParamError

native = pytest.mark.skipif(not kernels.native(), reason=f"native kernels off: {kernels.why_not()}")


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-draft-kv")
    tiny_hf_model("llama", seed=3, max_position_embeddings=1024, scale=0.3).save_pretrained(d)
    return tokenswift.load(str(d), heads="none")


def _prefilled(m, n: int) -> KVCache:
    cache = KVCache(m.cfg, capacity=n + 8)
    m.prefill(torch.arange(3, 3 + n).unsqueeze(0) % m.cfg.vocab_size, cache)
    return cache


@native
@pytest.mark.parametrize("rows", [4096, 7])  # one block, and blocks of 7 entries (the last short)
def test_sync_quantizes_the_committed_entries_and_only_those(lm, monkeypatch, rows):
    monkeypatch.setattr(Q8KVCache, "SYNC_ROWS", rows)
    m = lm.model
    main = _prefilled(m, 90)
    q8 = Q8KVCache(m.cfg, main.capacity)
    q8.k.fill_(5)
    q8.v.fill_(5)
    q8.sync(main, 50)
    q8.sync(main, 90)  # the second sync adds [50, 90)
    assert q8.length == 90 and torch.equal(q8.pos[:90], main.pos[:90])
    for src, q, s in ((main.k, q8.k, q8.ks), (main.v, q8.v, q8.vs)):
        rq, rs = kernels.quantize_q8_reference(src[:, :, :, :90])
        assert torch.equal(q[:, :, :, :90], rq) and torch.equal(s[:, :, :, :90], rs)
        assert (q[:, :, :, 90:] == 5).all()  # nothing past N written
    q8.length = 95  # a draft's own entries past N are dropped by the next sync's truncation
    q8.sync(main, 90)
    assert q8.length == 90


@native
def test_a_pass_over_the_int8_copy_stores_quantized_kv_and_stays_near_the_float_pass(lm, monkeypatch):
    m = lm.model
    main = _prefilled(m, 300)
    q8 = Q8KVCache(m.cfg, main.capacity)
    q8.sync(main, 300)
    tok, pos = torch.tensor([[11]]), torch.tensor([[300]])
    h8 = m(tok, pos, q8)[0, 0]
    hf = m(tok, pos, main)[0, 0]  # the same token over the float cache: K/V at entry 300
    for src, q, s in ((main.k, q8.k, q8.ks), (main.v, q8.v, q8.vs)):
        # layer 0's K/V come from the token alone: the float pass's, quantized; deeper layers'
        # follow attention over the int8 rows, so they are near those
        rq, rs = kernels.quantize_q8_reference(src[:1, :, :, 300:301])
        assert torch.equal(q[:1, :, :, 300:301], rq) and torch.equal(s[:1, :, :, 300:301], rs)
        deq = q[1:, :, :, 300].float() * s[1:, :, :, 300, None]
        assert (deq - src[1:, :, :, 300]).abs().max().item() < 0.05 * src[1:, :, :, 300].abs().max().item()
    l8, lf = m.logits(h8), m.logits(hf)
    assert not torch.equal(l8, lf)
    assert (l8 - lf).abs().max().item() < 0.1 * lf.abs().max().item()  # rounded, not broken
    # the torch fallback (a dequantized copy) computes the same attention
    q8.truncate(300)
    monkeypatch.setenv("TOKENSWIFT_PORTABLE_ATTENTION", "1")
    hp = m(tok, pos, q8)[0, 0]
    assert (hp - h8).abs().max().item() < 1e-4


@native
def test_auto_takes_the_int8_copy_past_the_budget_and_the_tokens_stay_ar(lm):
    prompt = [i % 90 + 3 for i in range(117)]
    kw = dict(ignore_eos=True, temperature=1.0, min_p=0.1, seed=5)
    want = lm.generate(prompt, 120, method="ar", **kw).tokens
    got = lm.generate(prompt, 120, draft_budget=64, tree="1,3,3,3", **kw)
    assert got.tokens == want
    st = got.stats
    assert st["draft_kv"] == "int8" and st["draft_refreshes"] == 0 and st["draft_kv_max"] > 120


def test_int8_without_the_native_kernels_is_a_named_error(lm, monkeypatch):
    monkeypatch.setattr(kernels, "native", lambda: False)
    monkeypatch.setattr(kernels, "why_not", lambda: "TOKENSWIFT_NATIVE=0")
    assert drafters.resolve_draft_kv("auto", lm.model) == "partial"
    with pytest.raises(ParamError, match=r"draft_kv 'int8' needs the native CPU kernels \(TOKENSWIFT_NATIVE=0\); "
                                         r"use draft_kv 'partial' or 'full'"):
        lm.generate(list(range(3, 40)), 20, draft_kv="int8", tree="1,3,3,3", ignore_eos=True)


@native
def test_auto_takes_the_int8_copy_only_where_attention_runs_natively(lm, monkeypatch):
    """Kernels built, but the pass takes torch's portable attention: int8 would dequantize the
    whole copy every pass, so auto keeps the partial cache and an explicit int8 is refused."""
    assert drafters.resolve_draft_kv("auto", lm.model) == "int8"
    monkeypatch.setenv("TOKENSWIFT_PORTABLE_ATTENTION", "1")
    assert drafters.resolve_draft_kv("auto", lm.model) == "partial"
    with pytest.raises(ParamError, match=r"draft_kv 'int8' needs the native CPU kernels \(attention takes "
                                         r"torch's portable kernel here\)"):
        drafters.resolve_draft_kv("int8", lm.model)


def test_bad_draft_kv_is_named(lm):
    with pytest.raises(ParamError, match=r"draft_kv must be one of auto, int8, partial, full, got 'int4'"):
        lm.generate(list(range(3, 40)), 20, draft_kv="int4")


@native
def test_the_memory_check_counts_the_int8_copy(lm, monkeypatch):
    n = 200 + 800
    kv = n * lm.kv_bytes_per_token
    monkeypatch.setattr(api, "available_memory", lambda device: kv + n * Q8KVCache.bytes_per_token(lm.model.cfg) // 2)
    prompt = [i % 90 + 3 for i in range(200)]
    # steps() checks before it returns its iterator
    lm.steps(prompt, 800, method="ar", ignore_eos=True)  # the float cache alone fits
    lm.steps(prompt, 800, draft_budget=64, draft_kv="partial", ignore_eos=True)
    with pytest.raises(ParamError, match="needs a KV cache of"):
        lm.steps(prompt, 800, draft_budget=64, ignore_eos=True)
