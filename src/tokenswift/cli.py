"""`tokenswift` command line. The only module that prints.

Errors in input (bad values, missing files, unknown models) print one line on stderr and exit
with code 2; Ctrl-C exits with 130. No tracebacks for either.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

EXIT_USAGE = 2
EXIT_INTERRUPT = 130


class CliError(Exception):
    """A user-facing error: printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line instead of usage + message
        raise CliError(f"{self.prog}: {message}")


def _int(name: str):
    def conv(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {s!r}") from None
        return v

    return conv


def _float(name: str):
    def conv(s: str) -> float:
        try:
            v = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number, got {s!r}") from None
        if math.isnan(v):
            raise argparse.ArgumentTypeError(f"{name} must be a number, got {s!r}")
        return v

    return conv


def _param_args(group: Any, *names: str) -> None:
    """The flags of these options, from their one definition (params.py)."""
    from .params import PARAMS

    for name in names:
        p = PARAMS[name]
        if p.kind is bool:
            group.add_argument(p.flag, dest=name, action="store_true", help=p.help)
            continue
        conv = _int(p.flag) if p.kind is int else _float(p.flag) if p.kind is float else str
        group.add_argument(p.flag, dest=name, type=conv, default=p.default, choices=p.choices or None, help=p.help)


COMPILE_HELP = ("torch.compile the decode, draft and verify passes (CUDA graphs on GPUs): the first pass of "
                "each size compiles (minutes on a CPU); the same text")


def build_parser() -> argparse.ArgumentParser:
    from .config import DRAFTER_POOLS
    from .loading import DEFAULT_MODEL
    from .params import PARAMS, SAMPLING, SPEC

    p = _Parser(prog="tokenswift", description="Fast, lossless long-text generation (TokenSwift).")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress details to stderr")
    sub = p.add_subparsers(dest="command", parser_class=_Parser, metavar="COMMAND")

    g = sub.add_parser("generate", help="generate text from a prompt", description="Generate text from a prompt.")
    g.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"embedded model name, .gguf file or HF model directory (default {DEFAULT_MODEL})")
    src = g.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="prompt text (default: read stdin when it is not a terminal)")
    src.add_argument("--prompt-file", type=Path, help="read the prompt from this UTF-8 file")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    _param_args(g, "max_new_tokens", "method")
    s = g.add_argument_group("sampling (temperature 0 = greedy)")
    _param_args(s, *SAMPLING)
    s.add_argument("--paper-defaults", action="store_true",
                   help="the paper's sampler: temperature 1, min-p 0.1 keeping 20, penalty 1.2 over 1024")
    sp = g.add_argument_group("speculation (tokenswift / ngram methods; speed only, never the text)")
    sp.add_argument("--heads", default="auto", metavar="PATH|none|auto",
                    help="draft heads file; auto = shipped heads for a known model (default auto)")
    _param_args(sp, *(n for n in SPEC if PARAMS[n].flag and n != "drafter"))
    sp.add_argument("--drafter", default="auto", metavar="auto|self|seq|none|PATH",
                    help=PARAMS["drafter"].help + "; or a seq drafter file (from train-drafter) to draft with")
    sp.add_argument("--no-ngrams", action="store_true", help="draft without n-gram reuse")
    g.add_argument("--stats", action="store_true",
                   help="print the run's stats as JSON on stderr at the end (also when interrupted)")
    _param_args(g, "ignore_eos")
    g.add_argument("--json", action="store_true", help="print one JSON object {tokens, text, stats} at the end")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    g.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="weights dtype (default float32 on CPU, bfloat16 on CUDA)")
    _param_args(g, "kv_dtype")
    _param_args(g, "weights", "activations", "attention_dtype")
    g.add_argument("--rope-scaling", default=None, metavar="TYPE:FACTOR",
                   help="extend the context, e.g. yarn:4 (types: linear, dynamic, yarn, llama3)")
    g.add_argument("--compile", action="store_true", help=COMPILE_HELP)
    ck = g.add_argument_group("resumable runs")
    ck.add_argument("--checkpoint", type=Path, metavar="FILE",
                    help="keep FILE up to date with the options, seed and committed tokens (atomic writes), "
                         "every --checkpoint-every tokens and at exit, Ctrl-C included")
    ck.add_argument("--checkpoint-every", type=_int("--checkpoint-every"), default=256, metavar="N",
                    help="tokens between checkpoint writes (default 256)")
    ck.add_argument("--checkpoint-kv", action="store_true",
                    help="also keep the committed tokens' keys and values in FILE.kv (appended at every write; "
                         "SmolLM2: 23 KB a token with a float16 cache, 46 KB with float32), so that --resume "
                         "reads them back instead of recomputing them; --resume uses FILE.kv when it exists")
    ck.add_argument("--resume", type=Path, metavar="FILE",
                    help="continue the run saved in FILE with its own options (the text is the same as an "
                         "uninterrupted run's); prints the whole text; keeps FILE up to date")

    t = sub.add_parser("train-heads", help="train draft heads on a frozen model",
                       description="Train draft heads (the backbone and LM head stay frozen). Hidden states are "
                                   "cached on disk, so reruns and further epochs skip the backbone.")
    t.add_argument("--model", default=DEFAULT_MODEL, help=f"model to train heads for (default {DEFAULT_MODEL})")
    t.add_argument("--data", nargs="+", required=True, type=Path, metavar="FILE", help="UTF-8 text files")
    t.add_argument("--out", required=True, type=Path, help="heads file to write (.safetensors)")
    t.add_argument("--num-heads", type=_int("--num-heads"), default=3, help="draft heads (default 3)")
    t.add_argument("--steps", type=_int("--steps"), default=1000, help="optimizer steps (default 1000)")
    t.add_argument("--seq-len", type=_int("--seq-len"), default=256, help="tokens per training sequence (default 256)")
    t.add_argument("--lr", type=_float("--lr"), default=1e-3, help="peak learning rate, cosine decay (default 1e-3)")
    t.add_argument("--batch-size", type=_int("--batch-size"), default=8, help="sequences per step (default 8)")
    t.add_argument("--seed", type=_int("--seed"), default=0, help="data order and self-distill sampling (default 0)")
    t.add_argument("--max-tokens", type=_int("--max-tokens"), default=262144,
                   help="training pool size in tokens; their hidden states are cached (default 262144)")
    mode = t.add_mutually_exclusive_group()
    mode.add_argument("--self-distill", dest="self_distill", action="store_true", default=False,
                      help="targets are the model's own continuations (paper sampler) of prompts from the data")
    mode.add_argument("--text-targets", dest="self_distill", action="store_false",
                      help="targets are the data's own tokens (default: measured higher held-out accuracy and "
                           "accepted length than --self-distill at equal steps; see docs/training.md)")
    t.add_argument("--prompt-len", type=_int("--prompt-len"), default=32,
                   help="self-distill: prompt tokens taken from the data per sequence (default 32)")
    t.add_argument("--resume", action="store_true", help="continue from <out>.ckpt when it exists")
    t.add_argument("--cache-dir", type=Path, default=None,
                   help="where hidden states are cached (default ~/.cache/tokenswift/hidden, or $TOKENSWIFT_CACHE/hidden)")
    t.add_argument("--device", default=None, help="cpu, cuda ... (default: cuda when available)")

    e = sub.add_parser("eval-heads", help="measure draft heads on held-out text",
                       description="Per-head top-1 / top-3 accuracy on held-out text, and the mean accepted "
                                   "length of greedy TokenSwift with a static tree (no n-grams).")
    e.add_argument("--model", default=DEFAULT_MODEL, help=f"model (default {DEFAULT_MODEL})")
    e.add_argument("--heads", required=True, help="heads file (or auto for the shipped heads)")
    e.add_argument("--data", nargs="+", required=True, type=Path, metavar="FILE", help="held-out UTF-8 text files")
    e.add_argument("--max-tokens", type=_int("--max-tokens"), default=32768,
                   help="held-out tokens for the accuracies (default 32768)")
    e.add_argument("--seq-len", type=_int("--seq-len"), default=512, help="window length (default 512)")
    e.add_argument("--tree", default="1,3,3,3", help="tree for the accepted-length run (default 1,3,3,3)")
    e.add_argument("--prompts", type=_int("--prompts"), default=4, help="greedy runs (default 4; 0 = skip)")
    e.add_argument("--prompt-len", type=_int("--prompt-len"), default=512, help="prompt tokens per run (default 512)")
    e.add_argument("--new-tokens", type=_int("--new-tokens"), default=128, help="tokens per greedy run (default 128)")
    e.add_argument("--seed", type=_int("--seed"), default=0, help="which windows are drawn (default 0)")
    e.add_argument("--json", action="store_true", help="print the result as one JSON object")
    e.add_argument("--device", default=None, help="cpu, cuda ... (default: cuda when available)")

    td = sub.add_parser("train-drafter", help="train the seq drafter by self-distillation",
                        description="The model continues prompts from the data with the paper's sampler; its features "
                                    "at three layers and its sampling distributions are cached on disk; a one-block "
                                    "drafter learns them, unrolled on its own outputs (training-time test).")
    td.add_argument("--model", default=DEFAULT_MODEL, help=f"model to train a drafter for (default {DEFAULT_MODEL})")
    td.add_argument("--data", nargs="+", required=True, type=Path, metavar="FILE", help="UTF-8 text files (prompts)")
    td.add_argument("--out", required=True, type=Path, help="drafter file to write (.safetensors)")
    td.add_argument("--steps", type=_int("--steps"), default=400, help="optimizer steps (default 400)")
    td.add_argument("--sequences", type=_int("--sequences"), default=512,
                    help="continuations the model writes for the pool, or text windows with --pool text (default 512)")
    td.add_argument("--pool", choices=DRAFTER_POOLS, default="generated",
                    help="generated: the model continues prompts of the data (default); text: windows of the data "
                         "itself, teacher-forced (one prefill a window: a larger pool for the same time)")
    td.add_argument("--seq-len", type=_int("--seq-len"), default=256, help="tokens per sequence (default 256)")
    td.add_argument("--prompt-len", type=_int("--prompt-len"), default=64,
                    help="prompt tokens taken from the data per sequence (default 64)")
    td.add_argument("--vocab", type=_int("--vocab"), default=8192,
                    help="draft vocabulary: the tokens the model writes most (default 8192)")
    td.add_argument("--unroll", type=_int("--unroll"), default=4, help="training-time test depth (default 4)")
    td.add_argument("--lr", type=_float("--lr"), default=1e-3, help="peak learning rate, cosine decay (default 1e-3)")
    td.add_argument("--batch-size", type=_int("--batch-size"), default=4, help="sequences per step (default 4)")
    td.add_argument("--seed", type=_int("--seed"), default=0, help="prompts, sampling and data order (default 0)")
    td.add_argument("--resume", action="store_true", help="continue from <out>.ckpt when it exists")
    td.add_argument("--cache-dir", type=Path, default=None,
                    help="where the pool is cached (default ~/.cache/tokenswift/hidden, or $TOKENSWIFT_CACHE/hidden)")
    td.add_argument("--device", default=None, help="cpu, cuda ... (default: cuda when available)")

    ed = sub.add_parser("eval-drafter", help="measure a seq drafter on held-out text",
                        description="The model continues held-out prompts with the paper's sampler; per depth, the "
                                    "drafter's coupled acceptance (its draw with the target position's own noise "
                                    "equals the target's) and total variation, and the expected tokens per "
                                    "iteration; optionally a real run's per-depth acceptance beside them.")
    ed.add_argument("--model", default=DEFAULT_MODEL, help=f"model (default {DEFAULT_MODEL})")
    ed.add_argument("--drafter", default="auto", help="drafter file, or auto for the shipped one (default auto)")
    ed.add_argument("--data", nargs="+", required=True, type=Path, metavar="FILE", help="held-out UTF-8 text files")
    ed.add_argument("--sequences", type=_int("--sequences"), default=64, help="continuations (default 64)")
    ed.add_argument("--seq-len", type=_int("--seq-len"), default=256, help="tokens per sequence (default 256)")
    ed.add_argument("--prompt-len", type=_int("--prompt-len"), default=64, help="prompt tokens (default 64)")
    ed.add_argument("--depth", type=_int("--depth"), default=4, help="chain depth γ (default 4)")
    ed.add_argument("--run-tokens", type=_int("--run-tokens"), default=512,
                    help="tokens of a real tokenswift run with this drafter alone (no n-grams), on a held-out "
                         "prompt, whose acceptance per depth is reported beside (default 512; 0 = skip)")
    ed.add_argument("--run-prefix", type=_int("--run-prefix"), default=1024,
                    help="prompt tokens of that run (default 1024)")
    ed.add_argument("--seed", type=_int("--seed"), default=0, help="prompts and sampling seeds (default 0)")
    ed.add_argument("--cache-dir", type=Path, default=None, help="where the held-out pool is cached")
    ed.add_argument("--json", action="store_true", help="print the result as one JSON object")
    ed.add_argument("--device", default=None, help="cpu, cuda ... (default: cuda when available)")

    b = sub.add_parser("bench", help="benchmark decoding methods side by side",
                       description="Runs methods one after another on the same prompt and seed, reads each long "
                                   "run at checkpoint lengths, and reports speed (and speedup vs ar), acceptance, "
                                   "Distinct-n and peak memory. Writes JSON, CSV and a PNG figure.")
    b.add_argument("--model", default=DEFAULT_MODEL, help=f"model (default {DEFAULT_MODEL})")
    b.add_argument("--heads", default="auto", metavar="PATH|none|auto", help="draft heads (default auto)")
    b.add_argument("--prompt-file", type=Path, default=None,
                   help="UTF-8 text the prompt is cut from (default ../shared/data/cdne.txt when present)")
    b.add_argument("--prefix", type=_int("--prefix"), default=2048, help="prompt tokens (default 2048)")
    b.add_argument("--lengths", default="2048,4096,8192,16384",
                   help="checkpoint lengths of new tokens, comma-separated (default 2048,4096,8192,16384)")
    b.add_argument("--contexts", default=None, metavar="C1,C2,...",
                   help="context sweep: for each C, the first C tokens of the text as the prompt (instead of "
                        "--prefix), then the methods side by side; e.g. 4096,16384,32768,65536,100000 with "
                        "--lengths 1024")
    b.add_argument("--prefill-kv", type=Path, default=None, metavar="DIR",
                   help="with --contexts: read each context's prefill from K/V rows an earlier sweep saved in DIR "
                        "(--checkpoint-kv's format, checked against the model, numerics and tokens), else compute "
                        "and save them there; a 64K prefill takes most of an hour on 2 CPU cores, reading it seconds")
    b.add_argument("--methods", default=",".join(_bench_defaults()),
                   help="comma-separated, from: " + ", ".join(_bench_methods()) + f" (default {','.join(_bench_defaults())})")
    b.add_argument("--seed", type=_int("--seed"), default=0, help="sampling seed (default 0)")
    b.add_argument("--rounds", type=_int("--rounds"), default=1, metavar="N",
                   help="run the methods N times round-robin (ar, m1, ..., ar, m1, ...) and report medians, each "
                        "speedup the median of the rounds' ratios to the same round's ar: for a machine whose speed "
                        "drifts, such as a shared VM (default 1)")
    b.add_argument("--greedy", action="store_true", help="greedy instead of the paper's sampler (not for speed claims)")
    b.add_argument("--rope-scaling", default=None, metavar="KIND:FACTOR",
                   help="extend the context, e.g. yarn:4 for 32K on SmolLM2 (default: auto when needed)")
    b.add_argument("--out", type=Path, default=Path("bench-results"), help="output folder (default bench-results)")
    b.add_argument("--name", default=None, help="file name stem (default bench-<prefix>-<max length>)")
    b.add_argument("--device", default=None, help="cpu, cuda ... (default: cuda when available)")
    b.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="weights dtype")
    _param_args(b, "kv_dtype")
    _param_args(b, "weights", "activations", "attention_dtype")

    v = sub.add_parser("serve", help="serve the model over an OpenAI-compatible HTTP API",
                       description="OpenAI-compatible HTTP server: /v1/completions, /v1/chat/completions (streamed "
                                   "or not), /v1/models, /health. One generation runs at a time; the others wait in "
                                   "a bounded queue. Needs the serve extra: pip install 'tokenswift[serve]'.")
    v.add_argument("--model", default=DEFAULT_MODEL, help=f"model to serve (default {DEFAULT_MODEL})")
    v.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 for all)")
    v.add_argument("--port", type=_int("--port"), default=8000, help="TCP port (default 8000; 0 = any free port)")
    v.add_argument("--api-key", default=None, metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on every path but /health, /docs included "
                        "(default: no key)")
    v.add_argument("--queue-size", type=_int("--queue-size"), default=16, metavar="N",
                   help="requests that may wait while one generates; more get 429 (default 16)")
    v.add_argument("--max-body-bytes", type=_int("--max-body-bytes"), default=None, metavar="N",
                   help="largest request body; larger ones get 413 before they are read (default 4194304)")
    v.add_argument("--heads", default="auto", metavar="PATH|none|auto", help="draft heads (default auto)")
    v.add_argument("--device", default=None, help="cpu, cuda ... (default: cuda when available)")
    v.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="weights dtype")
    _param_args(v, "kv_dtype")
    _param_args(v, "weights", "activations", "attention_dtype")
    v.add_argument("--rope-scaling", default=None, metavar="TYPE:FACTOR",
                   help="extend the context, e.g. yarn:4 (types: linear, dynamic, yarn, llama3)")
    v.add_argument("--compile", action="store_true", help=COMPILE_HELP)
    return p


def options_markdown() -> str:
    """Every command's options as Markdown (the end of docs/cli.md), from the parser itself, so
    each flag, default and help text is the one the CLI has: `tests/test_docs.py` checks the page
    against it."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {c.dest: c.help for c in sub._choices_actions}
    out = ["## Every option", "",
           "Generated from the parser (`python -c 'from tokenswift.cli import options_markdown as m; print(m())'`).",
           ""]
    for name, sp in sub.choices.items():
        out += [f"### `tokenswift {name}`", "", f"{helps.get(name, '')[:1].upper()}{helps.get(name, '')[1:]}.", "",
                "| option | default | what it does |", "|---|---|---|"]
        for a in sp._actions:
            if not a.option_strings or a.dest == "help":
                continue
            flag = ", ".join(f"`{o}`" for o in a.option_strings)
            if a.choices and not isinstance(a, argparse._StoreTrueAction):
                flag += " " + "\\|".join(f"`{c}`" for c in a.choices)
            unset = a.default is None or a.default is False or a.default == argparse.SUPPRESS
            default = "" if unset else f"`{a.default}`"
            text = " ".join((a.help or "").replace("|", "\\|").split()).replace("%%", "%")
            out.append(f"| {flag} | {default} | {text} |")
        out.append("")
    return "\n".join(out)


def _bench_methods() -> tuple[str, ...]:
    from .bench import METHODS

    return METHODS


def _bench_defaults() -> tuple[str, ...]:
    from .bench import DEFAULT_METHODS

    return DEFAULT_METHODS


MAX_PROMPT_BYTES = 64 << 20  # more text than any model's context holds (~15M tokens of English)


def _at_most(f: Any, what: str) -> bytes:
    """A prompt's bytes from `f`, refused past MAX_PROMPT_BYTES: /dev/zero never ends."""
    data = f.read(MAX_PROMPT_BYTES + 1)
    if len(data) > MAX_PROMPT_BYTES:
        raise CliError(f"{what} is larger than {MAX_PROMPT_BYTES >> 20} MiB, the most a prompt may be")
    return data


def _read_prompt(args: argparse.Namespace) -> str:
    if args.prompt is not None:
        text = args.prompt
    elif args.prompt_file is not None:
        path: Path = args.prompt_file
        try:
            with open(path, "rb") as f:
                data = _at_most(f, f"prompt file {path}")
        except FileNotFoundError:
            raise CliError(f"prompt file not found: {path}") from None
        except IsADirectoryError:
            raise CliError(f"prompt file is a directory: {path}") from None
        except OSError as e:
            raise CliError(f"cannot read prompt file {path}: {e.strerror}") from None
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise CliError(f"prompt file {path} is not UTF-8 (bad byte at offset {e.start})") from None
    elif not sys.stdin.isatty():
        data = _at_most(sys.stdin.buffer, "the prompt on stdin")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise CliError(f"stdin is not UTF-8 (bad byte at offset {e.start})") from None
    else:
        raise CliError("no prompt: give --prompt, --prompt-file, or pipe text on stdin")
    if not text.strip():
        raise CliError("the prompt is empty")
    return text


# The generate options the text depends on (besides the sampling and speculation options):
# a checkpoint records them and --resume reuses them.
_RUN_OPTIONS = ("prompt", "prompt_file", "model", "heads", "device", "dtype", "kv_dtype", "weights", "activations",
                "attention_dtype", "rope_scaling", "method", "chat", "max_new_tokens", "ignore_eos", "paper_defaults", "no_ngrams")


def _run_options(args: argparse.Namespace) -> dict[str, Any]:
    """The run's options from the command line, validated before any model loads."""
    from .config import PAPER_SAMPLING
    from .params import PARAMS, SAMPLING, SPEC

    sampling = {name: getattr(args, name) for name in SAMPLING}
    if args.paper_defaults:
        sampling.update(PAPER_SAMPLING)
    spec = {name: getattr(args, name) for name in SPEC if hasattr(args, name)}
    spec["use_ngrams"] = not args.no_ngrams
    seq_drafter = "auto"  # the seq drafter's weights: shipped for the model, or a file
    if args.drafter not in PARAMS["drafter"].choices:
        seq_drafter, spec["drafter"] = args.drafter, "seq"
        if not Path(args.drafter).is_file():
            raise CliError(f"--drafter must be one of {', '.join(PARAMS['drafter'].choices)} or a seq drafter file, "
                           f"got {args.drafter!r} (no such file)")
    elif args.drafter in ("self", "none"):
        seq_drafter = "none"
    options = {"model": args.model, "heads": args.heads, "seq_drafter": seq_drafter, "device": args.device,
               "dtype": args.dtype, "kv_dtype": args.kv_dtype, "weights": args.weights, "activations": args.activations,
               "attention_dtype": args.attention_dtype, "rope_scaling": args.rope_scaling, "method": args.method, "chat": args.chat,
               "max_new_tokens": args.max_new_tokens, "ignore_eos": args.ignore_eos,
               "sampling": sampling, "spec": spec, "compile": args.compile}
    _check_options(options, _flag_name)
    return options


def _checkpoint_key(section: str, name: str) -> str:
    return f"options.{section}.{name}" if section else f"options.{name}"


def _flag_name(section: str, name: str) -> str:
    from .params import PARAMS

    return PARAMS[name].flag or name


def _check_options(o: dict[str, Any], name_of: Any, prefix: str = "") -> None:
    """Validates a run's options; a bad one is a CliError naming it as `name_of(section, name)`
    does (a flag for the command line, a key for a checkpoint)."""
    from .config import SamplingConfig, SpecConfig
    from .params import PARAMS, ParamError

    section = ""
    try:
        for key in ("max_new_tokens", "method", "ignore_eos"):
            PARAMS[key].check(o[key])
        PARAMS["kv_dtype"].check(o.get("kv_dtype", "auto"))  # checkpoints before kv_dtype have none
        PARAMS["weights"].check(o.get("weights", "auto"))  # nor before weights
        PARAMS["activations"].check(o.get("activations", "float"))
        PARAMS["attention_dtype"].check(o.get("attention_dtype", "float32"))
        section = "sampling"
        SamplingConfig(**o["sampling"])
        section = "spec"
        SpecConfig(**o["spec"])
    except ParamError as e:
        raise CliError(prefix + e.named(name_of(section, e.param))) from None
    except TypeError as e:  # a checkpoint's section holding an unknown key
        raise CliError(f"{prefix}{section}: {e}") from None
    except KeyError as e:
        raise CliError(f"{prefix}lacks the option {e.args[0]!r}") from None


def _refuse_options_with_resume(args: argparse.Namespace) -> None:
    from .params import PARAMS, SAMPLING, SPEC

    defaults = build_parser().parse_args(["generate"])
    names = (*_RUN_OPTIONS, *SAMPLING, *(n for n in SPEC if hasattr(defaults, n)))
    given = [name for name in names if getattr(args, name) != getattr(defaults, name)]
    if given:
        p = PARAMS.get(given[0])
        flag = p.flag if p is not None and p.flag else "--" + given[0].replace("_", "-")
        raise CliError(f"--resume continues with the options saved in {args.resume}; drop {flag}")


def cmd_generate(args: argparse.Namespace) -> int:
    from .checkpoint import Checkpoint, claim, save_to

    if args.checkpoint_every < 1:
        raise CliError(f"--checkpoint-every must be >= 1, got {args.checkpoint_every}")
    if args.resume is not None:
        _refuse_options_with_resume(args)
        ck = Checkpoint.load(args.resume)
        path = args.resume
        _check_options(ck.options, _checkpoint_key, prefix=f"checkpoint {path}: ")
        ck_path: Path | None = args.checkpoint or args.resume
    else:
        ck = Checkpoint(options=_run_options(args), prompt=_read_prompt(args))
        ck_path = args.checkpoint
    if _rank() > 0:  # tensor parallel: rank 0 alone writes the checkpoint
        ck_path = None
    if ck_path is not None:  # from the first moment, so that a run killed while loading resumes too
        claim(ck_path, own=args.resume,
              kv=Path(f"{ck_path}.kv") if args.checkpoint_kv or args.resume is not None else None)
        save_to(ck, ck_path)
    old_term = _sigterm_as_interrupt()
    try:
        return _run_generate(args, ck, ck_path)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM, while loading or generating
        where = (f"; {len(ck.tokens)} tokens saved in {ck_path}: continue with tokenswift generate --resume {ck_path}"
                 if ck_path is not None else "")
        sys.stdout.flush()
        sys.stderr.write(f"\ninterrupted{where}\n")
        return EXIT_INTERRUPT
    finally:
        _restore_sigterm(old_term)


def _run_generate(args: argparse.Namespace, ck: Any, ck_path: Path | None) -> int:
    from contextlib import closing

    from .api import TextStream
    from .checkpoint import continue_run, load_model_for, save_to
    from .params import ParamError

    lm = load_model_for(ck, args.resume)
    if _lead_or_follow(lm):
        return 0
    resumed = len(ck.tokens)
    kv = None
    if ck_path is not None:
        kv = Path(f"{ck_path}.kv")
        if not (args.checkpoint_kv or (args.resume is not None and kv.exists())):
            kv = None
    try:
        steps = continue_run(ck, lm, ck_path, args.checkpoint_every, kv=kv)
    except ParamError as e:
        if args.resume is None:
            raise
        raise CliError(f"checkpoint {args.resume}: " + e.named(_checkpoint_key("", e.param))) from None
    if ck_path is not None:
        save_to(ck, ck_path)
    out = sys.stdout
    bars = Bars() if (sys.stderr.isatty() and not out.isatty()) else None
    text_stream = TextStream(lm.tokenizer)
    pieces: list[str] = []
    stats: dict[str, Any] = {}

    def emit(piece: str) -> None:
        if args.json:
            pieces.append(piece)
        elif piece:
            out.write(piece)
            out.flush()

    emit(text_stream.push(ck.tokens))  # the text a resumed run had already written: stdout gets it whole
    try:
        with closing(steps):  # saves at exit, whatever the exit (Ctrl-C and SIGTERM included)
            for step in steps:
                stats = step.stats
                emit(text_stream.push(step.tokens))
                if bars:
                    bars("tokens", len(ck.tokens), ck.max_new_tokens,
                         {"tokens_per_s": stats.get("decode_tokens_per_s", 0)})
    except KeyboardInterrupt:
        # stdout gets the text of every token the checkpoint holds: the interrupt can land after
        # a step's tokens were committed (and saved) but before they were printed, and the stream
        # holds back a character not yet finished
        emit(text_stream.push(ck.tokens[len(text_stream.ids):]) + text_stream.flush())
        # a long run stopped on purpose (one segment of a resumable job) still reports what it did
        if args.stats:
            out.flush()
            sys.stderr.write("\n" + json.dumps(dict(stats, interrupted=True, resumed_tokens=resumed)) + "\n")
        raise
    finally:
        if bars:
            bars.close()
    tail = text_stream.flush()
    if resumed:
        stats = dict(stats, resumed_tokens=resumed)
    if args.json:
        pieces.append(tail)
        json.dump({"tokens": ck.tokens, "text": "".join(pieces), "stats": stats}, out)
        out.write("\n")
    else:
        out.write(tail + "\n")
        if args.stats:
            sys.stderr.write(json.dumps(stats) + "\n")
        elif sys.stderr.isatty() and out.isatty():
            sys.stderr.write(
                f"[{stats.get('new_tokens', 0)} tokens, {stats.get('decode_tokens_per_s', 0):.1f} tok/s, "
                f"prefill {stats.get('prefill_seconds', 0):.2f} s]\n"
            )
    out.flush()
    return 0


def _sigterm_as_interrupt() -> Any:
    """SIGTERM (kill, a job scheduler's stop) ends a run like Ctrl-C: checkpoint saved, exit 130."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    return signal.signal(signal.SIGTERM, handler)


def _restore_sigterm(old: Any) -> None:
    import signal

    if old is not None:
        signal.signal(signal.SIGTERM, old)


class Bars:
    """tqdm bars on stderr, one per phase of a long job, each closed when the next begins: a
    generation's tokens, a bench's methods, training's hidden states / self-distillation /
    optimizer steps. `bars(phase, done, total, info)`; info may hold tokens_per_s, loss, acc."""

    LABELS = {"hidden": ("hidden states", "seq"), "generate": ("self-distill", "seq"), "prefill": ("text pool", "seq"),
              "train": ("training", "step")}

    def __init__(self) -> None:
        self.phase: str | None = None
        self.bar: Any = None

    def __call__(self, phase: str, done: int, total: int, info: dict[str, Any] | None = None) -> None:
        from tqdm import tqdm

        if phase != self.phase:
            self.close()
            label, unit = self.LABELS.get(phase, (phase, "tok"))
            # a resumed job starts where it stands, so the rate counts only this run's work
            self.bar = tqdm(total=total, initial=max(0, min(done, total) - 1), desc=label, unit=unit,
                            file=sys.stderr, dynamic_ncols=True)
            self.phase = phase
        self.bar.update(min(done, total) - self.bar.n)  # tqdm throttles the redraws
        if info:
            post = {"tok/s": f"{info.get('tokens_per_s', 0):.0f}"}
            if "loss" in info:
                post["loss"] = f"{info['loss']:.3f}"
                post["acc"] = "/".join(f"{a:.2f}" for a in info.get("acc", []))
            self.bar.set_postfix(post, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.bar = self.phase = None


def _default_cache_dir() -> Path:
    from .loading import _cache_root

    return _cache_root() / "hidden"


def cmd_train_heads(args: argparse.Namespace) -> int:
    from .train import TrainConfig, build_store, read_texts, train_heads

    cfg = TrainConfig(num_heads=args.num_heads, steps=args.steps, seq_len=args.seq_len, lr=args.lr,
                      batch_size=args.batch_size, seed=args.seed, self_distill=args.self_distill,
                      max_tokens=args.max_tokens, prompt_len=args.prompt_len)
    read_texts(args.data)  # missing or non-UTF-8 files fail before the model loads
    if args.out.suffix != ".safetensors":
        raise CliError(f"--out must end in .safetensors, got {args.out}")
    from .loading import load_model

    loaded = load_model(args.model, device=args.device, pack=False)
    t0 = time.perf_counter()
    bars = Bars()
    try:
        store = build_store(loaded.model, loaded.tokenizer, args.data, cfg, args.cache_dir or _default_cache_dir(), bars)
        t1 = time.perf_counter()
        info = {"data": [p.name for p in args.data], "command": "tokenswift train-heads " + " ".join(sys.argv[2:])}
        summary = train_heads(loaded.model, store, cfg, args.out, resume=args.resume, progress=bars,
                              model_name=loaded.name, info=info)
    finally:
        bars.close()
    t2 = time.perf_counter()
    summary.update(cache_seconds=round(t1 - t0, 1), total_seconds=round(t2 - t0, 1), out=str(args.out))
    sys.stderr.write(json.dumps(summary) + "\n")
    return 0


def cmd_eval_heads(args: argparse.Namespace) -> int:
    from .train import greedy_accepted_length, head_accuracy, pick_windows, read_texts, tokenize

    texts = read_texts(args.data)
    import tokenswift

    lm = tokenswift.load(args.model, heads=args.heads, device=args.device)
    if lm.heads is None:
        raise CliError(f"no draft heads to evaluate for {args.model!r} (--heads {args.heads})")
    if lm.tokenizer is None:
        raise CliError(f"model {args.model!r} has no tokenizer to read the data with")
    docs = tokenize(lm.tokenizer, texts)
    windows = pick_windows(docs, args.seq_len, max(1, args.max_tokens // args.seq_len), args.seed)
    acc = head_accuracy(lm.model, lm.heads, windows)
    result: dict[str, Any] = {"heads": lm.heads.meta.get("path"), "positions": acc.positions,
                              "base_top1": round(acc.base_top1, 4),
                              "top1": [round(x, 4) for x in acc.top1], "top3": [round(x, 4) for x in acc.top3]}
    if args.prompts > 0:
        prompts = pick_windows(docs, args.prompt_len, args.prompts, args.seed + 1)
        result["greedy"] = greedy_accepted_length(lm.model, lm.heads, prompts, args.new_tokens, args.tree,
                                                  lm.eos_token_ids)
    if args.json:
        sys.stdout.write(json.dumps(result) + "\n")
    else:
        sys.stdout.write(f"held-out positions: {acc.positions}  (base model next-token top-1 {acc.base_top1:.3f})\n")
        for k, (a1, a3) in enumerate(zip(acc.top1, acc.top3), 1):
            sys.stdout.write(f"head {k} (token t+{k + 1}): top-1 {a1:.3f}  top-3 {a3:.3f}\n")
        if "greedy" in result:
            g = result["greedy"]
            sys.stdout.write(f"greedy tree {g['tree']}: mean accepted length {g['mean_accepted_length']:.2f} "
                             f"({g['tokens_per_iteration']:.2f} tokens/iteration over {g['iterations']} iterations)\n")
    return 0


def cmd_train_drafter(args: argparse.Namespace) -> int:
    from .seqdraft import default_taps
    from .train import DrafterConfig, build_distill_store, read_texts, train_drafter

    cfg = DrafterConfig(steps=args.steps, sequences=args.sequences, seq_len=args.seq_len, prompt_len=args.prompt_len,
                        vocab=args.vocab, unroll=args.unroll, lr=args.lr, batch_size=args.batch_size, seed=args.seed,
                        pool=args.pool)
    read_texts(args.data)  # missing or non-UTF-8 files fail before the model loads
    if args.out.suffix != ".safetensors":
        raise CliError(f"--out must end in .safetensors, got {args.out}")
    from .loading import load_model

    loaded = load_model(args.model, device=args.device, pack=False)
    taps = default_taps(loaded.model.cfg.num_layers)
    t0 = time.perf_counter()
    bars = Bars()
    try:
        store = build_distill_store(loaded.model, loaded.tokenizer, args.data, cfg, taps,
                                    args.cache_dir or _default_cache_dir(), bars)
        t1 = time.perf_counter()
        info = {"data": [p.name for p in args.data], "command": "tokenswift train-drafter " + " ".join(sys.argv[2:])}
        summary = train_drafter(loaded.model, store, cfg, taps, args.out, resume=args.resume, progress=bars,
                                model_name=loaded.name, info=info)
    finally:
        bars.close()
    t2 = time.perf_counter()
    summary.update(pool_seconds=round(t1 - t0, 1), total_seconds=round(t2 - t0, 1), out=str(args.out))
    sys.stderr.write(json.dumps(summary) + "\n")
    return 0


def cmd_eval_drafter(args: argparse.Namespace) -> int:
    from .config import PAPER_SAMPLING
    from .train import DrafterConfig, build_distill_store, eval_drafter, read_texts, tokenize

    texts = read_texts(args.data)
    if args.depth < 1 or args.depth > 16:
        raise CliError(f"--depth must be in [1, 16], got {args.depth}")
    cfg = DrafterConfig(sequences=args.sequences, seq_len=args.seq_len, prompt_len=args.prompt_len, seed=args.seed)
    import tokenswift

    lm = tokenswift.load(args.model, heads="none", device=args.device, drafter=args.drafter)
    if lm.seq is None:
        raise CliError(f"no seq drafter to evaluate for {args.model!r} (--drafter {args.drafter})")
    from .loading import load_model

    plain = load_model(args.model, device=args.device, pack=False)  # batched generation: unpacked weights
    bars = Bars()
    try:
        store = build_distill_store(plain.model, plain.tokenizer, args.data, cfg, lm.seq.taps,
                                    args.cache_dir or _default_cache_dir(), bars, seed_base=10**9)
    finally:
        bars.close()
    del plain
    res = eval_drafter(lm.seq, store, cfg.prompt_len, depth=args.depth)
    res["drafter"] = getattr(lm.seq, "meta", {}).get("path")
    if args.run_tokens > 0:
        docs = tokenize(lm.tokenizer, texts)
        ids = [int(t) for d in docs for t in d][: args.run_prefix]
        run = lm.generate(ids, args.run_tokens, method="tokenswift", drafter="seq", use_ngrams=False,
                          gamma=args.depth, ignore_eos=True, **PAPER_SAMPLING)
        st = run.stats
        res["run"] = {"prefix": len(ids), "new_tokens": st["new_tokens"], "depth_acceptance": st["depth_acceptance"],
                      "tokens_per_iteration": round(st["tokens_per_iteration"], 3),
                      "seq_ms_per_drafted_token": st["drafters"].get("seq", {}).get("ms_per_token"),
                      "decode_tokens_per_s": round(st["decode_tokens_per_s"], 2)}
    if args.json:
        sys.stdout.write(json.dumps(res) + "\n")
    else:
        sys.stdout.write(f"held-out positions: {res['positions']} (target mass inside the draft vocabulary "
                         f"{res['target_mass_in_draft_vocab']:.3f})\n")
        for d, (a, tv) in enumerate(zip(res["coupled_acceptance"], res["total_variation"]), 1):
            line = f"depth {d}: coupled acceptance {a:.3f}  total variation {tv:.3f}"
            if "run" in res and d <= len(res["run"]["depth_acceptance"]):
                line += f"  (real run: {res['run']['depth_acceptance'][d - 1]:.3f})"
            sys.stdout.write(line + "\n")
        sys.stdout.write(f"expected tokens per iteration at depth {res['depth']}: {res['expected_tokens_per_iteration']:.2f}\n")
        if "run" in res:
            r = res["run"]
            sys.stdout.write(f"real run ({r['new_tokens']} tokens after {r['prefix']}, drafter seq alone): "
                             f"{r['tokens_per_iteration']:.2f} tokens/iteration, {r['seq_ms_per_drafted_token']} ms "
                             f"per drafted token, {r['decode_tokens_per_s']:.1f} tok/s\n")
    return 0


def _bench_outputs(args: argparse.Namespace, stem: str) -> dict[str, Path]:
    """The files a bench writes, checked before any work: a bench of an hour must not end in an
    unwritable path. `--name` is a file name, never a path out of `--out`."""
    if not stem or stem in (".", "..") or any(c in stem for c in "/\\\0"):
        raise CliError(f"--name must be a file name without a folder (/), got {stem!r}")
    if args.out.exists() and not args.out.is_dir():
        raise CliError(f"--out {args.out} exists and is not a folder")
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CliError(f"cannot create the --out folder {args.out}: {e.strerror or e}") from None
    paths = {ext: args.out / f"{stem}.{ext}" for ext in ("json", "csv", "png")}
    for path in paths.values():
        if path.is_dir():
            raise CliError(f"cannot write {path}: is a folder")
    if not os.access(args.out, os.W_OK):
        raise CliError(f"cannot write in the --out folder {args.out}: permission denied")
    return paths


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import (BenchSetup, available, numerics, parse_lengths, parse_methods, run_bench, run_sweep, sweep_table,
                        table, write_png, write_sweep_png)

    try:
        lengths = parse_lengths(args.lengths)
        methods = parse_methods(args.methods)
        contexts = parse_lengths(args.contexts, "contexts") if args.contexts is not None else None
    except ValueError as e:
        raise CliError(f"--{e}") from None
    if args.prefix < 1:
        raise CliError(f"--prefix must be >= 1, got {args.prefix}")
    if args.rounds < 1:
        raise CliError(f"--rounds must be >= 1, got {args.rounds}")
    if args.prefill_kv is not None and not contexts:
        raise CliError(f"--prefill-kv {args.prefill_kv} needs --contexts (it keeps a sweep's prefills)")
    if args.prefill_kv is not None and args.prefill_kv.exists() and not args.prefill_kv.is_dir():
        raise CliError(f"--prefill-kv must be a folder, got the file {args.prefill_kv}")
    if all(available(m) is not None for m in methods):
        raise CliError("no method can run here: " + "; ".join(f"{m}: {available(m)}" for m in methods))
    prefix = contexts[-1] if contexts else args.prefix
    stem = args.name or (f"bench-sweep-{prefix}-{lengths[-1]}" if contexts else f"bench-{args.prefix}-{lengths[-1]}")
    paths = _bench_outputs(args, stem)
    setup = BenchSetup.load(args.model, heads=args.heads, device=args.device, dtype=args.dtype,
                            kv_dtype=args.kv_dtype, weights=args.weights, activations=args.activations,
                            attention_dtype=args.attention_dtype, rope_scaling=args.rope_scaling,
                            prompt_file=args.prompt_file,
                            prefix=prefix, lengths=lengths, greedy=args.greedy, seed=args.seed)
    if setup.auto_rope:
        sys.stderr.write(f"tokenswift: {prefix + lengths[-1]} tokens exceed the model's context; "
                         f"using --rope-scaling {setup.rope_scaling}\n")
    command = "tokenswift " + " ".join(sys.argv[1:]) if sys.argv and "tokenswift" in sys.argv[0] else None

    def save(result: dict[str, Any]) -> None:  # after each method too: a stopped bench keeps them
        setup.save(result, paths["json"], paths["csv"], command)

    bars = Bars()
    try:
        if contexts:
            result = run_sweep(setup.lm, setup.prompt, contexts, lengths, methods, setup.sampling, progress=bars,
                               on_context=save, kv_dir=args.prefill_kv,
                               options=numerics(setup.lm, setup.rope_scaling), rounds=args.rounds)
        else:
            result = run_bench(setup.lm, setup.prompt, lengths, methods, setup.sampling, progress=bars, on_method=save,
                               rounds=args.rounds)
    finally:
        bars.close()
    save(result)
    runs = result["runs"]  # a sweep's by context, then by method
    runs = {f"{m} @ {c}": r for c, rs in runs.items() for m, r in rs.items()} if contexts else runs
    skipped = {name: run["skipped"] for name, run in runs.items() if "skipped" in run}
    if not result["records"]:
        raise CliError("no method ran: " + "; ".join(f"{m}: {why}" for m, why in skipped.items()) +
                       f" (recorded in {paths['json']})")
    sampler = "greedy" if args.greedy else "paper sampler"
    try:
        if contexts:
            write_sweep_png(result, paths["png"], title=f"{setup.lm.name}, {lengths[-1]} new tokens after each "
                                                         f"context, {sampler}, {result['device']}")
        else:
            write_png(result, paths["png"], title=f"{setup.lm.name}, {args.prefix}-token prefix, {sampler}, "
                                                   f"{result['device']}")
    except ImportError:
        paths.pop("png")
        sys.stderr.write("tokenswift: matplotlib is not installed; no PNG (pip install 'tokenswift[bench]')\n")
    print(sweep_table(result) if contexts else table(result))
    if args.rounds > 1:
        print(f"each figure: the median of {args.rounds} rounds, the methods run round-robin; each speedup: the "
              "median of the rounds' ratios to the same round's ar")
    for name, why in skipped.items():
        print(f"{name}: skipped ({why})")
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    if not 0 <= args.port <= 65535:
        raise CliError(f"--port must be in [0, 65535], got {args.port}")
    if args.queue_size < 1:
        raise CliError(f"--queue-size must be >= 1, got {args.queue_size}")
    if args.max_body_bytes is not None and args.max_body_bytes < 1:
        raise CliError(f"--max-body-bytes must be >= 1, got {args.max_body_bytes}")
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise CliError("tokenswift serve needs fastapi and uvicorn: pip install 'tokenswift[serve]'") from None
    from .server import MAX_BODY_BYTES, bind, check_api_key, make_server

    if args.api_key is not None:
        try:
            check_api_key(args.api_key, "--api-key")
        except ValueError as e:
            raise CliError(str(e)) from None

    import tokenswift

    if _rank() > 0:  # tensor parallel: rank 0 serves, the others run its generations beside it
        lm = tokenswift.load(args.model, heads=args.heads, device=args.device, dtype=args.dtype,
                             rope_scaling=args.rope_scaling, compile=args.compile, kv_dtype=args.kv_dtype,
                             weights=args.weights, activations=args.activations,
                             attention_dtype=args.attention_dtype)
        _lead_or_follow(lm)
        return 0
    try:  # before the model loads, so that a taken port fails at once
        sock = bind(args.host, args.port)
    except OSError as e:
        raise CliError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None

    lm = tokenswift.load(args.model, heads=args.heads, device=args.device, dtype=args.dtype,
                         rope_scaling=args.rope_scaling, compile=args.compile, kv_dtype=args.kv_dtype,
                         weights=args.weights, activations=args.activations,
                         attention_dtype=args.attention_dtype)
    _lead_or_follow(lm)
    server = make_server(lm, names=[args.model], api_key=args.api_key, queue_size=args.queue_size,
                         max_body_bytes=args.max_body_bytes or MAX_BODY_BYTES)
    logging.getLogger("tokenswift.server").setLevel(logging.INFO)  # one line per request, with or without -v
    host, port = sock.getsockname()[:2]
    sys.stderr.write(f"tokenswift: serving {lm.name} at http://{host}:{port}/v1 (queue {args.queue_size}"
                     f"{', API key required' if args.api_key else ''}); Ctrl-C stops\n")
    sys.stderr.flush()
    server.run(sockets=[sock])
    return 0


# The tensor-parallel group this process leads (rank 0 under torchrun), told to stop at exit.
_LEADING: list[Any] = []


def _rank() -> int:
    from .parallel import world_size

    return int(os.environ.get("RANK", "0")) if world_size() > 1 else 0


def _lead_or_follow(lm: Any) -> bool:
    """Under torchrun: rank 0 leads (its step generators are mirrored on the other ranks) and
    returns False; any other rank runs rank 0's generations until it stops, then returns True."""
    from .parallel import follow

    tp = lm.model.tp
    if tp is None:
        return False
    if tp.rank == 0:
        lm.lead = True
        _LEADING.append(tp)
        return False
    follow(tp, lambda call: lm.steps(**call))
    return True


TENSOR_PARALLEL_COMMANDS = ("generate", "serve")


def main(argv: Sequence[str] | None = None) -> int:
    rc = None
    try:
        rc = _main(argv)
        return rc
    finally:
        from .parallel import stop_followers

        if _LEADING and rc in (None, EXIT_INTERRUPT):
            # interrupted or failed inside a step: the other ranks may be mid-collective, so no
            # goodbye; exiting non-zero makes torchrun stop them (the checkpoint is saved by now)
            if rc is None:
                import traceback

                traceback.print_exc()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(EXIT_INTERRUPT if rc == EXIT_INTERRUPT else 1)
        while _LEADING:
            stop_followers(_LEADING.pop())


def _main(argv: Sequence[str] | None = None) -> int:
    from .params import PARAMS, ParamError

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                            format="tokenswift: %(message)s", stream=sys.stderr)
        if not args.verbose:
            _quiet_transformers()
        if args.command is None:
            parser.print_help(sys.stderr)
            return EXIT_USAGE
        from .parallel import world_size

        if world_size() > 1 and args.command not in TENSOR_PARALLEL_COMMANDS:
            raise CliError(f"{args.command} runs in one process; under torchrun (WORLD_SIZE {world_size()}) "
                           f"tokenswift runs {' and '.join(TENSOR_PARALLEL_COMMANDS)}")
        if args.command == "generate":
            return cmd_generate(args)
        if args.command == "train-heads":
            return cmd_train_heads(args)
        if args.command == "eval-heads":
            return cmd_eval_heads(args)
        if args.command == "train-drafter":
            return cmd_train_drafter(args)
        if args.command == "eval-drafter":
            return cmd_eval_drafter(args)
        if args.command == "bench":
            return cmd_bench(args)
        if args.command == "serve":
            return cmd_serve(args)
        raise CliError(f"unknown command {args.command!r}")
    except CliError as e:
        _fail(str(e))
        return EXIT_USAGE
    except ParamError as e:  # an option's value, as the library saw it: name its flag
        p = PARAMS.get(e.param)
        _fail(e.named(p.flag if p is not None and p.flag else e.param))
        return EXIT_USAGE
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e))
        return EXIT_USAGE
    except KeyboardInterrupt:
        sys.stderr.write("\ninterrupted\n")
        return EXIT_INTERRUPT
    except BrokenPipeError:
        # The reader went away (e.g. `| head`): stop quietly, and keep Python from complaining at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


def _fail(msg: str) -> None:
    line = " ".join(msg.split())  # one line, whatever the message held
    if not line.startswith("tokenswift"):
        line = "tokenswift: error: " + line
    sys.stderr.write(line + "\n")


def _quiet_transformers() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    except Exception:  # transformers is a dependency; this only guards odd installs
        pass


if __name__ == "__main__":
    sys.exit(main())
