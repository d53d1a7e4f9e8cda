"""GGUF weights kept as blocks (Q4_0/Q4_1/Q8_0, Q5_0/Q5_1 and the K-quants Q4_K/Q5_K/Q6_K) (`--weights`): the native kernel against the float
kernel on the dequantized matrix (bit for bit) and a float64 reference, row invariance, the
loader's choices, and quantization of float checkpoints at load."""

from __future__ import annotations

import os
import subprocess
import sys

import gguf
import numpy as np
import pytest
import torch

from conftest import tiny_hf_model
from test_loading import write_gguf
from tokenswift import kernels
from tokenswift.kernels import PackedLinear, QuantLinear, QuantStack, dequantize_reference, linear_reference
from tokenswift.loading import load_model
from tokenswift.params import ParamError
from tokenswift.quant import Blocks

pytestmark = pytest.mark.skipif(not kernels.native(), reason=f"native kernels off: {kernels.why_not()}")

QTYPES = ["q4_0", "q4_1", "q8_0"]
# the types a Q4_K_M / Q5_K_M / Q6_K file mixes in: the gguf package cannot quantize the K-quants,
# so their tests take random valid blocks (random codes and scale bytes, finite float16 scales)
MORE_QTYPES = ["q5_0", "q5_1", "q4_k", "q5_k", "q6_k"]
KQUANTS = ("q4_k", "q5_k", "q6_k")
# byte offsets of a block's float16 fields (d, and m or dmin)
F16_FIELDS = {"q4_0": (0,), "q4_1": (0, 2), "q8_0": (0,), "q5_0": (0,), "q5_1": (0, 2), "q4_k": (0, 2),
              "q5_k": (0, 2), "q6_k": (208,), "q2_k": (80, 82)}


def _raw(w: torch.Tensor, qtype: str) -> torch.Tensor:
    t = getattr(gguf.GGMLQuantizationType, qtype.upper())
    return torch.from_numpy(gguf.quants.quantize(w.numpy(), t))


def _random_raw(qtype: str, N: int, K: int, seed: int) -> torch.Tensor:
    """N rows of K inputs as random valid `qtype` blocks: uint8 [N, row bytes]."""
    t = getattr(gguf.GGMLQuantizationType, qtype.upper())
    inputs, nbytes = gguf.GGML_QUANT_SIZES[t]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(N, K // inputs, nbytes), dtype=np.uint8)
    for at in F16_FIELDS[qtype]:
        scale = rng.uniform(2e-4, 2e-3, size=(N, K // inputs)) * rng.choice([-1, 1], size=(N, K // inputs))
        raw[:, :, at : at + 2] = scale.astype(np.float16).view(np.uint8).reshape(N, K // inputs, 2)
    return torch.from_numpy(raw.reshape(N, -1))


def _case(qtype: str, shape: tuple[int, int], seed: int):
    """Random weights [N, K], bias, 128 input rows, their blocks and the blocks' float32 weights
    (random blocks for the types beyond the first three: `w` is None)."""
    N, K = shape
    g = torch.Generator().manual_seed(seed)
    w, b = 0.05 * torch.randn(N, K, generator=g), torch.randn(N, generator=g)
    x = torch.randn(128, K, generator=g)
    if qtype in QTYPES:
        raw = _raw(w, qtype)
    else:
        raw, w = _random_raw(qtype, N, K, seed), None
    return w, b, x, QuantLinear(raw, qtype, (N, K)), dequantize_reference(raw, qtype, (N, K))


def _shapes(qtypes, small, kquant):
    return [(q, s) for q in qtypes for s in (kquant if q in KQUANTS else small)]


@pytest.mark.parametrize("qtype, shape", _shapes(QTYPES + MORE_QTYPES, [(50, 64), (960, 576), (130, 1536)],
                                                 [(50, 256), (300, 768), (130, 1536)]))
def test_quant_linear_matches_reference_and_is_row_invariant(qtype, shape):
    N, K = shape
    w, b, x, ql, wd = _case(qtype, shape, seed=1)
    assert torch.equal(ql.dense(), wd)  # the file's reference dequantization, bit for bit
    pl = PackedLinear(wd)
    for bias in (None, b):
        rows = torch.cat([ql.matmul(x[i : i + 1], bias) for i in range(x.shape[0])])
        for M in (1, 2, 3, 8, 17, 128):
            y = ql.matmul(x[:M], bias)
            assert torch.equal(y, rows[:M]), f"M={M}: a row depends on the rows beside it"
            assert torch.equal(y, pl.matmul(x[:M], bias)), f"M={M}: not the float kernel's bits"
            # a sequential float32 sum of K products: error ~ K * 2^-24 of the sum of |products|
            bound = 4 * K * 2**-24 * (x[:M].abs() @ wd.abs().T).max().item()
            assert (y - linear_reference(x[:M], wd, bias)).abs().max().item() <= bound
    assert ql.matmul(x[:6].view(2, 3, K)).shape == (2, 3, N)


@pytest.mark.parametrize("qtype, shape", _shapes(QTYPES + MORE_QTYPES, [(50, 64), (960, 576), (130, 1536)],
                                                 [(50, 256), (130, 1536)]))
def test_int8_activations_match_their_reference_and_are_row_invariant(qtype, shape):
    N, K = shape
    w, b, x, ql, wd = _case(qtype, shape, seed=2)
    x[5, :32] = 0.0  # an all-zero block: scale 0, codes 0
    ql.act8 = True
    for bias in (None, b):
        rows = torch.cat([ql.matmul(x[i : i + 1], bias) for i in range(x.shape[0])])
        for M in (1, 2, 3, 8, 17, 128):
            y = ql.matmul(x[:M], bias)
            assert torch.equal(y, rows[:M]), f"M={M}: a row depends on the rows beside it"
            # exact integer block sums, then one float32 FMA a block: error ~ K/32 roundings of the sum
            ref = kernels.qlinear_act8_reference(x[:M], wd, bias)
            bound = 4 * (K // 32 + 2) * 2**-24 * (x[:M].abs() @ wd.abs().T).max().item()
            assert (y - ref).abs().max().item() <= bound
    # a different model than the float activations' (the rounding of x), but a close one
    ql.act8 = False
    exact = ql.matmul(x[:8])
    ql.act8 = True
    rel = ((ql.matmul(x[:8]) - exact).norm() / exact.norm()).item()
    assert 0 < rel < 0.02, rel


def test_int8_activations_write_the_same_text_with_ar_and_tokenswift(smollm, cdne_ids):
    import tokenswift

    lm = tokenswift.load("smollm2-135m", activations="int8")
    assert lm.model.activations == "int8" and smollm.model.activations == "float"
    prompt = cdne_ids[1000:1400]
    for kw in (dict(temperature=0.0), dict(tokenswift.PAPER_SAMPLING, seed=3)):
        want = lm.generate(prompt, 200, method="ar", ignore_eos=True, **kw).tokens
        got = lm.generate(prompt, 200, method="tokenswift", tree="1,3,3,3", ignore_eos=True, **kw).tokens
        assert got == want
        assert lm.generate(prompt, 200, method="tokenswift", ignore_eos=True, **kw).tokens == want
    # a verify pass's rows are one-token passes' bit for bit, as with float activations
    from tokenswift.cache import KVCache

    m = lm.model
    ids = torch.tensor([prompt[:300]])
    c1 = KVCache(m.cfg, capacity=320)
    m.prefill(ids[:, :292], c1)
    c8 = KVCache(m.cfg, capacity=320)
    m.prefill(ids[:, :292], c8)
    pos = torch.arange(292, 300).unsqueeze(0)
    h8 = m(ids[:, 292:300], pos, c8)
    h1 = torch.cat([m(ids[:, i : i + 1], pos[:, i - 292 : i - 291], c1) for i in range(292, 300)], dim=1)
    assert torch.equal(h8, h1)


def test_int8_activations_need_weight_blocks():
    with pytest.raises(ParamError, match=r"activations 'int8' needs weights held as GGUF blocks"):
        load_model("smollm2-135m", weights="float", activations="int8")
    with pytest.raises(ParamError, match=r"activations must be one of float, int8, got 'int4'"):
        load_model("smollm2-135m", activations="int4")


@pytest.mark.parametrize("qtype", QTYPES + MORE_QTYPES)
def test_packing_in_the_int8_order_equals_moving_the_codes_there(qtype):
    """`pack_q` with ACT8 writes the panels `relayout_q` makes of the float order's, and back."""
    K = 512 if qtype in KQUANTS else 96
    raw = _raw(0.1 * torch.randn(100, K), qtype) if qtype in QTYPES else _random_raw(qtype, 100, K, seed=5)
    t = kernels.QTYPES[qtype]
    plain = kernels.ops.pack_q(raw, t, K)
    moved = plain.clone()
    kernels.ops.relayout_q(moved, t, True)
    assert torch.equal(kernels.ops.pack_q(raw, t | kernels.ACT8, K), moved) and not torch.equal(moved, plain)
    kernels.ops.relayout_q(moved, t, False)
    assert torch.equal(moved, plain)


@pytest.mark.parametrize("qtype", QTYPES + MORE_QTYPES)
def test_quant_rows_are_the_dequantized_rows(qtype):
    """In either order of the codes (int8 activations move them in place, and back)."""
    K = 512 if qtype in KQUANTS else 96
    raw = _raw(0.1 * torch.randn(100, K), qtype) if qtype in QTYPES else _random_raw(qtype, 100, K, seed=4)
    ql = QuantLinear(raw, qtype, (100, K))
    ids = torch.tensor([[0, 99, 47], [48, 48, 5]])
    want = dequantize_reference(raw, qtype, (100, K))
    before = ql.packed.clone()
    assert torch.equal(ql.rows(ids), want[ids])
    ql.act8 = True
    assert not torch.equal(ql.packed, before), "the codes did not move"
    assert torch.equal(ql.rows(ids), want[ids]) and torch.equal(ql.dense(), want)
    ql.act8 = False
    assert torch.equal(ql.packed, before)


def test_quant_linear_bad_inputs_name_the_problem():
    raw = _raw(torch.randn(8, 64), "q8_0")
    with pytest.raises(ValueError, match="type 'q3_k'"):
        QuantLinear(raw, "q3_k", (8, 64))
    with pytest.raises(RuntimeError, match="do not hold 64 inputs"):  # K-quants: whole blocks of 256
        QuantLinear(raw, "q4_k", (8, 64))
    with pytest.raises(RuntimeError, match="do not hold 96 inputs"):
        QuantLinear(raw, "q8_0", (8, 96))
    ql = QuantLinear(raw, "q8_0", (8, 64))
    with pytest.raises(RuntimeError, match="input width 63 != 64"):
        ql.matmul(torch.randn(2, 63))
    with pytest.raises(RuntimeError, match="index 8 out of range"):
        ql.rows(torch.tensor([8]))


def _logits(model, toks):
    with torch.no_grad():
        return model.logits(model(toks, torch.arange(toks.shape[1])[None]))


@pytest.mark.parametrize("kind,arch,qtype", [("llama", "llama", "Q4_1"), ("llama-tied", "llama", "Q8_0"),
                                             ("qwen2", "qwen2", "Q4_0"), ("qwen3", "qwen3", "Q4_1")])
def test_gguf_blocks_give_the_dequantized_models_logits_bitwise(tmp_path, kind, arch, qtype):
    hf = tiny_hf_model(kind, intermediate_size=128)  # every matrix 32-wide: all kept as blocks
    path = tmp_path / "q.gguf"
    write_gguf(hf, path, arch, qtype=qtype)
    kept = load_model(path, device="cpu")
    flat = load_model(path, device="cpu", weights="float")
    assert kept.model.quantized == qtype.lower() and flat.model.quantized is None
    assert all(isinstance(w, QuantLinear) for w in kept.model.matrices())
    if hf.config.tie_word_embeddings:
        assert kept.model.lm_head is kept.model.embed  # one table, not a packed copy
    toks = torch.randint(0, hf.config.vocab_size, (1, 40))
    assert torch.equal(_logits(kept.model, toks), _logits(flat.model, toks))
    # and the rows of a 40-token pass are one-token passes' (row invariance through the model)
    assert torch.equal(_logits(kept.model, toks[:, :1]), _logits(kept.model, toks)[:, :1])


# a Q4_K_M-style mix (llama.cpp's choice per tensor, on a model every matrix of which is 256-wide):
# Q4_K mostly, Q6_K for v, down and the head, Q5_0 for k in layer 1 and Q5_1 for its up projection
# (a gate/up stack of two types), Q5_K for layer 0's gate
def _kmix(name: str, a: np.ndarray):
    if a.ndim != 2:
        return None
    layer1 = name.startswith("blk.1.")
    qt = ("q6_k" if name.endswith(("attn_v.weight", "ffn_down.weight")) or name == "output.weight"
          else "q5_0" if layer1 and name.endswith("attn_k.weight")
          else "q5_1" if layer1 and name.endswith("ffn_up.weight")
          else "q5_k" if name == "blk.0.ffn_gate.weight" else "q4_k")
    seed = sum(map(ord, name))
    return qt.upper(), _random_raw(qt, a.shape[0], a.shape[1], seed).numpy()


@pytest.mark.parametrize("kind,arch", [("llama", "llama"), ("qwen2", "qwen2")])
def test_a_k_quant_mix_gives_the_dequantized_models_logits_bitwise(tmp_path, kind, arch):
    """Every matrix kept as blocks, fused ones of two types as a `QuantStack`: logits equal the
    same file loaded as floats, and a 40-token pass's first row equals a one-token pass."""
    hf = tiny_hf_model(kind, hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=64)
    path = tmp_path / "kmix.gguf"
    write_gguf(hf, path, arch, qtype=_kmix)
    kept = load_model(path, device="cpu")
    flat = load_model(path, device="cpu", weights="float")
    m = kept.model
    assert m.quantized == "mixed" and all(isinstance(w, QuantLinear) for w in m.matrices())
    assert isinstance(m.layers[0].wqkv, QuantStack) and m.layers[0].wqkv.qtype == "q4_k+q4_k+q6_k"
    assert m.layers[1].wqkv.qtype == "q4_k+q5_0+q6_k" and m.layers[1].w_gate_up.qtype == "q4_k+q5_1"
    assert m.layers[0].w_gate_up.qtype == "q5_k+q4_k" and m.lm_head.qtype == "q6_k" and m.embed.qtype == "q4_k"
    assert torch.equal(m.layers[1].wqkv.dense(), flat.model.layers[1].wqkv.dense())
    toks = torch.randint(0, hf.config.vocab_size, (1, 40))
    assert torch.equal(_logits(m, toks), _logits(flat.model, toks))
    assert torch.equal(_logits(m, toks[:, :1]), _logits(m, toks)[:, :1])
    # int8 activations: every stack's parts take the integer products' code order together
    float_logits = _logits(m, toks)
    assert m.int8_activations() == len({id(w) for w in m.matrices()})
    assert all(p.act8 for p in m.layers[1].wqkv.parts)
    assert torch.equal(m.layers[1].wqkv.dense(), flat.model.layers[1].wqkv.dense())
    got = _logits(m, toks)
    assert torch.equal(_logits(m, toks[:, :1]), got[:, :1])
    assert 0 < ((got - float_logits).norm() / float_logits.norm()).item() < 0.05


def test_block_types_the_kernel_does_not_keep_are_named_and_a_file_too_big_is_refused(tmp_path, monkeypatch, caplog):
    import logging

    from tokenswift import loading

    hf = tiny_hf_model("llama", hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=64)
    path = tmp_path / "q2k.gguf"
    mix = lambda name, a: (("Q2_K", _random_raw("q2_k", a.shape[0], a.shape[1], 5).numpy())  # noqa: E731
                           if name.endswith("ffn_down.weight") else _kmix(name, a))
    write_gguf(hf, path, "llama", qtype=mix)
    with caplog.at_level(logging.INFO, logger="tokenswift"):
        m = load_model(path, device="cpu").model
    assert not isinstance(m.layers[0].w_down, QuantLinear) and isinstance(m.layers[0].wo, QuantLinear)
    assert "q2k.gguf: Q2_K tensors are dequantized to float32 at load (1.0 MiB; blocks the kernel keeps: " \
           "Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K)" in caplog.text
    blocks, floats = loading.gguf_memory(__import__("gguf").GGUFReader(str(path)), keep=True)
    assert floats["q2_k"] == 4 * 2 * 256 * 512 and blocks["q6_k"] > 0
    need = sum(blocks.values()) + sum(floats.values())
    monkeypatch.setattr(loading, "available_memory", lambda device: need - 1)
    with pytest.raises(ValueError, match=r"^q2k\.gguf needs [0-9.]+ MiB of memory \(Q4_K [0-9.]+ MiB as blocks, .*Q6_K "
                                         r"[0-9.]+ MiB as blocks, F32 [0-9.]+ MiB as float32, Q2_K 1\.0 MiB as float32\) "
                                         r"and [0-9.]+ MiB are available$"):
        load_model(path, device="cpu")
    monkeypatch.setattr(loading, "available_memory", lambda device: need)
    load_model(path, device="cpu")


def test_gguf_matrices_the_kernel_cannot_keep_are_dequantized(tmp_path):
    hf = tiny_hf_model("llama")  # intermediate 112: the down projection's width is not a block multiple
    path = tmp_path / "mixed.gguf"
    write_gguf(hf, path, "llama", qtype="Q8_0")
    kept = load_model(path, device="cpu")
    L = kept.model.layers[0]
    assert isinstance(L.wqkv, QuantLinear) and not isinstance(L.w_down, QuantLinear)
    toks = torch.randint(0, hf.config.vocab_size, (1, 24))
    assert torch.equal(_logits(kept.model, toks), _logits(load_model(path, device="cpu", weights="float").model, toks))


def test_weights_q8_0_quantizes_a_float_checkpoint_as_llamacpp_would(tmp_path, tiny_dir):
    hf = tiny_hf_model("llama", intermediate_size=128)
    d = tmp_path / "hf"
    hf.save_pretrained(d)
    path = tmp_path / "q8.gguf"
    write_gguf(hf, path, "llama", qtype="Q8_0")
    ours = load_model(d, device="cpu", weights="q8_0")
    assert ours.model.quantized == "q8_0"
    toks = torch.randint(0, hf.config.vocab_size, (1, 32))
    # the same blocks as the GGUF file written from the same weights
    assert torch.equal(_logits(ours.model, toks), _logits(load_model(path, device="cpu").model, toks))
    # a float checkpoint keeps its floats unless asked
    assert load_model(d, device="cpu").model.quantized is None


def test_weights_q4_0_keeps_the_embedding_and_head_at_q8_0(tmp_path):
    hf = tiny_hf_model("llama", intermediate_size=128)
    d = tmp_path / "hf"
    hf.save_pretrained(d)
    m = load_model(d, device="cpu", weights="q4_0").model
    assert m.quantized == "mixed"
    assert m.layers[0].wqkv.qtype == "q4_0" and m.layers[1].w_down.qtype == "q4_0"
    assert m.embed.qtype == "q8_0" and m.lm_head.qtype == "q8_0"
    # the same model as the float checkpoint of those blocks' dequantized weights, bit for bit
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if p.dim() == 2:
                qt = "q8_0" if name in ("model.embed_tokens.weight", "lm_head.weight") else "q4_0"
                p.copy_(Blocks.quantize(p.data, qt).dequantize())
    d2 = tmp_path / "hf-dequantized"
    hf.save_pretrained(d2)
    toks = torch.randint(0, hf.config.vocab_size, (1, 16))
    assert torch.equal(_logits(m, toks), _logits(load_model(d2, device="cpu").model, toks))


def test_weights_value_is_checked():
    with pytest.raises(ParamError, match=r"weights must be one of auto, float, q8_0, q4_0, got 'int3'"):
        load_model("smollm2-135m", weights="int3")


def test_blocks_without_native_kernels():
    """TOKENSWIFT_NATIVE=0: a GGUF's blocks are dequantized (auto), and asking for q8_0 is an
    error that says why."""
    code = (
        "from tokenswift.loading import load_model\n"
        "from tokenswift.params import ParamError\n"
        "m = load_model('smollm2-135m', tokenizer=False)\n"
        "print(m.model.quantized)\n"
        "try:\n    load_model('smollm2-135m', weights='q8_0')\n"
        "except ParamError as e:\n    print(e)\n"
    )
    env = {**os.environ, "TOKENSWIFT_NATIVE": "0"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "None"
    assert lines[1] == "weights 'q8_0' needs the native CPU kernels, which are off here (TOKENSWIFT_NATIVE=0)"


def _write_random_gguf(path, hidden: int, inter: int, layers: int, heads: int, kv_heads: int, vocab: int,
                       qtype_of=lambda name: "q4_0"):
    """A Llama of the given shape as a GGUF with random blocks of `qtype_of(name)` per matrix
    (small float16 scales, random codes and scale bytes), written tensor by tensor so that the
    test never holds the whole file."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(layers)
    w.add_context_length(4096)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(inter)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    dh = hidden // heads
    mats = {"token_embd.weight": (vocab, hidden), "output.weight": (vocab, hidden)}
    for i in range(layers):
        mats.update({f"blk.{i}.attn_q.weight": (hidden, hidden), f"blk.{i}.attn_k.weight": (kv_heads * dh, hidden),
                     f"blk.{i}.attn_v.weight": (kv_heads * dh, hidden), f"blk.{i}.attn_output.weight": (hidden, hidden),
                     f"blk.{i}.ffn_gate.weight": (inter, hidden), f"blk.{i}.ffn_up.weight": (inter, hidden),
                     f"blk.{i}.ffn_down.weight": (hidden, inter)})
    norms = ["output_norm.weight"] + [f"blk.{i}.{n}" for i in range(layers) for n in ("attn_norm.weight", "ffn_norm.weight")]
    types = {name: qtype_of(name) for name in mats}
    for name, (n, k) in mats.items():
        t = getattr(gguf.GGMLQuantizationType, types[name].upper())
        inputs, nbytes = gguf.GGML_QUANT_SIZES[t]
        w.add_tensor_info(name, (n, k // inputs * nbytes), np.dtype(np.uint8), n * k // inputs * nbytes, raw_dtype=t)
    for name in norms:
        w.add_tensor_info(name, (hidden,), np.dtype(np.float32), hidden * 4)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    rng = np.random.default_rng(0)
    # scales that keep |w| below ~0.06 for every type (d * sc * q at its largest)
    scale = {"q4_0": 2**-10, "q8_0": 2**-14, "q5_0": 2**-10, "q4_k": 2**-14, "q6_k": 2**-16}
    for name, (n, k) in mats.items():  # in the order of the infos: one tensor in memory at a time
        qt = types[name]
        inputs, nbytes = gguf.GGML_QUANT_SIZES[getattr(gguf.GGMLQuantizationType, qt.upper())]
        b = rng.integers(0, 256, size=(n, k // inputs, nbytes), dtype=np.uint8)
        f16 = np.frombuffer(np.float16(scale[qt]).tobytes(), dtype=np.uint8)
        for at in F16_FIELDS[qt]:
            b[:, :, at : at + 2] = f16
        w.write_tensor_data(b.reshape(n, -1))
    for name in norms:
        w.write_tensor_data(np.ones(hidden, dtype=np.float32))
    w.close()


def _q4_k_m(layers: int):
    """llama.cpp's Q4_K_M choice per tensor (more bits for v and down in the first and last
    eighth of the layers and every third between, Q6_K for the output), with layer 0's k as
    Q5_0 so that the file holds each type such a file has."""
    def more_bits(i: int) -> bool:
        return i < layers // 8 or i >= 7 * layers // 8 or (i - layers // 8) % 3 == 2

    def qtype_of(name: str) -> str:
        if name == "output.weight":
            return "q6_k"
        if name == "blk.0.attn_k.weight":
            return "q5_0"
        if name.endswith(("attn_v.weight", "ffn_down.weight")) and more_bits(int(name.split(".")[1])):
            return "q6_k"
        return "q4_k"

    return qtype_of


@pytest.mark.slow
def test_a_7b_q4_0_gguf_loads_and_writes_tokens_in_6_gb(tmp_path):
    path = tmp_path / "llama-7b-shape-q4_0.gguf"
    _write_random_gguf(path, hidden=4096, inter=11008, layers=32, heads=32, kv_heads=32, vocab=32000)
    code = (
        "import resource, sys, tokenswift\n"
        f"lm = tokenswift.load({str(path)!r}, heads='none', drafter='none')\n"
        "print(lm.model.quantized)\n"
        "out = lm.generate([1, 2, 3, 4, 5, 6, 7, 8], max_new_tokens=4, method='ar', temperature=0)\n"
        "print(len(out.tokens), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stderr[-2000:]
    kind, line = r.stdout.split("\n")[:2]
    n, peak_mib = map(int, line.split())
    print(f"7B-shape Q4_0: peak RSS {peak_mib} MiB")
    assert kind == "q4_0" and n == 4
    assert peak_mib <= 6 * 1024


@pytest.mark.slow
def test_a_7b_q4_k_m_gguf_loads_and_writes_tokens_in_6_5_gb(tmp_path):
    """A random Llama of 7B shape as a Q4_K_M-style mix (Q4_K, Q6_K, one Q5_0 matrix): every
    matrix kept as blocks (fused q/k/v of two types as stacks), peak RSS at most 6.5 GB."""
    path = tmp_path / "llama-7b-shape-q4_k_m.gguf"
    _write_random_gguf(path, hidden=4096, inter=11008, layers=32, heads=32, kv_heads=32, vocab=32000,
                       qtype_of=_q4_k_m(32))
    code = (
        "import resource, sys, tokenswift\n"
        "from tokenswift.kernels import QuantLinear\n"
        f"lm = tokenswift.load({str(path)!r}, heads='none', drafter='none')\n"
        "print(lm.model.quantized, all(isinstance(w, QuantLinear) for w in lm.model.matrices()))\n"
        "out = lm.generate([1, 2, 3, 4, 5, 6, 7, 8], max_new_tokens=4, method='ar', temperature=0)\n"
        "print(len(out.tokens), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stderr[-2000:]
    kinds, line = r.stdout.split("\n")[:2]
    n, peak_mib = map(int, line.split())
    print(f"7B-shape Q4_K_M mix: {path.stat().st_size / 2**30:.2f} GiB file, peak RSS {peak_mib} MiB")
    assert kinds == "mixed True" and n == 4
    assert peak_mib * 2**20 <= 6.5e9


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads RSS from /proc")
def test_the_embedded_model_loads_in_200_mb():
    """`tokenswift.load()` of the embedded SmolLM2 (Q4_1 layers, Q8_0 embedding) with its
    tokenizer and shipped heads grows a fresh process's RSS by at most 200 MB (its float32
    dequantization took ~750 MB)."""
    code = (
        "import gc, tokenswift\n"
        "from tokenswift import kernels\n"
        "import os\ndef rss(): return int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE')\n"
        "kernels.native()\n"
        "r0 = rss()\n"
        "lm = tokenswift.load('smollm2-135m'); gc.collect()\n"
        "print(lm.model.quantized, (rss() - r0) // 2**20)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    kind, mib = r.stdout.split()
    print(f"embedded model: RSS grows {mib} MiB")
    assert kind == "mixed" and int(mib) <= 200


@pytest.mark.parametrize("act8", [False, True], ids=["float", "int8"])
@pytest.mark.parametrize("qtype", QTYPES + MORE_QTYPES)
def test_a_subset_of_rows_gives_the_full_matrixs_outputs_at_them(qtype, act8):
    """`subset(ids)`: the rows alone, still blocks (the draft's head over part of the vocabulary):
    its outputs are the whole matrix's at those rows, bit for bit, for 1 and 5 input rows, with
    float or int8 activations (the codes in their order); the float panels' subset likewise."""
    w, b, x, ql, wd = _case(qtype, (300, 256 if qtype in KQUANTS else 96), seed=7)
    ql.act8 = act8
    ids = torch.tensor([0, 1, 47, 48, 49, 95, 96, 150, 299, 17])
    sub = ql.subset(ids)
    assert sub.act8 == act8
    assert sub.shape == (10, wd.shape[1]) and torch.equal(sub.dense(), wd[ids])
    for M in (1, 5):
        assert torch.equal(sub.matmul(x[:M]), ql.matmul(x[:M])[:, ids])
    pl = PackedLinear(wd)
    assert torch.equal(pl.subset(ids).matmul(x[:3]), pl.matmul(x[:3])[:, ids])
    with pytest.raises(RuntimeError, match=r"row 300 outside \[0, 300\)"):
        ql.subset(torch.tensor([3, 300]))
