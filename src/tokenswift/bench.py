"""Side-by-side benchmarks: several decoding methods on one prompt, one after another in one
process, each as one long run read at checkpoint lengths (one 16K run gives 2K/4K/8K/16K).

Per method and checkpoint: wall and decode seconds, tokens/s, speedup vs `ar` of the same
bench, acceptance rate, tokens per iteration, n-gram share, Distinct-1..4 of the generated
tokens, peak memory, and whether the tokens equal `ar`'s. The library returns records;
`tokenswift bench` prints them and writes JSON, CSV and a PNG figure.

Methods: `ar`; `tokenswift` (auto trie) and its ablations `tokenswift-paper` (static tree
1,3,3,3 with n-gram top-20, the paper's setting), `tokenswift-noheads`, `tokenswift-nongrams`,
`tokenswift-fullkv`, `tokenswift-partial`, `tokenswift-sparse` (`--draft-kv sparse
--draft-vocab 16384`), `tokenswift-self` (the int4 self-draft alone), `tokenswift-seq` (the seq
drafter alone); `ngram` (prompt lookup); when installed, `hf` (transformers generate)
and `hf-lookup` (its prompt_lookup_num_tokens=10), both given one logits processor that is
our whole sampler (windowed penalty included), so they sample the same distribution with
their own random numbers; and `llamacpp` (llama-cpp-python on the same GGUF, its own sampler
set to the nearest settings).
"""

from __future__ import annotations

import csv
import importlib.util
import json
import logging
import os
import statistics
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .config import PAPER_SAMPLING
from .loading import synchronize

log = logging.getLogger("tokenswift")

OURS = {
    "ar": dict(method="ar"),
    "tokenswift": dict(method="tokenswift"),
    "tokenswift-paper": dict(method="tokenswift", tree="1,3,3,3", ngram_topk=20),
    "tokenswift-noheads": dict(method="tokenswift", use_heads=False),
    "tokenswift-nongrams": dict(method="tokenswift", use_ngrams=False),
    "tokenswift-fullkv": dict(method="tokenswift", draft_kv="full"),
    "tokenswift-partial": dict(method="tokenswift", draft_kv="partial"),
    # the per-query sparse draft view, its head over the first 16K ids and the text's own tokens
    "tokenswift-sparse": dict(method="tokenswift", draft_kv="sparse", draft_vocab=16384),
    "tokenswift-self": dict(method="tokenswift", drafter="self"),  # the int4 self-draft alone
    "tokenswift-seq": dict(method="tokenswift", drafter="seq"),  # the seq drafter alone
    "ngram": dict(method="ngram"),
}
EXTERNAL = ("hf", "hf-lookup", "llamacpp")
METHODS = tuple(OURS) + EXTERNAL
# llamacpp runs where llama-cpp-python is installed and the model is a GGUF file (else the table
# says why it was skipped): the engine a CPU user with that file would otherwise pick.
DEFAULT_METHODS = ("ar", "tokenswift", "ngram", "llamacpp")


def distinct_n(tokens: Sequence[int], n: int) -> float:
    """Distinct-n: distinct n-grams / all n-grams of a token sequence (0 when too short)."""
    total = len(tokens) - n + 1
    if total <= 0:
        return 0.0
    return len({tuple(tokens[i : i + n]) for i in range(total)}) / total


def first_difference(tokens: Sequence[int], ref: Sequence[int]) -> int | None:
    """Index of the first token that differs from `ref` (over the shorter length), None if none."""
    return next((i for i, (a, b) in enumerate(zip(tokens, ref)) if a != b), None)


def _reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:  # Linux: "5" resets the peak resident set size of this process
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_memory_mib(device: str = "cpu") -> float:
    """Peak memory since the last reset: GPU allocations on CUDA, else the process's peak RSS."""
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@dataclass
class Checkpoints:
    """Collects one record per checkpoint length as a run goes past it."""

    lengths: list[int]
    method: str
    device: str
    t0: float = field(default_factory=time.perf_counter)
    records: list[dict[str, Any]] = field(default_factory=list)

    def due(self, produced: int) -> list[int]:
        done = {r["length"] for r in self.records}
        return [L for L in self.lengths if L <= produced and L not in done]

    def add(self, L: int, tokens: Sequence[int], wall: float, prefill: float, stats: dict[str, Any]) -> None:
        gen = list(tokens[:L])
        decode = max(wall - prefill, 1e-9)
        rec = {
            "method": self.method, "length": L, "wall_seconds": wall, "prefill_seconds": prefill,
            "decode_seconds": decode, "tokens_per_s": L / wall, "decode_tokens_per_s": L / decode,
            "acceptance_rate": stats.get("acceptance_rate"), "tokens_per_iteration": stats.get("tokens_per_iteration"),
            "ngram_share": stats.get("ngram_share"), "depth_acceptance": stats.get("depth_acceptance"),
            "peak_memory_mib": peak_memory_mib(self.device),
        }
        for n in (1, 2, 3, 4):
            rec[f"distinct_{n}"] = distinct_n(gen, n)
        self.records.append(rec)


def run_ours(lm: Any, prompt: list[int], lengths: list[int], name: str, sampling: dict[str, Any],
             progress: Callable[[str, int, int], None] | None = None) -> tuple[list[dict[str, Any]], list[int], dict]:
    total = max(lengths)
    cp = Checkpoints(lengths, name, str(lm.model.device))
    _reset_peak()
    tokens: list[int] = []
    stats: dict[str, Any] = {}
    dev = lm.model.device
    synchronize(dev)
    start = time.perf_counter()
    for step in lm.steps(prompt, total, ignore_eos=True, **sampling, **OURS[name]):
        tokens.extend(step.tokens)
        stats = step.stats
        synchronize(dev)  # the clock times finished work (CUDA runs asynchronously)
        wall = time.perf_counter() - start
        for L in cp.due(len(tokens)):
            cp.add(L, tokens, wall, stats["prefill_seconds"], stats)
        if progress is not None:
            progress(name, len(tokens), total)
    return cp.records, tokens[:total], stats


def _sampler_processor(sampling: dict[str, Any]):
    """A transformers LogitsProcessor that is our whole sampler: windowed penalty, temperature
    and filters -> final log-probabilities, so `generate(do_sample=True)` with neutral warpers
    samples exactly our distribution (with its own random numbers)."""
    from transformers import LogitsProcessor

    from .config import SamplingConfig
    from .sampling import final_logprobs

    s = SamplingConfig(**sampling)
    W = s.penalty_width

    class OurSampler(LogitsProcessor):
        def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
            window = input_ids[:, -W:] if W else None
            return final_logprobs(scores.float(), window, s)

    return OurSampler()


def run_hf(lm: Any, prompt: list[int], lengths: list[int], name: str, sampling: dict[str, Any],
           progress: Callable[[str, int, int], None] | None = None) -> tuple[list[dict[str, Any]], list[int], dict]:
    from transformers import AutoModelForCausalLM, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

    src = Path(lm.source)
    if src.suffix == ".gguf":
        hf = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32)
    else:
        hf = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32)
    hf.eval()
    total = max(lengths)
    n0 = len(prompt)
    cp = Checkpoints(lengths, name, "cpu")
    times: dict[str, float] = {}

    class Clock(StoppingCriteria):
        def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kw: Any) -> torch.BoolTensor:
            produced = input_ids.shape[1] - n0
            wall = time.perf_counter() - times["start"]
            times.setdefault("prefill", wall)  # the first call comes right after the prefill token
            for L in cp.due(produced):
                cp.add(L, input_ids[0, n0:].tolist(), wall, times["prefill"], {})
            if progress is not None:
                progress(name, produced, total)
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    torch.manual_seed(int(sampling.get("seed", 0)))
    hf.generation_config.eos_token_id = None  # like ignore_eos: no stop, no EOS masking
    kw: dict[str, Any] = dict(max_new_tokens=total, do_sample=True, temperature=1.0, top_k=0,
                              top_p=1.0, logits_processor=LogitsProcessorList([_sampler_processor(sampling)]),
                              stopping_criteria=StoppingCriteriaList([Clock()]), pad_token_id=0)
    if name == "hf-lookup":
        kw["prompt_lookup_num_tokens"] = 10
    _reset_peak()
    times["start"] = time.perf_counter()
    with torch.inference_mode():
        out = hf.generate(torch.tensor([prompt]), **kw)
    tokens = out[0, n0:].tolist()
    del hf
    return cp.records, tokens, {}


# ggml's type ids for the KV cache types both engines hold, and llama.h's RoPE scaling types
GGML_KV_TYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 30}
LLAMA_ROPE_SCALING = {"linear": 1, "yarn": 2}


def llamacpp_options(lm: Any) -> dict[str, Any]:
    """llama.cpp's settings for computing what `lm` computes: the same KV cache type (its own
    default is float16) and the same RoPE scaling (YaRN or linear from the same original context)."""
    kv = GGML_KV_TYPES.get(lm.model.kv_dtype)
    if kv is None:
        raise ValueError(f"llamacpp: no ggml type for kv_dtype {lm.model.kv_dtype}")
    opts: dict[str, Any] = {"type_k": kv, "type_v": kv}
    rs = lm.config.rope_scaling
    if rs is not None and rs.kind in LLAMA_ROPE_SCALING and rs.factor != 1.0:
        opts.update(rope_scaling_type=LLAMA_ROPE_SCALING[rs.kind], rope_freq_scale=1.0 / rs.factor)
        if rs.kind == "yarn":
            opts["yarn_orig_ctx"] = int(rs.original_max_position_embeddings or lm.config.max_position_embeddings)
    elif rs is not None and rs.kind != "default":
        raise ValueError(f"llamacpp: RoPE scaling {rs.kind!r} has no llama.cpp equivalent in the bench")
    return opts


class ExternalFailure(RuntimeError):
    """Another engine's run failed (its error, or its process's end, in the message)."""


# What llama.cpp's build says of itself when it has AMX kernels: natively built llama-cpp-python
# 0.3.x crashed in `decode` on batches of more than one token there (a Xeon with AMX), so its prompt
# is then evaluated a token at a time (its decode is a token at a time anyway).
LLAMACPP_AMX = b"AMX_INT8 = 1"


def _llamacpp_child(job: dict[str, Any], out: Any) -> None:
    """llama.cpp's run, in its own process: ("progress", n) as tokens come, then ("done", records,
    tokens, stats) or ("error", message)."""
    try:
        import llama_cpp

        amx = LLAMACPP_AMX in llama_cpp.llama_print_system_info()
        batch = 1 if amx else 512
        sampling, prompt, lengths = job["sampling"], job["prompt"], job["lengths"]
        total = max(lengths)
        # seed and penalty window are the model's settings in llama-cpp-python, not generate()'s
        llm = llama_cpp.Llama(model_path=job["source"], n_ctx=len(prompt) + total + 8, n_threads=job["threads"],
                              n_batch=batch, n_ubatch=batch, verbose=False, logits_all=False,
                              seed=int(sampling.get("seed", 0)),
                              last_n_tokens_size=int(sampling.get("penalty_window", 64)), **job["options"])
        cp = Checkpoints(lengths, job["name"], "cpu")
        _reset_peak()
        start = time.perf_counter()
        prefill = None
        tokens: list[int] = []
        gen = llm.generate(prompt, temp=float(sampling.get("temperature", 1.0)), top_k=0, top_p=1.0,
                           min_p=float(sampling.get("min_p", 0.0)), repeat_penalty=float(sampling.get("penalty", 1.0)))
        for tok in gen:
            wall = time.perf_counter() - start
            prefill = wall if prefill is None else prefill
            tokens.append(int(tok))
            for L in cp.due(len(tokens)):
                cp.add(L, tokens, wall, prefill, {})
            out.put(("progress", len(tokens)))
            if len(tokens) >= total:
                break
        stats = {"prompt_batch": batch}
        if amx:
            stats["prompt_batch_why"] = "llama.cpp built with AMX: batches of more than one token crashed its decode"
        out.put(("done", cp.records, tokens, stats))
        out.close()
        out.join_thread()  # the result is written before llama.cpp's teardown, which could crash
    except Exception as e:  # noqa: BLE001  (reported to the parent, which skips the method)
        out.put(("error", f"{type(e).__name__}: {e}"))


def run_isolated(target: Callable[[dict[str, Any], Any], None], job: dict[str, Any], name: str, total: int,
                 progress: Callable[[str, int, int], None] | None = None) -> tuple[list[dict[str, Any]], list[int], dict]:
    """Runs `target(job, queue)` in a fresh process (spawned: nothing of this one's threads or
    memory) and returns what it reports ("done", records, tokens, stats), passing its "progress"
    on. Its error, or its process ending without a result (a crash: the signal is named), raises
    ExternalFailure; this process goes on."""
    import multiprocessing
    import queue
    import signal

    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    proc = ctx.Process(target=target, args=(job, out), daemon=True)
    proc.start()
    try:
        while True:
            try:
                msg = out.get(timeout=0.2)
            except queue.Empty:
                if proc.is_alive():
                    continue
                try:  # what it put just before it ended
                    msg = out.get(timeout=2.0)
                except queue.Empty:
                    code = proc.exitcode
                    how = f"killed by {signal.Signals(-code).name}" if code is not None and code < 0 else f"exit code {code}"
                    raise ExternalFailure(f"{name}'s process ended without a result ({how})") from None
            if msg[0] == "progress":
                if progress is not None:
                    progress(name, int(msg[1]), total)
            elif msg[0] == "error":
                raise ExternalFailure(str(msg[1]))
            else:
                _, records, tokens, stats = msg
                return records, tokens, stats
    finally:
        proc.join(timeout=10)
        if proc.is_alive():
            proc.kill()
            proc.join()


def run_llamacpp(lm: Any, prompt: list[int], lengths: list[int], name: str, sampling: dict[str, Any],
                 progress: Callable[[str, int, int], None] | None = None) -> tuple[list[dict[str, Any]], list[int], dict]:
    """llama.cpp (llama-cpp-python) on the same GGUF file, in a process of its own: a crash of it
    (a segfault in its native code) skips this method instead of ending the bench. Its peak memory
    is that process's (llama.cpp's model and cache, without ours). Stats: `prompt_batch`, the
    tokens its prompt was evaluated in at a time (1 where its build has AMX, `LLAMACPP_AMX`)."""
    src = Path(lm.source)
    if src.suffix != ".gguf":
        raise ValueError(f"llamacpp needs a .gguf model, got {src}")
    job = {"source": str(src), "prompt": [int(t) for t in prompt], "lengths": [int(L) for L in lengths],
           "name": name, "sampling": dict(sampling), "options": llamacpp_options(lm), "threads": os.cpu_count() or 1}
    return run_isolated(_llamacpp_child, job, name, max(lengths), progress)


def available(name: str) -> str | None:
    """None when the method can run here, else why not."""
    if name in ("hf", "hf-lookup") and importlib.util.find_spec("transformers") is None:
        return "transformers is not installed (pip install transformers accelerate)"
    if name == "llamacpp" and importlib.util.find_spec("llama_cpp") is None:
        return "llama-cpp-python is not installed (pip install 'tokenswift[bench]' or llama-cpp-python)"
    if name not in METHODS:
        return f"unknown method {name!r}; available: {', '.join(METHODS)}"
    return None


def run_bench(lm: Any, prompt: list[int], lengths: Sequence[int], methods: Sequence[str],
              sampling: dict[str, Any] | None = None,
              progress: Callable[[str, int, int], None] | None = None,
              on_method: Callable[[dict[str, Any]], None] | None = None, rounds: int = 1) -> dict[str, Any]:
    """Runs every method on `prompt` for max(lengths) new tokens; returns a JSON-ready result.
    `on_method` gets the result so far after each method (`"partial": True` until the last), so
    a long bench that is stopped keeps the methods it finished.

    With `rounds` > 1 the methods run that many times round-robin (ar, m1, m2, ar, m1, m2, ...),
    so that a machine whose speed drifts (a shared VM: ±10% within minutes) slows every method
    alike. A record then holds the median of its rounds' times (`rounds`, and each round's decode
    speed in `decode_tokens_per_s_rounds`), and its speedups are the median of each round's ratio
    to the same round's `ar` (`decode_speedup_rounds`; a partial result pairs the rounds both
    have). Every round's tokens are compared with the first `ar` run's. An external method that
    fails in any round is reported as skipped, with the reason, and none of its rounds kept."""
    lengths = sorted({int(L) for L in lengths})
    if not lengths or lengths[0] < 1:
        raise ValueError(f"lengths must be positive integers, got {list(lengths)}")
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise ValueError(f"unknown method {bad[0]!r}; available: {', '.join(METHODS)}")
    _check_rounds(rounds)
    sampling = dict(PAPER_SAMPLING if sampling is None else sampling)
    per_round: dict[str, list[list[dict[str, Any]]]] = {}  # method -> each round's records
    runs: dict[str, Any] = {}
    ref: list[int] | None = None
    order = sorted(methods, key=lambda m: m != "ar")  # ar first: the others are compared to it
    last = (rounds - 1, order[-1])

    def merged() -> list[dict[str, Any]]:
        return [r for name in order if name in per_round for r in _median_records(per_round[name], rounds > 1)]

    for rnd in range(rounds):
        # a progress phase per round, so that a bar starts afresh (one method alone keeps its name)
        step = progress if progress is None or rounds == 1 else \
            (lambda name, done, total, r=rnd: progress(f"{name} (round {r + 1}/{rounds})", done, total))
        for name in order:
            if "skipped" in runs.get(name, {}):
                continue
            why = available(name)
            if why is not None:
                runs[name] = {"skipped": why}
                log.warning("bench: skipping %s: %s", name, why)
                continue
            runner = run_ours if name in OURS else (run_llamacpp if name == "llamacpp" else run_hf)
            try:
                recs, tokens, stats = runner(lm, prompt, lengths, name, sampling, step)
            except Exception as e:  # another project's API: its failure must not lose the other runs
                if name in OURS:
                    raise
                runs[name] = {"skipped": str(e) if isinstance(e, ExternalFailure) else f"{type(e).__name__}: {e}"}
                per_round.pop(name, None)
                log.warning("bench: %s failed: %s: %s", name, type(e).__name__, e)
                continue
            if name == "ar" and ref is None:
                ref = tokens
            compared = ref is not None and name in OURS  # other engines draw their own random numbers
            first = first_difference(tokens, ref) if compared else None
            where = lm.model.kernels if name in OURS else {"llamacpp": "llama.cpp"}.get(name, "transformers")
            if stats.get("prompt_batch") == 1:
                where += ", prompt a token a batch"
            if name in OURS and lm.model.bf16_attention:
                where += ", bf16-amx attention" if lm.model.bf16_order == "amx" else ", bf16 attention"
            for r in recs:  # per length: a late difference leaves the shorter lengths equal
                r["same_as_ar"] = (first is None or first >= r["length"]) if compared else None
                r["kernels"] = where
            per_round.setdefault(name, []).append(recs)
            before = runs.get(name, {}).get("first_difference")
            if before is not None:  # the earliest difference of any round
                first = before if first is None else min(first, before)
            run = {"new_tokens": len(tokens), "same_as_ar": (first is None) if compared else None,
                   "first_difference": first}
            if rounds > 1:
                run["rounds"] = rnd + 1
            if stats:  # the last round's
                run["stats"] = {k: v for k, v in stats.items() if k != "auto"}
                if "auto" in stats:
                    run["auto"] = stats["auto"]
            runs[name] = run
            if on_method is not None and (rnd, name) != last:
                on_method(_result(merged(), runs, lengths, order, prompt, sampling, partial=True, rounds=rounds))
    return _result(merged(), runs, lengths, order, prompt, sampling, partial=False, rounds=rounds)


def _check_rounds(rounds: Any) -> None:
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be an integer >= 1, got {rounds!r}")


_TIMES = ("wall_seconds", "prefill_seconds", "decode_seconds")


def _median_records(rounds: list[list[dict[str, Any]]], keep: bool = True) -> list[dict[str, Any]]:
    """One method's records of its rounds so far -> one record per length: the first round's,
    with the times the median of the rounds' (speeds from those), the peak memory their largest,
    `same_as_ar` true only where every round's was, and each round's times kept (`keep`; also
    for a single round so far) for the per-round speedups. A length some round did not reach
    is left out."""
    if len(rounds) == 1 and not keep:
        return rounds[0]
    out = []
    for rs in zip(*rounds):
        r = dict(rs[0])
        for k in _TIMES:
            r[k] = statistics.median(x[k] for x in rs)
            r[f"{k}_rounds"] = [x[k] for x in rs]
        r["tokens_per_s"] = r["length"] / r["wall_seconds"]
        r["decode_tokens_per_s"] = r["length"] / r["decode_seconds"]
        r["decode_tokens_per_s_rounds"] = [x["decode_tokens_per_s"] for x in rs]
        r["peak_memory_mib"] = max(x["peak_memory_mib"] for x in rs)
        same = [x["same_as_ar"] for x in rs]
        r["same_as_ar"] = None if None in same else all(same)
        r["rounds"] = len(rs)
        out.append(r)
    return out


def _result(records: list[dict[str, Any]], runs: dict[str, Any], lengths: list[int], order: Sequence[str],
            prompt: list[int], sampling: dict[str, Any], partial: bool, rounds: int = 1) -> dict[str, Any]:
    """The JSON-ready result of the runs so far, each record compared with `ar`'s (round by
    round where there are rounds: the median of the rounds' ratios)."""
    ar = {r["length"]: r for r in records if r["method"] == "ar"}
    for r in records:
        base = ar.get(r["length"])
        r["speedup"] = r["decode_speedup"] = None
        if base and "wall_seconds_rounds" in r and "wall_seconds_rounds" in base:
            n = min(len(r["wall_seconds_rounds"]), len(base["wall_seconds_rounds"]))  # a partial result's rounds
            pairs = range(n)
            r["speedup"] = statistics.median(base["wall_seconds_rounds"][i] / r["wall_seconds_rounds"][i] for i in pairs)
            r["decode_speedup_rounds"] = [base["decode_seconds_rounds"][i] / r["decode_seconds_rounds"][i] for i in pairs]
            r["decode_speedup"] = statistics.median(r["decode_speedup_rounds"])
        elif base:
            r["speedup"] = base["wall_seconds"] / r["wall_seconds"]
            r["decode_speedup"] = base["decode_seconds"] / r["decode_seconds"]
        if base:
            for n in (1, 2, 3, 4):
                r[f"distinct_{n}_vs_ar"] = r[f"distinct_{n}"] - base[f"distinct_{n}"]
    out = {"records": list(records), "runs": dict(runs), "lengths": lengths, "methods": list(order),
           "prompt_tokens": len(prompt), "sampling": sampling}
    if rounds > 1:
        out["rounds"] = rounds
    if partial:
        out["partial"] = True
    return out


def numerics(lm: Any, rope_scaling: str | None) -> dict[str, Any]:
    """What a prompt's K/V rows depend on, for the header of a saved prefill (`KVRows.NUMERICS`)."""
    m = lm.model
    return {"model": lm.name, "dtype": str(m.dtype).removeprefix("torch."),
            "kv_dtype": str(m.kv_dtype).removeprefix("torch."), "weights": m.quantized or "float",
            "activations": m.activations, "rope_scaling": rope_scaling, "compile": False, "device": str(m.device),
            **({"attention_dtype": m.attention_dtype} if m.bf16_attention else {})}


def prefill_rows(lm: Any, prompt: list[int], run_len: int, kv_dir: Path, options: dict[str, Any]) -> dict[str, Any]:
    """The prompt's prefill for a sweep context, read from `kv_dir` where an earlier run saved
    it (the rows of `--checkpoint-kv`'s format: `checkpoint.KVRows`, which checks the numerics,
    the model's shape, the cache's dtype and RoPE length, each row's token and checksum), else
    computed and saved there. Either way it lands in the model's prefill memo, so every method
    of the context starts from it. -> {"prefill_seconds", "rows_read", "kv_file"}."""
    from .cache import KVCache
    from .checkpoint import Checkpoint, KVRows, model_fingerprint

    m = lm.model
    C = len(prompt)
    digest = format(zlib.crc32(torch.tensor(prompt, dtype=torch.int64).numpy().tobytes()), "08x")
    path = Path(kv_dir) / f"prefill-{C}-{digest}.kv"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot make the prefill folder {path.parent}: {e.strerror or e}") from None
    ck = Checkpoint(options=dict(options), prompt="", prompt_ids=list(prompt), model_fingerprint=model_fingerprint(m.cfg))
    rows = KVRows(path, ck)
    cache = KVCache(m.cfg, capacity=C, dtype=m.kv_dtype, device=m.device, rope_len=run_len)
    m.kv_prefix = rows.load
    t0 = time.perf_counter()
    try:
        m.prefill(torch.tensor(prompt, dtype=torch.int64, device=m.device).unsqueeze(0), cache)
    finally:
        m.kv_prefix = None
    seconds = time.perf_counter() - t0
    read = rows.written or 0  # set by the load: the rows the file held for this prompt
    if read < C:
        rows.append(cache, C, list(prompt))
    return {"prefill_seconds": seconds, "rows_read": read, "kv_file": str(path)}


def run_sweep(lm: Any, prompt: list[int], contexts: Sequence[int], lengths: Sequence[int], methods: Sequence[str],
              sampling: dict[str, Any] | None = None,
              progress: Callable[[str, int, int], None] | None = None,
              on_context: Callable[[dict[str, Any]], None] | None = None,
              kv_dir: Path | None = None, options: dict[str, Any] | None = None, rounds: int = 1) -> dict[str, Any]:
    """The context sweep: for each context C, the first C tokens of `prompt` as the prompt, then
    every method side by side as in `run_bench` (same seed, compared with `ar` at that context).
    Records carry `context`; `on_context` gets the result so far after each context.

    The prompt is prefilled once per context and every method starts from a copy of that cache
    (`Decoder.prefill_memo`: the same computation, so the same bits): at 100K a prefill is most
    of an hour here. So a method's `prefill_seconds` after the first is a copy's; the sweep's
    figures are decode speeds. With `kv_dir`, each context's prefill is read from there or saved
    there (`prefill_rows`; `options`: its numerics), for later sweeps. `rounds`: as `run_bench`'s,
    at each context."""
    _check_rounds(rounds)  # before an hour of prefill
    contexts = sorted({int(c) for c in contexts})
    if not contexts or contexts[0] < 1 or contexts[-1] > len(prompt):
        raise ValueError(f"contexts must lie in [1, {len(prompt)}] (the prompt's tokens), got {contexts}")
    model = getattr(lm, "model", None)
    if model is not None:
        model.prefill_memo = {}
    try:
        return _sweep(lm, prompt, contexts, lengths, methods, sampling, progress, on_context, kv_dir, options, rounds)
    finally:
        if model is not None:
            model.prefill_memo = None


def _sweep(lm: Any, prompt: list[int], contexts: list[int], lengths: Sequence[int], methods: Sequence[str],
           sampling: dict[str, Any] | None, progress: Callable[[str, int, int], None] | None,
           on_context: Callable[[dict[str, Any]], None] | None, kv_dir: Path | None = None,
           options: dict[str, Any] | None = None, rounds: int = 1) -> dict[str, Any]:
    records: list[dict[str, Any]] = []
    runs: dict[str, Any] = {}
    prefills: dict[str, Any] = {}
    out: dict[str, Any] = {}
    for C in contexts:
        step = (lambda name, done, total, C=C: progress(f"{name} @ {C}", done, total)) if progress else None
        if kv_dir is not None and getattr(lm, "model", None) is not None:
            prefills[str(C)] = prefill_rows(lm, prompt[:C], C + max(lengths), kv_dir, options or {})
            log.info("context %d: %d of its rows read from %s", C, prefills[str(C)]["rows_read"], kv_dir)
        res = run_bench(lm, prompt[:C], lengths, methods, sampling, progress=step, rounds=rounds)
        for r in res["records"]:
            r["context"] = C
        records.extend(res["records"])
        runs[str(C)] = res["runs"]
        out = {"sweep": True, "contexts": [c for c in contexts if c <= C], "records": list(records),
               "runs": dict(runs), "lengths": res["lengths"], "methods": res["methods"], "sampling": res["sampling"],
               "prompt_tokens": C}
        if rounds > 1:
            out["rounds"] = rounds
        if prefills:
            out["prefills"] = dict(prefills)
        if C != contexts[-1]:
            out["partial"] = True
            if on_context is not None:
                on_context(out)
    return out


def sweep_table(result: dict[str, Any]) -> str:
    """A Markdown table of a context sweep: decode speed against `ar` at each context."""
    lines = ["| context | method | new tokens | decode tok/s | decode speedup | = ar | acceptance by depth | "
             "tok/iter | peak MiB | kernels |", "|" + "|".join(["---"] * 10) + "|"]
    L = max(result["lengths"])
    for r in sorted((r for r in result["records"] if r["length"] == L),
                    key=lambda r: (r["context"], result["methods"].index(r["method"]))):
        depth = " ".join(f"{a:.2f}" for a in r["depth_acceptance"][:4]) if r.get("depth_acceptance") else "—"
        same = {True: "yes", False: "NO", None: "—"}[r["same_as_ar"]]
        sp = "—" if r["decode_speedup"] is None else f"{r['decode_speedup']:.2f}x"
        tpi = "—" if r["tokens_per_iteration"] is None else f"{r['tokens_per_iteration']:.2f}"
        lines.append(f"| {r['context']} | {r['method']} | {r['length']} | {r['decode_tokens_per_s']:.2f} | {sp} | "
                     f"{same} | {depth} | {tpi} | {r['peak_memory_mib']:.0f} | {r.get('kernels', '—')} |")
    return "\n".join(lines)


def write_sweep_png(result: dict[str, Any], path: str | Path, title: str = "") -> None:
    """Decode speedup vs context and decode tok/s vs context, one line per method (matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    L = max(result["lengths"])
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for m in result["methods"]:
        recs = sorted((r for r in result["records"] if r["method"] == m and r["length"] == L),
                      key=lambda r: r["context"])
        xs = [r["context"] for r in recs]
        a1.plot(xs, [r["decode_speedup"] for r in recs], marker="o", label=m)
        a2.plot(xs, [r["decode_tokens_per_s"] for r in recs], marker="o", label=m)
    _finish(fig, ((a1, f"decode speedup vs ar ({L} new tokens)"), (a2, "decode tokens/s")), "context (prompt tokens)",
            title, path)


def _finish(fig: Any, axes: Any, xlabel: str, title: str, path: str | Path) -> None:
    """The bench figures' common styling: a 1x reference line on the first axis, log-2 x axes,
    labels, grid, legend; then the file."""
    import matplotlib.pyplot as plt

    axes[0][0].axhline(1.0, color="gray", lw=0.8, ls="--")
    for a, lab in axes:
        a.set_xscale("log", base=2)
        a.set_xlabel(xlabel)
        a.set_ylabel(lab)
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


CSV_FIELDS = ("context", "method", "length", "wall_seconds", "prefill_seconds", "decode_seconds", "tokens_per_s",
              "decode_tokens_per_s", "speedup", "decode_speedup", "acceptance_rate", "tokens_per_iteration",
              "ngram_share", "depth_acceptance", "distinct_1", "distinct_2", "distinct_3", "distinct_4",
              "peak_memory_mib", "same_as_ar", "rounds", "decode_speedup_rounds")


def write_csv(result: dict[str, Any], path: str | Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in result["records"]:
            w.writerow({k: (round(v, 4) if isinstance(v, float) else
                            " ".join(f"{a:.3f}" for a in v) if isinstance(v, list) else v) for k, v in r.items()})


def write_png(result: dict[str, Any], path: str | Path, title: str = "") -> None:
    """Speedup vs length and acceptance vs length, one line per method (needs matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for m in result["methods"]:
        recs = sorted((r for r in result["records"] if r["method"] == m), key=lambda r: r["length"])
        if not recs:
            continue
        xs = [r["length"] for r in recs]
        a1.plot(xs, [r["speedup"] for r in recs], marker="o", label=m)
        if any(r["acceptance_rate"] is not None for r in recs) and m != "ar":
            a2.plot(xs, [r["acceptance_rate"] or 0.0 for r in recs], marker="o", label=m)
    _finish(fig, ((a1, "speedup vs ar (wall time)"), (a2, "acceptance rate")), "new tokens", title, path)


def table(result: dict[str, Any]) -> str:
    """A Markdown table of the records."""
    head = ("| method | new tokens | wall s | tok/s | speedup | acceptance | tok/iter | acceptance by depth "
            "| n-gram share | Distinct-1/2/3/4 | peak MiB | = ar | kernels |")
    lines = [head, "|" + "|".join(["---"] * 13) + "|"]

    def f(v: Any, d: int = 2) -> str:
        return "—" if v is None else (f"{v:.{d}f}" if isinstance(v, float) else str(v))

    for r in sorted(result["records"], key=lambda r: (r["length"], result["methods"].index(r["method"]))):
        dn = "/".join(f"{r[f'distinct_{n}']:.3f}" for n in (1, 2, 3, 4))
        same = {True: "yes", False: "NO", None: "—"}[r["same_as_ar"]]
        # the first four depths: how often the walk drew the drafted token once it got there
        depth = " ".join(f"{a:.2f}" for a in r["depth_acceptance"][:4]) if r.get("depth_acceptance") else "—"
        lines.append(f"| {r['method']} | {r['length']} | {r['wall_seconds']:.1f} | {r['tokens_per_s']:.2f} | "
                     f"{f(r['speedup'])}x | {f(r['acceptance_rate'], 3)} | {f(r['tokens_per_iteration'])} | "
                     f"{depth} | {f(r['ngram_share'], 3)} | {dn} | {r['peak_memory_mib']:.0f} | {same} | {r.get('kernels', '—')} |")
    return "\n".join(lines)


# -- the bench command's setup -------------------------------------------------------------------


def parse_lengths(spec: str, what: str = "lengths") -> list[int]:
    """"1024,2048" -> [1024, 2048] (sorted, distinct, positive); ValueError naming `what`."""
    try:
        lengths = sorted({int(x) for x in spec.split(",") if x.strip()})
    except ValueError:
        raise ValueError(f"{what} must be comma-separated integers, got {spec!r}") from None
    if not lengths or lengths[0] < 1:
        raise ValueError(f"{what} must be positive, got {spec!r}")
    return lengths


def parse_methods(spec: str) -> list[str]:
    methods = [m.strip() for m in spec.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise ValueError(f"methods: unknown method {bad[0] if bad else ''!r}; available: {', '.join(METHODS)}")
    return methods


def default_text() -> Path | None:
    """../shared/data/cdne.txt seen from the working directory or from this package's checkout."""
    for base in (Path.cwd(), *Path.cwd().parents, Path(__file__).resolve().parents[2]):
        for cand in (base / "shared" / "data" / "cdne.txt", base.parent / "shared" / "data" / "cdne.txt"):
            if cand.is_file():
                return cand
    return None


@dataclass
class BenchSetup:
    """What a bench runs on: the model (with YaRN when the runs pass its context), the prompt
    cut from a text file, the sampler, and the metadata every result file records."""

    lm: Any
    prompt: list[int]
    sampling: dict[str, Any]
    rope_scaling: str | None
    auto_rope: bool
    prompt_file: Path
    heads: str
    started: float

    @classmethod
    def load(cls, model: str, heads: str, device: str | None, dtype: str | None, rope_scaling: str | None,
             prompt_file: Path | None, prefix: int, lengths: Sequence[int], greedy: bool, seed: int,
             kv_dtype: str = "auto", weights: str = "auto", activations: str = "float",
             attention_dtype: str = "float32") -> "BenchSetup":
        import tokenswift

        started = time.perf_counter()
        text_path = prompt_file or default_text()
        if text_path is None:
            raise ValueError("no prompt text: give --prompt-file (../shared/data/cdne.txt was not found)")
        try:
            text = Path(text_path).read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"prompt file {text_path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
        except OSError as e:
            raise ValueError(f"prompt file {text_path}: {e.strerror}") from None
        lm = tokenswift.load(model, heads=heads, device=device, dtype=dtype, rope_scaling=rope_scaling, kv_dtype=kv_dtype,
                              weights=weights, activations=activations, attention_dtype=attention_dtype)
        need = prefix + max(lengths)
        auto = rope_scaling is None and need > lm.config.context_length
        if auto:  # the smallest power-of-two YaRN factor that holds the runs
            factor = 2
            while lm.config.context_length * factor < need:
                factor *= 2
            rope_scaling = f"yarn:{factor}"
            lm = tokenswift.load(model, heads=heads, device=device, dtype=dtype, rope_scaling=rope_scaling, kv_dtype=kv_dtype,
                              weights=weights, activations=activations, attention_dtype=attention_dtype)
        chars = 8 * prefix  # encode only what the prefix needs (whole books take minutes)
        while True:
            ids = lm.encode(text[:chars], max_tokens=sys.maxsize)  # the bench cuts the prompt itself
            if len(ids) > prefix or chars >= len(text):
                break
            chars *= 2
        if len(ids) < prefix:
            raise ValueError(f"prefix {prefix} is longer than {text_path} ({len(ids)} tokens)")
        sampling = dict(temperature=0.0, seed=seed) if greedy else dict(PAPER_SAMPLING, seed=seed)
        return cls(lm=lm, prompt=ids[:prefix], sampling=sampling, rope_scaling=rope_scaling, auto_rope=auto,
                   prompt_file=Path(text_path), heads=heads, started=started)

    def save(self, result: dict[str, Any], json_path: Path, csv_path: Path, command: str | None = None) -> None:
        """Writes the result (partial ones too) as JSON and CSV, with the run's metadata."""
        result.update({
            "model": self.lm.name, "heads": self.heads, "prompt_file": str(self.prompt_file),
            "rope_scaling": self.rope_scaling, "device": str(self.lm.model.device),
            "dtype": str(self.lm.model.dtype).replace("torch.", ""),
            "kv_dtype": str(self.lm.model.kv_dtype).replace("torch.", ""), "threads": torch.get_num_threads(),
            "weights": self.lm.model.quantized or "float", "activations": self.lm.model.activations,
            "attention_dtype": self.lm.model.attention_dtype, "bench_seconds": time.perf_counter() - self.started, "command": command,
        })
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=1, default=str))
        write_csv(result, csv_path)
