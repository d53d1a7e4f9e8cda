"""Native CPU kernels: a thin face over the C++ sources beside it, one per kernel family
(`attention.cpp`, `linear.cpp`, `layer.cpp`, `sample.cpp`, sharing `common.h` and `amx.h`), built on
first use for the CPU's instruction level (AVX2+FMA, AVX-512 with VNNI, or that with AMX tiles:
`LEVELS`).

- `attention(q, k, v, mask)`: grouped-query attention of T new tokens over a KV cache (float32,
  bfloat16 or float16 K/V, read in place, or int8 K/V with per-row scales: the draft's copy of
  the cache), split by fixed chunks of each row's visible keys and merged in a fixed order, so
  that every row's bits equal a one-token pass's.
- `attention_rows`: one token's attention over a list of rows per KV head, read in place (the
  sparse draft's per-query selection), with `attention`'s arithmetic over those rows.
- `sparse_select_dims`: the sparse draft's choice of those rows, scored by the query group's
  largest dimensions against an int8 copy of the keys kept dimension-major.
- `quantize_q8`: K/V rows to int8 with one float32 scale per row, in place into a cache. Over
  int8 keys the scores are integer dot products with the query rows quantized the same way.
- `PackedLinear`: a float32 weight matrix packed into 48-output panels; each output is one FMA
  chain over the input in order, so a row's result does not depend on how many rows run.
- `QuantLinear`: a GGUF Q4_0/Q4_1/Q8_0 matrix kept at its size in the same panels; its codes
  are dequantized in registers to exactly the float32 weights of the file's dequantization, so
  its product equals `PackedLinear`'s on the dequantized matrix bit for bit (and is as row-invariant).
- `sample_rows` / `gumbel_at` (sample.cpp): the sampler's penalty, temperature, top-k, min-p
  and position-keyed Gumbel-max draw in one call per row, the arithmetic of `sampling.py`'s.
- `attn_in` / `attn_out_mlp`: a decoder layer's two halves around attention in one call each
  (norms, the matmuls of either weight form, RoPE, the cache write; the output projection,
  residuals and the SiLU MLP), row by row, so a decode step runs two calls a layer (`attn_block`
  is `attn_in` then `attention`; `attn_block_sparse`, `attn_in` then the sparse draft's choice
  and `attention_rows`) instead of about ninety small torch ops. `rms_norm` is their norm alone
  (the final norm).

The extension is compiled once per torch version and source (about a minute on 2 cores) into
`$TOKENSWIFT_CACHE` (default `~/.cache/tokenswift`) and loaded from there afterwards. Where it
cannot be built or used — not x86-64 with AVX2+FMA, no C++ compiler or ninja, a failed build,
`TOKENSWIFT_NATIVE=0` — `native()` is False, one log line says why, and the model runs its torch
paths. The `*_reference` functions are what the kernels are tested against.
"""

from __future__ import annotations

import hashlib
import logging
import math
import mmap
import os
import platform
import shutil
import threading
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

log = logging.getLogger("tokenswift")

# Keys per attention chunk (by ordinal in a row's visible keys): chunks fully inside the cache are
# shared by all rows of a KV head; 256 gives 2 threads enough chunks from 1K context on.
CHUNK = 256

_SOURCES = [Path(__file__).with_name(f) for f in ("attention.cpp", "linear.cpp", "layer.cpp", "sample.cpp")]
_HEADERS = [Path(__file__).with_name(f) for f in ("common.h", "amx.h")]
_COMMON = ["-O3", "-ffp-contract=off", "-fopenmp"]
# One build of the sources per instruction level, each with its own flags and its own op
# namespace (torch.ops.tokenswift_<level>), so a process can hold two levels side by side (the
# tests compare them). `cpu` flags each level needs, as /proc/cpuinfo names them. The AVX-512
# unit adds 16-wide float tiles and VNNI int8 tiles (linear.cpp's `#if` blocks); the AMX unit is
# the AVX-512 one whose int8-activation matmuls of 4 rows and more run on AMX tiles (amx.h); the
# rest is the same source, so the same bits.
_AVX512 = ("-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni")
_AVX512_CPU = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni")
LEVELS: dict[str, dict[str, tuple[str, ...]]] = {
    "avx2": {"flags": ("-mavx2", "-mfma", "-mf16c"), "cpu": ("avx2", "fma", "f16c")},
    "avx512": {"flags": _AVX512, "cpu": _AVX512_CPU},
    "amx": {"flags": _AVX512 + ("-mamx-tile", "-mamx-int8"), "cpu": _AVX512_CPU + ("amx_tile", "amx_int8")},
}
# Builds for the tests only, never chosen to run a model: `amx_emu` is the `amx` unit with the tile
# instructions modelled in AVX-512 code (amx.h), so that its layout is checked where the CPU has
# no AMX; it runs wherever `avx512` does.
TEST_LEVELS: dict[str, dict[str, tuple[str, ...]]] = {
    "amx_emu": {"flags": _AVX512 + ("-DTS_AMX_EMU",), "cpu": _AVX512_CPU},
}
# Instructions a level uses where the CPU has them (a /proc/cpuinfo flag -> compiler flags), with
# a plain path of the same bits where it lacks them: vdpbf16ps for bfloat16 attention (`bf16`).
_OPTIONAL = {"avx512": {"avx512_bf16": ("-mavx512bf16",)},
             "amx": {"avx512_bf16": ("-mavx512bf16",), "amx_bf16": ("-mamx-bf16",)},
             "amx_emu": {"avx512_bf16": ("-mavx512bf16",)}}


def level_flags(level: str) -> list[str]:
    """The compiler flags of `level`'s build on this CPU."""
    have = cpu_flags()
    extra = [f for flag, fs in _OPTIONAL.get(level, {}).items() if flag in have for f in fs]
    return list({**LEVELS, **TEST_LEVELS}[level]["flags"]) + extra


_lock = threading.Lock()
_state: dict[str, object] = {}  # "ok": bool, "why": str, "level": str
_built: dict[str, object] = {}  # level -> its op namespace
ops = None  # the chosen level's op namespace (torch.ops.tokenswift_<level>) once `native()` is True


def cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux lists them (empty where /proc/cpuinfo is absent)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def amx_permitted() -> bool:
    """Whether Linux lets this process use the AMX tile state: it must be asked for once per process
    (arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)); without it the first tile instruction
    kills the process."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        sys_arch_prctl, arch_req_xcomp_perm, xfeature_xtiledata = 158, 0x1023, 18
        return libc.syscall(sys_arch_prctl, arch_req_xcomp_perm, xfeature_xtiledata) == 0
    except (OSError, AttributeError):
        return False


def levels_present() -> list[str]:
    """The instruction levels this CPU (and its OS) can run, lowest first."""
    flags = cpu_flags()
    cap = torch.backends.cpu.get_cpu_capability()  # torch's own check, the OS's saved state included
    if not flags:  # no /proc/cpuinfo: what torch reports, AVX2 at most
        return ["avx2"] if cap in ("AVX2", "AVX512") else []
    out = [lv for lv, d in LEVELS.items() if set(d["cpu"]) <= flags]
    if cap != "AVX512":  # the OS does not save the 512-bit registers
        out = [lv for lv in out if lv == "avx2"]
    if "amx" in out and not amx_permitted():
        out.remove("amx")
    return out


def _unavailable_reason() -> str | None:
    if os.environ.get("TOKENSWIFT_NATIVE", "1") == "0":
        return "TOKENSWIFT_NATIVE=0"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"CPU architecture {platform.machine()} (the kernels are x86-64 AVX2)"
    if not levels_present():
        return f"CPU capability {torch.backends.cpu.get_cpu_capability()} (needs AVX2, FMA and F16C)"
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        return "no C++ compiler (c++) on PATH"
    try:
        import ninja  # noqa: F401  (torch's extension builder runs it)
    except ImportError:
        if shutil.which("ninja") is None:
            return "ninja is not installed (pip install ninja)"
    return None


def chosen_level() -> tuple[str | None, str]:
    """(the level the kernels run at, '') or (None, why not): the best level present, or the one
    TOKENSWIFT_ISA names when the CPU has it."""
    have = levels_present()
    want = os.environ.get("TOKENSWIFT_ISA", "").strip().lower()
    if not want:
        return (have[-1], "") if have else (None, "no AVX2")
    if want not in LEVELS:
        return None, f"TOKENSWIFT_ISA={want!r} is not one of {', '.join(LEVELS)}"
    if want not in have:
        return None, f"TOKENSWIFT_ISA={want}: this CPU lacks it (it has: {', '.join(have) or 'none'})"
    return want, ""


def build_dir(level: str = "avx2") -> Path:
    root = Path(os.environ.get("TOKENSWIFT_CACHE", Path.home() / ".cache" / "tokenswift"))
    src = b"".join(p.read_bytes() for p in _SOURCES + _HEADERS)
    flags = " ".join(_COMMON + level_flags(level))
    key = hashlib.sha256(src + flags.encode() + torch.__version__.encode()).hexdigest()[:16]
    return root / "kernels" / f"{level}-{key}"


def load_level(level: str):
    """The op namespace of one level's build (building it once): the chosen level's is `ops`;
    the tests load others beside it. Raises where the build fails."""
    if level in _built:
        return _built[level]
    from torch.utils import cpp_extension

    d = build_dir(level)
    d.mkdir(parents=True, exist_ok=True)
    if not any(d.glob("*.so")):
        log.info("building the native CPU kernels (%s) into %s (once; about a minute)", level, d)
    try:  # the PyPI wheel's binary; else the ninja found on PATH
        import ninja

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    except ImportError:
        pass
    flags = _COMMON + level_flags(level) + [f"-DTS_NS=tokenswift_{level}"]
    cpp_extension.load(name=f"tokenswift_cpu_{level}", sources=[str(p) for p in _SOURCES], extra_cflags=flags,
                       extra_ldflags=["-fopenmp"], build_directory=str(d), is_python_module=False, verbose=False)
    _built[level] = getattr(torch.ops, f"tokenswift_{level}")
    return _built[level]


def use_level(level: str) -> None:
    """Runs every later kernel call at `level` (an A/B benchmark in one process): its build
    becomes `ops` and `isa()` names it. The native kernels must be on."""
    global ops
    if not native():
        raise ValueError(f"instruction level {level!r} needs the native kernels, which are off ({why_not()})")
    if level not in LEVELS:
        raise ValueError(f"instruction level must be one of {', '.join(LEVELS)}, got {level!r}")
    if level not in levels_present():
        raise ValueError(f"instruction level {level!r}: this CPU lacks it (it has: {', '.join(levels_present())})")
    ops = load_level(level)
    _state["level"] = level


def native() -> bool:
    """Whether the native kernels are loaded (building them on the first call)."""
    global ops
    if "ok" in _state:
        return bool(_state["ok"])
    with _lock:
        if "ok" in _state:
            return bool(_state["ok"])
        why = _unavailable_reason()
        level = None
        if why is None:
            level, why = chosen_level()
            why = why or None
        if why is None:
            try:
                ops = load_level(level)
                if level == "amx" and not os.environ.get("TOKENSWIFT_ISA"):
                    bad = amx_check()
                    if bad:  # a guard for tile code first run on a new machine: the level below runs
                        log.warning("AMX kernels not used: %s; running avx512", bad)
                        level, ops = "avx512", load_level("avx512")
            except Exception as e:  # a failed build must not stop generation: the torch paths run
                why = f"the build failed ({type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else e})"
        _state["ok"] = why is None
        _state["why"] = why or ""
        _state["level"] = level if why is None else ""
        if why:
            log.info("native CPU kernels off: %s; attention and matmuls take torch's kernels", why)
        else:
            log.info("native CPU kernels on, %s (row-invariant attention and float32 matmuls)", level)
        return why is None


def amx_check() -> str:
    """'' where the `amx` build's tiles work here, else why not: `amx_disagrees` run in a child
    process (a tile fault on real hardware kills the process that takes it, which the guard must
    survive), once per build (a mark beside it records a pass)."""
    import signal
    import subprocess
    import sys

    mark = build_dir("amx") / "tiles-checked"
    if mark.exists():
        return ""
    code = ("from tokenswift import kernels\nkernels.amx_permitted()\n"
            "print(kernels.amx_disagrees(kernels.load_level('amx')) or 'same bits')\n")
    env = {**os.environ, "TOKENSWIFT_ISA": "avx512"}  # the child runs the check, not the guard again
    try:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900, env=env)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"the tiles' check did not run ({type(e).__name__})"
    if r.returncode < 0:
        return f"the tiles' check process was killed by {signal.Signals(-r.returncode).name}"
    last = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else f"exit code {r.returncode}"
    if r.returncode != 0 or last != "same bits":
        return last
    mark.write_text("the amx build's 16-row int8 product gave its rows' bits here\n", encoding="utf-8")
    return ""


def amx_disagrees(level_ops) -> str:
    """'' where a build's int8-activation matmul gives the same bits for 16 rows at once (the AMX
    tiles' path) as for each row alone (the VNNI path), else what differed: 17 small products
    (milliseconds), which `amx_check` runs in a child process before a level with tiles runs a
    model."""
    g = torch.Generator().manual_seed(0)
    N, K = 48, 64
    raw = torch.randint(0, 256, (N, K // 32, 18), dtype=torch.uint8, generator=g)
    raw[:, :, :2] = torch.tensor([0.01], dtype=torch.float16).view(torch.uint8)  # each block's scale d
    w = level_ops.pack_q(raw.reshape(N, -1), QTYPES["q4_0"] | ACT8, K)
    x = torch.randn(16, K, generator=g)
    try:
        rows = torch.cat([level_ops.qlinear(x[i : i + 1], w, QTYPES["q4_0"] | ACT8, N, None) for i in range(16)])
        whole = level_ops.qlinear(x, w, QTYPES["q4_0"] | ACT8, N, None)
    except RuntimeError as e:
        return f"a 16-row int8 product raised {e}"
    if not torch.equal(rows, whole):
        return f"a 16-row int8 product differs from its rows alone (max |diff| {(rows - whole).abs().max().item():.3g})"
    return ""


def why_not() -> str:
    """Why the native kernels are off ('' when on)."""
    native()
    return str(_state.get("why", ""))


def isa() -> str:
    """The instruction level the kernels run at ('avx2', 'avx512'), or 'torch' where they are off."""
    return str(_state["level"]) if native() else "torch"


# ---------------------------------------------------------------------------------------------
# attention
# ---------------------------------------------------------------------------------------------


def attention(
    q: torch.Tensor,  # [B, T, H, D] float32, already scaled
    k: torch.Tensor,  # [B, KH, S, D] float32/bfloat16/float16/int8, last dim contiguous; last T = new
    v: torch.Tensor,  # [B, KH, S, D]
    mask: torch.Tensor | None = None,  # [1 or B, T, T] bool among the new tokens; None = causal
    chunk: int = CHUNK,
    lse: bool = False,
    k_scale: torch.Tensor | None = None,  # [B, KH, S] float32: int8 K/V only (row = scale * int8 row)
    v_scale: torch.Tensor | None = None,  # [B, KH, S]
    kv_start: torch.Tensor | None = None,  # [B, T] int64: row t sees cached keys kv_start[b, t] .. S-T-1 only
    bf16: bool | str = False,  # bfloat16 attention (bfloat16 K/V, D % 32 == 0): see attention_reference;
    # "amx": its products summed in AMX-BF16's order (the avx512 and amx levels)
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:  # [B, T, H*D] (and [B, T, H] log-sum-exp)
    """With `kv_start` (a sliding window), each row's visible keys begin at its own start and are
    chunked from there: a row's bits equal its one-token pass over k[:, :, kv_start:]."""
    out, l = ops.attention(q, k, v, mask, chunk, lse, k_scale, v_scale, kv_start, bool(bf16), bf16 == "amx")
    return (out, l) if lse else out


def attention_rows(
    q: torch.Tensor,  # [1, 1, H, D] float32, already scaled
    k: torch.Tensor,  # [1, KH, S, D] float32/bfloat16/float16, last dim contiguous (a cache layer, in place)
    v: torch.Tensor,  # [1, KH, S, D]
    rows: torch.Tensor,  # [KH, R] int64: the entries each KV head attends to, in the order they are merged
    chunk: int = CHUNK,
) -> torch.Tensor:  # [1, 1, H*D]
    """One token's attention in which each KV head reads only its listed rows, in place (the
    sparse draft's): `attention`'s arithmetic over those rows, so it equals `attention` over a
    gathered copy of them bit for bit."""
    return ops.attention_rows(q, k, v, rows, chunk)


def sparse_select_dims(
    q: torch.Tensor,  # [1, 1, H, D] float32, already scaled
    kt: torch.Tensor,  # [KH, D, >= S] int8: a layer of the keys' int8 copy, dimension-major
    ks: torch.Tensor,  # [KH, >= S] float32: their row scales
    a: int,
    b: int,
    S: int,
    budget: int,
    dims: int,
) -> torch.Tensor:  # [KH, a + budget + S - b] int64, ascending
    """The sparse draft's rows: entries [0, a), the top `budget` of [a, b) and [b, S), per KV head.
    The top by the `dims` scorer (`SparseKV`): the `dims` dimensions where the query group's |q|
    is largest, integer dot products with the query rounded to 7 bits, each row's softmax summed
    over the group."""
    return ops.sparse_select_dims(q, kt, ks, a, b, S, budget, dims)


def quantize_q8(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> None:
    """x [B, KH, T, D] float32 (or a bfloat16/float16 cache view, widened exactly) -> q (int8,
    same shape) and scale [B, KH, T], written in place: per row scale = max|x| / 127 and
    q = round(x / scale) (0 for an all-zero row)."""
    ops.quantize_q8(x, q, scale)


def quantize_q8_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What `quantize_q8` writes, in plain torch: (q int8 [..., D], scale float32 [...])."""
    s = x.abs().amax(-1) / 127.0  # [...]
    r = torch.where(s[..., None] > 0, x / s[..., None], torch.zeros_like(x))
    return r.round().clamp(-127, 127).to(torch.int8), s


def tile_dpbf16ps_reference(c: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """What one AMX TDPBF16PS computes, in the order the Intel SDM's pseudocode gives: c float32
    [M, N] + a bfloat16 [M, 2K] times b bfloat16 [K, 2N] (row k of b: N pairs), where per output
    the even elements' products (a[m, 2k] b[k, 2n]) are summed over k in order from zero, the odd
    elements' likewise, and c + (even + odd) is the result; every step in float32, rounding to
    nearest even, denormals read and written as zero (torch's flush-denormal mode)."""
    torch.set_flush_denormal(True)  # this thread's MXCSR (FTZ and DAZ); tensors this small stay on it
    # (a product and a sum as two steps equal one FMA unless the product is denormal, which FTZ would
    # flush before the sum: operands of a model's scale, and the test's, stay far above that)
    try:
        A, B = a.float(), b.float()  # exact; each product of two bfloat16 numbers is exact in float32
        even = torch.zeros_like(c)
        odd = torch.zeros_like(c)
        for k in range(B.shape[0]):
            even = even + A[:, 2 * k, None] * B[k, 0::2][None, :]
            odd = odd + A[:, 2 * k + 1, None] * B[k, 1::2][None, :]
        return c + (even + odd)
    finally:
        torch.set_flush_denormal(False)  # torch's default (there is no getter to restore another)


def to_bf16_ftz(x: torch.Tensor) -> torch.Tensor:
    """x rounded to bfloat16 (nearest even) with |x| < 2^-126 as 0, back in x's dtype: how
    bfloat16 attention takes its query rows and probabilities."""
    x = torch.where(x.abs() < torch.finfo(torch.float32).tiny, torch.zeros_like(x), x)
    return x.float().bfloat16().to(x.dtype)


def attention_reference(q, k, v, mask=None, k_scale=None, v_scale=None, bf16=False, chunk=CHUNK):
    """The same attention in plain torch, float64: every cached key plus the new keys the mask
    allows (causal when None), softmax, weighted values; int8 K/V times their row scales (and,
    for head_dim a multiple of 32, the query rows rounded to int8 as the kernel's integer scores
    take them). With `bf16`, bfloat16 attention: the query rows rounded to bfloat16, and in each
    chunk of `chunk` visible keys the probabilities exp(s - the chunk's max) rounded to bfloat16
    where they weight the values (their sum unrounded), the chunks merged as the kernel merges
    them. -> [B, T, H*D] float32."""
    B, T, H, D = q.shape
    KH, S = k.shape[1], k.shape[2]
    G = H // KH
    if bf16:
        return _attention_reference_bf16(q, k, v, mask, chunk)
    if k_scale is not None:
        k = k.double() * k_scale.double()[..., None]
        v = v.double() * v_scale.double()[..., None]
        if D % 32 == 0:  # the kernel's integer scores: the query rows in int8 as well
            q8, qs = quantize_q8_reference(q)
            q = q8.double() * qs.double()[..., None]
    kk = k.double().repeat_interleave(G, dim=1)  # [B, H, S, D]
    vv = v.double().repeat_interleave(G, dim=1)
    s = torch.einsum("bthd,bhsd->bhts", q.double(), kk)  # [B, H, T, S]
    m = torch.ones(1, T, T, dtype=torch.bool).tril() if mask is None else mask
    allow = torch.ones(m.shape[0], T, S, dtype=torch.bool)
    allow[..., S - T :] = m
    s = s.masked_fill(~allow[:, None], float("-inf"))
    o = torch.einsum("bhts,bhsd->bthd", torch.softmax(s, -1), vv)
    return o.reshape(B, T, H * D).float()


def _attention_reference_bf16(q, k, v, mask, chunk):
    B, T, H, D = q.shape
    KH, S = k.shape[1], k.shape[2]
    n, G = S - T, H // KH
    qb = to_bf16_ftz(q).double()
    kk = k.double().repeat_interleave(G, dim=1)  # [B, H, S, D]
    vv = v.double().repeat_interleave(G, dim=1)
    m = torch.ones(1, T, T, dtype=torch.bool).tril() if mask is None else mask
    out = torch.empty(B, T, H, D, dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            new = [n + i for i in range(T) if m[0 if m.shape[0] == 1 else b, t, i]]
            vis = torch.tensor(list(range(n)) + new)  # the row's visible keys, in the order chunked
            s = torch.einsum("hd,hsd->hs", qb[b, t], kk[b][:, vis])  # [H, V]
            parts = []
            for c0 in range(0, len(vis), chunk):
                sc = s[:, c0 : c0 + chunk]
                mc = sc.amax(-1, keepdim=True)  # [H, 1]
                e = torch.exp(sc - mc)
                o = torch.einsum("hs,hsd->hd", to_bf16_ftz(e.float()).double(), vv[b][:, vis[c0 : c0 + chunk]])
                parts.append((mc, e.sum(-1, keepdim=True), o))
            M = torch.stack([p[0] for p in parts]).amax(0)  # [H, 1]
            w = [torch.exp(p[0] - M) for p in parts]
            out[b, t] = sum(wi * p[2] for wi, p in zip(w, parts)) / sum(wi * p[1] for wi, p in zip(w, parts))
    return out.reshape(B, T, H * D).float()


# ---------------------------------------------------------------------------------------------
# memory a step streams through
# ---------------------------------------------------------------------------------------------

HUGE_PAGE = 2 << 20  # x86-64's transparent huge page


def zeros_huge(shape, dtype: torch.dtype, device="cpu") -> torch.Tensor:
    """`torch.zeros` for memory a decode step streams through whole (the KV cache, large packed
    weights), allocated before the time that matters (a fault on a huge page may compact memory
    first: the draft's copies, written after the prefill, keep small pages): on Linux, fresh anonymous memory advised onto transparent huge pages (madvise
    MADV_HUGEPAGE; granted where the system's THP setting is "madvise" or "always"), aligned to
    2 MiB. Over 4 KiB pages every page costs a TLB miss a step and stops the hardware prefetchers
    at its end (SmolLM2 at 1K context, Zen 4: a step 8.7 -> 7.2 ms; docs/benchmarks.md). Its zero
    pages are faulted in by the first write, huge, so a long context's cache is touched as the
    text grows, not all at allocation. Elsewhere (another OS, a GPU, under 4 MiB) torch.zeros."""
    n = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if not _huge_pages_fit(torch.device(device), n):
        return torch.zeros(shape, dtype=dtype, device=device)
    # private anonymous memory (a shared mapping would be shmem, whose huge pages are off by default):
    # zero-filled; the tensor's buffer keeps it mapped
    mm = mmap.mmap(-1, n + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        mm.madvise(mmap.MADV_HUGEPAGE)
    except OSError:  # a kernel without THP: small pages, still zeros
        pass
    with warnings.catch_warnings():  # frombuffer warns of buffers it cannot resize: this one never is
        warnings.simplefilter("ignore")
        raw = torch.frombuffer(mm, dtype=torch.uint8)
    off = -raw.data_ptr() % HUGE_PAGE
    return raw[off : off + n].view(dtype).view(shape)


def huge_copy(t: torch.Tensor) -> torch.Tensor:
    """t (a packed weight the C++ side allocated and filled) copied onto huge pages (`zeros_huge`);
    t itself where that would not give any."""
    if not _huge_pages_fit(t.device, t.numel() * t.element_size()):
        return t
    return zeros_huge(t.shape, t.dtype).copy_(t)


def _huge_pages_fit(device: torch.device, nbytes: int) -> bool:
    """Whether `zeros_huge` can give n bytes on `device` huge pages: a CPU tensor of at least two
    (one whole 2 MiB page inside, whatever the alignment), on Linux."""
    return (device.type == "cpu" and nbytes >= 2 * HUGE_PAGE and platform.system() == "Linux"
            and hasattr(mmap, "MADV_HUGEPAGE"))


# ---------------------------------------------------------------------------------------------
# linear
# ---------------------------------------------------------------------------------------------


class PackedLinear:
    """A float32 weight [N, K] in the kernel's panel layout ([ceil(N/48), K, 48]); `matmul` is
    x @ W^T + b with each output one FMA chain over K, the same for any number of rows."""

    qt = 0  # the layer ops' weight kind: float panels

    def __init__(self, w: torch.Tensor) -> None:  # w [N, K] float32
        self.shape = tuple(w.shape)
        self.packed = huge_copy(ops.pack_linear(w.detach().float()))  # [NB, K, 48]

    def matmul(self, x: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:  # [..., K] -> [..., N]
        return ops.linear(x, self.packed, self.shape[0], b)

    def dense(self) -> torch.Tensor:  # [N, K]
        N, K = self.shape
        return self.packed.transpose(1, 2).reshape(-1, K)[:N].contiguous()

    def subset(self, ids: torch.Tensor) -> "PackedLinear":
        """The rows ids [n] (int64) alone: its outputs are this matrix's at those rows."""
        return PackedLinear(self.packed[ids // 48, :, ids % 48])


def linear_reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """x @ w^T + b in float64, rounded to float32."""
    y = F.linear(x.double(), w.double(), None if b is None else b.double())
    return y.float()


# ggml's type ids of the block formats `QuantLinear` keeps (linear.cpp's panel layouts)
QTYPES = {"q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0": 8, "q4_k": 12, "q5_k": 13, "q6_k": 14}
# added to a type id: the kernel rounds the activations to int8 (linear.cpp's qlinear_i8_impl), and
# the panels' codes lie in the order those integer products read them (linear.cpp's `put_codes`)
ACT8 = 256


class QuantLinear:
    """A weight [N, K] held as GGUF blocks (`raw`: the file's rows, uint8 [N, row bytes]),
    repacked into the kernel's panels at about the same size (the K-quants' per-256 fields
    repeated per 32 inputs, and 5- and 6-bit codes a byte each: linear.cpp). `matmul` is x @ W^T + b with W
    the file's dequantized float32 weights, each output one FMA chain over K (as `PackedLinear`);
    `rows(ids)` dequantizes rows (an embedding lookup)."""

    def __init__(self, raw: torch.Tensor, qtype: str, shape: tuple[int, int]) -> None:
        if qtype not in QTYPES:
            raise ValueError(f"quantized weights of type {qtype!r}: the kernel takes {', '.join(QTYPES)}")
        if not native():
            raise RuntimeError(f"GGUF blocks need the native CPU kernels, which are off here ({why_not()})")
        self.qtype = qtype
        self.shape = (int(shape[0]), int(shape[1]))
        self.packed = huge_copy(ops.pack_q(raw, QTYPES[qtype], self.shape[1]))  # [NB, K/32, PB] uint8
        self.dtype = torch.float32  # what it computes in and gives back
        self.device = raw.device
        self._act8 = False

    @property
    def act8(self) -> bool:
        """int8 activations (`load(activations="int8")`): each row rounded per block of 32 to
        int8 and multiplied in integers, llama.cpp's arithmetic; a different model, off by
        default. Setting it moves the panels' codes, in place, into the order those products read
        them (or back)."""
        return self._act8

    @act8.setter
    def act8(self, on: bool) -> None:
        on = bool(on)
        if on != self._act8:
            self._relayout(on)
            self._act8 = on

    def _relayout(self, on: bool) -> None:
        ops.relayout_q(self.packed, QTYPES[self.qtype], on)

    @property
    def nbytes(self) -> int:
        return self.packed.numel()

    @property
    def qt(self) -> int:  # ggml's type id, as the layer ops take it (+ ACT8 with int8 activations)
        return QTYPES[self.qtype] | (ACT8 if self.act8 else 0)

    def matmul(self, x: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:  # [..., K] -> [..., N]
        return ops.qlinear(x, self.packed, self.qt, self.shape[0], b)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:  # [...] int -> [..., K] float32
        return ops.qrows(self.packed, self.qt, self.shape[0], ids)

    def dense(self) -> torch.Tensor:  # [N, K]
        return self.rows(torch.arange(self.shape[0]))

    def subset(self, ids: torch.Tensor) -> "QuantLinear":
        """The rows ids [n] (int64) alone, still blocks: its outputs are this matrix's at those rows."""
        sub = object.__new__(QuantLinear)
        sub.qtype, sub.shape, sub.dtype, sub.device, sub._act8 = self.qtype, (int(ids.numel()), self.shape[1]), \
            self.dtype, self.device, self.act8
        # (not copied onto huge pages: the draft's head is rebuilt as the text's vocabulary grows)
        sub.packed = ops.pack_q_rows(self.packed, self.qt, self.shape[0], ids)  # in this matrix's code order
        return sub


MIXED = 512  # the type id of a `QuantStack` (common.h's Weight::parts)


class QuantStack(QuantLinear):
    """A fused matrix (q/k/v, gate/up) whose parts are blocks of different types, as K-quant
    mixes have them (Q4_K_M: Q4_K q and k, Q6_K v in some layers). The parts' panels lie one after
    another in one buffer behind a small header, and one call multiplies them all, each output by
    its part's kernel: the same bits as each part alone, and as the dequantized fused matrix."""

    def __init__(self, parts: list[QuantLinear]) -> None:
        K = parts[0].shape[1]
        if any(p.shape[1] != K for p in parts) or any(isinstance(p, QuantStack) for p in parts):
            raise ValueError("a stack takes block matrices of one width")
        head = 16 + 24 * len(parts)
        at = (head + 63) // 64 * 64  # panels 64-byte aligned
        offsets = []
        for p in parts:
            offsets.append(at)
            at += p.packed.numel()
        buf = zeros_huge((at,), torch.uint8, parts[0].device)
        header = [len(parts), K] + [x for p, o in zip(parts, offsets) for x in (QTYPES[p.qtype], p.shape[0], o)]
        buf[:head] = torch.tensor(header, dtype=torch.int64).view(torch.uint8)
        self.parts = []
        for p, o in zip(parts, offsets):
            n = p.packed.numel()
            buf[o : o + n] = p.packed.view(-1)
            q = object.__new__(QuantLinear)  # the part, its panels a view of the stack's buffer
            q.qtype, q.shape, q.dtype, q.device, q._act8 = p.qtype, p.shape, p.dtype, p.device, p.act8
            q.packed = buf[o : o + n].view(p.packed.shape)
            self.parts.append(q)
        self.packed = buf
        self.qtype = "+".join(p.qtype for p in parts)
        self.shape = (sum(p.shape[0] for p in parts), K)
        self.dtype, self.device, self._act8 = torch.float32, parts[0].device, False
        if any(p.act8 for p in self.parts):  # one code order for the whole stack
            self.act8 = True

    def _relayout(self, on: bool) -> None:
        for p in self.parts:  # views of the stack's buffer
            p.act8 = on

    @property
    def qt(self) -> int:
        return MIXED | (ACT8 if self.act8 else 0)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        return self.dense()[ids]

    def dense(self) -> torch.Tensor:
        return torch.cat([p.dense() for p in self.parts])

    def subset(self, ids: torch.Tensor) -> "QuantLinear":
        raise NotImplementedError("a stack of block types has no row subset (only LM heads are cut)")


def dequantize_reference(raw: torch.Tensor, qtype: str, shape: tuple[int, int]) -> torch.Tensor:
    """The float32 weights [N, K] of GGUF blocks, by the gguf package's reference dequantization
    (what the loader computes for types the kernel does not keep)."""
    import gguf
    import numpy as np

    t = getattr(gguf.GGMLQuantizationType, qtype.upper())
    a = gguf.quants.dequantize(raw.numpy(), t).astype(np.float32).reshape(shape)
    return torch.from_numpy(np.ascontiguousarray(a))


# ---------------------------------------------------------------------------------------------
# a layer's halves around attention
# ---------------------------------------------------------------------------------------------

def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:  # [..., n] -> [..., n]
    """Rows of x over sqrt(mean(x^2) + eps), times w: each row alone, in a fixed order."""
    return ops.rms_norm(x, w, eps)


def rms_norm_reference(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.double()
    return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w.double()).float()


def attn_in(
    x: torch.Tensor,  # [B, T, D] float32
    norm: torch.Tensor,  # [D]
    eps: float,
    w,  # PackedLinear | QuantLinear [(H + 2 KH) * Dh, D]
    bias: torch.Tensor | None,  # [(H + 2 KH) * Dh]
    q_norm: torch.Tensor | None,  # [Dh] (Qwen3), with k_norm
    k_norm: torch.Tensor | None,
    cos: torch.Tensor,  # [B, T, 1, Dh/2]
    sin: torch.Tensor,
    heads: int,
    kv_heads: int,
    q_scale: float,
    kc: torch.Tensor | None = None,  # [L, B, KH, capacity, Dh]: a cache's keys, written at [layer, :, :, start + t]
    vc: torch.Tensor | None = None,
    layer: int = 0,
    start: int = 0,
) -> torch.Tensor:  # [B, T, H + 2 KH, Dh]: q (RoPE'd, times q_scale), k (RoPE'd), v
    return ops.attn_in(x, norm, eps, w.packed, w.qt, w.shape[0], bias, q_norm, k_norm, cos, sin,
                                        heads, kv_heads, q_scale, kc, vc, layer, start)


def attn_block(x, norm, eps, w, bias, q_norm, k_norm, cos, sin, heads, kv_heads, q_scale, kc, vc, layer, start,
               mask=None, chunk: int = CHUNK, bf16: bool | str = False) -> torch.Tensor:
    """`attn_in` writing the cache, then `attention` of its queries over the layer's keys
    0 .. start + T under `mask` ([1 or B, T, T] among the new tokens; None = causal)
    -> [B, T, H*Dh]: the same numbers as the two calls, with no views made in Python."""
    return ops.attn_block(x, norm, eps, w.packed, w.qt, w.shape[0], bias, q_norm, k_norm, cos, sin,
                          heads, kv_heads, q_scale, kc, vc, layer, start, mask, chunk, bool(bf16),
                          bf16 == "amx")


def attn_block_sparse(x, norm, eps, w, bias, q_norm, k_norm, cos, sin, heads, kv_heads, q_scale, kc, vc, layer, start,
                      kt, ks, a: int, b: int, budget: int, dims: int, chunk: int = CHUNK) -> torch.Tensor:
    """One token's `attn_in` writing the cache (at `start`), then the sparse draft's choice of the
    layer's rows by its query (`sparse_select_dims` over kt [KH, Dh, >= start+1] int8 and ks
    [KH, >= start+1]) and `attention_rows` over them -> [1, 1, H*Dh]: the same numbers as the
    three calls, in one."""
    return ops.attn_block_sparse(x, norm, eps, w.packed, w.qt, w.shape[0], bias, q_norm, k_norm, cos, sin, heads,
                                 kv_heads, q_scale, kc, vc, layer, start, kt, ks, a, b, budget, dims, chunk)


def attn_out_mlp(x, att, wo, bo, norm, eps, wgu, bgu, wd, bd, post_attn=None, post_mlp=None,
                 gelu: bool = False) -> torch.Tensor:
    """x [B, T, D], att [B, T, H*Dh] -> x1 + down(silu(gate(h)) * up(h)) with x1 = x + att Wo^T + bo,
    h = rms_norm(x1); wgu holds gate then up ([2I, D]). Gemma's: `post_attn` / `post_mlp` norm the
    attention and MLP branches before their residual adds, and `gelu` takes GELU-tanh for SiLU."""
    return ops.attn_out_mlp(x, att, wo.packed, wo.qt, wo.shape[0], bo, norm, eps, wgu.packed,
                                             wgu.qt, wgu.shape[0], bgu, wd.packed, wd.qt, wd.shape[0], bd,
                                             post_attn, post_mlp, gelu)


def attn_in_reference(x, norm, eps, w, bias, q_norm, k_norm, cos, sin, heads, kv_heads, q_scale):
    """`attn_in` in float64 torch (w a dense [N, D] tensor) -> [B, T, H + 2 KH, Dh] float32."""
    B, T, D = x.shape
    h = rms_norm_reference(x, norm, eps).double()
    y = F.linear(h, w.double(), None if bias is None else bias.double())
    Dh = w.shape[0] // (heads + 2 * kv_heads)
    y = y.view(B, T, heads + 2 * kv_heads, Dh)
    qk = y[:, :, : heads + kv_heads]
    if q_norm is not None:
        qn = rms_norm_reference(qk[:, :, :heads], q_norm, eps)
        kn = rms_norm_reference(qk[:, :, heads:], k_norm, eps)
        qk = torch.cat([qn, kn], dim=2).double()
    c, s = cos.double(), sin.double()
    a, b = qk[..., : Dh // 2], qk[..., Dh // 2 :]
    qk = torch.cat([a * c - b * s, b * c + a * s], dim=-1)
    qk[:, :, :heads] *= q_scale
    return torch.cat([qk, y[:, :, heads + kv_heads :]], dim=2).float()


def attn_out_mlp_reference(x, att, wo, bo, norm, eps, wgu, bgu, wd, bd, post_attn=None, post_mlp=None,
                           gelu: bool = False):
    """`attn_out_mlp` in float64 torch (dense weights) -> [B, T, D] float32."""
    dbl = lambda t: None if t is None else t.double()  # noqa: E731
    a = F.linear(att.double(), wo.double(), dbl(bo))
    if post_attn is not None:
        a = rms_norm_reference(a, post_attn, eps).double()
    x1 = x.double() + a
    h = rms_norm_reference(x1, norm, eps).double()
    gu = F.linear(h, wgu.double(), dbl(bgu))
    I = gu.shape[-1] // 2
    act = F.gelu(gu[..., :I], approximate="tanh") if gelu else F.silu(gu[..., :I])
    m = F.linear(act * gu[..., I:], wd.double(), dbl(bd))
    if post_mlp is not None:
        m = rms_norm_reference(m, post_mlp, eps).double()
    return (x1 + m).float()


def qlinear_act8_reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """What `QuantLinear.matmul` computes with int8 activations, in float64: x's rows rounded per
    block of 32 as `quantize_q8_reference` rounds a row, times the dequantized weights w [N, K]."""
    K = x.shape[-1]
    q, s = quantize_q8_reference(x.reshape(-1, K // 32, 32).float())
    xr = (q.double() * s.double()[..., None]).reshape(*x.shape[:-1], K)
    return linear_reference(xr, w, b)


# ---------------------------------------------------------------------------------------------
# sampling (sample.cpp)
# ---------------------------------------------------------------------------------------------


def sample_rows(logits: torch.Tensor, window: torch.Tensor | None, keys: torch.Tensor, s) -> torch.Tensor:
    """`sampling.draw(sampling.final_scores(logits, window, s), ...)` for every filter but top-p
    and eta: logits [N, V] float32, window [N or 1, W] int64 or None, keys [N] int64 (each
    row's `position_key`, its uint64 bits) -> [N] int64 tokens."""
    import math

    min_p = s.min_p > 0.0
    return ops.sample_rows(logits, window, keys, float(s.penalty), float(s.temperature),
                                            int(s.top_k), math.log(s.min_p) if min_p else 0.0, min_p,
                                            int(s.min_keep), bool(s.greedy))


def gumbel_at(key: int, ids: torch.Tensor) -> torch.Tensor:
    """`sampling.gumbel_at_reference(key, ids)` natively: [n] int64 -> [n] float64 (std::log)."""
    return ops.gumbel_at(key - (1 << 64) if key >= 1 << 63 else key, ids.to(torch.int64))
