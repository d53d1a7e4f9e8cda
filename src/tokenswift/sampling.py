"""The sampler, as pure functions: logits + history -> final distribution -> one token.

Draws are position-keyed Gumbel-max (DESIGN.md, "Losslessness"): the token at absolute
position P is `argmax(log p_P + g(seed, P))`, with `g` drawn from a generator seeded by
(seed, P) alone. That samples exactly from p_P, and any decoder that computes the same p_P
at P draws the same token — plain AR, TokenSwift, or a resumed run.

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


def final_logprobs(
    logits: torch.Tensor,  # [N, V] float32
    window: torch.Tensor | None,  # [N, W]
    s: SamplingConfig,
) -> torch.Tensor:  # [N, V] log-probabilities, -inf where filtered out
    """The sampler's final distribution. For greedy (temperature 0) it returns the penalized
    logits, whose argmax is the greedy choice."""
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
        p = x.softmax(-1)
        drop = p < s.min_p * p.max(-1, keepdim=True).values
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
    return x.log_softmax(-1)


def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def position_key(seed: int, position: int) -> int:
    """64-bit generator seed for (seed, position); neighbouring pairs are decorrelated."""
    return _splitmix64(_splitmix64(seed) ^ (position & _M64))


def gumbel(seed: int, position: int, vocab: int) -> torch.Tensor:
    """Gumbel(0, 1) noise [V] for one position, drawn on the CPU so every device agrees.

    The draft and the walk both need the noise of the same few positions, so the latest ones
    are kept (read-only: callers add it to their logits, never write into it)."""
    return _kept(_NOISE, (seed, position, vocab), _gumbel)


def _kept(store: dict, key: tuple[int, int, int], make) -> torch.Tensor:
    """store[key], made by make(*key) on a miss; the oldest entry goes past _NOISE_KEEP."""
    hit = store.get(key)
    if hit is None:
        hit = make(*key)
        if len(store) >= _NOISE_KEEP:
            store.pop(next(iter(store)))
        store[key] = hit
    return hit


_NOISE: dict[tuple[int, int, int], torch.Tensor] = {}
_NOISE_KEEP = 64  # more than the deepest trie plus an iteration's slack


def _uniform(seed: int, position: int, vocab: int) -> torch.Tensor:  # [V] float64 in (0, 1)
    g = torch.Generator(device="cpu")
    g.manual_seed(position_key(seed, position))
    u = torch.rand(vocab, generator=g, dtype=torch.float64)
    return u.clamp_(min=torch.finfo(torch.float64).tiny)


def _gumbel(seed: int, position: int, vocab: int) -> torch.Tensor:
    return _to_gumbel(_uniform(seed, position, vocab))


def _to_gumbel(u: torch.Tensor) -> torch.Tensor:  # uniforms (float64) -> their Gumbel noise (float32)
    return (-torch.log(-torch.log(u))).to(torch.float32)


def uniforms(seed: int, position: int, vocab: int) -> torch.Tensor:
    """The uniforms [V] (float64) behind `gumbel(seed, position, vocab)`, kept like the noise."""
    return _kept(_UNIFORM, (seed, position, vocab), _uniform)


_UNIFORM: dict[tuple[int, int, int], torch.Tensor] = {}


def draw(
    logprobs: torch.Tensor,  # [N, V] from final_logprobs
    positions: Sequence[int],  # absolute position of each row's token
    s: SamplingConfig,
) -> torch.Tensor:  # [N] int64
    """One token per row. Greedy: argmax. Sampling: position-keyed Gumbel-max; rows that
    share a position share the noise."""
    if s.greedy:
        return logprobs.argmax(-1)
    V = logprobs.shape[-1]
    if logprobs.device.type == "cpu":
        # Only the tokens the filters kept can win: their noise alone (min-p, top-k and top-p
        # keep a few hundred of ~50K), the same values as the whole vector's, and the first of
        # equal maxima as argmax over the whole row picks it.
        out = torch.empty(len(positions), dtype=torch.int64)
        for i, p in enumerate(positions):
            row = logprobs[i]
            keep = (row > _NEG_INF).nonzero().squeeze(1)  # [n] ascending
            if 0 < keep.numel() * 4 <= V:
                g = _to_gumbel(uniforms(s.seed, int(p), V)[keep])
                out[i] = keep[(row[keep] + g).argmax()]
            else:
                out[i] = (row + gumbel(s.seed, int(p), V)).argmax()
        return out
    noise: dict[int, torch.Tensor] = {}
    rows = []
    for p in positions:
        if p not in noise:
            noise[p] = gumbel(s.seed, int(p), V).to(logprobs.device)
        rows.append(noise[p])
    return (logprobs + torch.stack(rows)).argmax(-1)


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
    lp = final_logprobs(logits, window, s)  # [N, V]
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
    return draw(final_logprobs(logits, window, s), positions, s)
