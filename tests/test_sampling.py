"""The sampler's pure functions: filters, penalty, validation and position-keyed Gumbel-max."""

from __future__ import annotations

import math

import pytest
import torch

from tokenswift.config import SamplingConfig
from tokenswift.sampling import apply_penalty, draw, final_logprobs, gumbel, history_windows, position_key, sample

NEG = float("-inf")


@pytest.mark.parametrize(
    "logits,window,penalty,want",
    [
        ([2.0, -1.0, 0.5, 3.0], [0, 1, 1], 2.0, [1.0, -2.0, 0.5, 3.0]),  # duplicates penalized once
        ([2.0, -1.0, 0.5, 3.0], [3], 1.0, [2.0, -1.0, 0.5, 3.0]),  # penalty 1 = off
        ([0.0, 4.0], [0, 1], 4.0, [0.0, 1.0]),  # zero stays zero
        ([1.0, -1.0], [0, 1], 0.5, [2.0, -0.5]),  # penalty < 1 rewards repeats
    ],
)
def test_repetition_penalty(logits, window, penalty, want):
    out = apply_penalty(torch.tensor([logits]), torch.tensor([window]), penalty)
    assert out[0].tolist() == pytest.approx(want)


def test_history_windows_pad_with_own_tokens_and_cut_to_width():
    w = history_windows([[1, 2, 3, 4, 5], [7]], width=3)
    assert w.tolist() == [[3, 4, 5], [7, 7, 7]]
    logits = torch.zeros(2, 10) + 2.0
    out = apply_penalty(logits, w, 2.0)
    assert out[0].tolist() == [2, 2, 2, 1, 1, 1, 2, 2, 2, 2]
    assert out[1].tolist() == [2, 2, 2, 2, 2, 2, 2, 1, 2, 2]  # padding penalized nothing extra


def _kept(cfg: SamplingConfig, logits) -> list[int]:
    lp = final_logprobs(torch.tensor([logits]), None, cfg)[0]
    return [i for i, v in enumerate(lp.tolist()) if v != NEG]


L5 = [math.log(p) for p in (0.5, 0.25, 0.15, 0.07, 0.03)]


@pytest.mark.parametrize(
    "kw,kept",
    [
        ({}, [0, 1, 2, 3, 4]),
        ({"top_k": 2}, [0, 1]),
        ({"top_k": 2, "min_keep": 3}, [0, 1, 2]),
        ({"top_p": 0.5}, [0]),
        ({"top_p": 0.7}, [0, 1]),
        ({"top_p": 0.76}, [0, 1, 2]),
        ({"top_p": 0.5, "min_keep": 2}, [0, 1]),
        ({"min_p": 0.2}, [0, 1, 2]),  # 0.2 * 0.5 = 0.1 > 0.07
        ({"min_p": 0.6}, [0]),
        ({"min_p": 0.6, "min_keep": 4}, [0, 1, 2, 3]),
        ({"eta": 0.09}, [0, 1, 2]),  # threshold min(0.09, 0.3 * exp(-H)) with H = 1.32 -> 0.080
        ({"top_k": 3, "min_p": 0.4}, [0, 1]),
    ],
)
def test_filters_keep_the_expected_tokens(kw, kept):
    assert _kept(SamplingConfig(**kw), L5) == kept


def test_temperature_sharpens_and_final_distribution_is_normalized():
    cfg = SamplingConfig(temperature=0.5)
    lp = final_logprobs(torch.tensor([L5]), None, cfg)[0]
    p = lp.exp()
    assert p.sum().item() == pytest.approx(1.0, abs=1e-6)
    base = torch.tensor([0.5, 0.25, 0.15, 0.07, 0.03])
    want = base**2 / (base**2).sum()
    assert torch.allclose(p, want, atol=1e-6)


def test_greedy_is_argmax_after_penalty():
    cfg = SamplingConfig(temperature=0, penalty=3.0)
    logits = torch.tensor([[3.0, 2.0, 0.1]])
    assert sample(logits, None, [0], cfg).item() == 0
    assert sample(logits, torch.tensor([[0]]), [0], cfg).item() == 1  # 3/3 = 1 < 2


@pytest.mark.parametrize(
    "kw,fragment",
    [
        ({"temperature": -0.1}, "temperature must be 0 (greedy) or in [0.0001, 100], got -0.1"),
        ({"temperature": float("nan")}, "temperature must be 0 (greedy) or in [0.0001, 100], got nan"),
        ({"top_p": 0.0}, "top_p must be in (0, 1], got 0.0"),
        ({"top_p": 1.5}, "top_p must be in (0, 1], got 1.5"),
        ({"min_p": 1.0}, "min_p must be in [0, 1), got 1.0"),
        ({"min_p": -0.1}, "min_p must be in [0, 1), got -0.1"),
        ({"top_k": -1}, "top_k must be an integer in [0, 100000] (0 = off), got -1"),
        ({"penalty": 0.0}, "penalty must be in [0.0001, 10000] (1 = off), got 0.0"),
        # values that would overflow float32 logits and leave the sampler nothing to draw from
        ({"temperature": 1e-300}, "temperature must be 0 (greedy) or in [0.0001, 100], got 1e-300"),
        ({"penalty": 1e-300}, "penalty must be in [0.0001, 10000] (1 = off), got 1e-300"),
        ({"top_k": True}, "top_k must be an integer in [0, 100000] (0 = off), got True"),
        ({"penalty_window": -5}, "penalty_window must be an integer in [0, 16777216], got -5"),
        ({"eta": 1.0}, "eta must be in [0, 1), got 1.0"),
        ({"min_keep": 0}, "min_keep must be an integer in [1, 100000], got 0"),
        ({"seed": -1}, "seed must be an integer in [0, 2^63), got -1"),
    ],
)
def test_bad_sampling_values_are_named(kw, fragment):
    with pytest.raises(ValueError) as e:
        SamplingConfig(**kw)
    assert fragment in str(e.value)


# --- position-keyed Gumbel-max --------------------------------------------------------------


def test_noise_depends_only_on_seed_and_position():
    a = gumbel(7, 1000, 50)
    assert torch.equal(a, gumbel(7, 1000, 50))
    assert not torch.equal(a, gumbel(7, 1001, 50))
    assert not torch.equal(a, gumbel(8, 1000, 50))
    keys = {position_key(s, p) for s in range(20) for p in range(200)}
    assert len(keys) == 20 * 200


def test_rows_sharing_a_position_share_noise():
    cfg = SamplingConfig(seed=3)
    lp = final_logprobs(torch.zeros(3, 1000), None, cfg)
    toks = draw(lp, [10, 10, 11], cfg)
    assert toks[0] == toks[1]
    assert toks[0] == draw(lp[:1], [10], cfg)[0]


def _chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    n = counts.sum()
    expected = probs * n
    return float(((counts - expected) ** 2 / expected).sum())


def test_gumbel_max_draws_exactly_from_the_final_distribution():
    """20,000 positions, one draw each: the histogram fits the target (chi-square, 5 dof)."""
    cfg = SamplingConfig(seed=11, penalty=1.3)
    logits = torch.tensor([[1.0, 0.5, 0.0, -0.5, 2.0, 0.2]])
    window = torch.tensor([[4]])
    p = final_logprobs(logits, window, cfg)[0].exp()
    counts = torch.zeros(6)
    n = 20_000
    lp = final_logprobs(logits, window, cfg).expand(n, -1)
    toks = draw(lp, list(range(n)), cfg)
    counts += torch.bincount(toks, minlength=6).float()
    # 99.9% quantile of chi-square with 5 degrees of freedom is 20.5
    assert _chi_square(counts, p) < 20.5
    # and it is not the unpenalized distribution: the penalty on token 4 shows
    p_raw = logits[0].softmax(-1)
    assert _chi_square(counts, p_raw) > 100


# --- coupled draft candidates ------------------------------------------------------------------


def test_coupled_candidate_is_the_targets_draw_when_the_draft_is_exact():
    """Same distribution + the same position noise -> the first candidate is the token the
    target will draw, at every position; q's top-1 agrees far less often under sampling."""
    from tokenswift.sampling import coupled_candidates

    torch.manual_seed(0)
    logits = torch.randn(200, 50) * 1.5  # [N, V]
    window = torch.randint(0, 50, (200, 8))
    s = SamplingConfig(temperature=1.0, min_p=0.05, min_keep=5, penalty=1.3, penalty_window=8, seed=11)
    positions = list(range(1000, 1200))
    want = sample(logits, window, positions, s).tolist()
    cands = coupled_candidates(logits, window, positions, s, k=3)
    assert [c[0] for c in cands] == want
    top1 = logits.argmax(-1).tolist()
    assert sum(a == b for a, b in zip(top1, want)) < 150  # the plain top-1 misses often


@pytest.mark.parametrize("k", [1, 2, 5])
def test_coupled_candidates_are_distinct_and_ranked(k):
    from tokenswift.sampling import coupled_candidates

    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0, -1.0]])
    greedy = SamplingConfig(temperature=0.0)
    assert coupled_candidates(logits, None, [7], greedy, k) == [[0, 1, 2, 3, 4][:k]]
    s = SamplingConfig(temperature=1.0, seed=3)
    got = coupled_candidates(logits, None, [7], s, k)[0]
    assert len(got) == k and len(set(got)) == k
    assert got[0] == int(sample(logits, None, [7], s)[0])
    rest = [t for t in [0, 1, 2, 3, 4, 5] if t != got[0]]
    assert got[1:] == rest[: k - 1]  # then the best remaining tokens in order


def test_coupled_candidates_skip_filtered_tokens():
    from tokenswift.sampling import coupled_candidates

    logits = torch.tensor([[5.0, 4.9, -10.0, -10.0]])
    s = SamplingConfig(temperature=1.0, min_p=0.5, seed=1)  # keeps tokens 0 and 1 only
    got = coupled_candidates(logits, None, [3], s, 4)[0]
    assert sorted(got) == [0, 1]


def test_draw_over_the_kept_tokens_equals_the_whole_row_draw():
    # draw() adds noise only to the tokens the filters kept; the token must be the one the whole
    # row's Gumbel-max gives, including rows where the filters keep most of the vocabulary
    from tokenswift.config import SamplingConfig

    g = torch.Generator().manual_seed(11)
    V = 4096
    for min_p, top_k in [(0.1, 0), (0.0, 20), (0.02, 0), (0.0, 3000), (0.5, 0)]:
        s = SamplingConfig(temperature=1.0, min_p=min_p, top_k=top_k, min_keep=5, seed=3)
        logits = torch.randn(16, V, generator=g) * 4
        lp = final_logprobs(logits, None, s)
        positions = list(range(100, 116))
        whole = torch.stack([(lp[i] + gumbel(s.seed, p, V)).argmax() for i, p in enumerate(positions)])
        assert torch.equal(draw(lp, positions, s), whole), (min_p, top_k)


# --- the native sampler -----------------------------------------------------------------------


def test_noise_is_splitmix64s_stream_and_the_native_noise_equals_torchs():
    """Token i's uniform is the i-th output of SplitMix64 seeded with the position's key (its
    first output from 0 is 0xE220A8397B1DCDAF); the native kernel's noise equals torch's but for
    the last bit of some logs (std::log and torch's log round differently)."""
    import math

    from tokenswift import kernels
    from tokenswift.sampling import gumbel_at_reference

    u = ((0xE220A8397B1DCDAF >> 11) + 0.5) * 2.0**-53
    assert gumbel_at_reference(0, torch.tensor([0])).item() == -math.log(-math.log(u))
    if not kernels.native():
        pytest.skip(f"native kernels off: {kernels.why_not()}")
    ids = torch.arange(200_000)
    for key in (0, position_key(5, 1234), (1 << 64) - 1):
        a, b = kernels.gumbel_at(key, ids), gumbel_at_reference(key, ids)
        assert a.dtype == torch.float64 and torch.allclose(a, b, rtol=4e-16, atol=4e-16)


NATIVE_CASES = [
    dict(temperature=0.0),
    dict(temperature=0.0, penalty=1.3, penalty_window=8),
    dict(temperature=1.0),
    dict(temperature=0.7, top_k=40, min_keep=5),
    dict(temperature=1.0, min_p=0.1, min_keep=20, penalty=1.2, penalty_window=64),  # the paper's
    dict(temperature=1.3, min_p=0.05, min_keep=1),
    dict(temperature=1.0, top_k=3000, min_p=0.02, min_keep=100, penalty=0.8, penalty_window=32),
]


@pytest.mark.parametrize("cfg", NATIVE_CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_the_native_sampler_draws_the_tokens_of_the_torch_sampler(cfg):
    """`kernels.sample_rows` == `draw(final_scores(...))` token for token: rows with -inf logits,
    windows with repeated ids, ties, vocabularies of 50 to Gemma's 262,144."""
    from tokenswift import kernels
    from tokenswift.sampling import _signed, final_scores

    if not kernels.native():
        pytest.skip(f"native kernels off: {kernels.why_not()}")
    s = SamplingConfig(seed=7, **cfg)
    g = torch.Generator().manual_seed(0)
    for V in (50, 4096, 262144):
        logits = (torch.randn(8, V, generator=g) * 3).round(decimals=1)  # many equal values
        logits[:, 5] = float("-inf")
        win = torch.randint(0, V, (8, 32), generator=g) if s.penalty != 1.0 else None
        if win is not None:
            win[:, 1::2] = win[:, ::2]  # each id twice: penalized once
        pos = list(range(100, 108))
        keys = torch.tensor([_signed(position_key(s.seed, p)) for p in pos])
        want = draw(final_scores(logits, win, s), pos, s)
        assert torch.equal(kernels.sample_rows(logits, win, keys, s), want), V
        assert torch.equal(sample(logits, win, pos, s), want), V  # sample() takes the native call
