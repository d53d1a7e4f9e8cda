"""`kv_dtype`: every KV cache of a run in the chosen type, for ar and tokenswift alike."""

from __future__ import annotations

import pytest
import torch

import tokenswift
from conftest import tiny_hf_model
from tokenswift.config import PAPER_SAMPLING
from tokenswift.params import ParamError


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-kv")
    tiny_hf_model("llama", seed=2, max_position_embeddings=1024, scale=0.3).save_pretrained(d)
    return d


@pytest.mark.parametrize("kv", ["bfloat16", "float16"])
@pytest.mark.parametrize("sampler", ["greedy", "paper"])
def test_tokenswift_equals_ar_with_a_rounded_cache(tiny_dir, kv, sampler):
    lm = tokenswift.load(str(tiny_dir), heads="none", kv_dtype=kv)
    assert lm.model.kv_dtype == getattr(torch, kv)
    assert lm.kv_bytes_per_token * 2 == tokenswift.load(str(tiny_dir), heads="none").kv_bytes_per_token
    kw = dict(ignore_eos=True, **(dict(temperature=0.0) if sampler == "greedy" else dict(PAPER_SAMPLING, seed=4)))
    prompt = list(range(3, 60))
    want = lm.generate(prompt, 160, method="ar", **kw)
    got = lm.generate(prompt, 160, **kw)
    assert got.tokens == want.tokens


@pytest.mark.parametrize("kv", [torch.bfloat16, torch.float16])
def test_the_cache_rounding_is_part_of_the_model(tiny_dir, kv):
    """The same pass over a rounded cache gives other logits than over a float32 one (so the
    equality above is between two runs of the rounded model, not of the float32 one)."""
    from tokenswift.cache import KVCache

    m = tokenswift.load(str(tiny_dir), heads="none").model
    out = []
    for dt in (torch.float32, kv):
        cache = KVCache(m.cfg, capacity=80, dtype=dt)
        m.prefill(torch.arange(3, 60).unsqueeze(0), cache)
        out.append(m.logits(m(torch.tensor([[7]]), torch.tensor([[57]]), cache)[0, 0]))
    assert not torch.equal(out[0], out[1])
    assert (out[0] - out[1]).abs().max().item() < 0.05  # rounded, not broken


def test_caches_take_the_kv_dtype(tiny_dir, monkeypatch):
    from tokenswift import cache as cache_mod

    made = []
    real = cache_mod.KVCache.__init__

    def spy(self, *a, **kw):
        real(self, *a, **kw)
        made.append(self.k.dtype)

    monkeypatch.setattr(cache_mod.KVCache, "__init__", spy)
    lm = tokenswift.load(str(tiny_dir), heads="none", kv_dtype="bfloat16")
    lm.generate(list(range(3, 40)), 140, ignore_eos=True, draft_kv="partial", **PAPER_SAMPLING)
    assert len(made) >= 2 and set(made) == {torch.bfloat16}  # the main cache and the partial draft cache


def test_bad_kv_dtype_is_named(tiny_dir):
    with pytest.raises(ParamError, match=r"kv_dtype must be one of auto, float32, bfloat16, float16, got 'int8'"):
        tokenswift.load(str(tiny_dir), kv_dtype="int8")
