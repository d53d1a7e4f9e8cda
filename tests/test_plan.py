"""The auto planner's pure parts: chain trees, the cost line, running statistics and the plan
it picks for given costs (no timing here)."""

from __future__ import annotations

import pytest

from tokenswift.plan import (HOLD, STAT_WIDTH, AutoPlanner, Calibration, NGramGain, Plan, RankStats, chain_tree,
                             fit_line)

Q = [[0.9, 0.05, 0.02], [0.5, 0.3], [0.4, 0.1]]
# reach: depth 1 .9, depth 2 .45, depth 3 .18; siblings: (0,1) .27, (1,) .05, (2,) .02, (0,0,1) .045


@pytest.mark.parametrize("depth, siblings, want_paths, want_e", [
    (0, 0, (), 0.0),
    (1, 0, ((0,),), 0.9),
    (2, 0, ((0,), (0, 0)), 0.9 + 0.45),
    (3, 0, ((0,), (0, 0), (0, 0, 0)), 0.9 + 0.45 + 0.18),
    (3, 1, ((0,), (0, 0), (0, 1), (0, 0, 0)), 0.9 + 0.45 + 0.18 + 0.27),
    (3, 2, ((0,), (1,), (0, 0), (0, 1), (0, 0, 0)), 0.9 + 0.45 + 0.18 + 0.27 + 0.05),
    (3, 3, ((0,), (1,), (0, 0), (0, 1), (0, 0, 0), (0, 0, 1)), 0.9 + 0.45 + 0.18 + 0.27 + 0.05 + 0.045),
    (1, 5, ((0,), (1,), (2,)), 0.9 + 0.05 + 0.02),  # only the siblings that exist
    (5, 0, ((0,), (0, 0), (0, 0, 0), (0, 0, 0, 0), (0, 0, 0, 0, 0)), 0.9 + 0.45 + 0.18),  # no data: 0
])
def test_chain_tree_is_the_chain_plus_the_likeliest_siblings(depth, siblings, want_paths, want_e):
    paths, e = chain_tree(Q, depth, siblings)
    assert paths == want_paths
    assert e == pytest.approx(want_e)


@pytest.mark.parametrize("points, want", [
    ({1: 10.0, 5: 14.0}, (10.0, 1.0)),
    ({1: 10.0, 3: 12.0, 5: 14.0}, (10.0, 1.0)),
    ({1: 10.0, 5: 9.0}, (10.0, 0.0)),  # a bigger trie never costs less: slope 0, c1 no less than c(1)
    ({5: 12.0}, (10.0, 0.5)),  # one size: the prior slope (here 0.05 of c1)
    ({1: 8.0}, (8.0, 0.4)),
    # two big tries only, steep: the line would reach T = 1 below zero; c1 is held at
    # max c(T)/T = 161/6 and the slope fits the rest with that intercept
    ({5: 123.0, 6: 161.0}, (161 / 6, (4 * (123 - 161 / 6) + 5 * (161 - 161 / 6)) / 41)),
])
def test_fit_line(points, want):
    c1, m = fit_line(points, 0.05)
    assert (c1, m) == pytest.approx(want)


def test_rank_stats_converge_to_the_observed_rates():
    s = RankStats(2, [[0.5, 0.1]], weight=4, decay=1.0)
    for i in range(1000):
        s.update(0, 0 if i % 4 else 1)  # rank 0 three times in four, rank 1 once
        if i % 2:
            s.update(1, None)
    q = s.q()
    assert q[0][0] == pytest.approx(0.75, abs=0.01) and q[0][1] == pytest.approx(0.25, abs=0.01)
    assert q[1][0] < 0.01 and len(q[0]) == STAT_WIDTH


def test_ngram_gain_scores_matches_on_committed_text():
    table = {5: [(6, 7, 8), (6, 9, 9)]}
    gain = NGramGain([1, 2], decay=1.0, prior=0.0)
    toks = [5, 6, 9, 9, 1, 1, 1]  # at 5: chain 1 matches 1 token, chain 2 all 3
    gain.update(toks, lambda key, k: table.get(key, [])[:k], n=4)
    assert gain.count == 4  # positions 0..3 have their 3 followers committed
    assert gain.mean(1) == pytest.approx(1 / 4) and gain.mean(2) == pytest.approx(3 / 4)
    gain.update(toks, lambda key, k: table.get(key, [])[:k], n=4)
    assert gain.count == 4  # nothing scored twice


def _planner(costs, draft_s, q0, q1=0.01, depth=6, max_k=0, explore_every=0):
    p = AutoPlanner(depth, ngram_n=4, max_k=max_k, max_nodes=None, explore_every=explore_every)
    p.costs = dict(costs)
    p.t_draft = {"self": draft_s}
    p.stats = {"self": RankStats(depth, [[q0, q1]], weight=1000, decay=1.0)}
    return p


def test_planner_measures_a_plain_step_then_a_modest_chain_before_planning():
    p = AutoPlanner(8, ngram_n=4, max_k=20, max_nodes=None)
    plan = p.choose(100)
    assert plan.plain and not plan.modelled
    p.observe(plan, 1, 0.0, 0.03, 0.001, 1)
    plan = p.choose(101)
    assert (plan.depth, plan.ngram_k, plan.trie_size, plan.modelled) == (4, 0, 5, False)
    p.observe(plan, 5, 0.04, 0.05, 0.001, 3)
    assert p.choose(102).modelled  # both costs seen: planned from here on


def test_planner_takes_a_measured_trie_size_at_its_own_cost():
    # the sizes run: 1 node at 36 ms, 5 at 86, 6 at 99 (16K context, Zen 3); a line through them
    # puts a plain step at ~33 ms, but 1 node was measured: a plain plan costs what it measured
    p = _planner({1: 0.03627, 5: 0.08555, 6: 0.09924}, 0.028, q0=0.95)
    plain = next(q for q in p.plans() if q.plain)
    assert plain.expected_seconds == pytest.approx(0.03627 + p.t_token)
    unmeasured = next(q for q in p.plans() if q.trie_size == 3 and q.depth == 2)
    c1, m = fit_line(p.costs, 0.05)
    assert unmeasured.expected_seconds == pytest.approx(2 * 0.028 + c1 + 2 * m + p.t_token * unmeasured.expected_tokens)


def test_planner_picks_ar_when_drafts_cannot_pay_for_themselves():
    # a draft token costs as much as a step and rarely matches
    p = _planner({1: 0.05, 5: 0.06}, 0.05, q0=0.3)
    plan = p.choose(2048)
    assert (plan.depth, plan.ngram_k) == (0, 0)
    assert p.choices[-1]["why"]["ar_tokens_per_s"] == pytest.approx(20.0)


def test_planner_chains_deeper_the_better_the_draft_couples():
    # a draft at 30 % of a step, verify +5 % a token
    shallow = _planner({1: 0.10, 9: 0.14}, 0.03, q0=0.6).choose(4096)
    deep = _planner({1: 0.10, 9: 0.14}, 0.03, q0=0.97).choose(4096)
    assert 1 <= shallow.depth < deep.depth
    assert deep.expected_tokens > 4 and deep.rate > 1.5 * 10


def test_planner_adds_siblings_when_they_are_likely_and_verify_is_flat():
    p = _planner({1: 0.10, 33: 0.1001}, 0.01, q0=0.6, q1=0.3)
    plan = p.choose(4096)
    assert plan.depth >= 1 and len(plan.paths) > plan.depth  # sibling leaves in the trie
    assert plan.width >= 2


def test_planner_extends_the_chain_with_ngrams_when_they_match():
    p = _planner({1: 0.10, 17: 0.102}, 0.02, q0=0.9, max_k=4)
    p.ngram.count, p.ngram.prior = 100.0, 0.0
    p.ngram.gain = {k: 100.0 * 2.5 for k in p.ngram.ks}  # chains add 2.5 tokens on average
    plan = p.choose(4096)
    assert plan.ngram_k > 0 and plan.trie_size == 1 + len(plan.paths) + plan.ngram_k * 3


def test_planner_explores_ever_less_often_while_plain_steps_win():
    """A draft now and then re-measures what drafting costs; while plain steps stay best the
    interval doubles (5, 10, 20, 40 iterations), so a run where drafts cannot pay wastes little."""
    p = _planner({1: 0.05, 5: 0.06}, 0.05, q0=0.3, explore_every=5)
    drafted = [i for i in range(1, 101) if p.choose(1000 + i).draft]
    assert p.explorations == 4 and drafted == [5, 15, 35, 75]


@pytest.mark.parametrize("draft_s, measured_at, now, want", [
    (0.06, 1000, 1000, False),  # a drafted token dearer than a step: no chain can pay
    (0.05, 1000, 1000, False),  # as dear as a step: 2 tokens for 2.05 steps at best
    (0.03, 1000, 1000, True),  # depth 1 accepted: 2 tokens for 1.65 steps
    (0.06, 1000, 2000, False),  # measured at half today's context: still its own
    (0.06, 1000, 2001, True),  # measured at under half: stale, worth measuring again
    (None, 0, 1000, True),  # never measured
])
def test_could_pay_is_the_rate_of_a_chain_accepted_whole(draft_s, measured_at, now, want):
    p = _planner({1: 0.05, 2: 0.0525, 5: 0.06}, draft_s, q0=0.3)
    p._draft_ctx = {"self": measured_at} if draft_s is not None else {}
    p._ctx = now
    ar = next(q for q in p.plans() if q.plain)
    assert p.could_pay("self", ar) is want


def test_planner_skips_explorations_no_draft_could_win_until_the_context_doubles():
    """A drafted token measured at a step's cost (a short context: it reads the same weights):
    an exploration could not find a winning draft, so none is paid for; once the context has
    doubled since the draft's cost was measured, one is again."""
    p = _planner({1: 0.05, 5: 0.06}, 0.05, q0=0.9, explore_every=5)
    p._draft_ctx = {"self": 1000}
    drafted = [i for i in range(1, 101) if p.choose(1000 + i).draft]
    assert drafted == [] and p.explorations == 0 and p.explorations_skipped == 4
    for i in range(101, 400):
        if p.choose(1900 + i).draft:  # the context passes 2000 at i = 101
            break
    assert p.explorations == 1 and p.iterations == 155  # the next exploration due: 75 + 80


def test_planner_explores_at_the_base_interval_again_once_a_draft_wins():
    p = _planner({1: 0.05, 5: 0.06}, 0.05, q0=0.3, explore_every=5)
    for i in range(40):
        p.choose(1000 + i)  # explorations at 5, 15, 35: the interval is 40 now
    p.t_draft = {"self": 0.001}  # drafts became cheap and couple well
    p.stats = {"self": RankStats(6, [[0.95, 0.01]], weight=1000, decay=1.0)}
    p._held = None  # (the held plain plan would be replanned within HOLD iterations anyway)
    explored = []
    for i in range(40, 100):
        before = p.explorations
        p.choose(1000 + i)
        if p.explorations > before:
            explored.append(p.iterations)
    assert explored[:3] == [75, 80, 85]  # the next one as planned, then every 5 again


def test_planner_recomputes_a_plain_plan_every_hold_iterations_only():
    p = _planner({1: 0.05, 5: 0.06}, 0.05, q0=0.3)
    calls = []
    plans = p.plans
    p.plans = lambda: calls.append(p.iterations) or plans()
    for i in range(3 * HOLD):
        assert p.choose(1000 + i).plain
    assert calls == [1, 1 + HOLD, 1 + 2 * HOLD]
    # drafting plans are recomputed every iteration: their acceptance statistics move
    d = _planner({1: 0.10, 9: 0.14}, 0.03, q0=0.97)
    calls.clear()
    plans = d.plans
    d.plans = lambda: calls.append(d.iterations) or plans()
    for i in range(5):
        assert d.choose(4096 + i).draft
    assert calls == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("obs, want", [
    ([], 1.0),
    ([(2, 0.1, 2.0, 0.1)] * 3, 1.0),  # too few observations: not applied yet
    ([(2, 0.1, 2.0, 0.1)] * 6, 1.0),  # as expected
    ([(1, 0.1, 2.0, 0.1)] * 6, 0.5),  # half the tokens
    ([(2, 0.2, 2.0, 0.1)] * 6, 0.5),  # twice the time
    # tokens weigh as tokens: 3 of 2 expected and 1 of 2 -> 4 of 4, in 2x the time
    ([(3, 0.2, 2.0, 0.1), (1, 0.2, 2.0, 0.1)] * 3, 0.5),
])
def test_calibration_is_realized_over_expected_rate(obs, want):
    c = Calibration(decay=1.0, min_weight=4)
    for o in obs:
        c.update(*o)
    assert c.factor == pytest.approx(want)


def test_planner_stops_drafting_when_drafts_give_less_than_expected():
    """The model says a chain pays (its costs per trie size look flat), but the drafting
    iterations really give 40 % of the tokens per second it expected (8 tokens/s against 20):
    after a few of them, plain steps, whose estimate holds."""
    p = _planner({1: 0.10, 9: 0.12}, 0.03, q0=0.95)
    plan = p.choose(4096)
    assert plan.draft and p.rate(plan) > 2 * 10
    for i in range(5):
        p.observe(plan, plan.trie_size, 0.0, plan.expected_seconds / 0.4, 0.0, plan.expected_tokens)
        p.costs, p.t_draft = {1: 0.10, 9: 0.12}, {"self": 0.03}  # the parts the model sees stay as they were
        p._seen.clear()
        plan = p.choose(4096)
    assert plan.plain
    assert p.cal["spec"].factor == pytest.approx(0.4) and p.cal["plain"].factor == 1.0


def test_a_machine_that_slows_down_does_not_make_unmeasured_drafts_win():
    """Plain steps give 0.88 of what the model expects (another job took the cores, the costs lag
    behind): drafts, never measured, are expected 5 % below plain steps and stay there, as the
    machine's slowness is theirs too; before, plain steps alone were calibrated down and the
    drafts, at 1.0, won at a loss."""
    p = _planner({1: 0.10, 2: 0.125}, 0.075, q0=0.9, depth=1)
    plan = p.choose(4096)
    assert plan.plain
    for i in range(3 * HOLD):
        p.observe(plan, 1, 0.0, plan.expected_seconds / 0.88, 0.0, 1)
        p.costs, p._seen = {1: 0.10, 2: 0.125}, {}
        plan = p.choose(4096)
        assert plan.plain, i
    assert p.cal["plain"].factor == pytest.approx(0.88)


def test_drafts_are_calibrated_against_what_plain_steps_give_at_the_time():
    """The machine runs at half speed: plain steps and drafting iterations both give half their
    expected rate. Plain steps' calibration carries that; the drafts' own is 1.0 (they gave
    what plain steps did, relative to the model)."""
    p = _planner({1: 0.10, 9: 0.12}, 0.03, q0=0.95)
    ar = next(q for q in p.plans() if q.plain)
    for _ in range(6):
        p.observe(ar, 1, 0.0, 2 * ar.expected_seconds, 0.0, 1)
    spec = max((q for q in p.plans() if q.draft), key=p.rate)
    for _ in range(6):
        p.observe(spec, spec.trie_size, 0.0, 2 * spec.expected_seconds, 0.0, spec.expected_tokens)
    assert p.cal["plain"].factor == pytest.approx(0.5) and p.cal["spec"].factor == pytest.approx(1.0)
    assert p.rate(spec) == pytest.approx(0.5 * spec.rate)


def test_planner_needs_a_clear_gain_to_leave_ar():
    # the best drafting plan is worth ~3 % more than AR on paper: within the noise margin, so AR
    p = _planner({1: 0.10, 2: 0.104}, 0.092, q0=1.0, depth=1)
    assert not p.choose(4096).draft
    p = _planner({1: 0.10, 2: 0.104}, 0.092, q0=1.0, depth=1)
    p.margin = 0.0
    assert p.choose(4096).draft  # without the margin the estimate alone decides


def test_planner_observes_the_trie_it_verified():
    p = AutoPlanner(4, ngram_n=4, max_k=8, max_nodes=None)
    p.observe(p.choose(10), 1, draft_s=0.0, verify_s=0.03, other_s=0.001, tokens=1)
    plan = p.choose(11)  # a chain of 4: n-gram chains may give fewer nodes than the plan allowed
    p.observe(plan, 3, draft_s=0.04, verify_s=0.1, other_s=0.01, tokens=2)
    assert p.costs == {1: 0.03, 3: 0.1} and p.t_draft == {"self": pytest.approx(0.01)}


def test_ngram_gain_is_shrunk_toward_zero_until_it_has_evidence():
    gain = NGramGain([1], decay=1.0, prior=16.0)
    chains = {5: [(6, 7)]}
    top = lambda t, k: chains.get(t, [])[:k]  # noqa: E731
    gain.update([5, 6, 7], top, n=3)  # one position scored, a 2-token match
    assert gain.mean(1) == pytest.approx(2 / 17)
    gain.update([5, 6, 7] * 40, top, n=3)
    assert gain.mean(1) > 0.5  # plenty of evidence: the measured gain shows through


def test_planner_chooses_between_drafters_by_measured_rate():
    """Two drafters: the one with more expected tokens per second wins, whichever is listed first."""
    p = AutoPlanner(6, ngram_n=4, max_k=0, max_nodes=None, explore_every=0, drafters=("seq", "self"))
    p.costs = {1: 0.10, 9: 0.14}
    p.stats = {"seq": RankStats(6, [[0.7, 0.05]], weight=1000, decay=1.0),
               "self": RankStats(6, [[0.9, 0.02]], weight=1000, decay=1.0)}
    p.t_draft = {"seq": 0.004, "self": 0.03}  # cheap and good vs dear and better
    assert p.choose(4096).drafter == "seq"
    p.t_draft = {"seq": 0.004, "self": 0.001}
    assert p.choose(4096).drafter == "self"
    p.stats["self"] = RankStats(6, [[0.1, 0.0]], weight=1000, decay=1.0)  # a cheap draft that never couples
    assert p.choose(4096).drafter == "seq"


def test_planner_explores_the_other_drafter():
    p = AutoPlanner(4, ngram_n=4, max_k=0, max_nodes=None, explore_every=2, drafters=("seq", "self"))
    p.costs = {1: 0.10, 5: 0.12}
    p.stats = {w: RankStats(4, [[0.8, 0.05]], weight=1000, decay=1.0) for w in ("seq", "self")}
    p.t_draft = {"seq": 0.003, "self": 0.05}
    used = {p.choose(4096 + i).drafter for i in range(40)}
    assert {"seq", "self"} <= used  # mostly seq, with the self-draft re-measured now and then


def _observe(p, depth, size, verify_s, draft_s=0.0):
    plan = Plan(depth, tuple((0,) * d for d in range(1, depth + 1)), 0, 1.0, 1.0, size, "self" if depth else None)
    p.observe(plan, size, draft_s=draft_s, verify_s=verify_s, other_s=0.0, tokens=1)


@pytest.mark.parametrize("gap, want", [
    (1, 0.8 * 0.25 + 0.2 * 0.05),                   # measured every iteration: the moving average
    (2, 0.8 * 0.95 * 0.25 + (1 - 0.76) * 0.05),     # one iteration without it: a little less kept
    (200, 0.05),                                     # hundreds of iterations old: the new one, nearly
])
def test_a_running_cost_keeps_less_of_what_it_measured_long_ago(gap, want):
    """A verify cost measured long ago (a shorter context, or while the cores were shared) is
    mostly replaced by the next measurement: the old rule (x0.8 per measurement, however old)
    kept a stale 5x cost in the plan for hundreds of iterations."""
    p = AutoPlanner(4, ngram_n=4, max_k=0, max_nodes=None, explore_every=0)
    p.iterations = 10
    _observe(p, 0, 1, 0.25)
    p.iterations += gap
    _observe(p, 0, 1, 0.05)
    assert p.costs[1] == pytest.approx(want, rel=1e-3)


def test_a_drafters_cost_ages_by_iterations_too():
    p = AutoPlanner(4, ngram_n=4, max_k=0, max_nodes=None, explore_every=0)
    _observe(p, 4, 5, 0.1, draft_s=4 * 0.04)
    for i in range(300):  # plain steps only: the draft cost is not measured again
        p.iterations += 1
        _observe(p, 0, 1, 0.05)
    _observe(p, 2, 3, 0.1, draft_s=2 * 0.01)
    assert p.t_draft["self"] == pytest.approx(0.01, rel=1e-4)
    assert p.costs[1] == pytest.approx(0.05)


def test_one_pass_timed_across_a_pause_moves_a_cost_by_at_most_its_outlier_bound():
    """A run stopped for minutes mid-pass (SIGSTOP) times that pass at minutes: it raises the
    estimate as a 4x pass would, and the next measurements bring it back."""
    p = AutoPlanner(4, ngram_n=4, max_k=0, max_nodes=None, explore_every=0)
    for _ in range(3):
        p.iterations += 1
        _observe(p, 0, 1, 0.05)
    p.iterations += 1
    _observe(p, 0, 1, 378.0)
    assert p.costs[1] == pytest.approx(0.05 * (0.8 + 0.2 * 4))
    for _ in range(10):
        p.iterations += 1
        _observe(p, 0, 1, 0.05)
    assert p.costs[1] < 0.055
    # a real rise is followed: each measurement may raise the estimate by up to 1.6x
    for _ in range(20):
        p.iterations += 1
        _observe(p, 0, 1, 0.5)
    assert p.costs[1] == pytest.approx(0.5, rel=0.03)
