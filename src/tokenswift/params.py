"""Every generation option, defined once: its library keyword, type, range, default and help, the
CLI flag and the HTTP API field that set it.

`SamplingConfig`, `SpecConfig` and `LM.steps` validate through `Param.check`; the CLI builds its
flags from `PARAMS`; the server its request fields. A bad value raises `ParamError`, which keeps
the option's keyword apart from the message, so each surface names the option the way its user
typed it (`--top-p`, `top_p`, `sampling.top_p` in a checkpoint) without rewriting text.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from typing import Any, Callable, Sequence


class ParamError(ValueError):
    """A bad value of one option. `str(e)` names it by its library keyword; `e.named(name)` says
    the same with another name (a CLI flag, an API field, a checkpoint key)."""

    def __init__(self, param: str, *pieces: str) -> None:
        # the message is name.join(pieces): the name stands between every two pieces
        self.param = param
        self.pieces = pieces
        super().__init__(self.named(param))

    def named(self, name: str) -> str:
        return name.join(self.pieces)


def short_repr(value: Any, limit: int = 80) -> str:
    """repr(value) cut to `limit` characters: an error message quotes a hostile value, not all of it."""
    shown = repr(value)
    return shown if len(shown) <= limit else shown[: limit - 3] + "..."


def json_problem(e: BaseException) -> str:
    """What is wrong with a JSON text that `json.loads` refused, in words for its author: Python's
    parser stops on nesting deeper than its recursion limit and on integers of more than 4300
    digits with errors that do not say "JSON"."""
    if isinstance(e, RecursionError):
        return "arrays or objects nested too deeply"
    if isinstance(e, UnicodeDecodeError):
        return f"not UTF-8 (bad byte at offset {e.start})"
    if isinstance(e, json.JSONDecodeError):
        return f"not JSON ({e.msg}: line {e.lineno} column {e.colno})"
    if isinstance(e, ValueError) and "digits" in str(e):
        return f"a number of more than {sys.get_int_max_str_digits()} digits"
    return f"not JSON ({e})"


def bad_value(param: str, want: str, value: Any) -> ParamError:
    """The usual error: "<name> must be <want>, got <value>"."""
    return ParamError(param, "", f" must be {want}, got {short_repr(value)}")


def is_int(v: Any) -> bool:
    """An int that is not a bool (JSON's true / false are not token ids or sizes)."""
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


@dataclass(frozen=True)
class Param:
    name: str  # the library keyword (LM.steps, SamplingConfig / SpecConfig field)
    kind: type  # int, float, str or bool
    default: Any
    want: str  # the valid values in words, for errors: "in (0, 1]"
    help: str
    ok: Callable[[Any], bool] = lambda v: True  # range check, after the type check
    flag: str | None = None  # CLI flag of `tokenswift generate` (None: not a flag)
    field: str | None = None  # HTTP API request field (None: not served)
    choices: tuple[str, ...] = ()
    group: str = "run"  # "sampling", "spec" or "run"
    nullable: bool = False  # None is a valid value (e.g. max_nodes: no cap)

    def check(self, value: Any) -> Any:
        """The value if it is valid; else ParamError naming this option."""
        if value is None and self.nullable:
            return value
        if self.kind is int:
            good = is_int(value)
        elif self.kind is float:
            good = _is_number(value)
        elif self.kind is bool:
            good = isinstance(value, bool)
        else:
            good = isinstance(value, str)
        if self.choices:
            good = good and value in self.choices
        if not good or not self.ok(value):
            raise bad_value(self.name, self.want, value)
        return value


# Temperatures below this (other than 0 = greedy) and penalties outside [1/PENALTY_MAX,
# PENALTY_MAX] push float32 logits to +-inf, and the sampler would answer token 0 forever.
MIN_TEMPERATURE = 1e-4
PENALTY_MAX = 1e4
# The largest values that size memory or work before anything runs.
MAX_GAMMA = 64
MAX_TOP = 100_000  # top_k, ngram_topk, min_keep: no vocabulary is larger
MAX_BUDGET = 1 << 24  # draft_budget, penalty_window: entries


def _sampling(*params: Param) -> list[Param]:
    return [Param(**{**p.__dict__, "group": "sampling"}) for p in params]


def _spec(*params: Param) -> list[Param]:
    return [Param(**{**p.__dict__, "group": "spec"}) for p in params]


_LIST: list[Param] = [
    Param("max_new_tokens", int, 256, "an integer >= 1", "tokens to generate (default 256)",
          ok=lambda v: v >= 1, flag="--max-new-tokens", field="max_tokens"),
    Param("method", str, "tokenswift", "one of tokenswift, ar, ngram",
          "tokenswift (drafts verified by the model), ar (plain), or ngram (prompt-lookup drafts); all write the "
          "same text (default tokenswift)", flag="--method", field="method", choices=("tokenswift", "ar", "ngram")),
    Param("ignore_eos", bool, False, "true or false", "keep going past end-of-sequence tokens",
          flag="--ignore-eos", field="ignore_eos"),
    Param("kv_dtype", str, "auto", "one of auto, float32, bfloat16, float16",
          "the KV cache's element type for every method: bfloat16/float16 halve its memory and the bytes a long "
          "step reads (the model then computes with a rounded cache: ar and tokenswift still write the same "
          "text); auto = the weights' dtype (default auto)", flag="--kv-dtype",
          choices=("auto", "float32", "bfloat16", "float16")),
    Param("weights", str, "auto", "one of auto, float, q8_0, q4_0",
          "how the weight matrices are held: auto = a GGUF's Q4_0/Q4_1/Q8_0 blocks as in the file (multiplied "
          "by the native CPU kernel, the numbers of their float32 dequantization) and a float checkpoint's floats; "
          "float = all dequantized; q8_0/q4_0 = quantized at load (a different model than the float one; q4_0 "
          "keeps the embedding and LM head at q8_0) (default auto)", flag="--weights",
          choices=("auto", "float", "q8_0", "q4_0")),
    Param("attention_dtype", str, "float32", "one of float32, bfloat16, bfloat16-amx",
          "the arithmetic of attention over the KV cache: float32, or bfloat16 = the queries and the softmax's "
          "probabilities rounded to bfloat16 and their products summed in float32 (the AVX-512 BF16 "
          "instruction where the CPU has it; faster, a different model: ar and tokenswift still write the same "
          "text); bfloat16-amx = the same roundings with the products summed in the order of AMX's bfloat16 "
          "tiles (on the AMX tiles where the CPU has them, else in AVX-512 vectors; another model again). Both "
          "need the native CPU kernels, a bfloat16 cache (kv_dtype auto becomes bfloat16) and head_dim a "
          "multiple of 32 (default float32)", flag="--attention-dtype",
          choices=("float32", "bfloat16", "bfloat16-amx")),
    Param("activations", str, "float", "one of float, int8",
          "what the GGUF weight blocks multiply: float = the float32 activations (the numbers of the "
          "dequantized model); int8 = each row rounded to int8 per block of 32 and multiplied in integers, "
          "llama.cpp's arithmetic (faster, a different model; ar and tokenswift still write the same text) "
          "(default float)", flag="--activations", choices=("float", "int8")),
    *_sampling(
        Param("temperature", float, 1.0, f"0 (greedy) or in [{MIN_TEMPERATURE:g}, 100]",
              f"0 = greedy, else in [{MIN_TEMPERATURE:g}, 100] (default 1.0)",
              ok=lambda v: v == 0 or MIN_TEMPERATURE <= v <= 100, flag="--temperature", field="temperature"),
        Param("top_k", int, 0, f"an integer in [0, {MAX_TOP}] (0 = off)", "keep the k best tokens (0 = off)",
              ok=lambda v: 0 <= v <= MAX_TOP, flag="--top-k", field="top_k"),
        Param("top_p", float, 1.0, "in (0, 1]", "nucleus mass in (0, 1] (default 1 = off)",
              ok=lambda v: 0 < v <= 1, flag="--top-p", field="top_p"),
        Param("min_p", float, 0.0, "in [0, 1)", "drop tokens below min_p x the best (0 = off)",
              ok=lambda v: 0 <= v < 1, flag="--min-p", field="min_p"),
        Param("min_keep", int, 1, f"an integer in [1, {MAX_TOP}]", "tokens every filter keeps at least (default 1)",
              ok=lambda v: 1 <= v <= MAX_TOP, flag="--min-keep", field="min_keep"),
        Param("eta", float, 0.0, "in [0, 1)", "eta sampling epsilon (0 = off)", ok=lambda v: 0 <= v < 1,
              flag="--eta", field="eta"),
        Param("penalty", float, 1.0, f"in [{1 / PENALTY_MAX:g}, {PENALTY_MAX:g}] (1 = off)",
              f"divide positive / multiply negative logits of recent tokens, in [{1 / PENALTY_MAX:g}, "
              f"{PENALTY_MAX:g}] (default 1 = off)",
              ok=lambda v: 1 / PENALTY_MAX <= v <= PENALTY_MAX, flag="--repetition-penalty",
              field="repetition_penalty"),
        Param("penalty_window", int, 1024, f"an integer in [0, {MAX_BUDGET}]",
              "how many recent tokens the penalty looks at (default 1024)", ok=lambda v: 0 <= v <= MAX_BUDGET,
              flag="--penalty-window", field="penalty_window"),
        Param("seed", int, 0, "an integer in [0, 2^63)", "sampling seed (default 0)", ok=lambda v: 0 <= v < 2**63,
              flag="--seed", field="seed"),
    ),
    *_spec(
        Param("gamma", int, 8, f"an integer in [1, {MAX_GAMMA}]",
              "most positions drafted per iteration: chained draft passes under --tree auto, base + heads under a "
              "static tree (default 8)", ok=lambda v: 1 <= v <= MAX_GAMMA, flag="--gamma"),
        Param("tree", str, "auto", "'auto' or a tree shape such as '1,3,3,3'",
              "trie: auto (sized by measured cost, the default) or a static shape, branching per depth or JSON "
              "paths (the paper: 1,3,3,3)", flag="--tree"),
        Param("ngram_n", int, 4, "an integer in [2, 16]", "n-gram length", ok=lambda v: 2 <= v <= 16),
        Param("ngram_topk", int, 20, f"an integer in [0, {MAX_TOP}]", "n-gram continuations per candidate (default 20)",
              ok=lambda v: 0 <= v <= MAX_TOP, flag="--ngram-topk"),
        Param("use_ngrams", bool, True, "true or false", "draft with n-gram reuse"),
        Param("use_heads", bool, True, "true or false", "draft with the draft heads (static trees)"),
        Param("draft_budget", int, 1024, f"an integer in [64, {MAX_BUDGET}]",
              "context up to which the draft attends to the cache itself; past it --draft-kv decides (partial: "
              "this many entries) (default 1024)", ok=lambda v: 64 <= v <= MAX_BUDGET,
              flag="--draft-budget"),
        Param("sinks", int, 16, "an integer in [0, 1024]", "first KV entries the draft cache always keeps",
              ok=lambda v: 0 <= v <= 1024),
        Param("draft_kv", str, "auto", "one of auto, sparse, int8, partial, full",
              "the KV cache the self-draft attends to beyond --draft-budget entries: sparse (per draft query and KV "
              "head, the entries its own query scores highest on an int8 copy of a quarter of the key dimensions, "
              "with sinks and the recent window), int8 (an int8 copy of the whole cache), partial (--draft-budget "
              "entries chosen by attention score), full (the cache itself), auto = int8 where the native CPU "
              "kernels run, else partial (default auto)", flag="--draft-kv",
              choices=("auto", "sparse", "int8", "partial", "full")),
        Param("draft_vocab", int, 0, f"an integer in [0, {MAX_BUDGET}]",
              "the self-draft's chains propose only the token ids below this and the tokens of the text so far "
              "(a head of fewer rows); 0 = the whole vocabulary (default 0)", ok=lambda v: 0 <= v <= MAX_BUDGET,
              flag="--draft-vocab"),
        Param("max_nodes", int, None, "None or an integer in [1, 4096]", "cap on trie nodes, root included",
              ok=lambda v: 1 <= v <= 4096, nullable=True),
        Param("draft_weights", str, "auto", "one of auto, int4, float",
              "the self-draft's weights: int4 (a 4-bit copy of the model), float (the model's own, GGUF blocks "
              "included), auto = int4 where torch's int4 kernel exists and the model's weights are float "
              "(default auto)", flag="--draft-weights", choices=("auto", "int4", "float")),
        Param("drafter", str, "auto", "one of auto, self, seq, none",
              "which drafters the auto plan may use: self (the model's int4 copy), seq (the one-block drafter "
              "loaded with the model), none (n-grams and plain steps), auto = whichever pays (default auto)",
              flag="--drafter", choices=("auto", "self", "seq", "none")),
    ),
]

PARAMS: dict[str, Param] = {p.name: p for p in _LIST}
SAMPLING = tuple(p.name for p in _LIST if p.group == "sampling")
SPEC = tuple(p.name for p in _LIST if p.group == "spec")
BY_FLAG: dict[str, Param] = {p.flag: p for p in _LIST if p.flag}
BY_FIELD: dict[str, Param] = {p.field: p for p in _LIST if p.field}


def check_all(values: dict[str, Any], names: Sequence[str]) -> None:
    """Checks `values[name]` for each of `names` (in that order: the first bad one is reported)."""
    for name in names:
        PARAMS[name].check(values[name])
