"""The native layer halves (`kernels.attn_in`, `kernels.attn_out_mlp`, `kernels.rms_norm`):
values against float64 references, every row bitwise the same alone or among others, both
weight forms (float panels, GGUF blocks) giving the same bits, the cache written as torch
would write it."""

from __future__ import annotations

import pytest
import torch

from test_quant_weights import _raw
from tokenswift import kernels
from tokenswift.kernels import PackedLinear, QuantLinear

pytestmark = pytest.mark.skipif(not kernels.native(), reason=f"native kernels off: {kernels.why_not()}")


def _blocks(w: torch.Tensor, qtype: str) -> tuple[QuantLinear, torch.Tensor]:
    """w [N, K] -> (QuantLinear, its dequantized float32 weights)."""
    raw = _raw(w, qtype)
    return QuantLinear(raw, qtype, tuple(w.shape)), kernels.dequantize_reference(raw, qtype, tuple(w.shape))


def _bound(K: int, scale: float) -> float:  # float32 sums of K products against a float64 reference
    return 8 * K * 2.0**-24 * scale


# (D, H, KH, Dh, bias, qk_norm): SmolLM2's layout, Qwen2's bias, Qwen3's q/k norms, odd widths
ATTN_SHAPES = [(576, 9, 3, 64, False, False), (64, 4, 2, 16, True, False), (96, 6, 2, 16, False, True),
               (40, 2, 1, 20, True, True)]


def _attn_inputs(D, H, KH, Dh, bias, qk_norm, B, T, seed=0):
    g = torch.Generator().manual_seed(seed)
    N = (H + 2 * KH) * Dh
    x = torch.randn(B, T, D, generator=g)
    norm = 1 + 0.1 * torch.randn(D, generator=g)
    w = torch.randn(N, D, generator=g) / D**0.5
    b = 0.1 * torch.randn(N, generator=g) if bias else None
    qn = 1 + 0.1 * torch.randn(Dh, generator=g) if qk_norm else None
    kn = 1 + 0.1 * torch.randn(Dh, generator=g) if qk_norm else None
    ang = torch.rand(B, T, 1, Dh // 2, generator=g) * 6.3
    return x, norm, w, b, qn, kn, ang.cos(), ang.sin()


@pytest.mark.parametrize("shape", ATTN_SHAPES, ids=lambda s: "-".join(map(str, s)))
def test_attn_in_matches_reference_and_rows_are_invariant(shape):
    D, H, KH, Dh, bias, qk_norm = shape
    B, T = 2, 11
    x, norm, w, b, qn, kn, cos, sin = _attn_inputs(*shape, B, T)
    scale = Dh**-0.5
    got = kernels.attn_in(x, norm, 1e-5, PackedLinear(w), b, qn, kn, cos, sin, H, KH, scale)
    ref = kernels.attn_in_reference(x, norm, 1e-5, w, b, qn, kn, cos, sin, H, KH, scale)
    assert got.shape == (B, T, H + 2 * KH, Dh)
    err = (got - ref).abs().max().item()
    assert err <= _bound(D, ref.abs().max().item() + 1) * (4 if qk_norm else 1), err
    for bi in range(B):
        for t in (0, 5, T - 1):
            one = kernels.attn_in(x[bi : bi + 1, t : t + 1], norm, 1e-5, PackedLinear(w), b, qn, kn,
                                  cos[bi : bi + 1, t : t + 1], sin[bi : bi + 1, t : t + 1], H, KH, scale)
            assert torch.equal(one[0, 0], got[bi, t])


@pytest.mark.parametrize("qtype", ["q4_0", "q4_1", "q8_0"])
def test_attn_in_over_blocks_equals_float_panels_of_their_weights(qtype):
    D, H, KH, Dh = 64, 4, 2, 16
    x, norm, w, b, qn, kn, cos, sin = _attn_inputs(D, H, KH, Dh, True, False, 1, 9, seed=1)
    q, dense = _blocks(w, qtype)
    a = kernels.attn_in(x, norm, 1e-6, q, b, None, None, cos, sin, H, KH, 0.25)
    f = kernels.attn_in(x, norm, 1e-6, PackedLinear(dense), b, None, None, cos, sin, H, KH, 0.25)
    assert torch.equal(a, f)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=lambda d: str(d).removeprefix("torch."))
def test_attn_in_writes_the_cache_as_torch_would(dtype):
    D, H, KH, Dh = 64, 4, 2, 16
    B, T, L, cap, layer, start = 2, 5, 3, 20, 1, 7
    x, norm, w, b, qn, kn, cos, sin = _attn_inputs(D, H, KH, Dh, False, False, B, T, seed=2)
    kc = torch.full((L, B, KH, cap, Dh), 7.0, dtype=dtype)
    vc = torch.full((L, B, KH, cap, Dh), 7.0, dtype=dtype)
    out = kernels.attn_in(x, norm, 1e-6, PackedLinear(w), None, None, None, cos, sin, H, KH, 0.25, kc, vc, layer,
                          start)
    want_k = torch.full_like(kc, 7.0)
    want_v = torch.full_like(vc, 7.0)
    want_k[layer, :, :, start : start + T] = out[:, :, H : H + KH].transpose(1, 2)
    want_v[layer, :, :, start : start + T] = out[:, :, H + KH :].transpose(1, 2)
    assert torch.equal(kc, want_k) and torch.equal(vc, want_v)
    with pytest.raises(RuntimeError, match="hold rows start"):
        kernels.attn_in(x, norm, 1e-6, PackedLinear(w), None, None, None, cos, sin, H, KH, 0.25, kc, vc, layer, 18)


# (D, H*Dh, I, bias)
MLP_SHAPES = [(576, 576, 1536, False), (64, 48, 96, True), (40, 40, 44, False)]


def _mlp_inputs(D, A, I, bias, B, T, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return (r(B, T, D), r(B, T, A), r(D, A) / A**0.5, 0.1 * r(D) if bias else None, 1 + 0.1 * r(D),
            r(2 * I, D) / D**0.5, 0.1 * r(2 * I) if bias else None, r(D, I) / I**0.5, 0.1 * r(D) if bias else None)


@pytest.mark.parametrize("shape", MLP_SHAPES, ids=lambda s: "-".join(map(str, s)))
def test_attn_out_mlp_matches_reference_and_rows_are_invariant(shape):
    D, A, I, bias = shape
    B, T = 2, 10
    x, att, wo, bo, norm, wgu, bgu, wd, bd = _mlp_inputs(D, A, I, bias, B, T)
    P = [PackedLinear(wo), PackedLinear(wgu), PackedLinear(wd)]
    got = kernels.attn_out_mlp(x, att, P[0], bo, norm, 1e-5, P[1], bgu, P[2], bd)
    ref = kernels.attn_out_mlp_reference(x, att, wo, bo, norm, 1e-5, wgu, bgu, wd, bd)
    err = (got - ref).abs().max().item()
    assert err <= _bound(max(D, I), 4 * ref.abs().max().item() + 4), err
    for bi in range(B):
        for t in (0, 3, T - 1):
            one = kernels.attn_out_mlp(x[bi : bi + 1, t : t + 1], att[bi : bi + 1, t : t + 1], P[0], bo, norm, 1e-5,
                                       P[1], bgu, P[2], bd)
            assert torch.equal(one[0, 0], got[bi, t])


@pytest.mark.parametrize("shape", [(64, 64, 96, False), (72, 96, 100, True)])
def test_gemmas_attn_out_mlp_matches_reference_and_rows_are_invariant(shape):
    """Gemma's block end: the attention and MLP branches normed before their residual adds,
    GELU-tanh for SiLU (a tail of 100 % 8 = 4 gate elements through the padded vector)."""
    D, A, I, bias = shape
    B, T = 2, 10
    x, att, wo, bo, norm, wgu, bgu, wd, bd = _mlp_inputs(D, A, I, bias, B, T)
    g = torch.Generator().manual_seed(5)
    pa, pm = 1 + 0.2 * torch.randn(D, generator=g), 1 + 0.2 * torch.randn(D, generator=g)
    P = [PackedLinear(wo), PackedLinear(wgu), PackedLinear(wd)]
    got = kernels.attn_out_mlp(x, att, P[0], bo, norm, 1e-6, P[1], bgu, P[2], bd, pa, pm, True)
    ref = kernels.attn_out_mlp_reference(x, att, wo, bo, norm, 1e-6, wgu, bgu, wd, bd, pa, pm, True)
    err = (got - ref).abs().max().item()
    assert err <= _bound(max(D, I), 4 * ref.abs().max().item() + 4), err
    silu = kernels.attn_out_mlp_reference(x, att, wo, bo, norm, 1e-6, wgu, bgu, wd, bd, pa, pm, False)
    assert (silu - ref).abs().max().item() > 100 * err  # the flags change the function
    for bi in range(B):
        for t in (0, 3, T - 1):
            one = kernels.attn_out_mlp(x[bi : bi + 1, t : t + 1], att[bi : bi + 1, t : t + 1], P[0], bo, norm, 1e-6,
                                       P[1], bgu, P[2], bd, pa, pm, True)
            assert torch.equal(one[0, 0], got[bi, t])


@pytest.mark.parametrize("qtype", ["q4_0", "q8_0"])
def test_attn_out_mlp_over_blocks_equals_float_panels_of_their_weights(qtype):
    D, A, I = 64, 64, 96
    x, att, wo, bo, norm, wgu, bgu, wd, bd = _mlp_inputs(D, A, I, False, 1, 12, seed=3)
    qs = [_blocks(w, qtype) for w in (wo, wgu, wd)]
    a = kernels.attn_out_mlp(x, att, qs[0][0], None, norm, 1e-6, qs[1][0], None, qs[2][0], None)
    f = kernels.attn_out_mlp(x, att, PackedLinear(qs[0][1]), None, norm, 1e-6, PackedLinear(qs[1][1]), None,
                             PackedLinear(qs[2][1]), None)
    assert torch.equal(a, f)


def test_silu_of_a_row_tail_equals_its_vector_lanes():
    # Width 44: elements 40..43 go through the padded tail; at width 48 the same gate values sit in
    # a vector's lanes. Their SiLU must have the same bits (an element does not depend on where
    # it sits), and be near float64's.
    D = 8
    got = {}
    for I in (44, 48):
        wgu = torch.zeros(2 * I, D)
        wgu[:I, 0] = -30 + 1.3 * torch.arange(I, dtype=torch.float32)  # gate_i = h0 * ramp_i
        wgu[I:, 1] = 1.0  # up_i = h1
        wd = torch.zeros(D, I)
        wd[torch.arange(4), torch.arange(40, 44)] = 1.0  # outputs 0..3 = a_40 .. a_43 exactly
        x = torch.zeros(1, 1, D)
        x[0, 0, :2] = 1.0
        norm = torch.ones(D)
        out = kernels.attn_out_mlp(x, torch.zeros(1, 1, D), PackedLinear(torch.zeros(D, D)), None, norm, 0.0,
                                   PackedLinear(wgu), None, PackedLinear(wd), None)
        got[I] = out[0, 0, :4] - x[0, 0, :4]
    assert torch.equal(got[44], got[48])
    h = kernels.rms_norm(x, norm, 0.0)[0, 0].double()
    gate = h[0] * (-30 + 1.3 * torch.arange(40, 44, dtype=torch.float32)).double()
    want = torch.nn.functional.silu(gate) * h[1]
    assert (got[44].double() - want).abs().max() < 1e-5


def test_rms_norm_matches_reference_and_is_row_invariant():
    g = torch.Generator().manual_seed(5)
    for n in (576, 64, 13):
        x = torch.randn(7, n, generator=g) * 3
        w = torch.randn(n, generator=g)
        got = kernels.rms_norm(x, w, 1e-6)
        ref = kernels.rms_norm_reference(x, w, 1e-6)
        assert (got - ref).abs().max() <= 1e-5 * (ref.abs().max() + 1)
        for i in range(7):
            assert torch.equal(kernels.rms_norm(x[i : i + 1], w, 1e-6)[0], got[i])


def test_layer_op_errors_name_the_problem():
    x, norm, w, b, qn, kn, cos, sin = _attn_inputs(64, 4, 2, 16, False, False, 1, 3)
    with pytest.raises(RuntimeError, match="does not fit x of width"):
        kernels.attn_in(x[..., :32], norm[:32], 1e-6, PackedLinear(w), None, None, None, cos, sin, 4, 2, 1.0)
    with pytest.raises(RuntimeError, match="cos/sin"):
        kernels.attn_in(x, norm, 1e-6, PackedLinear(w), None, None, None, cos[..., :3], sin, 4, 2, 1.0)
    with pytest.raises(RuntimeError, match="rms_norm: weight of 5"):
        kernels.rms_norm(x, torch.ones(5), 1e-6)


@pytest.mark.parametrize("T,masked", [(1, False), (6, False), (6, True)])
def test_attn_block_is_attn_in_then_attention(T, masked):
    D, H, KH, Dh = 64, 4, 2, 16
    B, L, cap, layer, start = 1, 2, 700, 1, 600  # 600 cached keys: chunks in the prefix and a tail
    x, norm, w, b, qn, kn, cos, sin = _attn_inputs(D, H, KH, Dh, True, False, B, T, seed=6)
    g = torch.Generator().manual_seed(7)
    kc = torch.randn(L, B, KH, cap, Dh, generator=g)
    vc = torch.randn(L, B, KH, cap, Dh, generator=g)
    mask = None
    if masked:
        mask = torch.ones(1, T, T, dtype=torch.bool).tril()
        mask[0, 3, 1:3] = False  # a tree: node 3 sees 0 and itself
    k2, v2 = kc.clone(), vc.clone()
    P = PackedLinear(w)
    att = kernels.attn_block(x, norm, 1e-6, P, b, None, None, cos, sin, H, KH, 0.25, kc, vc, layer, start, mask)
    qkv = kernels.attn_in(x, norm, 1e-6, P, b, None, None, cos, sin, H, KH, 0.25, k2, v2, layer, start)
    want = kernels.attention(qkv[:, :, :H], k2[layer, :, :, : start + T], v2[layer, :, :, : start + T], mask)
    assert torch.equal(att, want) and torch.equal(kc, k2) and torch.equal(vc, v2)
