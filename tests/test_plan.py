"""The auto trie planner's pure parts: best tree, expected acceptance, cost interpolation,
running statistics and the plan it picks for given costs (no timing here)."""

from __future__ import annotations

import pytest

from tokenswift.plan import (STAT_WIDTH, AutoPlanner, NGramGain, RankStats, best_tree, expected_accepted,
                             interpolate)

Q = [[0.9, 0.05], [0.5, 0.3], [0.4, 0.1]]
# path probabilities: (0) .9, (0,0) .45, (0,1) .27, (0,0,0) .18, (0,1,0) .108, (1) .05, (0,0,1) .045


@pytest.mark.parametrize("n, want", [
    (0, ()),
    (1, ((0,),)),
    (2, ((0,), (0, 0))),
    (3, ((0,), (0, 0), (0, 1))),
    (4, ((0,), (0, 0), (0, 1), (0, 0, 0))),
    (5, ((0,), (0, 0), (0, 1), (0, 0, 0), (0, 1, 0))),
    (6, ((0,), (0, 0), (0, 1), (0, 0, 0), (0, 1, 0), (1,))),
    (7, ((0,), (0, 0), (0, 1), (0, 0, 0), (0, 1, 0), (1,), (0, 0, 1))),
])
def test_best_tree_takes_the_likeliest_paths(n, want):
    got = best_tree(Q, n)
    assert set(got) == set(want)
    assert got == tuple(sorted(got, key=lambda p: (len(p), p)))  # the order parse_tree gives


def test_expected_accepted_sums_path_probabilities():
    paths = ((0,), (1,), (0, 0), (0, 0, 0))
    assert expected_accepted(Q, paths) == pytest.approx(0.9 + 0.05 + 0.45 + 0.18)
    assert expected_accepted(Q, ()) == 0.0
    assert expected_accepted(Q, ((0, 5),)) == 0.0  # ranks beyond the table never accept


def test_best_tree_beats_any_other_tree_of_its_size():
    import itertools

    all_paths = [p for d in (1, 2) for p in itertools.product(range(2), repeat=d)]
    for n in range(1, 5):
        best = expected_accepted(Q, best_tree(Q, n))
        for combo in itertools.combinations(all_paths, n):
            if all(p[:-1] == () or p[:-1] in combo for p in combo):
                assert expected_accepted(Q, combo) <= best + 1e-12


@pytest.mark.parametrize("points, T, want", [
    ({1: 10.0, 4: 16.0}, 2, 12.0),
    ({1: 10.0, 4: 16.0}, 4, 16.0),
    ({1: 10.0, 4: 16.0, 8: 24.0}, 16, 40.0),  # extrapolated along the last segment
    ({2: 10.0}, 4, 20.0),
])
def test_interpolate(points, T, want):
    assert interpolate(points, T) == pytest.approx(want)


def test_interpolate_needs_points():
    with pytest.raises(ValueError, match="no measured"):
        interpolate({}, 3)


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


def _planner(costs, draft_s, q0, q1, depth=3):
    p = AutoPlanner(depth, ngram_n=4, max_k=0, use_draft=True, max_nodes=None)
    p.costs = dict(costs)
    p.t_draft = draft_s
    p.stats = RankStats(depth, [[q0, 0.05], [q1, 0.05]], weight=1000, decay=1.0)
    return p


def test_planner_picks_ar_when_drafts_cannot_pay_for_themselves():
    # a 2-core CPU: the draft pass costs an AR step and heads rarely hit
    p = _planner({1: 0.05, 2: 0.06, 4: 0.07, 8: 0.09, 16: 0.12}, 0.05, q0=0.9, q1=0.03)
    plan = p.choose(2048)
    assert (plan.tree_nodes, plan.draft) == (0, False)
    assert p.choices[-1]["why"]["ar_tokens_per_s"] == pytest.approx(20.0)


def test_planner_picks_a_bigger_tree_when_verify_is_flat():
    # a GPU-like curve: 64 tokens cost what 1 does, the draft is cheap, heads are good
    p = _planner({1: 0.02, 64: 0.021}, 0.004, q0=0.9, q1=0.6)
    plan = p.choose(2048)
    assert plan.draft and plan.tree_nodes >= 12 and plan.expected_tokens > 2.5
    assert plan.rate > 1 / 0.02


def test_planner_explores_drafts_now_and_then_while_planning_ar():
    p = _planner({1: 0.05, 4: 0.07, 16: 0.12}, 0.05, q0=0.9, q1=0.03)
    p.explore_every = 5
    drafts = sum(p.choose(1000 + i).draft for i in range(50))
    assert drafts == 10 and p.explorations == 10


def test_planner_needs_a_clear_gain_to_leave_ar():
    # the best drafting plan is worth ~3 % more than AR on paper: within the noise margin, so AR
    p = _planner({1: 0.10, 2: 0.104, 4: 0.11}, 0.092, q0=1.0, q1=0.0, depth=1)
    plan = p.choose(4096)
    assert not plan.draft
    p.margin = 0.0
    assert p.choose(4096).draft  # without the margin the estimate alone decides


@pytest.mark.parametrize("probed_at,ctx,again", [
    (0, 0, True),  # never measured
    (4, 5, False), (4, 300, False), (4, 516, True),  # a short prompt: wait for a few hundred tokens
    (4096, 5000, False), (4096, 5120, True),  # a long one: wait for a quarter more
])
def test_planner_re_measures_when_the_context_has_grown_enough(probed_at, ctx, again):
    p = AutoPlanner(3, ngram_n=4, max_k=0, use_draft=True, max_nodes=None)
    if probed_at:
        p.costs, p.probe_ctx = {1: 0.05}, probed_at
    assert p.needs_probe(ctx) is again


def test_ngram_gain_is_shrunk_toward_zero_until_it_has_evidence():
    gain = NGramGain([1], decay=1.0, prior=16.0)
    chains = {5: [(6, 7)]}
    top = lambda t, k: chains.get(t, [])[:k]  # noqa: E731
    gain.update([5, 6, 7], top, n=3)  # one position scored, a 2-token match
    assert gain.mean(1) == pytest.approx(2 / 17)
    gain.update([5, 6, 7] * 40, top, n=3)
    assert gain.mean(1) > 0.5  # plenty of evidence: the measured gain shows through
