"""The sampler, as pure functions: logits + history -> final distribution -> one token.

Draws are position-keyed Gumbel-max (DESIGN.md, "Losslessness"): the token at absolute
position P is `argmax(x_P + g(seed, P))` over the tokens the filters kept, where `x_P` are the
final scores (log p_P up to a constant) and `g(seed, P)[i]` is Gumbel noise made from the
i-th output of a SplitMix64 stream keyed by (seed, P) alone, so that the noise of the few kept
tokens costs a few hashes, not a pass over the vocabulary. That samples exactly from p_P, and
any decoder that computes the same scores at P draws the same token — plain AR, TokenSwift, or
a resumed run. Scores and noise are added in float64, where the sum of a float32 score and the
noise is the same whichever code computes it; on CPUs with the native kernels `sample` runs as
one native call per row (`kernels.sample_rows`), the same arithmetic.

All functions take rows: logits [N, V] with one history window per row, so a verify pass can
score many trie nodes in one call. Filters follow the order penalty -> temperature -> top-k ->
top-p -> min-p -> eta, and `min_keep` protects the best tokens in every filter.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from .config import SamplingConfig

_M64 = (1 << 64) - 1
_NEG_INF = float("-inf")


def apply_penalty(
    logits: torch.Tensor,  # [N, V] float32
    window: torch.Tensor | None,  # [N, W] int64 recent tokens per row (duplicates allowed)
    penalty: float,
) -> torch.Tensor:  # [N, V]
    """Repetition penalty over each row's window: positive logits divided, negative multiplied.

    Each distinct token in the window is penalized once. Rows of unequal history length are
    padded by repeating one of the row's own tokens (see `history_windows`)."""
    if penalty == 1.0 or window is None or window.numel() == 0:
        return logits
    sel = logits.gather(-1, window)
    sel = torch.where(sel > 0, sel / penalty, sel * penalty)
    return logits.clone().scatter_(-1, window, sel)


def penalty_window(history: torch.Tensor, n: int, s: SamplingConfig) -> torch.Tensor | None:
    """The last `penalty_width` tokens of `history` before index n, as a [1, W] row (None when
    the penalty is off or there is no history)."""
    W = s.penalty_width
    if W == 0 or n == 0:
        return None
    return history[max(0, n - W) : n].unsqueeze(0)


def history_windows(histories: Sequence[Sequence[int]] | Sequence[torch.Tensor], width: int,
                    device: torch.device | str = "cpu") -> torch.Tensor | None:
    """The last `width` tokens of each history as one [N, W] tensor (W = longest window).

    Shorter rows are padded with their own last token, which changes nothing: a token
    repeated in a window is still penalized once."""
    if width == 0:
        return None
    rows = [torch.as_tensor(h[-width:] if len(h) else [], dtype=torch.int64) for h in histories]
    w = max((r.numel() for r in rows), default=0)
    if w == 0:
        return None
    out = torch.empty(len(rows), w, dtype=torch.int64)
    for i, r in enumerate(rows):
        if r.numel() == 0:
            raise ValueError("a history window is empty; the sampler needs at least one prior token")
        out[i, : r.numel()] = r
        out[i, r.numel():] = r[-1]
    return out.to(device)


def final_scores(
    logits: torch.Tensor,  # [N, V] float32
    window: torch.Tensor | None,  # [N, W]
    s: SamplingConfig,
) -> torch.Tensor:  # [N, V] scores, -inf where filtered out
    """The sampler's final distribution as scores: p = softmax(scores) per row (the penalized,
    tempered logits, -inf where a filter dropped the token). For greedy (temperature 0) the
    penalized logits, whose argmax is the greedy choice."""
    x = apply_penalty(logits.float(), window, s.penalty)
    if s.greedy:
        return x
    if s.temperature != 1.0:
        x = x / s.temperature
    V = x.shape[-1]
    keep_n = min(s.min_keep, V)
    if 0 < s.top_k < V:
        kth = torch.topk(x, max(s.top_k, keep_n), dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, _NEG_INF)
    if s.top_p < 1.0:
        sx, idx = torch.sort(x, dim=-1)  # ascending
        cum = sx.softmax(-1).cumsum(-1)
        drop = cum <= (1.0 - s.top_p)
        drop[..., V - keep_n:] = False
        x = x.masked_fill(drop.scatter(-1, idx, drop), _NEG_INF)
    if s.min_p > 0.0:
        # p < min_p * max p  <=>  x - max x < log(min_p): float32 scores differ exactly in float64
        xmax = x.max(-1, keepdim=True).values
        drop = (x.double() - xmax.double()) < math.log(s.min_p)
        if keep_n > 1:
            kth = torch.topk(x, keep_n, dim=-1).values[..., -1:]
            drop &= x < kth
        x = x.masked_fill(drop, _NEG_INF)
    if s.eta > 0.0:
        logp = x.log_softmax(-1)
        p = logp.exp()
        entropy = -(p * logp).nansum(-1, keepdim=True)
        eta = torch.clamp(math.sqrt(s.eta) * torch.exp(-entropy), max=s.eta)
        drop = p < eta
        kth = torch.topk(x, keep_n, dim=-1).values[..., -1:]
        drop &= x < kth
        x = x.masked_fill(drop, _NEG_INF)
    return x


def final_logprobs(
    logits: torch.Tensor,  # [N, V] float32
    window: torch.Tensor | None,  # [N, W]
    s: SamplingConfig,
) -> torch.Tensor:  # [N, V] log-probabilities, -inf where filtered out
    """`final_scores` normalized. For greedy (temperature 0) the penalized logits."""
    x = final_scores(logits, window, s)
    return x if s.greedy else x.log_softmax(-1)


def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def position_key(seed: int, position: int) -> int:
    """64-bit generator seed for (seed, position); neighbouring pairs are decorrelated."""
    return _splitmix64(_splitmix64(seed) ^ (position & _M64))


_GOLDEN = 0x9E3779B97F4A7C15  # SplitMix64's increment


def _signed(z: int) -> int:  # a uint64 as the int64 with its bits
    return z - (1 << 64) if z >= 1 << 63 else z


def _srl(z: torch.Tensor, n: int) -> torch.Tensor:  # logical right shift of int64 bits
    return (z >> n) & ((1 << (64 - n)) - 1)


def gumbel_at_reference(key: int, ids: torch.Tensor) -> torch.Tensor:
    """Gumbel(0, 1) noise [n] (float64) of the tokens `ids` [n] at a position whose key is `key`
    (`position_key`): token i's uniform is the i-th output of SplitMix64 seeded with `key`, its
    top 53 bits + 1/2 over 2^53, in (0, 1). Torch's integer ops wrap as uint64 arithmetic does."""
    z = _signed(key) + (ids.to(torch.int64) + 1) * _signed(_GOLDEN)
    z = (z ^ _srl(z, 30)) * _signed(0xBF58476D1CE4E5B9)
    z = (z ^ _srl(z, 27)) * _signed(0x94D049BB133111EB)
    z = z ^ _srl(z, 31)
    u = (_srl(z, 11).double() + 0.5) * 2.0**-53
    return -torch.log(-torch.log(u))


def gumbel_at(seed: int, position: int, ids: torch.Tensor) -> torch.Tensor:
    """The noise [n] (float64) of tokens `ids` [n] (int64, CPU) at `position`: the native
    kernel's where it runs (every draw on this machine then takes the same bits), else torch's."""
    from . import kernels

    key = position_key(seed, position)
    if kernels.native():
        return kernels.gumbel_at(key, ids)
    return gumbel_at_reference(key, ids)


def gumbel(seed: int, position: int, vocab: int) -> torch.Tensor:
    """The noise [V] (float64) of every token at one position, kept for the latest positions
    (read-only: callers add it to their scores, never write into it)."""
    key = (seed, position, vocab)
    hit = _NOISE.get(key)
    if hit is None:
        hit = gumbel_at(seed, position, torch.arange(vocab))
        if len(_NOISE) >= _NOISE_KEEP:
            _NOISE.pop(next(iter(_NOISE)))
        _NOISE[key] = hit
    return hit


_NOISE: dict[tuple[int, int, int], torch.Tensor] = {}
_NOISE_KEEP = 64  # more than the deepest trie plus an iteration's slack


def draw(
    scores: torch.Tensor,  # [N, V] from final_scores (or final_logprobs: a row's shift changes nothing)
    positions: Sequence[int],  # absolute position of each row's token
    s: SamplingConfig,
) -> torch.Tensor:  # [N] int64
    """One token per row. Greedy: argmax. Sampling: position-keyed Gumbel-max over the tokens
    the filters kept (their noise alone), score + noise in float64, the first of equal maxima;
    rows that share a position share the noise. On the CPU, whatever device the scores are on."""
    if s.greedy:
        return scores.argmax(-1)
    out = torch.empty(len(positions), dtype=torch.int64)
    for i, p in enumerate(positions):
        row = scores[i]
        keep = (row > _NEG_INF).nonzero().squeeze(1)  # [n] ascending
        x = row[keep].cpu().double()
        keep = keep.cpu()
        out[i] = keep[(x + gumbel_at(s.seed, int(p), keep)).argmax()]
    return out.to(scores.device)


def coupled_candidates(
    logits: torch.Tensor,  # [N, V] draft logits, one row per drafted position
    window: torch.Tensor | None,  # [N, W] penalty history each row is ranked with
    positions: Sequence[int],  # absolute position of each row's token
    s: SamplingConfig,
    k: int,
) -> list[list[int]]:  # per row: up to k distinct tokens, best guess first
    """Draft candidates that guess the target's *draw*, not just its likeliest token.

    The target draws `argmax(log p_P + g(P))` with noise known in advance. Drawing from the
    draft's distribution q_P with the same noise gives the same token whenever q_P is close
    to p_P (the Gumbel coupling), so under sampling the first candidate matches far more often
    than q's top-1 does. The rest are q's next-best tokens. Greedy: plain top-k. The target
    side is untouched, so this changes speed only."""
    if k <= 0:
        return [[] for _ in range(logits.shape[0])]
    lp = final_scores(logits, window, s)  # [N, V]
    first = draw(lp, positions, s)  # [N]
    rest = lp.scatter(-1, first.unsqueeze(-1), _NEG_INF)
    kk = min(k - 1, lp.shape[-1] - 1)
    out = []
    vals, idx = torch.topk(rest, kk, dim=-1) if kk > 0 else (None, None)
    for i in range(lp.shape[0]):
        row = [int(first[i])]
        if kk > 0:
            row += [int(t) for t, v in zip(idx[i].tolist(), vals[i].tolist()) if v != _NEG_INF]
        out.append(row)
    return out


def sample(
    logits: torch.Tensor,  # [N, V]
    window: torch.Tensor | None,  # [N, W]
    positions: Sequence[int],
    s: SamplingConfig,
) -> torch.Tensor:  # [N] int64
    """`draw(final_scores(...))`: one native call where the kernels run and the filters are
    those it implements (all but top-p and eta), the same tokens."""
    from . import kernels

    if (logits.device.type == "cpu" and s.top_p >= 1.0 and s.eta == 0.0 and kernels.native()):
        keys = torch.tensor([_signed(position_key(s.seed, int(p))) for p in positions], dtype=torch.int64)
        return kernels.sample_rows(logits.float(), window, keys, s)
    return draw(final_scores(logits, window, s), positions, s)
