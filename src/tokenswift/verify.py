"""The trie walk: turns verified logits into committed tokens, exactly as AR would sample them.

Starting at the root, draw ONE token at each visited node from the target's final distribution
at that node's position — penalty history = committed text + the path to the node — with the
position-keyed Gumbel-max noise. If a child carries that token, descend; otherwise the token
becomes the next root. Every drawn token is exactly the token plain decoding draws at that
position (same distribution, same noise), so the output is the same text.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import SamplingConfig
from .sampling import penalty_window, sample
from .tree import Trie


@dataclass
class WalkResult:
    accepted: list[int]  # node indices along the accepted path (root excluded)
    tokens: list[int]  # their tokens, then the next root: every token this iteration adds
    next_root: int


def walk(
    trie: Trie,
    logits: torch.Tensor,  # [T, V] target logits per node (row 0 = root)
    history: torch.Tensor,  # [capacity] int64; history[:root_pos+1] committed, root at root_pos
    root_pos: int,
    s: SamplingConfig,
) -> WalkResult:
    """Walks the trie. Writes each drawn token into `history` at its position, which is what
    the next node's penalty window reads; entries past the walk's end are left stale."""
    cur = 0
    accepted: list[int] = []
    tokens: list[int] = []
    while True:
        p = root_pos + trie.depths[cur] + 1  # position of the token drawn after `cur`
        window = penalty_window(history, p, s)
        window = window.to(logits.device) if window is not None else None
        tok = int(sample(logits[cur : cur + 1], window, [p], s)[0])
        history[p] = tok
        tokens.append(tok)
        child = trie.children[cur].get(tok)
        if child is None:
            return WalkResult(accepted=accepted, tokens=tokens, next_root=tok)
        accepted.append(child)
        cur = child
