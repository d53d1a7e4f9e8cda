"""Decoding loops. Each method is a generator of `Step`s: the tokens committed by one iteration
and the running stats. The library never prints; callers (API, CLI, server) consume steps."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch

from .cache import KVCache
from .config import SamplingConfig
from .model import Decoder
from .sampling import sample

log = logging.getLogger("tokenswift")

METHODS = ("ar",)


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
