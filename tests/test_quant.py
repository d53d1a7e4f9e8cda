"""Int4 weight-only copies: quantization, the kernel against its dequantized weights, the
copy of a model, and how close the embedded model's int4 copy samples to the model."""

from __future__ import annotations

import pytest
import torch

from tokenswift.config import PAPER_SAMPLING, SamplingConfig
from tokenswift.model import Decoder
from tokenswift.quant import Int4Weight, dequantize_int4, quantize_int4
from tokenswift.sampling import final_logprobs


@pytest.mark.parametrize("values, want_codes", [
    ([0.0, 1.0] * 16, [0, 15] * 16),  # min -> code 0, max -> code 15
    ([2.0] * 32, [8] * 32),  # a flat group: zero holds the value, scale ~0
    ([float(i % 16) for i in range(32)], [i % 16 for i in range(32)]),  # already on the 16-level grid
])
def test_quantize_int4_codes(values, want_codes):
    w = torch.tensor([values])
    codes, scale, zero = quantize_int4(w)
    assert codes.tolist() == [want_codes]
    assert torch.allclose(dequantize_int4(codes, scale, zero), w, atol=1e-2)


def test_q4_1_blocks_are_reproduced():
    """Weights of the Q4_1 form q·d + m (GGUF blocks of 32) come back with their own codes."""
    g = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (64, 128), generator=g)
    q[:, ::32], q[:, 1::32] = 0, 15  # llama.cpp's Q4_1 spans each block's min..max
    d = (torch.rand(64, 4, generator=g) * 0.02 + 0.001).half().float()
    m = (-torch.rand(64, 4, generator=g) * 0.1).half().float()
    w = (q.view(64, 4, 32) * d[..., None] + m[..., None]).view(64, 128)
    codes, scale, zero = quantize_int4(w)
    assert torch.equal(codes, q.to(torch.int32))
    err = (dequantize_int4(codes, scale, zero) - w).abs().max()
    assert err < 2e-3  # bfloat16 scale and zero: 8 bits of mantissa


def test_kernel_matches_its_dequantized_weights_and_odd_widths_fall_back():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(96, 64, generator=g)
    W = Int4Weight(w)
    assert W.kernel
    x = torch.randn(3, 64, generator=g)
    ref = x @ dequantize_int4(*quantize_int4(w)).t()
    assert torch.allclose(W.matmul(x), ref, rtol=0, atol=3e-2 * ref.abs().max())
    odd = Int4Weight(torch.randn(8, 48, generator=g))  # 48 is no multiple of 32
    assert not odd.kernel and odd.matmul(torch.randn(2, 48)).shape == (2, 8)
    with pytest.raises(ValueError, match="input width 48 is not a multiple of the group size 32"):
        quantize_int4(torch.randn(8, 48))


def _tiny_llama() -> Decoder:
    """A tiny random Llama loaded as the library loads any model, weights not packed."""
    import tempfile

    from conftest import tiny_hf_model
    from tokenswift.loading import load_model

    hf = tiny_hf_model("llama", intermediate_size=128)
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        return load_model(d, device="cpu", pack=False, draft_weights="float").model


def test_int4_copy_shares_the_small_tensors_and_reads_packed_weights_back():
    m = _tiny_llama()
    q = m.int4_copy()
    assert q.embed is m.embed and q.layers[1].attn_norm is m.layers[1].attn_norm
    assert isinstance(q.layers[0].wqkv, Int4Weight) and isinstance(q.lm_head, Int4Weight)
    x = torch.randint(0, 96, (1, 20))
    pos = torch.arange(20)[None]
    with torch.no_grad():
        a, b = m.logits(m(x, pos)), q.logits(q(x, pos))
    # random Gaussian weights lose ~10 % a matrix at 4 bits (real ones far less: see below)
    assert float((a - b).norm() / a.norm()) < 0.4
    assert m.pack()  # oneDNN-packed weights are read back exactly: the same int4 copy
    p = m.int4_copy()
    for name in ("wqkv", "wo", "w_gate_up", "w_down"):
        a, b = getattr(q.layers[1], name), getattr(p.layers[1], name)
        assert torch.equal(a.packed, b.packed) and torch.equal(a.scale_zero, b.scale_zero)
    assert torch.equal(q.lm_head.packed, p.lm_head.packed)


def test_int4_copy_of_smollm2_samples_close_to_the_model(smollm, cdne_ids):
    """What the self-draft's acceptance rests on: under the paper's sampler the int4 copy's
    distribution is within a small total-variation distance of the model's (held-out text)."""
    int4 = smollm.model.int4_copy()  # (the default load builds none over GGUF blocks: the draft runs those)
    assert isinstance(int4, Decoder)
    ids = torch.tensor([cdne_ids[5000:5256]])
    pos = torch.arange(256)[None]
    s = SamplingConfig(**PAPER_SAMPLING)
    with torch.no_grad():
        p = final_logprobs(smollm.model.logits(smollm.model(ids, pos)[0]), None, s).exp()
        q = final_logprobs(int4.logits(int4(ids, pos)[0]), None, s).exp()
    tv = 0.5 * (p - q).abs().sum(-1)  # [256]
    assert float(tv.mean()) < 0.03, float(tv.mean())


def test_int4_head_redoes_every_logit_near_the_best(monkeypatch):
    """The sampler may keep hundreds of tokens where a distribution is flat (min-p): an int4
    copy recomputes from float rows every logit within HEAD_MARGIN of its row's best, however
    many, and leaves the rest as the int4 head gave them."""
    import torch.nn.functional as F

    from tokenswift import model as model_mod

    m = _tiny_llama()
    q = m.int4_copy()
    monkeypatch.setattr(model_mod, "HEAD_SHORTLIST", 2)
    h = torch.randn(3, m.cfg.hidden_size)
    with torch.no_grad():
        hn = F.rms_norm(h, (h.shape[-1],), q.norm, m.cfg.rms_norm_eps)
        approx = model_mod.linear(hn, q.lm_head, None).float()  # [3, V] the int4 head alone
        exact = (hn.to(q.head_rows.dtype) @ q.head_rows.T).float()
        gap = approx.amax(-1, keepdim=True) - approx
        margin = float(gap.kthvalue(12, dim=-1).values.min())  # ~12 tokens per row lie within it
        monkeypatch.setattr(model_mod, "HEAD_MARGIN", margin)
        got = q.logits(h)
    near = gap <= margin
    assert int(near.sum(-1).min()) > 2  # more than the shortlist: the margin decides
    torch.testing.assert_close(got[near], exact[near])
    k = int(near.sum(-1).max())
    far = torch.ones_like(near)
    far.scatter_(-1, approx.topk(k, dim=-1).indices, False)
    assert torch.equal(got[far], approx[far])
    assert not torch.allclose(approx[near], exact[near])  # the int4 head alone would be off there
