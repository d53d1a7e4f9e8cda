"""Frozen configuration records: the model's shape, the sampler, the speculation settings.

`ModelConfig` is built from a Hugging Face `config.json` dict or from GGUF metadata; the
decoder in `model.py` reads nothing else. Architectures differ only by the flags here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Mapping

from .params import PARAMS, SAMPLING, SPEC, check_all

SUPPORTED_ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma3")
ROPE_KINDS = ("default", "linear", "dynamic", "yarn", "llama3")
MAX_ROPE_FACTOR = 1024  # beyond it no released model extends, and the context is not addressable


@dataclass(frozen=True)
class RopeScaling:
    """How rotary frequencies are derived. `kind="default"` is plain RoPE."""

    kind: str = "default"
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    # llama3
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    # yarn
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True
    # Per-frequency divisors stored in some GGUF files (llama3 scaling baked in).
    freq_factors: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.kind not in ROPE_KINDS:
            raise ValueError(f"unsupported RoPE scaling type {self.kind!r}; supported: {', '.join(ROPE_KINDS)}")
        if self.kind != "default" and not (0 < self.factor <= MAX_ROPE_FACTOR):
            raise ValueError(f"RoPE scaling factor must be in (0, {MAX_ROPE_FACTOR}], got {self.factor!r}")

    @staticmethod
    def parse(spec: str | Mapping[str, Any] | "RopeScaling" | None) -> "RopeScaling | None":
        """Accepts `"yarn:4"`, `"linear:2"`, a HF-style dict, or a RopeScaling."""
        if spec is None or isinstance(spec, RopeScaling):
            return spec
        if isinstance(spec, str):
            kind, sep, factor = spec.partition(":")
            kind = kind.strip().lower()
            if not sep or not factor.strip():
                raise ValueError(f"bad RoPE scaling {spec!r}: expected TYPE:FACTOR, e.g. yarn:4")
            if kind not in ROPE_KINDS or kind == "default":
                raise ValueError(
                    f"bad RoPE scaling {spec!r}: expected TYPE:FACTOR with TYPE one of linear, dynamic, yarn, llama3"
                )
            try:
                f = float(factor)
            except ValueError:
                raise ValueError(f"bad RoPE scaling {spec!r}: factor {factor!r} is not a number") from None
            if not 1.0 < f <= MAX_ROPE_FACTOR:
                raise ValueError(f"bad RoPE scaling {spec!r}: the factor must be in (1, {MAX_ROPE_FACTOR}] "
                                 "to extend the context")
            return RopeScaling(kind=kind, factor=f)
        return _rope_from_hf(dict(spec))


def _rope_from_hf(d: dict[str, Any]) -> RopeScaling | None:
    kind = d.get("rope_type", d.get("type", "default")) or "default"
    if kind == "default":
        return None
    if kind not in ROPE_KINDS:
        raise ValueError(f"unsupported RoPE scaling type {kind!r}; supported: {', '.join(ROPE_KINDS)}")
    kw: dict[str, Any] = {"kind": kind}
    for key in ("factor", "low_freq_factor", "high_freq_factor", "beta_fast", "beta_slow"):
        if d.get(key) is not None:
            kw[key] = float(d[key])
    for key in ("attention_factor", "mscale", "mscale_all_dim"):
        if d.get(key) is not None:
            kw[key] = float(d[key])
    if d.get("original_max_position_embeddings") is not None:
        kw["original_max_position_embeddings"] = int(d["original_max_position_embeddings"])
    if d.get("truncate") is not None:
        kw["truncate"] = bool(d["truncate"])
    return RopeScaling(**kw)


# Bounds on a model's shape, checked before anything is sized from it (a config.json typo must
# not allocate terabytes). Far above any released model of the supported families.
_SHAPE_LIMITS = {"vocab_size": 1 << 22, "hidden_size": 1 << 16, "intermediate_size": 1 << 19, "num_layers": 1024,
                 "num_heads": 1024, "num_kv_heads": 1024, "head_dim": 1024}


def _json_int(d: Mapping[str, Any], key: str, hi: int, default: Any = None) -> int:
    """An integer field of config.json in [1, hi] (an integral float such as 576.0 is accepted)."""
    v = d.get(key)
    if v is None:
        if default is None:
            raise ValueError(f"config.json lacks required field {key!r}")
        v = default
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= hi:
        raise ValueError(f"config.json field {key} must be an integer in [1, {hi}], got {v!r}")
    return v


@dataclass(frozen=True)
class ModelConfig:
    arch: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2; Llama's attention_bias sets this and o_bias
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k before RoPE
    # Sliding-window size per layer (None = full attention), Mistral v0.1 / Qwen windowed layers,
    # Gemma 3's local layers (a key is visible while q_pos - k_pos < window).
    layer_windows: tuple[int | None, ...] = field(default=())
    # Gemma 3: the windowed layers' own RoPE base, unscaled (None: every layer takes rope_theta
    # and rope_scaling)
    local_rope_theta: float | None = None
    # Gemma: norms after attention and after the MLP too (on the branch, before the residual add)
    post_norms: bool = False
    mlp_act: str = "silu"  # the gate's activation: "silu" or "gelu_tanh" (Gemma)
    embed_scale: float = 1.0  # embeddings multiplied by it (Gemma: sqrt(hidden_size))
    attn_scale: float | None = None  # scores' scale (None: head_dim ** -0.5)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.arch not in SUPPORTED_ARCHS:
            raise ValueError(f"unsupported architecture {self.arch!r}; supported: {', '.join(SUPPORTED_ARCHS)}")
        for name, hi in _SHAPE_LIMITS.items():
            v = getattr(self, name)
            if not (isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= hi):
                raise ValueError(f"model config: {name} must be an integer in [1, {hi}], got {v!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if not self.layer_windows:
            object.__setattr__(self, "layer_windows", (None,) * self.num_layers)
        if len(self.layer_windows) != self.num_layers:
            raise ValueError(f"layer_windows has {len(self.layer_windows)} entries for {self.num_layers} layers")
        if self.mlp_act not in ("silu", "gelu_tanh"):
            raise ValueError(f"mlp_act must be silu or gelu_tanh, got {self.mlp_act!r}")

    @property
    def context_length(self) -> int:
        """Longest sequence the model is meant to handle, RoPE scaling included."""
        rs = self.rope_scaling
        if rs is None or rs.kind == "default" or rs.freq_factors is not None:
            return self.max_position_embeddings
        orig = rs.original_max_position_embeddings or self.max_position_embeddings
        return max(self.max_position_embeddings, int(math.floor(orig * rs.factor)))

    def with_rope_scaling(self, rs: RopeScaling) -> "ModelConfig":
        """Extends the context: the original length is the model's own trained context."""
        if rs.original_max_position_embeddings is None:
            rs = replace(rs, original_max_position_embeddings=self.max_position_embeddings)
        return replace(self, rope_scaling=rs)

    # -- constructors -------------------------------------------------------------------------

    @staticmethod
    def from_hf(d: Mapping[str, Any]) -> "ModelConfig":
        """From a Hugging Face `config.json` (transformers 4.x `rope_scaling` or 5.x `rope_parameters`)."""
        arch = d.get("model_type")
        if arch in ("gemma3", "gemma3_text"):
            raise ValueError(f"model_type {arch!r}: Gemma 3 loads from its GGUF file (a safetensors folder is not "
                             f"supported yet)")
        if arch not in SUPPORTED_ARCHS:
            raise ValueError(
                f"unsupported model_type {arch!r} in config.json; supported: {', '.join(a for a in SUPPORTED_ARCHS if a != 'gemma3')}"
            )
        lim = _SHAPE_LIMITS
        hidden = _json_int(d, "hidden_size", lim["hidden_size"])
        heads = _json_int(d, "num_attention_heads", lim["num_heads"])
        layers = _json_int(d, "num_hidden_layers", lim["num_layers"])
        vocab = _json_int(d, "vocab_size", lim["vocab_size"])
        inter = _json_int(d, "intermediate_size", lim["intermediate_size"])
        kv_heads = _json_int(d, "num_key_value_heads", lim["num_kv_heads"], heads)
        head_dim = _json_int(d, "head_dim", lim["head_dim"], hidden // heads)

        rope_params = d.get("rope_parameters") or {}
        theta = float(rope_params.get("rope_theta", d.get("rope_theta", 10000.0)))
        if rope_params.get("rope_type") or rope_params.get("type"):
            rope = _rope_from_hf(rope_params)
        else:
            rope = _rope_from_hf(d["rope_scaling"]) if d.get("rope_scaling") else None
        max_pos = int(d.get("max_position_embeddings", 2048))
        if rope is not None:
            orig = d.get("original_max_position_embeddings") or rope.original_max_position_embeddings
            if rope.kind in ("yarn", "llama3"):
                orig = orig or max_pos
            if orig is not None:
                rope = replace(rope, original_max_position_embeddings=int(orig))

        attention_bias = bool(d.get("attention_bias", False))
        qkv_bias = attention_bias or arch == "qwen2"
        o_bias = attention_bias
        if arch == "qwen2":
            o_bias = False

        windows: list[int | None] = [None] * layers
        if d.get("layer_types"):
            sw = d.get("sliding_window")
            windows = [int(sw) if (t == "sliding_attention" and sw) else None for t in d["layer_types"]]
        elif arch == "mistral" and d.get("sliding_window"):
            windows = [int(d["sliding_window"])] * layers
        elif arch in ("qwen2", "qwen3") and d.get("use_sliding_window") and d.get("sliding_window"):
            first = int(d.get("max_window_layers", layers))
            windows = [int(d["sliding_window"]) if i >= first else None for i in range(layers)]

        eos = d.get("eos_token_id")
        eos_ids = tuple(int(x) for x in (eos if isinstance(eos, list) else [eos] if eos is not None else []))
        return ModelConfig(
            arch=arch,
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=inter,
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=rope,
            max_position_embeddings=max_pos,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=bool(d.get("mlp_bias", False)),
            qk_norm=arch == "qwen3",
            layer_windows=tuple(windows),
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )

    @staticmethod
    def from_gguf(meta: Mapping[str, Any], tensor_names: set[str]) -> "ModelConfig":
        """From GGUF metadata (already decoded to Python values) and the file's tensor names."""
        arch = meta.get("general.architecture")
        if arch not in ("llama", "qwen2", "qwen3", "gemma3"):
            raise ValueError(
                f"unsupported GGUF architecture {arch!r}; supported: llama (incl. Mistral), qwen2, qwen3, gemma3"
            )

        def get(key: str, default: Any = None) -> Any:
            return meta.get(f"{arch}.{key}", default)

        try:
            hidden = int(get("embedding_length"))
            heads = int(get("attention.head_count"))
            layers = int(get("block_count"))
            inter = int(get("feed_forward_length"))
        except TypeError:
            raise ValueError(f"GGUF metadata lacks the {arch}.* shape fields") from None
        kv_heads = int(get("attention.head_count_kv", heads))
        head_dim = int(get("attention.key_length", hidden // heads))
        vocab = get("vocab_size") or len(meta.get("tokenizer.ggml.tokens", ()))
        max_pos = int(get("context_length", 2048))

        rope = None
        stype = get("rope.scaling.type")
        if stype in ("linear", "yarn"):
            orig = get("rope.scaling.original_context_length")
            rope = RopeScaling(
                kind=stype,
                factor=float(get("rope.scaling.factor", 1.0)),
                original_max_position_embeddings=int(orig) if orig else max_pos,
            )
        elif stype not in (None, "none"):
            raise ValueError(f"unsupported GGUF RoPE scaling type {stype!r}")

        window = get("attention.sliding_window")
        windows = (int(window) if window else None,) * layers
        gemma: dict[str, Any] = {}
        if arch == "gemma3":
            # llama.cpp's Gemma 3 rules (the file does not carry them): every sixth layer attends to
            # the whole context, the others to the window with RoPE base 10K unscaled; embeddings
            # times sqrt(hidden); scores scaled by head_dim^-0.5 (hidden/heads for the 27B, 62 layers).
            # The file's norm weights already hold Gemma's (1 + w).
            windows = tuple(None if (i + 1) % 6 == 0 else int(window or 512) for i in range(layers))
            gemma = dict(local_rope_theta=10000.0, post_norms=True, mlp_act="gelu_tanh",
                         embed_scale=float(hidden) ** 0.5,
                         attn_scale=(hidden / heads) ** -0.5 if layers == 62 else None)
        eos = meta.get("tokenizer.ggml.eos_token_id")
        return ModelConfig(
            arch=arch,
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=inter,
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)),
            rope_theta=float(get("rope.freq_base", 10000.0)),
            rope_scaling=rope,
            max_position_embeddings=max_pos,
            tie_word_embeddings="output.weight" not in tensor_names,
            qkv_bias="blk.0.attn_q.bias" in tensor_names,
            o_bias="blk.0.attn_output.bias" in tensor_names,
            mlp_bias="blk.0.ffn_up.bias" in tensor_names,
            qk_norm="blk.0.attn_q_norm.weight" in tensor_names,
            layer_windows=windows,
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=(int(eos),) if eos is not None else (),
            **gemma,
        )


@dataclass(frozen=True)
class SamplingConfig:
    """The sampler. temperature 0 means greedy. Every field is validated on construction."""

    # defaults, ranges and help: params.py
    temperature: float = PARAMS["temperature"].default
    top_k: int = PARAMS["top_k"].default
    top_p: float = PARAMS["top_p"].default
    min_p: float = PARAMS["min_p"].default
    min_keep: int = PARAMS["min_keep"].default
    eta: float = PARAMS["eta"].default
    penalty: float = PARAMS["penalty"].default
    penalty_window: int = PARAMS["penalty_window"].default
    seed: int = PARAMS["seed"].default

    def __post_init__(self) -> None:
        check_all(self.__dict__, SAMPLING)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalty_width(self) -> int:
        """Tokens the repetition penalty looks back over (0 when it is off)."""
        return self.penalty_window if self.penalty != 1.0 else 0


# The paper's sampling setup (DESIGN.md, "Defaults"): what speed is measured under.
# where train-drafter's pool comes from (train.DrafterConfig.pool, train-drafter --pool)
DRAFTER_POOLS = ("generated", "text")

PAPER_SAMPLING = dict(temperature=1.0, min_p=0.1, min_keep=20, penalty=1.2, penalty_window=1024)


@dataclass(frozen=True)
class SpecConfig:
    """Speculation settings (DESIGN.md defaults). Only speed depends on them, never the text."""

    # defaults, ranges and help: params.py
    # most positions drafted per iteration: chained draft passes under tree="auto"; under a
    # static tree the base prediction + (gamma - 1) heads
    gamma: int = PARAMS["gamma"].default
    # "auto": size the trie (and n-gram chains) by measured cost and running acceptance
    # (plan.py); else a static tree shape (see tree.parse_tree), e.g. the paper's "1,3,3,3"
    tree: str | tuple = PARAMS["tree"].default
    ngram_n: int = PARAMS["ngram_n"].default
    ngram_topk: int = PARAMS["ngram_topk"].default
    use_ngrams: bool = PARAMS["use_ngrams"].default
    use_heads: bool = PARAMS["use_heads"].default
    # up to this context the draft attends to the main cache; past it `draft_kv` decides (a
    # partial cache holds this many entries: the paper's 4,096 costs ~15 ms a drafted
    # token in attention alone on a 2-core CPU)
    draft_budget: int = PARAMS["draft_budget"].default
    sinks: int = PARAMS["sinks"].default
    # the cache the self-draft attends to past draft_budget entries: "sparse" (per query, from an
    # int8 copy of a quarter of the key dims: SparseKV), "int8" (a quantized copy of the whole
    # cache), "partial" (the paper's selection), "full" (the cache itself), "auto"
    draft_kv: str = PARAMS["draft_kv"].default
    # the draft's chains draw from ids below this and the text's own tokens (DraftVocab); 0: all
    draft_vocab: int = PARAMS["draft_vocab"].default
    max_nodes: int | None = PARAMS["max_nodes"].default  # cap on trie nodes (root included); None = no cap
    # the self-draft's weights: "int4" (the model's int4 copy), "float" (its own weights, the
    # paper's), "auto" (int4 where the model has an int4 copy)
    draft_weights: str = PARAMS["draft_weights"].default
    # which drafters the auto plan may use: "self", "seq", "none", or "auto" (all that are loaded)
    drafter: str = PARAMS["drafter"].default

    def __post_init__(self) -> None:
        if isinstance(self.tree, str):
            check_all(self.__dict__, SPEC)
        else:  # a shape given as a list: its own checks below
            check_all(self.__dict__, [n for n in SPEC if n != "tree"])
        if self.auto:
            return
        from .tree import parse_tree

        parse_tree(self.tree)  # raises on a bad shape

    @property
    def auto(self) -> bool:
        return isinstance(self.tree, str) and self.tree.strip().lower() == "auto"

    def paths(self) -> tuple[tuple[int, ...], ...]:
        from .tree import parse_tree

        if self.auto:
            raise ValueError("tree 'auto' has no fixed paths; the planner chooses them per iteration")
        return tuple(p for p in parse_tree(self.tree) if len(p) <= self.gamma)
