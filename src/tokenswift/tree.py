"""Draft tries: static tree shapes over per-position candidates, merged with n-gram chains.

A tree shape is a set of rank paths: `(0, 2)` means "the best candidate at r+1, then the
third-best candidate at r+2". The shape "1,3,3,3" is every path whose rank at depth d is below
the d-th number (1 + 3 + 9 + 27 = 40 nodes). Token chains (n-gram continuations) are merged
into the same trie, so siblings never repeat a token and every path is verified once.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from typing import Sequence

import torch

from .params import ParamError, is_int, short_repr

SRC_TREE = 1  # node proposed by the static tree (draft logits / heads)
SRC_NGRAM = 2  # node proposed by an n-gram chain


# Limits a tree shape is checked against before any path is enumerated: a verify pass of more
# nodes than this costs more than the tokens it could gain anywhere.
MAX_TREE_NODES = 4096
MAX_RANK = 1024  # candidates per depth


def parse_tree(spec: str | Sequence[int] | Sequence[Sequence[int]]) -> tuple[tuple[int, ...], ...]:
    """Tree shape -> sorted, prefix-closed rank paths.

    Accepts "1,3,3,3" (branching per depth), a JSON list of paths "[[0],[0,0],[0,1]]", a list of
    ints (branching) or a list of paths. Missing prefixes of explicit paths are added. Errors are
    `ParamError`s of the option `tree`."""
    shown = short_repr(spec)

    def bad(why: str) -> ParamError:
        return ParamError("tree", "bad ", f" {shown}: {why}")

    if isinstance(spec, str):
        s = spec.strip()
        try:
            spec = json.loads(s) if s.startswith("[") else [int(x) for x in s.split(",") if x.strip()]
        except (ValueError, RecursionError):
            raise bad("expected e.g. '1,3,3,3' or '[[0],[0,0],[0,1]]'") from None
    if isinstance(spec, (str, bytes)) or not isinstance(spec, Sequence):
        raise bad("expected e.g. '1,3,3,3' or '[[0],[0,0],[0,1]]'")
    items = list(spec)
    if not items:
        raise bad("the tree shape is empty")
    if all(is_int(x) for x in items):
        if any(not 1 <= b <= MAX_RANK for b in items):
            raise bad(f"every branching factor must be an integer in [1, {MAX_RANK}]")
        nodes, level = 0, 1
        for b in items:  # nodes counted before they are enumerated
            level *= b
            nodes += level
            if nodes > MAX_TREE_NODES:
                raise bad(f"more than {MAX_TREE_NODES} nodes")
        paths = set()
        for d in range(1, len(items) + 1):
            paths.update(itertools.product(*(range(b) for b in items[:d])))
    else:
        paths = set()
        for p in items:
            if isinstance(p, (str, bytes)) or not isinstance(p, Sequence) or not p:
                raise bad(f"path {p!r} is not a non-empty list of ranks")
            if len(p) > MAX_TREE_NODES:
                raise bad(f"more than {MAX_TREE_NODES} nodes")
            if not all(is_int(r) and 0 <= r < MAX_RANK for r in p):
                raise bad(f"path {list(p)!r}: ranks must be integers in [0, {MAX_RANK})")
            p = tuple(p)
            for d in range(1, len(p) + 1):
                paths.add(p[:d])
            if len(paths) > MAX_TREE_NODES:
                raise bad(f"more than {MAX_TREE_NODES} nodes")
    return tuple(sorted(paths, key=lambda p: (len(p), p)))


def tree_width(paths: Sequence[tuple[int, ...]], depth: int) -> int:
    """Candidates needed at a depth (1-based): the largest rank used there, plus one."""
    return max((p[depth - 1] + 1 for p in paths if len(p) >= depth), default=0)


@dataclass
class Trie:
    """Node 0 is the root (the token sampled last iteration); nodes only follow their parent."""

    tokens: list[int]
    parents: list[int]
    depths: list[int]
    sources: list[int]
    children: list[dict[int, int]] = field(default_factory=list)

    @staticmethod
    def rooted(root: int) -> "Trie":
        return Trie(tokens=[int(root)], parents=[-1], depths=[0], sources=[0], children=[{}])

    def __len__(self) -> int:
        return len(self.tokens)

    def add_path(self, tokens: Sequence[int], source: int, max_nodes: int | None = None) -> None:
        """Inserts a token path below the root (prefixes shared); stops at `max_nodes`."""
        cur = 0
        for t in tokens:
            t = int(t)
            nxt = self.children[cur].get(t)
            if nxt is None:
                if max_nodes is not None and len(self.tokens) >= max_nodes:
                    return
                nxt = len(self.tokens)
                self.tokens.append(t)
                self.parents.append(cur)
                self.depths.append(self.depths[cur] + 1)
                self.sources.append(source)
                self.children.append({})
                self.children[cur][t] = nxt
            else:
                self.sources[nxt] |= source
            cur = nxt

    def mask(self, device: torch.device | str = "cpu") -> torch.Tensor:  # [T, T] bool
        """Each node sees itself and its ancestors."""
        T = len(self.tokens)
        m = torch.zeros(T, T, dtype=torch.bool)
        for i in range(T):
            p = self.parents[i]
            if p >= 0:
                m[i, : i] = m[p, : i]
            m[i, i] = True
        return m.to(device)

    def positions(self, root_pos: int, device: torch.device | str = "cpu") -> torch.Tensor:  # [T]
        return torch.tensor(self.depths, dtype=torch.int64, device=device) + root_pos


def build_trie(
    root: int,
    candidates: Sequence[Sequence[int]],
    paths: Sequence[tuple[int, ...]],
    chains: Sequence[Sequence[int]] = (),
    max_nodes: int | None = None,
) -> Trie:
    """root + static-tree paths over `candidates[d]` (ranked tokens for depth d+1) + token chains.

    Paths deeper than the candidates available, or ranks beyond them, are skipped."""
    trie = Trie.rooted(root)
    for p in paths:
        if len(p) > len(candidates) or any(r >= len(candidates[d]) for d, r in enumerate(p)):
            continue
        trie.add_path([candidates[d][r] for d, r in enumerate(p)], SRC_TREE, max_nodes)
    for chain in chains:
        trie.add_path(chain, SRC_NGRAM, max_nodes)
    return trie
