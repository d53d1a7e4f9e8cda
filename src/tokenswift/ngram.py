"""N-gram reuse: which continuations followed a token most often in prompt + output.

`NGramTable` maps a key token to the (n-1)-token continuations seen after it, with counts.
Updates are O(1) and top-k queries O(k): each key keeps its continuations in an array sorted
by count (descending) with the start index of every count block, so an increment swaps the
item to the front of its block and moves the block boundary (the classic LFU layout).

Every distinct continuation is kept; entries are identified by their tokens, never by their
counts (the paper's table hashed by continuation but compared by count, and lost entries).
"""

from __future__ import annotations

from typing import Sequence


class _Counts:
    """Continuations of one key, sorted by count. All operations O(1) except top(k): O(k)."""

    __slots__ = ("items", "count", "index", "start")

    def __init__(self) -> None:
        self.items: list[tuple[int, ...]] = []  # sorted by count, descending
        self.count: dict[tuple[int, ...], int] = {}
        self.index: dict[tuple[int, ...], int] = {}  # position in items
        self.start: dict[int, int] = {}  # count -> first index of its block

    def add(self, cont: tuple[int, ...]) -> None:
        c = self.count.get(cont, 0)
        if c == 0:
            self.items.append(cont)
            i = len(self.items) - 1
            self.index[cont] = i
            self.count[cont] = 1
            if 1 not in self.start:
                self.start[1] = i
            return
        i = self.index[cont]
        j = self.start[c]  # front of the count-c block
        other = self.items[j]
        self.items[i], self.items[j] = other, cont
        self.index[other], self.index[cont] = i, j
        self.count[cont] = c + 1
        # cont now ends the (c+1) block; the c block starts one later (or vanishes)
        if c + 1 not in self.start:
            self.start[c + 1] = j
        nxt = j + 1
        if nxt < len(self.items) and self.count[self.items[nxt]] == c:
            self.start[c] = nxt
        else:
            del self.start[c]

    def top(self, k: int) -> list[tuple[int, ...]]:
        return self.items[:k]


class NGramTable:
    def __init__(self, n: int = 4) -> None:
        if n < 2:
            raise ValueError(f"n-gram order must be >= 2, got {n}")
        self.n = n
        self._table: dict[int, _Counts] = {}
        self.size = 0  # n-grams added

    def add(self, gram: Sequence[int]) -> None:
        """Counts one n-gram (n tokens): key gram[0], continuation gram[1:]."""
        if len(gram) != self.n:
            raise ValueError(f"expected an n-gram of {self.n} tokens, got {len(gram)}")
        key = int(gram[0])
        counts = self._table.get(key)
        if counts is None:
            counts = self._table[key] = _Counts()
        counts.add(tuple(int(t) for t in gram[1:]))
        self.size += 1

    def add_all(self, tokens: Sequence[int], start: int, end: int) -> None:
        """Adds the n-grams starting at positions [start, end) of `tokens`."""
        n = self.n
        for i in range(start, min(end, len(tokens) - n + 1)):
            self.add(tokens[i : i + n])

    def top(self, key: int, k: int) -> list[tuple[int, ...]]:
        """Up to k most frequent continuations of `key`, most frequent first."""
        counts = self._table.get(int(key))
        return counts.top(k) if counts is not None else []

    def count(self, key: int, cont: Sequence[int]) -> int:
        counts = self._table.get(int(key))
        return counts.count.get(tuple(cont), 0) if counts is not None else 0


class NGramFeeder:
    """Adds the n-grams of a growing token sequence once they are `delay` tokens old.

    The paper's rule: an n-gram enters the table once it has left the repetition-penalty
    window (its last token is `delay` or more positions behind the end), since text inside
    the window is penalized and would rarely be accepted again."""

    def __init__(self, table: NGramTable, delay: int) -> None:
        self.table = table
        self.delay = max(0, delay)
        self.next_start = 0  # first n-gram start not yet added

    def catch_up(self, tokens: Sequence[int], length: int) -> None:
        """`tokens[:length]` is committed; add every n-gram that is now old enough."""
        n = self.table.n
        # n-gram starting at i ends at i+n-1; it is added once i+n-1 <= length-1-delay
        end = length - self.delay - n + 1
        if end > self.next_start:
            self.table.add_all(tokens, self.next_start, end)
            self.next_start = end
