"""bfloat16 attention (`attention_dtype="bfloat16"`): the model whose attention over a bfloat16
cache rounds its query rows and its probabilities to bfloat16 and sums their products in float32,
in vdpbf16ps' order. The kernel against a float64 reference of that arithmetic, bitwise row
invariance, the same bits on every instruction level (the plain FMA path against the
instruction), and `tokenswift` == `ar` with every drafter."""

from __future__ import annotations

import pytest
import torch

import tokenswift
from conftest import tiny_hf_model
from test_row_invariance import check_pass_equals_one_token_passes
from tokenswift import kernels
from tokenswift.config import PAPER_SAMPLING
from tokenswift.params import ParamError

pytestmark = pytest.mark.skipif(not kernels.native(), reason=f"native kernels off: {kernels.why_not()}")


def _qkv(B, T, H, KH, S, D, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, D, generator=g) * 0.35  # scaled queries: scores of a few units
    k = torch.randn(B, KH, S, D, generator=g).bfloat16()
    v = torch.randn(B, KH, S, D, generator=g).bfloat16()
    return q, k, v


def _tree_mask(T, seed):
    g = torch.Generator().manual_seed(seed)
    m = torch.eye(T, dtype=torch.bool)
    for i in range(1, T):  # each node under an earlier one: its ancestors' columns
        p = int(torch.randint(0, i, (1,), generator=g))
        m[i] |= m[p]
    return m[None]


@pytest.mark.parametrize("B,T,H,KH,S,D,chunk,tree", [
    (1, 1, 9, 3, 700, 64, 256, False),  # SmolLM2's heads, one row
    (1, 5, 9, 3, 1001, 64, 256, True),  # an odd key count: the last pair padded
    (1, 3, 4, 1, 513, 256, 256, False),  # Gemma 3's head_dim
    (2, 4, 8, 2, 300, 128, 64, True),  # batches, small chunks
    (1, 17, 2, 1, 97, 32, 32, False),  # odd chunks of 32
])
def test_the_kernel_computes_bf16_attention(B, T, H, KH, S, D, chunk, tree):
    q, k, v = _qkv(B, T, H, KH, S, D, seed=S + T)
    mask = _tree_mask(T, seed=T) if tree else None
    got = kernels.attention(q, k, v, mask, chunk=chunk, bf16=True)
    want = kernels.attention_reference(q, k, v, mask, bf16=True, chunk=chunk)
    # within float32's rounding of the same steps (a probability at a bfloat16 tie can round the
    # other way: one weight 2^-8 apart)
    assert (got - want).abs().max().item() < 1e-4
    # the arithmetic is a different one: float32 attention over the same cache lies far off it
    plain = kernels.attention(q, k, v, mask, chunk=chunk)
    assert (plain - want).abs().max().item() > 1e-3
    assert (plain - kernels.attention_reference(q, k, v, mask)).abs().max().item() < 2e-5


@pytest.mark.parametrize("T", [1, 2, 3, 8, 17, 64])
@pytest.mark.parametrize("tree", [False, True], ids=["causal", "tree"])
def test_a_row_has_the_bits_of_its_one_token_pass(T, tree):
    H, KH, D, n = 9, 3, 64, 600
    q, k, v = _qkv(1, T, H, KH, n + T, D, seed=T)
    mask = _tree_mask(T, seed=T + 1) if tree else torch.ones(T, T, dtype=torch.bool).tril()[None]
    out = kernels.attention(q, k, v, mask, bf16=True)  # [1, T, H*D]
    for t in range(T):
        seen = torch.cat([torch.arange(n), n + torch.nonzero(mask[0, t]).flatten()])  # its ancestors, in order
        one = kernels.attention(q[:, t : t + 1], k[:, :, seen], v[:, :, seen], bf16=True)
        assert torch.equal(one[0, 0], out[0, t]), f"row {t} of {T}"


def test_windows_keep_their_bits():
    """Per-row starts (a sliding window): a row's bits are its one-token pass over its window."""
    T, n = 6, 800
    q, k, v = _qkv(1, T, 8, 2, n + T, 64, seed=5)
    starts = torch.tensor([[100, 130, 257, 300, 511, 700]])
    out = kernels.attention(q, k, v, kv_start=starts, bf16=True)
    for t in range(T):
        s = int(starts[0, t])
        seen = torch.cat([torch.arange(s, n), n + torch.arange(t + 1)])
        assert torch.equal(kernels.attention(q[:, t : t + 1], k[:, :, seen], v[:, :, seen], bf16=True)[0, 0],
                           out[0, t])


def test_every_level_gives_the_same_bits():
    """Where the CPU has AVX-512 BF16 its build multiplies by vdpbf16ps; the AVX2 build takes two
    FMAs a pair in the instruction's order, odd element first. Both must give the same bits."""
    levels = {lv: kernels.load_level(lv) for lv in kernels.levels_present()}
    if len(levels) < 2:
        pytest.skip(f"this CPU runs one instruction level ({', '.join(levels)}): no second to compare")
    for (B, T, H, KH, S, D) in [(1, 1, 9, 3, 2000, 64), (1, 16, 9, 3, 1500, 64), (2, 5, 4, 1, 700, 256)]:
        q, k, v = _qkv(B, T, H, KH, S, D, seed=T)
        outs = {lv: ops.attention(q, k, v, None, 256, False, None, None, None, True)[0]
                for lv, ops in levels.items()}
        first = next(iter(outs.values()))
        assert all(torch.equal(first, o) for o in outs.values()), {lv: (o - first).abs().max() for lv, o in
                                                                    outs.items()}


def test_rounding_helpers_round_to_nearest_even_and_flush_tiny_values():
    tiny = torch.finfo(torch.float32).tiny
    x = torch.tensor([1.0, 1.00390625, 1.01171875, -2.5, tiny / 2, -tiny / 4, tiny, 3e38])
    want = torch.tensor([1.0, 1.0, 1.015625, -2.5, 0.0, 0.0, tiny, 3e38]).bfloat16().float()
    assert torch.equal(kernels.to_bf16_ftz(x), want)


def test_the_kernel_names_what_it_needs():
    q, k, v = _qkv(1, 1, 4, 2, 40, 64, seed=0)
    with pytest.raises(RuntimeError, match="bfloat16 attention needs bfloat16 K/V and head_dim a multiple of 32, "
                                           "got Half and head_dim 64"):
        kernels.attention(q, k.half(), v.half(), bf16=True)
    q, k, v = _qkv(1, 1, 4, 2, 40, 16, seed=0)
    with pytest.raises(RuntimeError, match="head_dim a multiple of 32, got BFloat16 and head_dim 16"):
        kernels.attention(q, k, v, bf16=True)


# ---- the model ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny Llama with head_dim 32 (two query heads sharing one KV head)."""
    d = tmp_path_factory.mktemp("tiny-bf16")
    tiny_hf_model("llama", seed=2, scale=0.3, max_position_embeddings=1024, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=32).save_pretrained(d)
    return d


def test_loading_makes_the_cache_bfloat16_and_names_what_does_not_fit(tiny_dir):
    lm = tokenswift.load(str(tiny_dir), heads="none", attention_dtype="bfloat16")
    assert lm.model.kv_dtype == torch.bfloat16 and lm.model.attention_dtype == "bfloat16"
    assert tokenswift.load(str(tiny_dir), heads="none").model.attention_dtype == "float32"
    with pytest.raises(ParamError, match=r"attention_dtype 'bfloat16' computes over a bfloat16 cache, and the KV "
                                         r"dtype asked for is float16 \(leave it auto, or make it bfloat16\)"):
        tokenswift.load(str(tiny_dir), heads="none", attention_dtype="bfloat16", kv_dtype="float16")
    with pytest.raises(ParamError, match=r"attention_dtype must be one of float32, bfloat16, bfloat16-amx, got 'int8'"):
        tokenswift.load(str(tiny_dir), attention_dtype="int8")


def test_a_head_dim_not_a_multiple_of_32_is_refused(tmp_path):
    tiny_hf_model("llama").save_pretrained(tmp_path)  # head_dim 16
    with pytest.raises(ParamError, match=r"attention_dtype 'bfloat16' needs head_dim a multiple of 32, and this "
                                         r"model's is 16"):
        tokenswift.load(str(tmp_path), heads="none", attention_dtype="bfloat16")


@pytest.mark.parametrize("method,draft_kv", [("tokenswift", "auto"), ("tokenswift", "sparse"),
                                             ("tokenswift", "partial"), ("tokenswift", "int8"), ("ngram", "auto")])
@pytest.mark.parametrize("sampler", ["greedy", "paper"])
def test_tokenswift_equals_ar_with_bf16_attention(tiny_dir, monkeypatch, method, draft_kv, sampler):
    from test_speculative import _force_costs

    _force_costs(monkeypatch, drafts_pay=True)  # drafts every iteration: a tiny model's are cheap but poor
    lm = tokenswift.load(str(tiny_dir), heads="none", attention_dtype="bfloat16")
    kw = dict(ignore_eos=True, **(dict(temperature=0.0) if sampler == "greedy" else dict(PAPER_SAMPLING, seed=4)))
    prompt = list(range(3, 90)) * 7  # 609 tokens: more than two chunks, and n-grams to reuse
    want = lm.generate(prompt, 160, method="ar", **kw)
    extra = {} if method == "ngram" else dict(draft_kv=draft_kv, draft_budget=64, draft_weights="float")
    got = lm.generate(prompt, 160, method=method, **kw, **extra)
    assert got.tokens == want.tokens
    if method == "tokenswift":
        assert got.stats["accepted_draft_tokens"] >= 5  # it drafted: verify passes were compared


def test_bf16_attention_is_part_of_the_model(tiny_dir):
    """The same prompt gives other logits with bfloat16 attention than with float32 attention over
    the same bfloat16 cache: the equality above is between two runs of the bfloat16 model."""
    prompt = (torch.arange(297) % 90 + 3).unsqueeze(0)
    out = []
    for a in ("float32", "bfloat16"):
        m = tokenswift.load(str(tiny_dir), heads="none", kv_dtype="bfloat16", attention_dtype=a).model
        cache = tokenswift.cache.KVCache(m.cfg, capacity=400, dtype=m.kv_dtype)
        m.prefill(prompt, cache)
        out.append(m.logits(m(torch.tensor([[7]]), torch.tensor([[297]]), cache)[0, 0]))
    assert not torch.equal(out[0], out[1])
    assert (out[0] - out[1]).abs().max().item() < 0.05


@pytest.mark.parametrize("T,tree", [(8, True), (16, False)])
def test_smollm2_passes_are_row_invariant_with_bf16_attention(smollm, T, tree):
    m = smollm.model
    m.bf16_attention = True
    try:
        check_pass_equals_one_token_passes(m, 1024, T, tree, torch.bfloat16, seed=T)
    finally:
        m.bf16_attention = False


def test_without_the_native_kernels_it_is_refused(tiny_dir):
    from tokenswift.loading import load_model

    with pytest.raises(ParamError, match=r"attention_dtype 'bfloat16' runs on the native CPU kernels, which this "
                                         r"model does not use here \(pack=False\)"):
        load_model(str(tiny_dir), attention_dtype="bfloat16", pack=False)  # plain weights, as training takes
