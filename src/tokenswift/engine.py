"""Decoding loops. Each method is a generator of `Step`s: the tokens committed by one iteration
and the running stats. The library never prints; callers (API, CLI, server) consume steps."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch

from .cache import DraftCache, KVCache
from .config import SamplingConfig, SpecConfig
from .heads import DraftHeads, base_draft_logits
from .model import Decoder
from .ngram import NGramFeeder, NGramTable
from .plan import PROBE_SIZES, STAT_WIDTH, TREE_SIZES, AutoPlanner, Plan
from .sampling import coupled_candidates, sample
from .tree import SRC_NGRAM, build_trie, tree_width
from .verify import walk

log = logging.getLogger("tokenswift")

METHODS = ("ar", "tokenswift", "ngram")


@dataclass
class Step:
    tokens: list[int]  # tokens committed by this iteration, in order
    stats: dict[str, Any] = field(default_factory=dict)  # running totals after this iteration
    finished: bool = False


class Timer:
    """Wall-clock buckets for the stats (no device sync: CPU work is synchronous)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.prefill = 0.0

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


def _stats(method: str, prompt_len: int, new: int, timer: Timer, finish: str | None, iterations: int) -> dict[str, Any]:
    total = timer.elapsed()
    decode = max(total - timer.prefill, 1e-9)
    return {
        "method": method,
        "prompt_tokens": prompt_len,
        "new_tokens": new,
        "iterations": iterations,
        "seconds": total,
        "prefill_seconds": timer.prefill,
        "decode_seconds": decode,
        "tokens_per_s": new / total if total > 0 else 0.0,
        "decode_tokens_per_s": new / decode,
        "finish_reason": finish,
    }


def penalty_window(history: torch.Tensor, n: int, s: SamplingConfig) -> torch.Tensor | None:
    """The last `penalty_window` committed tokens before index n, as a [1, W] row."""
    if s.penalty == 1.0 or s.penalty_window == 0 or n == 0:
        return None
    return history[max(0, n - s.penalty_window) : n].unsqueeze(0)


@torch.inference_mode()
def generate_ar(
    model: Decoder,
    prompt: Sequence[int],
    max_new_tokens: int,
    sampling: SamplingConfig,
    eos_ids: Sequence[int] = (),
    ignore_eos: bool = False,
) -> Iterator[Step]:
    """Plain autoregressive decoding: one forward pass per token."""
    dev = model.device
    n0 = len(prompt)
    total = n0 + max_new_tokens
    timer = Timer()
    history = torch.empty(total, dtype=torch.int64)  # [total] committed tokens, CPU
    history[:n0] = torch.as_tensor(list(prompt), dtype=torch.int64)
    cache = KVCache(model.cfg, capacity=total, dtype=model.dtype, device=dev)
    h = model.prefill(history[:n0].to(dev).unsqueeze(0), cache)  # [1, D]
    logits = model.logits(h)  # [1, V]
    timer.prefill = timer.elapsed()
    stop = set() if ignore_eos else set(eos_ids)
    tok_buf = torch.empty(1, 1, dtype=torch.int64, device=dev)  # [1, 1]
    pos_buf = torch.empty(1, 1, dtype=torch.int64, device=dev)  # [1, 1]
    for i in range(max_new_tokens):
        p = n0 + i
        tok = int(sample(logits, penalty_window(history, p, sampling), [p], sampling)[0])
        history[p] = tok
        finish = "eos" if tok in stop else ("length" if i == max_new_tokens - 1 else None)
        yield Step([tok], _stats("ar", n0, i + 1, timer, finish, i + 1), finished=finish is not None)
        if finish is not None:
            return
        tok_buf.fill_(tok)
        pos_buf.fill_(p)
        h = model(tok_buf, pos_buf, cache)  # [1, 1, D]
        logits = model.logits(h[:, -1])  # [1, V]


@torch.inference_mode()
def generate_speculative(
    model: Decoder,
    heads: DraftHeads | None,
    prompt: Sequence[int],
    max_new_tokens: int,
    sampling: SamplingConfig,
    spec: SpecConfig,
    eos_ids: Sequence[int] = (),
    ignore_eos: bool = False,
    method: str = "tokenswift",
) -> Iterator[Step]:
    """TokenSwift (method "tokenswift") and prompt-lookup drafting (method "ngram").

    Each iteration turns the root r (sampled, not yet cached, at position N) into 1 + k tokens:
    draft (model(r) over the partial cache + heads) -> trie (static tree ∪ n-gram chains) ->
    verify (one pass over the full cache with a tree mask) -> walk (one draw per node) ->
    commit (keep the accepted path's KV; feed the draft cache and the n-gram table).
    """
    cfg = model.cfg
    dev = model.device
    n0 = len(prompt)
    timer = Timer()
    t_draft = t_verify = 0.0
    use_draft = method == "tokenswift"
    use_heads = use_draft and spec.use_heads and heads is not None
    use_ngrams = method == "ngram" or spec.use_ngrams
    auto = use_draft and spec.auto
    depth = min(spec.gamma, 1 + heads.num_heads) if use_heads else 1
    paths = tuple(p for p in spec.paths() if len(p) <= depth) if use_draft and not auto else ()
    # candidates per depth: what the static tree uses, or every tracked rank under auto
    widths = [STAT_WIDTH if auto else tree_width(paths, d) for d in range(1, depth + 1)]
    # γ of the paper's acceptance rate: positions drafted per iteration
    gamma = spec.gamma if use_draft else spec.ngram_n - 1
    ngram_k = spec.ngram_topk if use_ngrams else 0
    if auto:
        max_nodes = spec.max_nodes or (1 + max(TREE_SIZES) + ngram_k * (spec.ngram_n - 1))
    else:
        max_nodes = spec.max_nodes or (1 + len(paths) + max(1, widths[0] if widths else 1) * ngram_k * spec.ngram_n)
    planner = AutoPlanner(depth, spec.ngram_n, ngram_k, use_draft, spec.max_nodes) if auto else None
    if planner is not None:
        planner.ngram.done = n0  # score generated text only: the prompt's n-grams would match themselves

    run_len = n0 + max_new_tokens  # fixes dynamic-NTK RoPE exactly as `generate_ar` does
    capacity = run_len + max(max_nodes, max(PROBE_SIZES)) + 1
    history = torch.empty(capacity, dtype=torch.int64)  # [capacity] committed tokens (+ walk scratch)
    history[:n0] = torch.as_tensor(list(prompt), dtype=torch.int64)
    tokens_list = list(prompt)  # the same, as Python ints for the n-gram table
    main = KVCache(cfg, capacity=capacity, dtype=model.dtype, device=dev, rope_len=run_len)
    h = model.prefill(history[:n0].to(dev).unsqueeze(0), main)  # [1, D]
    logits = model.logits(h)  # [1, V]
    timer.prefill = timer.elapsed()

    table = NGramTable(spec.ngram_n)
    feeder = NGramFeeder(table, sampling.penalty_window if sampling.penalty != 1.0 else 0)
    draft: DraftCache | None = None
    probs_buf: torch.Tensor | None = None
    if use_draft and not spec.full_kv_draft:
        draft = DraftCache(cfg, budget=spec.draft_budget, sinks=spec.sinks, dtype=model.dtype, device=dev,
                           rope_len=run_len)
        probs_buf = torch.empty(cfg.num_layers, cfg.num_kv_heads, capacity, dtype=torch.float32, device=dev)
    stop = set() if ignore_eos else set(eos_ids)

    W = sampling.penalty_window if sampling.penalty != 1.0 else 0
    N = n0
    root = int(sample(logits, penalty_window(history, N, sampling), [N], sampling)[0])
    history[N] = root
    tokens_list.append(root)
    produced = 1
    iters = accepted_total = ngram_accepted = 0
    draft_reads = 0  # most KV entries one ordinary draft pass attended to (refreshes excluded)
    refresh_reads = 0  # KV entries read by refresh passes, in total
    trie_nodes = draft_iters = 0
    plan: Plan | None = None

    def stats(finish: str | None) -> dict[str, Any]:
        st = _stats(method, n0, produced, timer, finish, iters)
        st.update({
            "acceptance_rate": accepted_total / (gamma * iters) if iters else 0.0,
            "tokens_per_iteration": (produced - 1) / iters if iters else 0.0,
            "accepted_draft_tokens": accepted_total,
            "ngram_share": ngram_accepted / accepted_total if accepted_total else 0.0,
            "gamma": gamma,
            "draft_seconds": t_draft,
            "verify_seconds": t_verify,
            "other_seconds": max(0.0, st["decode_seconds"] - t_draft - t_verify),
            "draft_kv_max": draft_reads,
            "draft_refresh_kv_total": refresh_reads,
            "draft_refreshes": draft.refreshes if draft is not None else 0,
            "heads": heads.num_heads if use_heads else 0,
            "tree": "auto" if auto else str(spec.tree),
            "mean_trie_size": trie_nodes / iters if iters else 0.0,
        })
        if planner is not None:
            st["auto"] = {"plan": plan.describe() if plan is not None else None, "changes": planner.choices,
                          "probes": planner.probes, "explorations": planner.explorations,
                          "draft_iterations": draft_iters,
                          # acceptance over the iterations that drafted (AR steps excluded)
                          "draft_acceptance_rate": accepted_total / (gamma * draft_iters) if draft_iters else 0.0}
        return st

    finish = "eos" if root in stop else ("length" if produced >= max_new_tokens else None)
    yield Step([root], stats(finish), finished=finish is not None)
    if finish is not None:
        return
    feeder.catch_up(tokens_list, len(tokens_list))
    tok_buf = torch.empty(1, 1, dtype=torch.int64, device=dev)  # [1, 1]
    pos_buf = torch.empty(1, 1, dtype=torch.int64, device=dev)  # [1, 1]

    def probe_run(T: int) -> None:  # one verify-shaped pass of T tokens at context N, undone
        x = torch.full((1, T), root, dtype=torch.int64, device=dev)  # [1, T]
        pos = torch.arange(N, N + T, dtype=torch.int64, device=dev).unsqueeze(0)  # [1, T]
        model.logits(model(x, pos, main)[0])
        main.truncate(N)

    while True:
        iters += 1
        t_iter0 = time.perf_counter()
        chain_k = ngram_k
        drafting = use_draft
        if planner is not None:
            if planner.needs_probe(N):
                planner.probe(N, probe_run)
                t_iter0 = time.perf_counter()
            plan = planner.choose(N)
            paths, chain_k, drafting = plan.paths, plan.ngram_k, plan.draft
        # -- DRAFT: candidates per position r+1 .. r+depth
        t0 = time.perf_counter()
        candidates: list[list[int]] = []
        if drafting:
            draft_iters += 1
            tok_buf.fill_(root)
            pos_buf.fill_(N)
            if draft is not None and N > spec.draft_budget:
                if not draft.valid:  # re-select with this query over the full cache
                    h0 = model(tok_buf, pos_buf, main, attn_probs=probs_buf)[0, -1]
                    main.truncate(N)
                    draft.refresh(main, probs_buf)
                    refresh_reads += N + 1
                else:
                    h0 = model(tok_buf, pos_buf, draft)[0, -1]
                    draft_reads = max(draft_reads, draft.length)
                    draft.truncate(draft.length - 1)  # the exact KV of r comes from verify
            else:
                h0 = model(tok_buf, pos_buf, main)[0, -1]
                draft_reads = max(draft_reads, N + 1)
                main.truncate(N)
            rows = heads.draft_logits(model, h0) if use_heads else base_draft_logits(model, h0)  # [1+K, V]
            rows = rows[:depth]
            # rank drafts as the sampler will see them (penalized by the committed window) and
            # put first the token the target's own noise would pick from the draft distribution
            win = history[max(0, N + 1 - W) : N + 1].to(dev).unsqueeze(0).expand(rows.shape[0], -1) if W else None
            candidates = coupled_candidates(rows, win, [N + 1 + d for d in range(rows.shape[0])], sampling,
                                            max(widths, default=0))
            candidates = [c[: widths[d]] for d, c in enumerate(candidates)]
        dt_draft = time.perf_counter() - t0
        t_draft += dt_draft

        # -- PROPOSE: static tree ∪ n-gram chains
        chains: list[list[int]] = []
        if chain_k > 0:
            if drafting:  # auto hangs chains off the likeliest depth-1 candidate only
                for c in (candidates[0][:1] if auto else candidates[0]) if candidates else []:
                    chains.extend([c, *cont] for cont in table.top(c, chain_k))
            else:
                chains = [list(cont) for cont in table.top(root, chain_k)]
        trie = build_trie(root, candidates, paths, chains, max_nodes)
        trie_nodes += len(trie)

        # -- VERIFY: one pass over the full cache, tree-masked
        t0 = time.perf_counter()
        T = len(trie)
        x = torch.tensor(trie.tokens, dtype=torch.int64, device=dev).unsqueeze(0)  # [1, T]
        pos = trie.positions(N, dev).unsqueeze(0)  # [1, T]
        hv = model(x, pos, main, mask=trie.mask(dev) if T > 1 else None)  # [1, T, D]
        vlogits = model.logits(hv[0])  # [T, V]
        dt_verify = time.perf_counter() - t0
        t_verify += dt_verify

        # -- ACCEPT
        res = walk(trie, vlogits, history, N, sampling)
        k = len(res.accepted)
        accepted_total += k
        ngram_accepted += sum(1 for i in res.accepted if trie.sources[i] == SRC_NGRAM)

        # -- COMMIT: keep the root's and the accepted nodes' KV, in path order
        main.keep(torch.tensor([N] + [N + i for i in res.accepted], dtype=torch.int64))
        if planner is not None:
            if drafting and planner.stats is not None:
                for d in range(min(depth, len(res.tokens))):
                    tok = res.tokens[d]
                    planner.stats.update(d, candidates[d].index(tok) if tok in candidates[d] else None)
            other = time.perf_counter() - t_iter0 - dt_draft - dt_verify
            planner.observe(plan, dt_draft, dt_verify, other, len(res.tokens))
        new = res.tokens  # accepted tokens, then the next root
        finish = None
        for j, t in enumerate(new):
            if t in stop:
                new, finish = new[: j + 1], "eos"
                break
        if produced + len(new) >= max_new_tokens and finish is None:
            new, finish = new[: max_new_tokens - produced], "length"
        produced += len(new)
        yield Step(new, stats(finish), finished=finish is not None)
        if finish is not None:
            return
        if draft is not None:
            draft.append(main, N, 1 + k)
        tokens_list.extend(res.tokens)
        feeder.catch_up(tokens_list, len(tokens_list))
        if planner is not None and ngram_k:
            planner.ngram.update(tokens_list, table.top, spec.ngram_n)
        N += 1 + k
        root = res.next_root

