"""Instruction levels: the kernels' run-time dispatch (`TOKENSWIFT_ISA`), and the same bits on
every level the machine has. Each level is a build of the same sources with its own flags; the
AVX-512 one multiplies 16 outputs a vector and sums int8 blocks by VNNI, so its results must
equal the AVX2 build's bit for bit, and each must be row-invariant on its own."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from test_quant_weights import MORE_QTYPES, QTYPES, _random_raw
from tokenswift import kernels
from tokenswift.kernels import QTYPES as KERNEL_QTYPES

pytestmark = pytest.mark.skipif(not kernels.native(), reason=f"native kernels off: {kernels.why_not()}")

AVX2 = {"avx2", "fma", "f16c"}
AVX512 = AVX2 | {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni"}
AMX = AVX512 | {"amx_tile", "amx_int8", "amx_bf16"}


@pytest.fixture(scope="module")
def levels():
    """Every level this CPU runs -> its op namespace (each built once), and where it runs avx512,
    `amx_emu` (the AMX unit with its tile instructions modelled: its layout checked everywhere)."""
    present = kernels.levels_present()
    return {lv: kernels.load_level(lv) for lv in present + (["amx_emu"] if "avx512" in present else [])}


def _two(levels):
    if len(levels) < 2:
        pytest.skip(f"this CPU runs one instruction level ({', '.join(levels)}): no second to compare")
    return list(levels.items())


@pytest.mark.parametrize("flags, cap, env, want, why", [
    (AVX512, "AVX512", "", "avx512", ""),
    (AVX512, "AVX512", "avx2", "avx2", ""),
    (AVX512, "AVX512", "AVX512", "avx512", ""),
    (AVX2, "AVX2", "", "avx2", ""),
    (AVX2, "AVX2", "avx512", None, "TOKENSWIFT_ISA=avx512: this CPU lacks it (it has: avx2)"),
    (AVX512, "AVX2", "", "avx2", ""),  # the flags, but an OS that does not save 512-bit registers
    (AMX, "AVX512", "", "amx", ""),
    (AMX, "AVX512", "avx512", "avx512", ""),
    (AMX | {"no_amx_permit"}, "AVX512", "", "avx512", ""),  # Linux refuses the tile state
    (AMX | {"no_amx_permit"}, "AVX512", "amx", None, "TOKENSWIFT_ISA=amx: this CPU lacks it (it has: avx2, avx512)"),
    (AMX, "AVX2", "", "avx2", ""),
    (AVX512, "AVX512", "amx", None, "TOKENSWIFT_ISA=amx: this CPU lacks it (it has: avx2, avx512)"),
    (AVX512, "AVX512", "sse4", None, "TOKENSWIFT_ISA='sse4' is not one of avx2, avx512, amx"),
    (AVX512, "AVX512", "amx_emu", None, "TOKENSWIFT_ISA='amx_emu' is not one of avx2, avx512, amx"),
    ({"sse4_2"}, "DEFAULT", "", None, "no AVX2"),
])
def test_dispatch_picks_the_best_level_present_and_honours_TOKENSWIFT_ISA(monkeypatch, flags, cap, env, want, why):
    """AMX is a level only where the CPU has the tile flags and Linux grants the process the tile
    state (`amx_permitted`; `no_amx_permit` stands for a refusal here)."""
    monkeypatch.setattr(kernels, "amx_permitted", lambda: "no_amx_permit" not in flags)
    monkeypatch.setattr(kernels, "cpu_flags", lambda: set(flags) - {"no_amx_permit"})
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: cap)
    monkeypatch.setenv("TOKENSWIFT_ISA", env)
    level, reason = kernels.chosen_level()
    assert level == want
    assert why in reason and (reason == "") == (want is not None)


def test_the_level_in_use_is_reported():
    level, _ = kernels.chosen_level()
    assert kernels.isa() == level and level in kernels.LEVELS
    want = os.environ.get("TOKENSWIFT_ISA") or kernels.levels_present()[-1]
    assert kernels.isa() == want.lower()


def test_use_level_switches_the_ops_and_the_name_stats_give(monkeypatch, levels):
    """What the A/B benchmarks call between levels: later calls run that build, `isa()` names it."""
    monkeypatch.setattr(kernels, "ops", kernels.ops)
    monkeypatch.setitem(kernels._state, "level", kernels.isa())
    for lv in (lv for lv in levels if lv in kernels.LEVELS):
        kernels.use_level(lv)
        assert kernels.ops is levels[lv] and kernels.isa() == lv
    with pytest.raises(ValueError, match="instruction level must be one of avx2, avx512, amx, got 'amx_emu'"):
        kernels.use_level("amx_emu")  # a test build, never a model's
    lacks = [lv for lv in kernels.LEVELS if lv not in kernels.levels_present()]
    for lv in lacks:  # its first instruction would kill the process
        with pytest.raises(ValueError, match=f"instruction level '{lv}': this CPU lacks it"):
            kernels.use_level(lv)


class _Skewed:
    """A level's ops whose many-row int8 products are off by one: tile code gone wrong."""

    def __init__(self, ops):
        self._ops = ops

    def __getattr__(self, name):
        return getattr(self._ops, name)

    def qlinear(self, x, *a):
        y = self._ops.qlinear(x, *a)
        return y + 1 if x.shape[0] >= 4 else y


def test_amx_tiles_that_disagree_with_their_rows_alone_are_not_used(monkeypatch, levels, caplog):
    """The guard run before a level with tiles takes a model: the modelled tiles pass it; tiles
    whose 16-row product differs from the rows alone leave the avx512 level running, with a warning."""
    if "amx_emu" not in levels:
        pytest.skip("no avx512 level on this CPU")
    assert kernels.amx_disagrees(levels["amx_emu"]) == ""
    assert kernels.amx_disagrees(_Skewed(levels["amx_emu"])).startswith("a 16-row int8 product differs")
    monkeypatch.setattr(kernels, "ops", kernels.ops)
    monkeypatch.setattr(kernels, "_state", {})
    monkeypatch.delenv("TOKENSWIFT_ISA", raising=False)
    monkeypatch.setattr(kernels, "chosen_level", lambda: ("amx", ""))
    monkeypatch.setattr(kernels, "amx_check", lambda: kernels.amx_disagrees(_Skewed(levels["amx_emu"])))
    monkeypatch.setattr(kernels, "load_level", lambda lv: _Skewed(levels["amx_emu"]) if lv == "amx" else levels[lv])
    with caplog.at_level("WARNING", logger="tokenswift"):
        assert kernels.native()
    assert kernels.isa() == "avx512" and kernels.ops is levels["avx512"]
    assert "AMX kernels not used: a 16-row int8 product differs from its rows alone" in caplog.text


def test_the_amx_check_runs_the_tiles_in_a_child_that_may_die(levels):
    """On a CPU without AMX the check's child dies on its first tile instruction and the guard
    says so (instead of this process dying); with AMX it passes and marks the build."""
    if "avx512" not in levels:
        pytest.skip("the amx build's child needs AVX-512 to reach its tiles")
    why = kernels.amx_check()
    if "amx" in kernels.levels_present():
        assert why == "" and (kernels.build_dir("amx") / "tiles-checked").exists()
    else:
        assert why == "the tiles' check process was killed by SIGILL"
        assert not (kernels.build_dir("amx") / "tiles-checked").exists()


def test_a_level_the_cpu_lacks_turns_the_kernels_off_with_the_reason():
    """In a fresh process: TOKENSWIFT_ISA naming something unavailable is refused in one log line,
    and a GGUF model (which needs the kernels) says why in its error."""
    code = ("import logging; logging.basicConfig(level=logging.INFO)\n"
            "from tokenswift import kernels\n"
            "print(kernels.native(), kernels.isa())\n")
    lacks = [lv for lv in kernels.LEVELS if lv not in kernels.levels_present()]
    if not lacks:
        pytest.skip("this CPU runs every level")
    env = {**os.environ, "TOKENSWIFT_ISA": lacks[-1]}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["False", "torch"]
    assert f"native CPU kernels off: TOKENSWIFT_ISA={lacks[-1]}: this CPU lacks it (it has: " in r.stderr


def _weights(qtype: str, N: int, K: int, seed: int):
    if qtype == "f32":
        return 0.05 * torch.randn(N, K, generator=torch.Generator().manual_seed(seed))
    return _random_raw(qtype, N, K, seed) if qtype in MORE_QTYPES else \
        _random_raw_q(qtype, N, K, seed)


def _random_raw_q(qtype: str, N: int, K: int, seed: int) -> torch.Tensor:
    import gguf

    w = 0.05 * torch.randn(N, K, generator=torch.Generator().manual_seed(seed))
    t = getattr(gguf.GGMLQuantizationType, qtype.upper())
    return torch.from_numpy(gguf.quants.quantize(w.numpy(), t))


def _matmul(ops, qtype: str, raw, N: int, K: int, x, b, act8: bool):
    if qtype == "f32":
        return ops.linear(x, ops.pack_linear(raw), N, b)
    qt = KERNEL_QTYPES[qtype]
    qt |= kernels.ACT8 if act8 else 0  # int8 activations read panels packed in their code order
    return ops.qlinear(x, ops.pack_q(raw, qt, K), qt, N, b)


CASES = [(q, False) for q in ["f32"] + QTYPES + MORE_QTYPES] + [(q, True) for q in QTYPES + MORE_QTYPES]


@pytest.mark.parametrize("qtype, act8", CASES, ids=[f"{q}{'-act8' if a else ''}" for q, a in CASES])
def test_matmuls_are_row_invariant_on_every_level_and_equal_across_levels(levels, qtype, act8):
    """Rows 1, 2, 3, 8, 17, 64 of a pass equal one-row passes on each level, and every level
    gives the same bits (int8 activations: integer block sums, then the same float epilogue)."""
    K = 512 if qtype in ("q4_k", "q5_k", "q6_k") else 160
    N = 100  # three panels, the last one part empty
    raw = _weights(qtype, N, K, seed=7)
    g = torch.Generator().manual_seed(3)
    x, b = torch.randn(64, K, generator=g), torch.randn(N, generator=g)
    x[5, :32] = 0.0  # an all-zero block of activations
    out = {}
    for lv, ops in levels.items():
        rows = torch.cat([_matmul(ops, qtype, raw, N, K, x[i : i + 1], b, act8) for i in range(64)])
        for M in (1, 2, 3, 8, 17, 64):
            assert torch.equal(_matmul(ops, qtype, raw, N, K, x[:M], b, act8), rows[:M]), f"{lv}, M={M}"
        out[lv] = rows
    ref = next(iter(out.values()))
    assert torch.isfinite(ref).all()
    for lv, y in out.items():
        assert torch.equal(y, ref), f"{lv} differs from {next(iter(out))}"


@pytest.mark.parametrize("dtype, D", [(torch.float32, 64), (torch.bfloat16, 64), (torch.float16, 64),
                                      (torch.int8, 64), (torch.int8, 128), (torch.int8, 32)],
                         ids=lambda d: str(d).removeprefix("torch."))
def test_attention_gives_the_same_bits_on_every_level(levels, dtype, D):
    """int8 K/V: AVX-512 scores 16 keys a block, keys in lanes (vpdpbusd), where D % 64 == 0;
    AVX2 pairs rows and keys (maddubs) and sums across lanes: the same integers."""
    (l0, o0), *rest = _two(levels)
    g = torch.Generator().manual_seed(1)
    B, T, H, KH, S = 1, 9, 8, 2, 700
    q = torch.randn(B, T, H, D, generator=g) * 0.3
    k = torch.randn(B, KH, S, D, generator=g)
    v = torch.randn(B, KH, S, D, generator=g)
    ks = vs = None
    if dtype == torch.int8:
        k8, ks = kernels.quantize_q8_reference(k)
        v8, vs = kernels.quantize_q8_reference(v)
        k, v = k8, v8
    else:
        k, v = k.to(dtype), v.to(dtype)
    parents = [-1, 0, 0, 1, 1, 2, 3, 3, 5]
    mask = torch.zeros(1, T, T, dtype=torch.bool)
    for i, p in enumerate(parents):
        mask[0, i, i] = True
        while p >= 0:
            mask[0, i, p] = True
            p = parents[p]
    starts = torch.tensor([[100, 100, 120, 130, 130, 140, 150, 160, 170]])
    for m, st in ((None, None), (mask, None), (mask, starts)):
        want = o0.attention(q, k, v, m, kernels.CHUNK, True, ks, vs, st)
        for lv, ops in rest:
            got = ops.attention(q, k, v, m, kernels.CHUNK, True, ks, vs, st)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), lv


@pytest.mark.parametrize("S, budget, dims, H, KH, D", [
    (3000, 150, 16, 9, 3, 64),  # SmolLM2's heads; spans of 2,048 entries, the last part of one
    (9000, 2000, 16, 9, 3, 64),  # a budget the sample's floor can undershoot
    (700, 1, 8, 9, 3, 64),
    (333, 50, 12, 12, 4, 32),  # entries off a block of 64 and 32: the one-at-a-time tail
    (5000, 250, 32, 8, 1, 256),  # Gemma 3's head_dim, eight rows a KV head
])
def test_the_sparse_draft_chooses_the_same_rows_on_every_level(levels, S, budget, dims, H, KH, D):
    """`sparse_select_dims` (VNNI and 16-wide exps on AVX-512, maddubs and 8-wide on AVX2):
    the same integer scores, the same float32 operations per entry and the same sums, hence the
    same rows, on queries with and without a dominant dimension."""
    from tokenswift.cache import SparseKV
    from tokenswift.config import ModelConfig

    (l0, o0), *rest = _two(levels)
    cfg = ModelConfig(arch="llama", vocab_size=32, hidden_size=H * D, intermediate_size=8, num_layers=1, num_heads=H,
                      num_kv_heads=KH, head_dim=D)
    g = torch.Generator().manual_seed(S + dims)
    view = SparseKV(cfg, budget=budget, sinks=16, recent=64, scorer=f"dims:{dims}")

    class Main:  # what attach reads of a cache
        k = torch.randn(1, 1, KH, S + 5, D, generator=g).to(torch.bfloat16)
        where = [(0, 0)]
    view.attach(Main, S)
    a, b = view.sinks, S - view.recent
    for scale in (0.3, 2.0):
        q = torch.randn(1, 1, H, D, generator=g) * scale
        q[0, 0, :, 3] *= 1 + 4 * (scale > 1)
        want = o0.sparse_select_dims(q, view.kq[0], view.ks[0, :, :, 0], a, b, S, budget, dims)
        assert want.shape == (KH, a + budget + S - b)
        for lv, ops in rest:
            assert torch.equal(ops.sparse_select_dims(q, view.kq[0], view.ks[0, :, :, 0], a, b, S, budget, dims),
                               want), lv


def _same_logits_on_every_level(pairs, monkeypatch, lm, ids: list[int]) -> None:
    """`_forward_logits` with each level's ops in turn: the same bits."""
    out = {}
    for lv, ops in pairs:
        monkeypatch.setattr(kernels, "ops", ops)
        out[lv] = _forward_logits(lm, ids)
    ref = out[pairs[0][0]]
    for lv, y in out.items():
        assert torch.equal(y, ref), lv


def _forward_logits(lm, ids: list[int]) -> torch.Tensor:
    """A prefill, then an 8-token causal pass on top: the logits of both."""
    from tokenswift.cache import KVCache

    m = lm.model
    t = torch.tensor([ids])
    c = KVCache(m.cfg, capacity=len(ids) + 8)
    h0 = m.prefill(t[:, :-8], c, return_all=True)  # (not the prefill memo: every level computes)
    pos = torch.arange(len(ids) - 8, len(ids)).unsqueeze(0)
    h1 = m(t[:, -8:], pos, c)
    return torch.cat([m.logits(h0[:, -16:]), m.logits(h1)], dim=1)


@pytest.mark.parametrize("activations", ["float", "int8"])
def test_a_model_gives_the_same_logits_on_every_level(levels, monkeypatch, smollm, cdne_ids, activations):
    """The embedded model (Q4_1 layers, Q8_0 embedding), every op on each level: the same bits."""
    import tokenswift

    pairs = _two(levels)
    lm = smollm if activations == "float" else tokenswift.load("smollm2-135m", activations="int8")
    ids = cdne_ids[2000:2300]
    _same_logits_on_every_level(pairs, monkeypatch, lm, ids)


@pytest.mark.parametrize("activations", ["float", "int8"])
def test_gemma3_gives_the_same_logits_on_every_level(levels, monkeypatch, activations):
    """Gemma 3 270M (Q4_K, Q5_0, Q6_K, Q8_0 blocks, stacks of two types, GELU, sliding windows):
    the same bits."""
    import tokenswift
    from tokenswift.loading import embedded_path
    from conftest import cdne_text

    pairs = _two(levels)
    try:
        embedded_path("gemma3-270m")
    except FileNotFoundError as e:
        pytest.skip(str(e))
    lm = tokenswift.load("gemma3-270m", device="cpu", activations=activations)
    ids = lm.tokenizer(cdne_text()[:6000]).input_ids[:600]  # past the 512-token window
    _same_logits_on_every_level(pairs, monkeypatch, lm, ids)


def test_sampling_draws_the_same_tokens_on_every_level(levels):
    pairs = _two(levels)
    from tokenswift.config import SamplingConfig

    g = torch.Generator().manual_seed(5)
    logits = torch.randn(6, 49152, generator=g) * 3
    window = torch.randint(0, 49152, (6, 40), generator=g)
    keys = torch.randint(0, 2**62, (6,), generator=g)
    s = SamplingConfig(temperature=0.8, top_k=0, min_p=0.05, penalty=1.1)
    got = []
    for _, ops in pairs:
        import math

        got.append(ops.sample_rows(logits, window, keys, float(s.penalty), float(s.temperature), int(s.top_k),
                                   math.log(s.min_p), True, int(s.min_keep), bool(s.greedy)))
    assert all(torch.equal(t, got[0]) for t in got)


def test_stats_and_bench_tables_name_the_level(smollm, cdne_ids):
    from tokenswift.bench import run_bench, sweep_table, table

    level = kernels.isa()
    prompt = cdne_ids[:40]
    assert smollm.generate(prompt, 4, method="ar", ignore_eos=True).stats["kernels"] == level
    res = run_bench(smollm, prompt, [4], ["ar", "tokenswift"])
    assert all(r["kernels"] == level for r in res["records"])
    head, _, *rows = table(res).splitlines()
    assert head.endswith("| kernels |") and len(rows) == 2 and all(r.endswith(f"| {level} |") for r in rows)
    for r in res["records"]:
        r["context"] = 40
    res["sweep"] = True
    assert all(r.endswith(f"| {level} |") for r in sweep_table(res).splitlines()[2:])
