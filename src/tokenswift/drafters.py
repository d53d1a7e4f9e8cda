"""Drafters: each only proposes tokens for the positions after the root; the engine builds the
trie, verifies, walks and commits (DESIGN.md, "The method in one picture").

- `SelfDrafter` — the target model itself, made cheap: its int4 copy (or its own float
  weights) over the partial KV cache. In `chain` mode it drafts autoregressively, one pass per
  drafted token, each token a coupled draw (the sampler's processing with the chain's own
  penalty history, then the position's own Gumbel noise), so a draft close to the target is
  accepted at every depth. In `heads` mode (the paper's) it runs one pass and the draft heads
  predict the following positions from its hidden state.
- `NGramDrafter` — continuations of a token seen so far in prompt + output.

Everything here changes speed only: the float32 target verifies every proposed token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .cache import DraftCache, KVCache
from .config import SamplingConfig
from .heads import DraftHeads, base_draft_logits
from .model import Decoder
from .ngram import NGramFeeder, NGramTable
from .sampling import coupled_candidates, penalty_window


@dataclass
class Proposal:
    """Ranked candidates per drafted position (candidates[d] for root position + d + 1), best
    first; in chain mode candidates[d][0] were drafted one after another (each pass saw the
    previous ones), the rest are siblings."""

    candidates: list[list[int]]


class SelfDrafter:
    def __init__(
        self,
        target: Decoder,
        draft: Decoder,  # the target or its int4 copy (`Decoder.int4_copy`)
        heads: DraftHeads | None,
        sampling: SamplingConfig,
        budget: int,
        sinks: int,
        full_kv: bool,
        max_depth: int,
        rope_len: int,
    ) -> None:
        cfg = target.cfg
        self.target = target
        self.model = draft
        self.heads = heads
        self.sampling = sampling
        self.budget = budget
        self.cache: DraftCache | None = None
        self.probs: torch.Tensor | None = None
        if not full_kv:
            self.cache = DraftCache(cfg, budget=budget, sinks=sinks, extra=max_depth + 1, dtype=target.dtype,
                                    device=target.device, rope_len=rope_len)
        dev = target.device
        self.tok = torch.empty(1, 1, dtype=torch.int64, device=dev)  # [1, 1]
        self.pos = torch.empty(1, 1, dtype=torch.int64, device=dev)  # [1, 1]
        # stats
        self.max_reads = 0  # most KV entries one ordinary draft pass attended to
        self.refresh_reads = 0  # KV entries read by re-selection passes, in total

    @property
    def refreshes(self) -> int:
        return self.cache.refreshes if self.cache is not None else 0

    def _cache_for(self, main: KVCache, N: int, root: int) -> tuple[KVCache, int]:
        """The cache the draft attends to at root position N, and its length to restore."""
        c = self.cache
        if c is None or N <= self.budget:
            return main, N
        if not c.valid:  # re-select the partial cache with this root's query over the full cache
            if self.probs is None or self.probs.shape[-1] < main.capacity:
                cfg = self.target.cfg
                self.probs = torch.empty(cfg.num_layers, cfg.num_kv_heads, main.capacity, dtype=torch.float32,
                                         device=main.k.device)
            self.tok.fill_(root)
            self.pos.fill_(N)
            self.model(self.tok, self.pos, main, attn_probs=self.probs)
            main.truncate(N)
            c.refresh(main, self.probs)
            self.refresh_reads += N + 1
        return c, c.length

    def _step(self, cache: KVCache, token: int, position: int) -> torch.Tensor:  # -> hidden [D]
        self.tok.fill_(token)
        self.pos.fill_(position)
        self.max_reads = max(self.max_reads, cache.length + 1)
        return self.model(self.tok, self.pos, cache)[0, -1]

    def propose(self, main: KVCache, history: torch.Tensor, N: int, root: int, depth: int, width: int,
                chain: bool) -> Proposal:
        """Candidates for positions N+1 .. N+depth (width per position, chain token first).

        history [capacity]: committed tokens, root at N; entries after N are scratch (the chain
        writes its draws there for its own penalty windows; the walk rewrites them)."""
        cache, restore = self._cache_for(main, N, root)
        s = self.sampling
        dev = self.target.device
        if not chain:
            h0 = self._step(cache, root, N)
            if self.heads is not None:
                rows = self.heads.draft_logits(self.model, h0)
            else:
                rows = base_draft_logits(self.model, h0)
            rows = rows[:depth]  # [depth, V]
            win = penalty_window(history, N + 1, s)  # [1, W]: the heads' rows share the committed window
            win = win.to(dev).expand(rows.shape[0], -1) if win is not None else None
            cands = coupled_candidates(rows, win, [N + 1 + d for d in range(rows.shape[0])], s, width)
            cache.truncate(restore)
            return Proposal(cands)
        cands: list[list[int]] = []
        tok = root
        for d in range(depth):
            p = N + 1 + d  # the position this pass predicts
            h = self._step(cache, tok, p - 1)
            logits = self.model.logits(h.unsqueeze(0))  # [1, V]
            win = penalty_window(history, p, s)
            win = win.to(dev) if win is not None else None
            row = coupled_candidates(logits, win, [p], s, max(1, width))[0]
            cands.append(row)
            tok = row[0]
            history[p] = tok  # the next pass's penalty window sees the chain
        cache.truncate(restore)
        return Proposal(cands)

    def committed(self, main: KVCache, start: int, n: int) -> None:
        """main entries [start, start+n) were just committed (exact target K/V)."""
        if self.cache is not None:
            self.cache.append(main, start, n)


class NGramDrafter:
    """Continuations seen after a token; n-grams enter once they leave the penalty window."""

    def __init__(self, n: int, penalty_window: int) -> None:
        self.table = NGramTable(n)
        self.feeder = NGramFeeder(self.table, penalty_window)

    def chains(self, after: int, k: int, prefix: Sequence[int] = ()) -> list[list[int]]:
        """Up to k token paths below the root: `prefix` then a continuation of `after`."""
        if k <= 0:
            return []
        return [[*prefix, *cont] for cont in self.table.top(after, k)]

    def committed(self, tokens: Sequence[int]) -> None:
        self.feeder.catch_up(tokens, len(tokens))
