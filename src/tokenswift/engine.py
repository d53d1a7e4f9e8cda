"""Decoding loops. Each method is a generator of `Step`s: the tokens committed by one iteration
and the running stats. The library never prints; callers (API, CLI, server) consume steps.

`generate_ar` is plain decoding; `SpeculativeRun` is TokenSwift's loop as named stages."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch

from .cache import KVCache
from .config import SamplingConfig, SpecConfig
from .drafters import NGramDrafter, Proposal, SelfDrafter, SeqDrafter, resolve_draft_kv
from .heads import DraftHeads
from .loading import synchronize
from .model import Decoder
from .params import PARAMS, ParamError
from .plan import STAT_WIDTH, AutoPlanner, Plan
from .sampling import penalty_window, sample
from .seqdraft import SeqDraftModel
from .tree import SRC_NGRAM, Trie, build_trie, tree_width
from .verify import WalkResult, walk

log = logging.getLogger("tokenswift")

METHODS = PARAMS["method"].choices


@dataclass
class Step:
    tokens: list[int]  # tokens committed by this iteration, in order
    stats: dict[str, Any] = field(default_factory=dict)  # running totals after this iteration
    finished: bool = False
    # the run's main cache as this step leaves it: its first `kv.length` entries are the keys and
    # values of the committed text (prompt included) before the last token, and stay as they are
    # for the rest of the run (a checkpoint saves them: `checkpoint.KVRows`). Read-only.
    kv: KVCache | None = None


class Timer:
    """Wall-clock buckets for the stats. Each reading waits for the device first: CUDA runs
    kernels asynchronously, and a clock read before they finish times only their launch."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.start = self.now()
        self.prefill = 0.0

    def now(self) -> float:
        synchronize(self.device)
        return time.perf_counter()

    def elapsed(self) -> float:
        return self.now() - self.start


def _agree(model: Decoder, value: Any) -> Any:
    """Rank 0's value on every rank under tensor parallelism (parallel.py); else the value."""
    return value if model.tp is None else model.tp.agree(value)


def _stats(method: str, prompt_len: int, new: int, timer: Timer, finish: str | None, iterations: int,
           model: Decoder) -> dict[str, Any]:
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
        "kernels": model.kernels,
        "attention_dtype": model.attention_dtype,
    }


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
    timer = Timer(dev)
    history = torch.empty(total, dtype=torch.int64)  # [total] committed tokens, CPU
    history[:n0] = torch.as_tensor(list(prompt), dtype=torch.int64)
    cache = KVCache(model.cfg, capacity=total, dtype=model.kv_dtype, device=dev, ring=model.kv_ring(total))
    h = model.prefill(history[:n0].to(dev).unsqueeze(0), cache)  # [1, D]
    logits = model.logits(h)  # [1, V]
    timer.prefill = timer.elapsed()
    stop = set() if ignore_eos else set(eos_ids)
    tok_buf = torch.empty(1, 1, dtype=torch.int64, device=dev)  # [1, 1]
    pos_buf = torch.empty(1, 1, dtype=torch.int64, device=dev)  # [1, 1]
    for i in range(max_new_tokens):
        p = n0 + i
        tok = _agree(model, int(sample(logits, penalty_window(history, p, sampling), [p], sampling)[0]))
        history[p] = tok
        finish = "eos" if tok in stop else ("length" if i == max_new_tokens - 1 else None)
        yield Step([tok], _stats("ar", n0, i + 1, timer, finish, i + 1, model), finished=finish is not None, kv=cache)
        if finish is not None:
            return
        tok_buf.fill_(tok)
        pos_buf.fill_(p)
        h = model(tok_buf, pos_buf, cache)  # [1, 1, D]
        logits = model.logits(h[:, -1])  # [1, V]


@dataclass
class RunState:
    """Where a speculative run stands: committed tokens, the KV cache, the root."""

    history: torch.Tensor  # [capacity] int64 committed tokens (+ the draft's and walk's scratch), CPU
    tokens: list[int]  # the committed tokens as Python ints (n-gram table)
    main: KVCache  # the target's cache: every committed token before the root
    N: int  # the root's position (it is sampled, not yet cached)
    root: int
    produced: int = 0  # new tokens committed (the root included)


@dataclass
class Counters:
    """Running totals for the stats."""

    iterations: int = 0
    draft_iterations: int = 0
    accepted: int = 0  # draft tokens accepted by the walk
    ngram_accepted: int = 0
    trie_nodes: int = 0
    drafted: int = 0  # positions drafted (chain passes or heads rows)
    # per drafter: [iterations, drafted positions, seconds]
    by_drafter: dict[str, list[float]] = field(default_factory=dict)
    t_draft: float = 0.0
    t_verify: float = 0.0
    t_walk: float = 0.0
    reached: list[int] = field(default_factory=list)  # per depth: iterations whose walk got there
    hits: list[int] = field(default_factory=list)  # per depth: ... and drew the first candidate

    def depth_acceptance(self) -> list[float]:
        return [round(h / r, 4) if r else 0.0 for h, r in zip(self.hits, self.reached)]


# Below this many new tokens the auto plan drafts with n-grams only (plain steps where none
# match): the int4 copy takes about a second to build for 135M parameters, and the planner needs
# a few iterations to learn what a draft costs, so a self-draft cannot pay back in a short run.
SELF_DRAFT_MIN_TOKENS = 128


def self_drafts(method: str, spec: SpecConfig, max_new_tokens: int) -> bool:
    """Whether a run drafts with the model itself (and so needs the draft weights). Static
    trees (the paper's drafts) always do: they were asked for."""
    if method != "tokenswift":
        return False
    if not spec.auto:
        return True
    return spec.drafter in ("auto", "self") and max_new_tokens >= SELF_DRAFT_MIN_TOKENS


def seq_drafts(method: str, spec: SpecConfig, seq: SeqDraftModel | None) -> bool:
    """Whether a run drafts with the seq drafter: auto plans only, when one is loaded."""
    if method != "tokenswift" or not spec.auto or spec.drafter not in ("auto", "seq"):
        return False
    if seq is None:
        if spec.drafter == "seq":
            raise ParamError("drafter", "", " 'seq' needs a seq drafter: load one (load(drafter=PATH), "
                             "--drafter PATH) or use the one shipped for the model")
        return False
    return True


def resolve_draft_model(model: Decoder, int4: Decoder | None, spec: SpecConfig) -> Decoder:
    """The weights the self-draft runs: the int4 copy unless asked for the float ones."""
    if spec.draft_weights == "float":
        return model
    if int4 is None:
        if spec.draft_weights == "int4":
            raise ValueError("draft_weights 'int4' needs the model's int4 copy: load it with draft_weights='int4' "
                             "or 'auto' (torch's int4 kernel must exist)")
        return model
    return int4


class SpeculativeRun:
    """One TokenSwift run. Each iteration is a handful of stages (DESIGN.md):

        plan -> draft -> build trie -> verify -> accept (walk) -> commit

    Drafters only propose; this class alone verifies, walks and commits."""

    def __init__(self, model: Decoder, draft_model: Decoder | None, heads: DraftHeads | None, prompt: Sequence[int],
                 max_new_tokens: int, sampling: SamplingConfig, spec: SpecConfig, method: str,
                 seq: SeqDraftModel | None = None) -> None:
        """`draft_model` (the model or its int4 copy) when the run self-drafts, None when it does
        not (`self_drafts` decides: `generate_speculative`); `seq` when it drafts with the seq
        drafter (`seq_drafts`)."""
        self.model = model
        self.sampling = sampling
        self.spec = spec
        self.method = method
        self.timer = Timer(model.device)
        self.c = Counters()
        self.auto = method == "tokenswift" and spec.auto
        # before the prefill: an explicit draft_kv the machine cannot run fails at once
        self.draft_kv = resolve_draft_kv(spec.draft_kv, draft_model) if draft_model is not None else None
        use_draft = draft_model is not None or (seq is not None and self.auto)
        self.use_heads = use_draft and not self.auto and spec.use_heads and heads is not None
        # static trees are the paper's drafts (one pass + heads); auto chains the draft passes
        self.chain = self.auto
        if not use_draft:
            depth = 0
        elif self.chain:
            depth = spec.gamma
        else:
            depth = min(spec.gamma, 1 + heads.num_heads) if self.use_heads else 1
        self.depth = depth
        self.paths = tuple(p for p in spec.paths() if len(p) <= depth) if use_draft and not self.auto else ()
        self.widths = [STAT_WIDTH if self.auto else tree_width(self.paths, d) for d in range(1, depth + 1)]
        # γ of the paper's acceptance rate: positions drafted per iteration
        self.gamma = depth if use_draft else spec.ngram_n - 1
        self.ngram_k = spec.ngram_topk if (method == "ngram" or spec.use_ngrams) else 0
        max_tree = 1 + depth * STAT_WIDTH if self.auto else 1 + len(self.paths)
        self.max_nodes = spec.max_nodes or (max_tree + max(1, self.widths[0] if self.widths else 1)
                                            * self.ngram_k * spec.ngram_n)
        names = (("seq",) if seq is not None else ()) + (("self",) if draft_model is not None else ())
        self.planner = AutoPlanner(depth, spec.ngram_n, self.ngram_k, spec.max_nodes,
                                   drafters=names) if self.auto else None

        dev = model.device
        n0 = len(prompt)
        self.n0 = n0
        self.max_new = max_new_tokens
        run_len = n0 + max_new_tokens  # fixes dynamic-NTK RoPE exactly as `generate_ar` does
        capacity = run_len + model.pass_size(self.max_nodes) + depth + 2  # a compiled pass pads its trie
        history = torch.empty(capacity, dtype=torch.int64)
        history[:n0] = torch.as_tensor(list(prompt), dtype=torch.int64)
        main = KVCache(model.cfg, capacity=capacity, dtype=model.kv_dtype, device=dev, rope_len=run_len,
                       ring=model.kv_ring(capacity, self.draft_kv))
        self.seq = SeqDrafter(seq, sampling, depth) if seq is not None else None
        taps = None
        if self.seq is not None:  # features of the prompt's last positions: the drafter's first entries
            m = min(n0, self.seq.W + 1)
            taps = (self.seq.taps, torch.empty(1, m, len(self.seq.taps), model.cfg.hidden_size, dtype=model.dtype,
                                               device=dev))  # [1, m, 3, D]
        h = model.prefill(history[:n0].to(dev).unsqueeze(0), main, taps=taps)  # [1, D]
        logits = model.logits(h)  # [1, V]
        self.timer.prefill = self.timer.elapsed()
        root = _agree(model, int(sample(logits, penalty_window(history, n0, sampling), [n0], sampling)[0]))
        history[n0] = root
        self.st = RunState(history, [*prompt, root], main, n0, root, produced=1)
        if self.seq is not None:  # entries (F[p-1], x[p]) for the last m positions, the root's included
            self.seq.committed(taps[1][0, :m], history[n0 - m + 1 : n0 + 1].tolist(), n0 - m + 1)
        self.taps_out: torch.Tensor | None = None  # [1, P, 3, D] the last verify pass's features
        # written by every verify pass (a view of its first P rows): allocated once, at the largest pass
        self.taps_buf = (torch.empty(1, model.pass_size(self.max_nodes), len(self.seq.taps), model.cfg.hidden_size,
                                     dtype=model.dtype, device=dev) if self.seq is not None else None)
        self.ngrams = NGramDrafter(spec.ngram_n, sampling.penalty_width)
        self.ngrams.committed(self.st.tokens)
        if self.planner is not None:
            self.planner.ngram.done = n0  # score generated text only: the prompt's n-grams would match themselves
        self.drafter = SelfDrafter(model, draft_model, heads if self.use_heads else None, sampling,
                                   spec.draft_budget, spec.sinks, self.draft_kv, depth,
                                   rope_len=run_len, vocab=spec.draft_vocab) if draft_model is not None else None
        if self.drafter is not None:
            self.drafter.prepare(main, n0, history)
        self.plan: Plan | None = None

    # -- stages ---------------------------------------------------------------------------------

    def choose_plan(self) -> Plan | None:
        if self.planner is None:
            return None
        # chosen from timings, which differ per rank: rank 0's plan for all
        self.plan = _agree(self.model, self.planner.choose(self.st.N))
        return self.plan

    def draft(self, plan: Plan | None) -> Proposal | None:
        depth = plan.depth if plan is not None else self.depth
        who = plan.drafter if plan is not None else "self"
        if depth == 0 or (who == "self" and self.drafter is None):
            return None
        st = self.st
        width = plan.width if plan is not None else max(self.widths, default=1)
        if who == "seq":
            prop = self.seq.propose(st.history, st.N, st.root, depth, width)
        else:
            prop = self.drafter.propose(st.main, st.history, st.N, st.root, depth, width, chain=self.chain)
        if not self.chain:
            prop.candidates = [c[: self.widths[d]] for d, c in enumerate(prop.candidates)]
        self.c.draft_iterations += 1
        self.c.drafted += depth
        return _agree(self.model, prop)

    def build(self, prop: Proposal | None, plan: Plan | None) -> Trie:
        st = self.st
        k = plan.ngram_k if plan is not None else self.ngram_k
        paths = plan.paths if plan is not None else self.paths
        chains: list[list[int]] = []
        if prop is None:
            chains = self.ngrams.chains(st.root, k)
        elif self.chain:  # continuations of the last chained token extend the chain
            chain = [c[0] for c in prop.candidates]
            chains = self.ngrams.chains(chain[-1], k, prefix=chain)
        else:  # the paper's: continuations of each depth-1 candidate
            for c in prop.candidates[0] if prop.candidates else []:
                chains.extend(self.ngrams.chains(c, k, prefix=[c]))
        cands = prop.candidates if prop is not None else []
        return build_trie(st.root, cands, paths, chains, self.max_nodes)

    def verify(self, trie: Trie) -> torch.Tensor:  # [T, V] target logits per trie node
        st = self.st
        dev = self.model.device
        T = len(trie)
        P = self.model.pass_size(T)  # > T when compiled: padded to a compiled size
        x = torch.tensor(trie.tokens, dtype=torch.int64, device=dev).unsqueeze(0)  # [1, T]
        pos = trie.positions(st.N, dev).unsqueeze(0)  # [1, T]
        mask = trie.mask(dev) if T > 1 else None  # [T, T]
        if P > T:  # padding rows see only themselves and no node sees them; commit drops their KV
            x = torch.nn.functional.pad(x, (0, P - T))  # [1, P]
            pos = torch.nn.functional.pad(pos, (0, P - T), value=st.N)  # [1, P]
            pad = torch.eye(P, dtype=torch.bool, device=dev)  # [P, P]
            if mask is not None:
                pad[:T, :T] = mask
            mask = pad
        taps = None
        if self.seq is not None:
            self.taps_out = self.taps_buf[:, :P]  # [1, P, 3, D]
            taps = (self.seq.taps, self.taps_out)
        hv = self.model(x, pos, st.main, mask=mask, taps=taps)  # [1, P, D]
        return self.model.logits(hv[0, :T])

    def accept(self, trie: Trie, logits: torch.Tensor, prop: Proposal | None) -> WalkResult:
        st = self.st
        res = _agree(self.model, walk(trie, logits, st.history, st.N, self.sampling))  # rank 0 samples
        c = self.c
        c.accepted += len(res.accepted)
        c.ngram_accepted += sum(1 for i in res.accepted if trie.sources[i] == SRC_NGRAM)
        if prop is not None:  # per depth: did the walk draw the first candidate?
            for d, cands in enumerate(prop.candidates):
                if d >= len(res.tokens):
                    break
                if len(c.reached) <= d:
                    c.reached.append(0)
                    c.hits.append(0)
                c.reached[d] += 1
                rank = cands.index(res.tokens[d]) if res.tokens[d] in cands else None
                if self.planner is not None and self.plan is not None and self.plan.drafter is not None:
                    self.planner.stats[self.plan.drafter].update(d, rank)
                if rank != 0:
                    break
                c.hits[d] += 1
        return res

    def commit(self, res: WalkResult) -> None:
        """Keeps the root's and the accepted nodes' KV in path order; feeds the drafters."""
        st = self.st
        k = len(res.accepted)
        if res.accepted == list(range(1, k + 1)):  # a plain step, or a chain's prefix: already in place
            st.main.truncate(st.N + 1 + k)
        else:
            st.main.keep(torch.tensor([st.N] + [st.N + i for i in res.accepted], dtype=torch.int64))
        if self.drafter is not None:
            self.drafter.committed(st.main, st.N, 1 + k)
        if self.seq is not None:  # features at the root and the accepted nodes pair with the next tokens
            idx = torch.tensor([0] + list(res.accepted), dtype=torch.int64, device=self.taps_out.device)
            self.seq.committed(self.taps_out[0].index_select(0, idx), res.tokens, st.N + 1)
        st.tokens.extend(res.tokens)
        self.ngrams.committed(st.tokens)
        if self.planner is not None and self.ngram_k:
            self.planner.ngram.update(st.tokens, self.ngrams.table.top, self.spec.ngram_n)
        st.N += 1 + k
        st.root = res.next_root

    # -- stats ----------------------------------------------------------------------------------

    def stats(self, finish: str | None) -> dict[str, Any]:
        c, st = self.c, self.st
        out = _stats(self.method, self.n0, st.produced, self.timer, finish, c.iterations, self.model)
        d = self.drafter
        out.update({
            "acceptance_rate": c.accepted / (self.gamma * c.iterations) if c.iterations and self.gamma else 0.0,
            "tokens_per_iteration": (st.produced - 1) / c.iterations if c.iterations else 0.0,
            "accepted_draft_tokens": c.accepted,
            "ngram_share": c.ngram_accepted / c.accepted if c.accepted else 0.0,
            "gamma": self.gamma,
            "drafter": ("chain" if self.chain else "heads" if self.use_heads else "base")
                       if (d or self.seq is not None) else "none",
            "draft_weights": ("int4" if d.model is not self.model else "float") if d else None,
            "seq_drafter": self.seq is not None,
            # per drafter: iterations that drafted with it, positions drafted, seconds, ms per drafted token
            "drafters": {w: {"iterations": int(v[0]), "drafted": int(v[1]), "seconds": round(v[2], 3),
                             "ms_per_token": round(1000 * v[2] / v[1], 3) if v[1] else None}
                         for w, v in c.by_drafter.items()},
            "depth_acceptance": c.depth_acceptance(),
            "draft_seconds": c.t_draft,
            "verify_seconds": c.t_verify,
            "walk_seconds": c.t_walk,
            "other_seconds": max(0.0, out["decode_seconds"] - c.t_draft - c.t_verify - c.t_walk),
            "draft_kv": d.kv if d else None,
            "draft_kv_max": d.max_reads if d else 0,
            # ids the chains could propose (draft_vocab: the head's rows), 0 for the whole vocabulary
            "draft_vocab": int(d.vocab.ids.numel()) if d and d.vocab is not None and d.vocab.ids is not None else 0,
            "draft_refresh_kv_total": d.refresh_reads if d else 0,
            "draft_refreshes": d.refreshes if d else 0,
            "heads": d.heads.num_heads if d is not None and d.heads is not None else 0,
            "tree": "auto" if self.auto else str(self.spec.tree),
            "mean_trie_size": c.trie_nodes / c.iterations if c.iterations else 0.0,
        })
        if self.planner is not None:
            p = self.planner
            out["auto"] = {"plan": self.plan.describe() if self.plan is not None else None, "changes": p.choices,
                           "explorations": p.explorations, "explorations_skipped": p.explorations_skipped,
                           "draft_iterations": c.draft_iterations,
                           # acceptance over the iterations that drafted (AR steps excluded)
                           "draft_acceptance_rate": c.accepted / c.drafted if c.drafted else 0.0}
        return out

    # -- the loop -------------------------------------------------------------------------------

    def steps(self, eos_ids: Sequence[int], ignore_eos: bool) -> Iterator[Step]:
        stop = set() if ignore_eos else set(eos_ids)
        st, c = self.st, self.c
        finish = "eos" if st.root in stop else ("length" if st.produced >= self.max_new else None)
        yield Step([st.root], self.stats(finish), finished=finish is not None, kv=st.main)
        if finish is not None:
            return
        clock = self.timer.now
        while True:
            c.iterations += 1
            t0 = clock()
            plan = self.choose_plan()
            if self.drafter is not None and (plan.drafter == "self" if plan is not None else self.depth):
                self.drafter.catch_up(st.main, st.N)  # per committed token, not per drafted one
            t1 = clock()
            prop = self.draft(plan)
            t2 = clock()
            trie = self.build(prop, plan)
            c.trie_nodes += len(trie)
            t3 = clock()
            logits = self.verify(trie)
            t4 = clock()
            res = self.accept(trie, logits, prop)
            t5 = clock()
            self.commit(res)
            t6 = clock()
            c.t_draft += t2 - t1
            if prop is not None:
                who = plan.drafter if plan is not None else "self"
                row = c.by_drafter.setdefault(who, [0, 0, 0.0])
                row[0] += 1
                row[1] += len(prop.candidates)
                row[2] += t2 - t1
            c.t_verify += t4 - t3
            c.t_walk += t5 - t4
            if self.planner is not None and plan is not None:
                self.planner.observe(plan, len(trie), t2 - t1, t4 - t3, (t6 - t0) - (t2 - t1) - (t4 - t3),
                                     len(res.tokens))
            new, finish = res.tokens, None
            for j, t in enumerate(new):
                if t in stop:
                    new, finish = new[: j + 1], "eos"
                    break
            if st.produced + len(new) >= self.max_new and finish is None:
                new, finish = new[: self.max_new - st.produced], "length"
            st.produced += len(new)
            yield Step(new, self.stats(finish), finished=finish is not None, kv=st.main)
            if finish is not None:
                return


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
    int4: Decoder | None = None,
    seq: SeqDraftModel | None = None,
) -> Iterator[Step]:
    """TokenSwift (method "tokenswift") and prompt-lookup drafting (method "ngram"); `int4` is
    the model's int4 copy for the self-draft (`Decoder.int4_copy`), needed only when
    `self_drafts(...)`; `seq` the seq drafter, used when `seq_drafts(...)`."""
    draft = resolve_draft_model(model, int4, spec) if self_drafts(method, spec, max_new_tokens) else None
    seq = seq if seq_drafts(method, spec, seq) else None
    run = SpeculativeRun(model, draft, heads, prompt, max_new_tokens, sampling, spec, method, seq=seq)
    yield from run.steps(eos_ids, ignore_eos)
