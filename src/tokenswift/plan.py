"""The `auto` trie: pick the draft plan with the best expected tokens per second.

A plan is (tree nodes n, n-gram chains k, draft pass or not). Its worth is

    expected tokens per iteration / expected seconds per iteration

where tokens come from running acceptance statistics (per depth and candidate rank, and the
n-gram gain measured on the text already committed) and seconds from the verify pass timed on
this machine at the current context for a few trie sizes (re-timed as the context grows),
plus the measured draft pass and per-iteration overhead. The plan "no draft, no n-grams" is a
plain AR step through the same loop, so auto never plans slower than the AR it measures.

The pure parts (best tree for a rank-probability table, its expected accepted length, cost
interpolation) are functions with table-driven tests; `AutoPlanner` holds the running state.
"""

from __future__ import annotations

import heapq
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

STAT_WIDTH = 8  # candidate ranks tracked per depth
TREE_SIZES = (0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48)  # tree nodes (root excluded) considered
PROBE_SIZES = (1, 2, 4, 8, 16, 32, 64)  # trie sizes (root included) timed at a context


def best_tree(q: Sequence[Sequence[float]], n: int) -> tuple[tuple[int, ...], ...]:
    """The n rank paths with the highest acceptance probability, prefix-closed.

    q[d][j] = P(the draw at depth d+1 is the rank-j candidate | the walk reached depth d).
    A path's probability is the product along it, which never grows with depth, so taking
    the best frontier node n times is optimal."""
    out: list[tuple[int, ...]] = []
    if n <= 0 or not q:
        return ()
    heap: list[tuple[float, tuple[int, ...]]] = [(-q[0][j], (j,)) for j in range(len(q[0])) if q[0][j] > 0]
    heapq.heapify(heap)
    while heap and len(out) < n:
        negp, path = heapq.heappop(heap)
        out.append(path)
        d = len(path)
        if d < len(q):
            for j in range(len(q[d])):
                if q[d][j] > 0:
                    heapq.heappush(heap, (negp * q[d][j], path + (j,)))
    return tuple(sorted(out, key=lambda p: (len(p), p)))


def expected_accepted(q: Sequence[Sequence[float]], paths: Sequence[tuple[int, ...]]) -> float:
    """Mean accepted draft tokens of a tree: the sum of its paths' acceptance probabilities."""
    total = 0.0
    for p in paths:
        prob = 1.0
        for d, j in enumerate(p):
            prob *= q[d][j] if d < len(q) and j < len(q[d]) else 0.0
        total += prob
    return total


def interpolate(points: dict[int, float], T: int) -> float:
    """Cost at trie size T from measured sizes: linear between them, linear beyond the ends."""
    if not points:
        raise ValueError("no measured trie sizes to interpolate from")
    xs = sorted(points)
    if T in points:
        return points[T]
    if len(xs) == 1:
        return points[xs[0]] * T / xs[0]
    if T < xs[0]:
        lo, hi = xs[0], xs[1]
    elif T > xs[-1]:
        lo, hi = xs[-2], xs[-1]
    else:
        hi = next(x for x in xs if x > T)
        lo = max(x for x in xs if x < T)
    slope = (points[hi] - points[lo]) / (hi - lo)
    return max(points[lo] + slope * (T - lo), 1e-6)


class RankStats:
    """Acceptance counts per (depth, rank) with exponential forgetting, starting from a prior
    worth a few observations so the first plans explore instead of settling on AR."""

    def __init__(self, depth: int, prior: Sequence[Sequence[float]], weight: float = 4.0,
                 decay: float = 0.995) -> None:
        self.depth = depth
        self.decay = decay
        self.visits = [weight] * depth
        self.hits = [[weight * (prior[min(d, len(prior) - 1)][j] if j < len(prior[min(d, len(prior) - 1)]) else 0.0)
                      for j in range(STAT_WIDTH)] for d in range(depth)]

    def update(self, d: int, rank: int | None) -> None:
        """The walk reached depth d (0-based) and drew the candidate of `rank` there (None: none)."""
        self.visits[d] = self.visits[d] * self.decay + 1.0
        row = self.hits[d]
        for j in range(STAT_WIDTH):
            row[j] *= self.decay
        if rank is not None and rank < STAT_WIDTH:
            row[rank] += 1.0

    def q(self) -> list[list[float]]:
        return [[h / v for h in row] for row, v in zip(self.hits, self.visits)]


class NGramGain:
    """Tokens an n-gram chain would have added, measured on the committed text: for each
    committed token, the longest prefix of the following tokens matched by its top-j chains."""

    def __init__(self, ks: Sequence[int], decay: float = 0.998, prior: float = 16.0) -> None:
        self.ks = sorted(set(ks))
        self.decay = decay
        # pseudo-observations of zero gain: one lucky match in the first tokens must not
        # switch the plan to n-gram chains (measured: it did, and cost ~2x at 30K context)
        self.prior = prior
        self.count = 0.0
        self.gain = {k: 0.0 for k in self.ks}
        self.done = 0  # next position to score

    def update(self, tokens: Sequence[int], top: Callable[[int, int], list[tuple[int, ...]]], n: int) -> None:
        kmax = max(self.ks, default=0)
        if kmax == 0:
            return
        last = len(tokens) - n + 1  # positions whose n-1 followers are all committed
        for p in range(self.done, last):
            chains = top(tokens[p], kmax)
            best = 0
            per_k = {}
            for j, chain in enumerate(chains):
                m = 0
                while m < len(chain) and tokens[p + 1 + m] == chain[m]:
                    m += 1
                best = max(best, m)
                per_k[j + 1] = best
            self.count = self.count * self.decay + 1.0
            for k in self.ks:
                got = per_k.get(min(k, len(chains)), 0) if chains else 0
                self.gain[k] = self.gain[k] * self.decay + got
        self.done = max(self.done, last)

    def mean(self, k: int) -> float:
        return self.gain.get(k, 0.0) / (self.count + self.prior)


@dataclass
class Plan:
    tree_nodes: int
    paths: tuple[tuple[int, ...], ...]
    ngram_k: int
    draft: bool
    expected_tokens: float  # per iteration
    expected_seconds: float  # per iteration
    trie_size: int  # root included

    @property
    def rate(self) -> float:
        return self.expected_tokens / self.expected_seconds

    def describe(self) -> dict[str, Any]:
        return {
            "tree_nodes": self.tree_nodes, "ngram_k": self.ngram_k, "draft_pass": self.draft,
            "trie_size": self.trie_size, "expected_tokens_per_iteration": round(self.expected_tokens, 3),
            "expected_ms_per_iteration": round(1000 * self.expected_seconds, 2),
            "expected_tokens_per_s": round(self.rate, 2),
        }


class AutoPlanner:
    """Chooses a plan per iteration from measured costs and running acceptance statistics."""

    def __init__(self, depth: int, ngram_n: int, max_k: int, use_draft: bool, max_nodes: int | None,
                 prior: Sequence[Sequence[float]] = ((0.6, 0.08, 0.04, 0.02), (0.15, 0.05, 0.03, 0.02)),
                 explore_every: int = 24, reprobe_growth: float = 1.25, margin: float = 0.05,
                 reprobe_min: int = 512) -> None:
        self.depth = depth
        self.n = ngram_n
        self.use_draft = use_draft
        self.max_nodes = max_nodes
        ks = [0] + [k for k in (1, 2, 4, 8, 16, 32) if k < max_k] + ([max_k] if max_k > 0 else [])
        self.ks = sorted(set(ks))
        self.stats = RankStats(depth, prior) if use_draft and depth > 0 else None
        self.ngram = NGramGain([k for k in self.ks if k > 0])
        self.costs: dict[int, float] = {}  # trie size -> verify seconds at probe_ctx
        self.probe_ctx = 0
        self.reprobe_growth = reprobe_growth
        self.reprobe_min = reprobe_min
        self.t_draft: float | None = None
        self.t_iter = 0.0  # per-iteration overhead outside draft and verify
        self.t_token = 0.0  # per committed token (the walk's draws)
        self.explore_every = explore_every
        self.margin = margin
        self.since_draft = 0
        self.probes = 0
        self.explorations = 0
        self.choices: list[dict[str, Any]] = []  # plan changes: position + plan + why
        self._last_key: tuple[int, int, bool] | None = None

    # -- measurements -------------------------------------------------------------------------

    def needs_probe(self, ctx: int) -> bool:
        # grow by a quarter and by a few hundred tokens: a short prompt would otherwise re-measure
        # every few tokens, when the verify cost has hardly moved
        return not self.costs or ctx >= max(self.probe_ctx * self.reprobe_growth, self.probe_ctx + self.reprobe_min)

    def probe(self, ctx: int, run: Callable[[int], None], sizes: Sequence[int] = PROBE_SIZES) -> None:
        """Times `run(T)` (one verify-shaped pass of T tokens at this context) for each size."""
        cap = self.max_nodes or max(sizes)
        costs = {}
        for T in sizes:
            if T > cap and T != 1:
                continue
            best = float("inf")
            for _ in range(2):  # the minimum of two: the machine is shared
                t0 = time.perf_counter()
                run(T)
                best = min(best, time.perf_counter() - t0)
            costs[T] = best
        self.costs = costs
        self.probe_ctx = ctx
        self.probes += 1

    def observe(self, plan: Plan, draft_s: float, verify_s: float, other_s: float, tokens: int) -> None:
        a = 0.2
        if plan.draft:
            self.t_draft = draft_s if self.t_draft is None else (1 - a) * self.t_draft + a * draft_s
        T = plan.trie_size
        if T in self.costs:  # follow drift between probes
            self.costs[T] = (1 - a) * self.costs[T] + a * verify_s
        per_tok = other_s / max(tokens, 1)
        self.t_token = (1 - a) * self.t_token + a * per_tok if self.t_token else per_tok

    # -- the choice ---------------------------------------------------------------------------

    def _cost(self, T: int, draft: bool) -> float:
        c = interpolate(self.costs, T)
        if draft:
            c += self.t_draft if self.t_draft is not None else interpolate(self.costs, 1)
        return c

    def choose(self, ctx: int) -> Plan:
        q = self.stats.q() if self.stats is not None else []
        q1 = sum(q[0][:1]) if q else 0.0
        plans: list[Plan] = []
        n_sizes = [s for s in TREE_SIZES if s == 0 or (self.stats is not None)]
        for n in n_sizes:
            paths = best_tree(q, n) if n else ()
            e_tree = expected_accepted(q, paths) if n else 0.0
            # depth-2 mass the tree already covers: chains only add where the tree misses
            cover2 = sum(q[1][p[1]] for p in paths if len(p) == 2 and p[0] == 0) if len(q) > 1 else 0.0
            for k in self.ks:
                chain_nodes = k * (self.n - 1)
                size = 1 + n + chain_nodes
                if self.max_nodes is not None and size > self.max_nodes:
                    continue
                g = self.ngram.mean(k) if k else 0.0
                if n:  # chains hang off the best depth-1 candidate
                    e = e_tree + (q1 * g * max(0.0, 1.0 - cover2) if k else 0.0)
                else:  # chains from the root itself (prompt lookup)
                    e = g
                tokens = 1.0 + e
                secs = self._cost(size, draft=n > 0) + self.t_token * tokens
                plans.append(Plan(n, paths, k, n > 0, tokens, secs, size))
        best = max(plans, key=lambda p: p.rate)
        ar_plan = next(p for p in plans if p.tree_nodes == 0 and p.ngram_k == 0)
        if best is not ar_plan and best.rate < ar_plan.rate * (1 + self.margin):
            best = ar_plan  # estimates are noisy: speculate only for a clear expected gain
        # keep the acceptance statistics alive while planning without a draft pass: every so
        # often run the best drafting plan anyway (not logged as a change of plan)
        if self.stats is not None and not best.draft:
            self.since_draft += 1
            if self.since_draft >= self.explore_every:
                self.since_draft = 0
                self.explorations += 1
                return max((p for p in plans if p.draft), key=lambda p: p.rate)
        else:
            self.since_draft = 0
        key = (best.tree_nodes, best.ngram_k, best.draft)
        if key != self._last_key:
            ar = next(p for p in plans if p.tree_nodes == 0 and p.ngram_k == 0)
            self.choices.append({
                "context": ctx, **best.describe(),
                "why": {"ar_tokens_per_s": round(ar.rate, 2),
                        "verify_ms": {str(T): round(1000 * c, 2) for T, c in sorted(self.costs.items())},
                        "draft_ms": round(1000 * self.t_draft, 2) if self.t_draft is not None else None,
                        "rank_acceptance": [[round(x, 3) for x in row[:4]] for row in q],
                        "ngram_gain": {str(k): round(self.ngram.mean(k), 3) for k in self.ks if k}},
            })
            self._last_key = key
        return best
