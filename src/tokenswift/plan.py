"""The `auto` plan: per iteration, the draft with the best expected tokens per second.

A plan is (drafter, chain depth g, sibling leaves, n-gram chains k): g chained draws of one
drafter (`self`: the model's int4 copy; `seq`: the one-block drafter) propose
positions r+1 … r+g, the next-best draft tokens at chosen depths are added as leaves, and k
n-gram continuations of the last chained token extend the trie past depth g (of the root when
g = 0). Its worth is

    expected tokens per iteration / expected seconds per iteration

with tokens from running acceptance statistics (per depth and candidate rank; the n-gram gain
measured on the committed text) and seconds from what the loop itself measures: the verify
pass per trie size (a size never run: a line through those that were), the draft pass per
drafted token, the overhead per committed token. Nothing is timed before the run starts, so
short runs pay nothing for planning: the first iteration is a plain step and the second a
modest chain, and they measure the costs the plans start from; a drafter not run yet has a
prior cost (a third of a step). "g = 0, k = 0" is a plain AR step through the same loop, and a
drafting plan must beat it by `margin`.

The model can be wrong in ways its parts do not show (a verify cost per trie size measured long
ago, a slope fitted through few sizes): so plain steps carry the ratio of the tokens per second
their iterations really gave to what the model expected of them, speculative plans that ratio
over plain steps' at the time (a machine slowing down moves both kinds: calibrated apart, plain
steps alone looked 12 % slow at 16K on a busy VM and unmeasured drafts won at a loss), and plans
are compared at their calibrated rates. While plain steps win, the plan is recomputed
every `HOLD` iterations only, and the drafts tried now and then to re-measure them come further
and further apart (up to `EXPLORE_MAX` iterations), so that a run where speculation cannot pay
costs little more than `ar`.

The pure parts (best tree for a rank-probability table, its expected accepted length, cost
interpolation) are functions with table-driven tests; `AutoPlanner` holds the running state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

STAT_WIDTH = 8  # candidate ranks tracked per depth
SIBLINGS = (0, 1, 2, 4, 8)  # sibling leaves considered per plan
# Priors until measured: extra cost of each verified token as a share of a one-token pass, and
# a drafted token's cost as a share of a one-token pass, per drafter (CPU: the int4 copy over
# the partial cache; the seq drafter's one block and reduced head).
SLOPE_PRIOR = 0.05
DRAFT_PRIOR = {"self": 0.35, "seq": 0.06}
# Running costs: a measurement enters with weight COST_WEIGHT, and what was known before keeps
# STALE of its weight for every iteration without a measurement of that cost. A trie size or a
# drafter seen every iteration is the plain moving average; one seen last hundreds of iterations
# ago (thousands of context entries shorter, or while another job held the cores) is mostly
# replaced by the next measurement instead of pulling the plan for many more.
# A measurement above OUTLIER x the estimate counts as OUTLIER x: a process stopped mid-step
# (SIGSTOP, a suspended laptop, a swap storm) times one pass at minutes.
COST_WEIGHT = 0.2
STALE = 0.95
OUTLIER = 4.0
# Calibration: decayed sums of realized and expected tokens and seconds per kind of plan, each
# observation of that kind keeping CAL_DECAY of what was there; applied once CAL_MIN observations
# (decayed) back it.
CAL_DECAY = 0.9
CAL_MIN = 4.0
# Plain steps: the plan is recomputed every HOLD iterations; the exploration interval doubles up
# to EXPLORE_MAX while plain steps stay best, and returns to `explore_every` when a draft wins.
HOLD = 8
EXPLORE_MAX = 512


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


class Calibration:
    """Realized over expected tokens per second for one kind of plan: the ratio of decayed sums
    (tokens realized / expected) / (seconds realized / expected), so that iterations of 1 and 3
    tokens weigh as tokens, not as ratios. 1.0 until `CAL_MIN` observations back it."""

    def __init__(self, decay: float = CAL_DECAY, min_weight: float = CAL_MIN) -> None:
        self.decay = decay
        self.min_weight = min_weight
        self.weight = 0.0
        self.sums = [0.0, 0.0, 0.0, 0.0]  # tokens realized, expected; seconds realized, expected
        self.factor = 1.0  # kept current by `update`: every plan the planner weighs reads it

    def update(self, tokens: float, seconds: float, expected_tokens: float, expected_seconds: float) -> None:
        d = self.decay
        self.weight = self.weight * d + 1.0
        for i, x in enumerate((tokens, expected_tokens, seconds, expected_seconds)):
            self.sums[i] = self.sums[i] * d + x
        tr, te, sr, se = self.sums
        ok = self.weight >= self.min_weight and min(tr, te, sr, se) > 0
        self.factor = (tr / te) / (sr / se) if ok else 1.0


def fit_line(points: dict[int, float], slope_prior: float) -> tuple[float, float]:
    """(c1, m) of the cost line c(T) = c1 + m·(T - 1) through measured (T, seconds) points:
    least squares with m >= 0 (a bigger trie never costs less); one point (or one size) gives
    the prior slope, m = slope_prior·c1."""
    xs = [T - 1 for T in points]
    ys = list(points.values())
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs)
    if var == 0:
        c1 = my / (1 + slope_prior * mx)
        return c1, slope_prior * c1
    m = max(0.0, sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var)
    c1 = my - m * mx
    # a pass of T tokens costs at most T one-token passes, so c1 >= c(T) / T: two big tries
    # measured first (a resumed run's first chains at long context) must not extrapolate to a
    # free plain step. Then the slope that fits best with that intercept.
    floor = max(y / (x + 1) for x, y in zip(xs, ys))
    if c1 < floor:
        c1 = floor
        m = max(0.0, sum(x * (y - c1) for x, y in zip(xs, ys)) / sum(x * x for x in xs))
    return max(c1, 1e-6), m


def chain_tree(q: Sequence[Sequence[float]], depth: int, siblings: int) -> tuple[tuple[tuple[int, ...], ...], float]:
    """The chain (0,), (0, 0) … of `depth` nodes plus the `siblings` likeliest sibling leaves
    (a next-best candidate at some depth of the chain) -> (rank paths, expected accepted tokens).

    q[d][j] = P(the draw at depth d+1 is the rank-j candidate | the walk reached depth d)."""
    return chain_trees(q, depth, (siblings,), clip=True)[0]


def chain_trees(q: Sequence[Sequence[float]], depth: int, siblings: Sequence[int],
                clip: bool = False) -> list[tuple[tuple[tuple[int, ...], ...], float]]:
    """`chain_tree` for each count of siblings (ascending), the leaves ranked once: the trees of
    more siblings extend those of fewer. A count beyond the leaves there are is left out (with
    `clip`, it takes all of them)."""
    reach = [1.0]  # reach[d] = P(the walk is on the chain at depth d)
    for d in range(depth):
        reach.append(reach[-1] * (q[d][0] if d < len(q) else 0.0))
    chain = [(0,) * d for d in range(1, depth + 1)]
    leaves = sorted(((reach[d] * q[d][j], (0,) * d + (j,)) for d in range(min(depth, len(q)))
                     for j in range(1, len(q[d])) if q[d][j] > 0), reverse=True)
    e_chain = sum(reach[1:])
    out = []
    for n in siblings:
        if n > len(leaves) and not clip:
            break
        top = leaves[:n]
        paths = tuple(sorted(chain + [p for _, p in top], key=lambda p: (len(p), p)))
        out.append((paths, e_chain + sum(w for w, _ in top)))
    return out


@dataclass(slots=True)
class Plan:
    depth: int  # chained draft passes (0: no draft)
    paths: tuple[tuple[int, ...], ...]  # rank paths over the draft's candidates
    ngram_k: int
    expected_tokens: float  # per iteration
    expected_seconds: float  # per iteration
    trie_size: int  # root included
    drafter: str | None = None  # which drafter proposes the chain (None when depth is 0)
    modelled: bool = True  # expected_* come from the cost model (not the first, unmeasured plan)

    @property
    def draft(self) -> bool:
        return self.depth > 0

    @property
    def plain(self) -> bool:
        """A plain AR step: no draft, no n-gram chain."""
        return self.depth == 0 and self.ngram_k == 0

    @property
    def kind(self) -> str:
        """What the planner calibrates it with: "plain" steps or "spec" (drafts, n-gram chains)."""
        return "plain" if self.plain else "spec"

    @property
    def width(self) -> int:
        """Candidates needed per drafted position."""
        return 1 + max((p[-1] for p in self.paths), default=0)

    @property
    def rate(self) -> float:
        return self.expected_tokens / self.expected_seconds

    def describe(self) -> dict[str, Any]:
        return {
            "drafter": self.drafter, "depth": self.depth, "siblings": len(self.paths) - self.depth, "ngram_k": self.ngram_k,
            "trie_size": self.trie_size, "expected_tokens_per_iteration": round(self.expected_tokens, 3),
            "expected_ms_per_iteration": round(1000 * self.expected_seconds, 2),
            "expected_tokens_per_s": round(self.rate, 2),
        }


class AutoPlanner:
    """Chooses a plan per iteration from measured costs and running acceptance statistics."""

    def __init__(self, max_depth: int, ngram_n: int, max_k: int, max_nodes: int | None,
                 prior: Sequence[Sequence[float]] = ((0.9, 0.03, 0.01, 0.005),),
                 explore_every: int = 32, margin: float = 0.05, drafters: Sequence[str] = ("self",)) -> None:
        self.drafters = tuple(drafters) if max_depth > 0 else ()
        self.max_depth = max_depth
        self.n = ngram_n
        self.max_nodes = max_nodes
        ks = [0] + [k for k in (1, 2, 4, 8, 16) if k < max_k] + ([max_k] if max_k > 0 else [])
        self.ks = sorted(set(ks))
        # per drafter: acceptance by (depth, rank) and seconds per drafted token (running, measured)
        self.stats: dict[str, RankStats] = {d: RankStats(max_depth, prior) for d in self.drafters}
        self.t_draft: dict[str, float | None] = {d: None for d in self.drafters}
        self.ngram = NGramGain([k for k in self.ks if k > 0])
        self.costs: dict[int, float] = {}  # trie size -> verify seconds (running, measured)
        self._seen: dict[Any, int] = {}  # cost key (trie size, or "draft:" + drafter) -> its last iteration
        self.t_token = 0.0  # per committed token: the walk's draws and the bookkeeping
        self.explore_every = explore_every
        self.margin = margin
        self.iterations = 0
        self.explorations = 0
        self.choices: list[dict[str, Any]] = []  # plan changes: position + plan + why
        self._last_key: tuple | None = None
        # realized / expected rate per kind of plan: "plain" steps and "spec" (drafts, n-grams)
        self.cal = {"plain": Calibration(), "spec": Calibration()}
        self._gap = explore_every  # iterations between explorations (grows while plain steps win)
        self._next_explore = explore_every
        self._held: Plan | None = None  # the plain plan held until _replan
        self._replan = 0
        self._ctx = 0  # the context of the iteration being planned
        self._draft_ctx: dict[str, int] = {}  # drafter -> the context its cost was last measured at
        self.explorations_skipped = 0  # explorations no draft could have won (`could_pay`)

    # -- measurements -------------------------------------------------------------------------

    def observe(self, plan: Plan, trie_size: int, draft_s: float, verify_s: float, other_s: float,
                tokens: int) -> None:
        """One iteration's measurements. `trie_size` is the trie actually verified: n-gram
        chains may be fewer than the plan allowed."""
        if plan.depth:
            old = self.t_draft[plan.drafter]
            self.t_draft[plan.drafter] = self._blend("draft:" + plan.drafter, old, draft_s / plan.depth)
            self._draft_ctx[plan.drafter] = self._ctx
        T = trie_size
        self.costs[T] = self._blend(T, self.costs.get(T), verify_s)
        per_tok = other_s / max(tokens, 1)
        a = COST_WEIGHT
        self.t_token = (1 - a) * self.t_token + a * per_tok if self.t_token else per_tok
        if plan.modelled:
            secs = draft_s + verify_s + other_s
            # speculative plans against what plain steps give at the time: a machine that slows
            # down (or speeds up) moves both kinds, so only their ratio is the drafts' own
            rel = self.cal["plain"].factor if plan.kind == "spec" else 1.0
            self.cal[plan.kind].update(tokens, secs, plan.expected_tokens * rel, plan.expected_seconds)

    def _blend(self, key: Any, old: float | None, new: float) -> float:
        """The running cost `key` after measuring `new`: weighted by how recent `old` is."""
        last = self._seen.get(key)
        self._seen[key] = self.iterations
        if old is None:
            return new
        new = min(new, OUTLIER * old)
        age = max(1, self.iterations - last) if last is not None else 1
        keep = (1 - COST_WEIGHT) * STALE ** (age - 1)
        return keep * old + (1 - keep) * new

    # -- the choice ---------------------------------------------------------------------------

    def plans(self) -> list[Plan]:
        """Every plan considered, with its expected tokens and seconds."""
        c1, m = fit_line(self.costs, SLOPE_PRIOR)
        # a trie size measured is its own cost; the line stands in for the sizes never run (a
        # line through a few sizes misses the others: the plain step's cost, read off a line
        # through 1, 5 and 6 nodes, came out 12 % low and its calibration then held plain
        # steps at 0.84 of their rate while drafts, rarely run, kept 1.0)
        costs = self.costs
        out: list[Plan] = []
        gain = {k: self.ngram.mean(k) for k in self.ks if k}  # once per call: ~270 plans read them
        t_tok = self.t_token
        for who in (None, *self.drafters):
            q = self.stats[who].q() if who is not None else []
            t = self.t_draft[who] if who is not None else None
            draft = t if t is not None else DRAFT_PRIOR.get(who, DRAFT_PRIOR["self"]) * c1
            for g in (range(1, self.max_depth + 1) if who is not None else (0,)):
                reach_g = 1.0
                for d in range(g):
                    reach_g *= q[d][0]
                for paths, e_tree in chain_trees(q, g, SIBLINGS if g else (0,)):  # no more siblings than leaves
                    base = 1 + len(paths)
                    for k in self.ks:
                        size = base + k * (self.n - 1)
                        if self.max_nodes is not None and size > self.max_nodes:
                            continue
                        tokens = 1.0 + e_tree + (reach_g * gain[k] if k else 0.0)
                        verify = costs.get(size)
                        if verify is None:
                            verify = c1 + m * (size - 1)
                        secs = g * draft + verify + t_tok * tokens
                        out.append(Plan(g, paths, k, tokens, secs, size, who))
        return out

    def could_pay(self, who: str, ar: Plan) -> bool:
        """Whether a chain of `who` could beat the plain step `ar` if every drafted token were
        accepted (the upper bound of what exploring it can find), at the costs measured; True
        while its cost is unmeasured, or was measured at under half today's context (a draft's
        cost grows more slowly with the context than a step's: a bound from then is stale)."""
        t = self.t_draft[who]
        if t is None or 2 * self._draft_ctx.get(who, 0) < self._ctx:
            return True
        c1, m = fit_line(self.costs, SLOPE_PRIOR)
        best = 0.0
        for g in range(1, self.max_depth + 1):
            tokens = 1.0 + g
            verify = self.costs.get(1 + g, c1 + m * g)
            best = max(best, tokens / (g * t + verify + self.t_token * tokens))
        return best > self.rate(ar)

    def rate(self, plan: Plan) -> float:
        """The plan's expected tokens per second, calibrated by what plain steps really give now
        and, for a speculative plan, by what its kind gave beyond that (1.0 until measured: a
        slower machine does not make unmeasured drafts look better than plain steps)."""
        f = self.cal["plain"].factor
        return plan.rate * f * (self.cal["spec"].factor if plan.kind == "spec" else 1.0)

    def choose(self, ctx: int) -> Plan:
        self.iterations += 1
        self._ctx = ctx
        # the first iterations measure before the model plans: a plain step (what every plan is
        # compared with), then a modest chain (what a drafted token costs). Plain first: a chain
        # measured alone fits a line through one size, and the plain step it extrapolates to was
        # off by 2x at 16K context (Zen 3), which kept the next plans drafting at a loss.
        if 1 not in self.costs:
            return Plan(0, (), 0, 1.0, 1.0, 1, None, modelled=False)
        if self.drafters and all(t is None for t in self.t_draft.values()):
            g = min(4, self.max_depth)
            return Plan(g, tuple((0,) * d for d in range(1, g + 1)), 0, 1.0 + g, 1.0, 1 + g, self.drafters[0],
                        modelled=False)
        explore = bool(self.explore_every) and self.iterations >= self._next_explore
        if self._held is not None and not explore and self.iterations < self._replan:
            return self._held  # plain steps: nothing a plain step measures changes the plan quickly
        plans = self.plans()
        ar = next(p for p in plans if p.plain)
        best = max(plans, key=self.rate)
        if best is not ar and self.rate(best) < self.rate(ar) * (1 + self.margin):
            best = ar  # estimates are noisy: speculate only for a clear expected gain
        self._held, self._replan = (best, self.iterations + HOLD) if best is ar else (None, 0)
        if explore:
            # measure a neighbour now and then: the cost curve and the acceptance statistics
            # only learn from plans that run. While plain steps stay best, ever less often.
            self._gap = min(2 * max(self._gap, self.explore_every), EXPLORE_MAX) if best is ar else self.explore_every
            self._next_explore = self.iterations + self._gap
            if best is ar and not any(self.could_pay(w, ar) for w in self.drafters):
                # not even a chain accepted whole would beat the plain step (a short context, where
                # a drafted token reads as many weight bytes as a step): nothing to learn by paying
                explore = False
                self.explorations_skipped += 1
        if explore:
            self.explorations += 1
            turn = self.explorations % (3 + (len(self.drafters) > 1))
            if turn == 3:  # another drafter's best chain
                others = [p for p in plans if p.draft and p.drafter != best.drafter and p.ngram_k == 0]
            elif turn == 0 or not best.draft:
                others = [p for p in plans if p.draft and p.ngram_k == 0] if not best.draft else [ar]
            else:
                d = best.depth + (2 if turn == 1 else -2)
                others = [p for p in plans if p.drafter == best.drafter and p.ngram_k == 0
                          and p.depth == max(1, min(self.max_depth, d))]
            if others:
                return max(others, key=self.rate)
        key = (best.drafter, best.depth, len(best.paths), best.ngram_k)
        if key != self._last_key:
            self.choices.append({
                "context": ctx, **best.describe(),
                "why": {"ar_tokens_per_s": round(ar.rate, 2),
                        "calibration": {k: round(c.factor, 3) for k, c in self.cal.items()},
                        "verify_ms": {str(T): round(1000 * c, 2) for T, c in sorted(self.costs.items())},
                        "draft_ms_per_token": {w: round(1000 * t, 2) if t is not None else None
                                               for w, t in self.t_draft.items()},
                        "rank_acceptance": {w: [[round(x, 3) for x in row[:3]] for row in st.q()]
                                            for w, st in self.stats.items()},
                        "ngram_gain": {str(k): round(self.ngram.mean(k), 3) for k in self.ks if k}},
            })
            self._last_key = key
        return best
