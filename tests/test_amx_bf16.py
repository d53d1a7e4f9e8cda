"""bfloat16 attention in AMX's order (`attention_dtype="bfloat16-amx"`): the tiles' instruction
against the order the Intel SDM gives it (on the `amx_emu` model everywhere `avx512` runs, and on
the real tiles where the CPU has AMX), the attention kernel's tile path against its vector path
bit for bit, row invariance, and ar == tokenswift under it."""

from __future__ import annotations

import pytest
import torch

from tokenswift import kernels

pytestmark = pytest.mark.skipif(not kernels.native(), reason=f"native kernels off: {kernels.why_not()}")


@pytest.fixture(scope="module")
def levels():
    """The levels with AVX-512 this CPU runs, and `amx_emu` beside them -> their op namespaces."""
    present = kernels.levels_present()
    if "avx512" not in present:
        pytest.skip(f"bfloat16-amx runs on the avx512 and amx levels; this CPU runs {', '.join(present)}")
    return {lv: kernels.load_level(lv) for lv in [lv for lv in present if lv != "avx2"] + ["amx_emu"]}


def _tiles(M, N, K, seed):
    """Operands on which the order of a tile's sums shows: products of mixed sizes and signs that
    cancel, a few denormal inputs (read as zero) and a running sum that starts large."""
    g = torch.Generator().manual_seed(seed)
    a = (torch.randn(M, 2 * K, generator=g) * torch.exp2(torch.randint(-12, 12, (M, 2 * K), generator=g).float()))
    b = (torch.randn(K, 2 * N, generator=g) * torch.exp2(torch.randint(-12, 12, (K, 2 * N), generator=g).float()))
    a[0, 0] = 1e-39  # a float32 denormal, still one as bfloat16
    b[0, 1] = -3e-39
    c = torch.randn(M, N, generator=g) * 1e3
    return c, a.bfloat16(), b.bfloat16()


def _other_orders(c, a, b):
    """Two orders the SDM's is not: one chain over every element, and pairs summed first."""
    A, B = a.double().float(), b.double().float()
    M, N, K = c.shape[0], c.shape[1], b.shape[0]
    chain = c.clone()
    pairs = torch.zeros_like(c)
    for k in range(K):
        for e in (0, 1):
            chain = chain + A[:, 2 * k + e, None] * B[k, e::2][None, :]
        pairs = pairs + (A[:, 2 * k, None] * B[k, 0::2][None, :] + A[:, 2 * k + 1, None] * B[k, 1::2][None, :])
    return chain, c + pairs


@pytest.mark.parametrize("M, N, K", [(16, 16, 16), (3, 16, 16), (16, 3, 16), (5, 7, 9), (1, 1, 1)])
def test_one_tile_product_sums_in_the_order_the_sdm_gives(levels, M, N, K):
    """On `amx_emu` this holds the model to an independent torch writing of the SDM's pseudocode;
    on a CPU with AMX (the `amx` level) it holds the instruction itself to it."""
    tiled = {lv: ops for lv, ops in levels.items() if lv in ("amx", "amx_emu")}
    for seed in range(4):
        c, a, b = _tiles(M, N, K, seed)
        want = kernels.tile_dpbf16ps_reference(c, a, b)
        if M * N * K >= 16 * 16 and seed == 0:  # the operands tell the orders apart, so this test can fail
            assert not any(torch.equal(want, o) for o in _other_orders(c, a, b))
        for lv, ops in tiled.items():
            got = ops.tile_dpbf16ps(c, a, b)
            assert torch.equal(got, want), f"{lv}, seed {seed}: max |diff| {(got - want).abs().max().item():.3g}"


def test_levels_without_tiles_say_so(levels):
    with pytest.raises(RuntimeError, match="this build has no AMX-BF16 tiles"):
        levels["avx512"].tile_dpbf16ps(torch.zeros(1, 1), torch.zeros(1, 2).bfloat16(), torch.zeros(1, 2).bfloat16())


def _attend(ops, q, k, v, mask=None, amx=True):
    return ops.attention(q, k, v, mask, 256, False, None, None, None, True, amx)[0]


TREE = torch.tensor([[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 0, 1, 0, 0, 0], [1, 1, 0, 1, 0, 0],
                     [1, 0, 1, 0, 1, 0], [1, 1, 0, 1, 0, 1]], dtype=torch.bool)[None]


@pytest.mark.parametrize("T, H, KH, S, D, tree", [
    (1, 9, 3, 700, 64, False),   # SmolLM2's heads, one token
    (5, 9, 3, 1300, 64, False),  # a causal pass: shared prefix chunks and each row's tail
    (6, 9, 3, 900, 64, True),    # a verify pass over a trie
    (3, 4, 1, 600, 256, False),  # Gemma 3's head_dim
    (16, 8, 2, 520, 32, False),  # 16 new tokens, 4 query heads a KV head
    (1, 9, 3, 17, 64, False),    # fewer keys than a tile
])
def test_attention_in_amx_order_is_the_same_on_tiles_and_vectors_and_row_invariant(levels, T, H, KH, S, D, tree):
    g = torch.Generator().manual_seed(T * 1000 + S)
    q = torch.randn(1, T, H, D, generator=g) * 0.2
    k = torch.randn(1, KH, S, D, generator=g).bfloat16()
    v = torch.randn(1, KH, S, D, generator=g).bfloat16()
    mask = TREE if tree else None
    out = {lv: _attend(ops, q, k, v, mask) for lv, ops in levels.items()}
    ref = kernels.attention_reference(q, k, v, mask, bf16=True)
    first = next(iter(out.values()))
    for lv, y in out.items():
        assert torch.equal(y, first), f"{lv} differs from {next(iter(out))}"
        assert (y - ref).abs().max().item() < 1e-4
    assert not torch.equal(first, _attend(levels["avx512"], q, k, v, mask, amx=False))  # another order
    for lv, ops in levels.items():  # each row equals its own one-token pass over its visible keys
        for t in range(T):
            seen = [i for i in range(T) if (mask[0, t, i] if tree else i <= t)]
            n = S - T
            kk = torch.cat([k[:, :, :n], k[:, :, [n + i for i in seen]]], 2)
            vv = torch.cat([v[:, :, :n], v[:, :, [n + i for i in seen]]], 2)
            alone = _attend(ops, q[:, t : t + 1], kk, vv)
            assert torch.equal(alone[0, 0], out[lv][0, t]), f"{lv}, row {t}"


def test_ar_and_tokenswift_write_the_same_text_under_bf16_amx_attention(levels, smollm, cdne_ids):
    import tokenswift

    if kernels.isa() not in ("avx512", "amx"):
        pytest.skip(f"the kernels run at {kernels.isa()} (TOKENSWIFT_ISA): bfloat16-amx needs avx512 or amx")

    lm = tokenswift.load("smollm2-135m", attention_dtype="bfloat16-amx")
    assert lm.model.attention_dtype == "bfloat16-amx" and lm.model.kv_dtype == torch.bfloat16
    ids = cdne_ids[:400]
    for sampling in ({"temperature": 0.0}, {}):
        a = lm.generate(ids, max_new_tokens=64, method="ar", seed=5, **sampling)
        b = lm.generate(ids, max_new_tokens=64, method="tokenswift", seed=5, **sampling)
        assert len(a.tokens) == 64 and a.tokens == b.tokens


def test_bf16_amx_attention_is_refused_where_the_kernels_run_at_avx2_or_a_kv_head_has_over_16_rows(monkeypatch, tmp_path):
    """The order needs AVX-512 vectors or the tiles, and a KV head's query heads fit a tile's 16 rows;
    a load outside that is told so in one line."""
    import tokenswift
    from conftest import tiny_hf_model
    from tokenswift.params import ParamError

    tiny_dir = tmp_path / "tiny"
    tiny_hf_model("llama", seed=2, scale=0.3, max_position_embeddings=1024, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=32).save_pretrained(tiny_dir)

    monkeypatch.setattr(kernels, "isa", lambda: "avx2")
    with pytest.raises(ParamError, match=r"attention_dtype 'bfloat16-amx' runs on the avx512 and amx kernel levels, "
                                         r"and the kernels here run at avx2"):
        tokenswift.load(str(tiny_dir), heads="none", attention_dtype="bfloat16-amx")
    many = tmp_path / "many-heads"
    tiny_hf_model("llama", seed=2, scale=0.3, max_position_embeddings=1024, hidden_size=72, num_attention_heads=18,
                  num_key_value_heads=1, head_dim=32).save_pretrained(many)
    monkeypatch.setattr(kernels, "isa", lambda: "avx512")
    with pytest.raises(ParamError, match=r"attention_dtype 'bfloat16-amx' takes at most 16 query heads a KV head "
                                         r"\(a tile's rows\), and this model has 18"):
        tokenswift.load(str(many), heads="none", attention_dtype="bfloat16-amx")
