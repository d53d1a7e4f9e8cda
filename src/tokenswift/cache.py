"""Preallocated KV cache, written by index.

Layout: `k`, `v` are `[layers, batch, kv_heads, capacity, head_dim]`; entry `i` of every layer
holds the token at absolute position `pos[i]`. Entries are kept in position order.

A model with sliding-window layers (Gemma 3: 5 of every 6) can keep those layers in a ring of
`window + RING_SLACK` slots instead (`ring=`): then `k`, `v` hold the whole-context layers only,
`rk`, `rv` the windowed ones, and ring slot `s` holds entry `base + s`. The ring still keeps its
entries in position order: when a pass would run past its end, the entries the pass can still see
move to its front (a copy of one window every RING_SLACK tokens). The attention kernel chunks each
row's visible keys from the row's own first key, so where they sit does not change a bit.
"""

from __future__ import annotations

import logging

import torch

from . import kernels
from .config import ModelConfig

log = logging.getLogger(__name__)

RING_SLACK = 1024  # ring slots past the window: the longest pass that needs no move, and the move's period
# entries a move keeps before the first one its pass reads: a draft pass runs positions ahead of
# the root, and the verify pass after it reads the root's window (a 100K run failed there at 98.8K)
RING_MARGIN = 256


def ring_slots(cfg: ModelConfig, capacity: int) -> int | None:
    """How many slots a cache of `capacity` entries gives its sliding-window layers: a ring of
    `window + RING_SLACK`, or None (they keep every entry) where the model has no windows or the
    context is not much longer than the ring."""
    w = max((w for w in cfg.layer_windows if w), default=0)
    if not w or capacity <= 2 * (w + RING_SLACK):
        return None
    return w + RING_SLACK


def cache_bytes(cfg: ModelConfig, entries: int, itemsize: int, ring: int | None = None) -> int:
    """The K/V bytes of a cache of `entries` entries (every layer whole, or the sliding-window
    layers in a ring of `ring` slots)."""
    ringed = sum(1 for w in cfg.layer_windows if w) if ring else 0
    held = (cfg.num_layers - ringed) * entries + ringed * min(ring or 0, entries)
    return 2 * cfg.num_kv_heads * cfg.head_dim * itemsize * held


class KVCache:
    # Entries sit in position order, so sliding-window masks can be computed from `pos`.
    ordered = True
    # K/V stored as int8 rows with float32 scales (`Q8KVCache`)
    quantized = False
    # a view whose every query attends to entries of its own choosing (`SparseKV`)
    sparse = False

    def __init__(
        self,
        cfg: ModelConfig,
        capacity: int,
        batch: int = 1,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        rope_len: int | None = None,
        ring: int | None = None,
    ) -> None:
        """`rope_len` is the run's full length; dynamic-NTK RoPE fixes its frequencies for it
        (every cache of one run must agree). Defaults to `capacity`. `ring`: slots for the
        sliding-window layers (`ring_slots`); None keeps every entry of every layer."""
        if capacity < 1:
            raise ValueError(f"KV cache capacity must be >= 1, got {capacity}")
        windows = cfg.layer_windows
        self.window = max((w for w in windows if w), default=0)  # the widest sliding window
        if ring is not None:
            if not self.window:
                raise ValueError(f"ring={ring} needs sliding-window layers; this model has none")
            if ring <= self.window:
                raise ValueError(f"ring must exceed the sliding window ({self.window} entries), got {ring}")
        self.ring = ring if ring is not None and ring < capacity else None
        ringed = [i for i, w in enumerate(windows) if self.ring and w]
        whole = [i for i, w in enumerate(windows) if not (self.ring and w)]
        # layer li lives in group 0 (the whole context: k, v) or 1 (the ring: rk, rv), at index j
        self.where: list[tuple[int, int]] = [(0, 0)] * cfg.num_layers
        for j, i in enumerate(whole):
            self.where[i] = (0, j)
        for j, i in enumerate(ringed):
            self.where[i] = (1, j)
        self.whole_layers, self.ring_layers = whole, ringed
        shape = (len(whole), batch, cfg.num_kv_heads, capacity, cfg.head_dim)
        # on huge pages: a step reads all of it (`kernels.zeros_huge`)
        self.k = kernels.zeros_huge(shape, dtype, device)  # [Lw, B, KVH, C, Dh]
        self.v = kernels.zeros_huge(shape, dtype, device)  # [Lw, B, KVH, C, Dh]
        self.rk = self.rv = None
        if self.ring:
            rshape = (len(ringed), batch, cfg.num_kv_heads, self.ring, cfg.head_dim)
            self.rk = kernels.zeros_huge(rshape, dtype, device)  # [Lr, B, KVH, R, Dh]
            self.rv = kernels.zeros_huge(rshape, dtype, device)  # [Lr, B, KVH, R, Dh]
        self.base = 0  # the entry ring slot 0 holds
        self.num_layers = cfg.num_layers
        self.pos = torch.zeros(capacity, dtype=torch.int64, device=device)  # [C]
        self.length = 0
        self.rope_len = rope_len if rope_len is not None else capacity

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.k.dtype

    @property
    def ringed(self) -> bool:
        return self.ring is not None

    def slot(self, li: int) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        """Layer li's storage: the `[layers, B, KVH, slots, Dh]` K and V tensors that hold it, its
        index there, and the entry their slot 0 holds (entry e sits at slot e - offset)."""
        g, j = self.where[li]
        if g:
            return self.rk, self.rv, j, self.base
        return self.k, self.v, j, 0

    def make_room(self, first: int, end: int, held: int | None = None) -> None:
        """Before a pass that reads entries from `first` on and writes entries up to `end`: the
        ring holds every entry of [first, end) (a no-op without a ring). Moves the held entries
        from `first` on (to `held`, default `length`) to the ring's front when the pass would run
        past its end, and grows the ring where one pass is longer than it."""
        if self.ring is None:
            return
        if first < self.base:
            raise ValueError(f"the sliding-window layers no longer hold entries before {self.base}; "
                             f"a pass needs them from {first}")
        if end - self.base <= self.ring:
            return
        held = self.length if held is None else held
        first = max(self.base, first - RING_MARGIN)
        a, b = first - self.base, max(held, first) - self.base  # slots of [first, held)
        need = end - first
        if need > self.ring:  # one pass longer than the ring: a larger ring, the kept entries first
            size = -(-need // RING_SLACK) * RING_SLACK + RING_SLACK
            log.info("sliding-window ring grows from %d to %d slots for a %d-entry pass", self.ring, size, need)
            shape = (*self.rk.shape[:3], size, self.rk.shape[4])
            rk = torch.zeros(shape, dtype=self.rk.dtype, device=self.rk.device)
            rv = torch.zeros(shape, dtype=self.rv.dtype, device=self.rv.device)
            rk[:, :, :, : b - a] = self.rk[:, :, :, a:b]
            rv[:, :, :, : b - a] = self.rv[:, :, :, a:b]
            self.rk, self.rv, self.ring = rk, rv, size
        elif b > a:  # the ranges may overlap: read, then write
            self.rk[:, :, :, : b - a] = self.rk[:, :, :, a:b].clone()
            self.rv[:, :, :, : b - a] = self.rv[:, :, :, a:b].clone()
        self.base = first

    def truncate(self, n: int) -> None:
        """Drops every entry from index `n` on."""
        if not 0 <= n <= self.length:
            raise ValueError(f"cannot truncate a cache of length {self.length} to {n}")
        self.length = n
        self.base = min(self.base, n)  # a ring that held nothing before n holds nothing now

    def keep(self, indices: torch.Tensor, start: int | None = None) -> None:
        """Keeps entries `[0, start)` and moves the chosen entries `indices` (ascending, all
        >= start) to `[start, start + len(indices))`; everything else after `start` is dropped.

        `start` defaults to `indices[0]`: the first kept tail entry stays where it is.
        Used after tree verification to keep only the accepted path.
        """
        idx = indices.to(device=self.pos.device, dtype=torch.int64).flatten()  # [K]
        n = idx.numel()
        if start is None:
            if n == 0:
                raise ValueError("keep() with no indices needs an explicit start")
            start = int(idx[0])
        if n:
            lo, hi = int(idx.min()), int(idx.max())
            if lo < start or hi >= self.length:
                raise ValueError(f"keep indices must lie in [{start}, {self.length}), got [{lo}, {hi}]")
            if n > 1 and not bool((idx[1:] > idx[:-1]).all()):
                raise ValueError("keep indices must be strictly ascending")
            if self.ring is not None and start < self.base:
                raise ValueError(f"keep from {start}: the sliding-window ring holds entries from {self.base} on")
            # Gather first, then write: source and destination ranges may overlap.
            self.k[:, :, :, start : start + n] = self.k.index_select(3, idx)
            self.v[:, :, :, start : start + n] = self.v.index_select(3, idx)
            if self.ring is not None:
                r, s = idx - self.base, start - self.base
                self.rk[:, :, :, s : s + n] = self.rk.index_select(3, r)
                self.rv[:, :, :, s : s + n] = self.rv.index_select(3, r)
            self.pos[start : start + n] = self.pos.index_select(0, idx)
        self.length = start + n

    def rows(self, a: int, b: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Entries [a, b) of every layer -> (k, v [L, B, KVH, b - a, Dh], held): views where
        nothing is ringed, else copies in which the ringed layers' entries before `held` (no
        longer kept) are zeros."""
        if self.ring is None:
            return self.k[:, :, :, a:b], self.v[:, :, :, a:b], a
        L, (_, B, KH, _, D) = self.num_layers, self.k.shape
        k = torch.zeros(L, B, KH, b - a, D, dtype=self.k.dtype, device=self.k.device)
        v = torch.zeros_like(k)
        k[self.whole_layers], v[self.whole_layers] = self.k[:, :, :, a:b], self.v[:, :, :, a:b]
        held = min(max(a, self.base), b)
        k[self.ring_layers, :, :, held - a :] = self.rk[:, :, :, held - self.base : b - self.base]
        v[self.ring_layers, :, :, held - a :] = self.rv[:, :, :, held - self.base : b - self.base]
        return k, v, held

    def write_rows(self, a: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Writes k, v [L, B, KVH, T, Dh] as entries [a, a + T) of every layer (the ring keeps the
        last `window` of them and what it holds before them that they can still see)."""
        T = k.shape[3]
        if self.ring is None:
            self.k[:, :, :, a : a + T] = k
            self.v[:, :, :, a : a + T] = v
            return
        self.k[:, :, :, a : a + T] = k[self.whole_layers]
        self.v[:, :, :, a : a + T] = v[self.whole_layers]
        first = max(a + T - self.window, self.base)  # what the next pass can see, as far as it is held
        self.make_room(first, a + T)
        w0 = max(a, first)  # the rows that go into the ring
        self.rk[:, :, :, w0 - self.base : a + T - self.base] = k[self.ring_layers, :, :, w0 - a :]
        self.rv[:, :, :, w0 - self.base : a + T - self.base] = v[self.ring_layers, :, :, w0 - a :]

    def snapshot(self) -> tuple:
        """A copy of the entries [0, length) that `restore` puts back (the prefill memo)."""
        T = self.length
        ring = None
        if self.ring is not None:
            ring = (self.base, self.rk[:, :, :, : T - self.base].clone(), self.rv[:, :, :, : T - self.base].clone())
        return T, self.pos[:T].clone(), self.k[:, :, :, :T].clone(), self.v[:, :, :, :T].clone(), ring

    def restore(self, snap: tuple) -> None:
        T, pos, k, v, ring = snap
        if (ring is None) != (self.ring is None) or k.shape[0] != self.k.shape[0]:
            raise ValueError("a snapshot restores into a cache of the same layout only")
        self.k[:, :, :, :T], self.v[:, :, :, :T] = k, v
        self.pos[:T] = pos
        if ring is not None:
            base, rk, rv = ring
            self.length, self.base = base, base  # nothing held: make_room moves nothing
            self.make_room(base, T)
            self.rk[:, :, :, : T - base], self.rv[:, :, :, : T - base] = rk, rv
        self.length = T


class Q8KVCache(KVCache):
    """The self-draft's copy of the main cache in int8: each K/V row of head_dim values is stored
    as int8 with one float32 scale (max |x| / 127), 17/64 of a float32 cache. Drafting over the
    whole context through this copy keeps the draft close to the target at long context, where a
    partial cache's selection misses most of YaRN's diffuse attention (benchmarks/draft_acceptance.py:
    depth-1 acceptance 0.98 at 16K against 0.64 for a 1,024-entry partial cache).

    `sync` quantizes the entries main committed since; the draft's own passes write quantized
    K/V after them (`store`) and are truncated away afterwards. Needs the native kernels.

    Where `main` keeps its sliding-window layers in a ring, the copy holds its whole-context
    layers only, and the draft reads (and writes, past main's committed entries) those windowed
    layers in main's ring, as the sparse view does: a window is a few hundred entries."""

    quantized = True
    SYNC_ROWS = 4096  # entries quantized per block by `sync`

    def __init__(self, cfg: ModelConfig, capacity: int, device: torch.device | str = "cpu",
                 rope_len: int | None = None, main: KVCache | None = None) -> None:
        super().__init__(cfg, capacity=1, batch=1, device=device, rope_len=rope_len)
        self.main = main if main is not None and main.ringed else None
        if self.main is not None:
            self.where, self.whole_layers, self.ring_layers = main.where, main.whole_layers, main.ring_layers
            self.window = main.window
        shape = (len(self.whole_layers), 1, cfg.num_kv_heads, capacity, cfg.head_dim)
        # empty, not zeros: entries are written before they are read, and the pages of a 100K
        # context's copy (1.2 GB) are then touched as the text grows, not all at once. Small pages:
        # the copy of a long prompt is written at the prefill, and huge pages' faults (each may
        # compact memory) made that 2.4x slower (16K entries: 265-293 ms against 102-122)
        self.k = torch.empty(shape, dtype=torch.int8, device=device)  # [L, 1, KVH, C, Dh]
        self.v = torch.empty(shape, dtype=torch.int8, device=device)
        self.ks = torch.empty(shape[:4], dtype=torch.float32, device=device)  # [L, 1, KVH, C] row scales
        self.vs = torch.empty(shape[:4], dtype=torch.float32, device=device)
        self.pos = torch.zeros(capacity, dtype=torch.int64, device=device)  # [C]
        if rope_len is None:
            self.rope_len = capacity

    @property
    def ringed(self) -> bool:
        return self.main is not None

    def slot(self, li: int) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        """A windowed layer's storage: main's ring (the draft's entries go past main's committed
        ones there, to be overwritten by main's next pass)."""
        g, j = self.where[li]
        if not g:
            raise ValueError(f"layer {li} is in the int8 copy: store() and layer() read it")
        return self.main.slot(li)

    def make_room(self, first: int, end: int, held: int | None = None) -> None:
        if self.main is not None:  # main's ring keeps the draft's own entries too, up to this length
            self.main.make_room(first, end, held=self.length if held is None else held)

    @staticmethod
    def bytes_per_token(cfg: ModelConfig) -> int:
        return 2 * cfg.num_layers * cfg.num_kv_heads * (cfg.head_dim + 4)

    def store(self, li: int, n: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v [1, KVH, T, Dh] float32 -> entries [n, n+T) of layer li, quantized."""
        T, li = k.shape[2], self.where[li][1]
        kernels.quantize_q8(k, self.k[li, :, :, n : n + T], self.ks[li, :, :, n : n + T])
        kernels.quantize_q8(v, self.v[li, :, :, n : n + T], self.vs[li, :, :, n : n + T])

    @torch.no_grad()
    def sync(self, main: KVCache, N: int) -> None:
        """Makes entries [0, N) main's (committed, exact), quantizing those not yet copied."""
        if (self.main is not None or main.ringed) and main is not self.main:
            raise ValueError("an int8 copy of a cache whose sliding-window layers keep a ring serves that cache only")
        a = min(self.length, N)
        # all layers at once, SYNC_ROWS entries at a time: [L, KVH, rows, Dh] viewed as the
        # kernel's [B, KVH, T, Dh], read in place (a 16-bit cache is widened a row at a time in
        # the kernel). Rows are quantized one by one, so the blocks give the same bits.
        for b in range(a, N, self.SYNC_ROWS):
            e = min(N, b + self.SYNC_ROWS)
            kernels.quantize_q8(main.k[:, 0, :, b:e], self.k[:, 0, :, b:e], self.ks[:, 0, :, b:e])
            kernels.quantize_q8(main.v[:, 0, :, b:e], self.v[:, 0, :, b:e], self.vs[:, 0, :, b:e])
        if a < N:
            self.pos[a:N] = main.pos[a:N]
        self.length = N

    def layer(self, li: int, S: int) -> tuple[torch.Tensor, ...]:
        """Layer li's entries [0, S): int8 keys, values [1, KVH, S, Dh] and their scales [1, KVH, S]."""
        li = self.where[li][1]
        return self.k[li, :, :, :S], self.v[li, :, :, :S], self.ks[li, :, :, :S], self.vs[li, :, :, :S]

    def dequantized(self, li: int, S: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        k, v, ks, vs = self.layer(li, S)
        return (k.to(dtype) * ks.to(dtype)[..., None], v.to(dtype) * vs.to(dtype)[..., None])

    def keep(self, indices: torch.Tensor, start: int | None = None) -> None:
        raise NotImplementedError("the int8 draft cache is only appended to and truncated")


class DraftCache(KVCache):
    """The small KV cache the draft pass attends to: `sinks` first tokens + the entries with
    the highest attention scores (chosen per layer and KV head with the current query) + the
    tokens committed since, within `budget` entries.

    Entries differ per layer and head, so `pos` is not meaningful here (`ordered` is False and
    the decoder skips sliding-window masks: the draft only affects speed). `extra` slots beyond
    the budget hold the root and the drafted tokens while a draft runs.
    """

    ordered = False

    def __init__(
        self,
        cfg: ModelConfig,
        budget: int = 4096,
        sinks: int = 16,
        recent: int | None = None,
        extra: int = 1,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        rope_len: int | None = None,
    ) -> None:
        recent = budget // 4 if recent is None else recent
        if budget < sinks + recent + 1:
            raise ValueError(f"draft budget {budget} is smaller than sinks ({sinks}) + recent window ({recent}) + 1")
        super().__init__(cfg, capacity=budget + extra, batch=1, dtype=dtype, device=device, rope_len=rope_len)
        self.budget = budget
        self.sinks = sinks
        self.recent = recent
        self.valid = False  # holds a selection that the recent window has not outgrown
        self.refreshes = 0

    @torch.no_grad()
    def refresh(self, main: KVCache, scores: torch.Tensor) -> None:
        """Re-selects from `main`'s entries [0, main.length).

        scores: [L, KVH, >= main.length] attention weight of the current query on each entry."""
        if main.ringed:
            raise ValueError("the partial draft cache selects from every layer's entries: a cache whose "
                             "sliding-window layers keep a ring cannot feed it")
        S = main.length
        n_sel = min(self.budget - self.recent - self.sinks, S - self.sinks)
        s = self.sinks
        self.k[:, :, :, :s] = main.k[:, :, :, :s]
        self.v[:, :, :, :s] = main.v[:, :, :, :s]
        if n_sel > 0:
            L, _, K, _, D = main.k.shape
            idx = scores[:, :, s:S].topk(n_sel, dim=-1).indices.sort(dim=-1).values + s  # [L, KVH, n_sel]
            gidx = idx.unsqueeze(-1).expand(L, K, n_sel, D)
            self.k[:, 0, :, s : s + n_sel] = torch.gather(main.k[:, 0, :, :S], 2, gidx)
            self.v[:, 0, :, s : s + n_sel] = torch.gather(main.v[:, 0, :, :S], 2, gidx)
        self.length = s + max(n_sel, 0)
        self.valid = True
        self.refreshes += 1

    def append(self, main: KVCache, start: int, n: int) -> None:
        """Copies main entries [start, start+n) (just committed) into the recent window; once
        it is full the cache is marked stale and the next draft pass re-selects."""
        if not self.valid:
            return
        if self.length + n > self.budget:
            self.valid = False
            return
        self.k[:, :, :, self.length : self.length + n] = main.k[:, :, :, start : start + n]
        self.v[:, :, :, self.length : self.length + n] = main.v[:, :, :, start : start + n]
        self.length += n


class SparseKV:
    """The self-draft's per-query sparse view of the main cache: at every draft pass, each layer's
    KV head attends to the first `sinks` entries, the last `recent` ones (the draft's own new
    entries among them) and the `budget` others that its own current query scores highest. A
    selection taken once goes stale within a few steps under YaRN's diffuse attention (DESIGN.md:
    0.93 agreement from 6% of the keys chosen per query at 16K, 0.77 when kept 8 steps), so it is
    taken afresh for every query, from a cheap score of every key:

    - "exact": the query against the keys themselves (the oracle: it reads every key in full);
    - "int8" / "int4": against a copy of the keys, int8 per row or 4-bit per 32 values, with
      float32 scales (a quarter / an eighth of float32 keys);
    - "dims:R": against the R dimensions where the query group's |q| is largest (SparQ's
      choice), of an int8 copy of the keys (per-row scales) kept dimension-major, so that those
      R rows of the copy are all a pass reads; each query row's values there rounded to 7 bits.
      What the native `sparse_select_dims` computes (the shipped scorer: R = Dh/4).

    A KV head's weight of an entry sums its query group's softmax weights over the scored entries.

    With `hold` > 0 a layer's choice is kept: the queries after the one that made it attend to the
    same sinks and chosen entries plus every entry from the choice's recent window on, until `hold`
    entries have joined since; then the next query chooses afresh. That is the paper's partial
    cache (its selection made by one query, refreshed once `budget // 4` tokens are committed)
    without a copy of the chosen rows: on a cache whose sliding-window layers keep a ring, it
    selects in the whole-context layers only, and a windowed layer reads its window whole.

    The view holds the main cache (`attach`): its entries, positions and length are main's, and a
    draft pass writes its K/V there as on the main cache (truncated away afterwards). Where
    attention runs natively, the dims scorer's choice and the attention over the chosen rows are
    native kernels (`sparse_select_dims`, `attention_rows`, the rows read in place); elsewhere, and
    for the other scorers, torch computes the scores and gathers the rows (reference code, not
    for speed)."""

    ordered = False  # attention mixes positions per head: no sliding-window masks
    fuse = True  # a draft pass may choose and attend in the layer's own call (`kernels.attn_block_sparse`)
    quantized = False
    sparse = True
    SCORERS = ("exact", "int8", "int4", "dims")
    GROUP = 32  # values a 4-bit scale covers (a whole row where head_dim is not a multiple)

    def __init__(self, cfg: ModelConfig, budget: int, sinks: int = 16, recent: int = 64, scorer: str = "int8",
                 hold: int = 0) -> None:
        kind, _, r = scorer.partition(":")
        if (kind not in self.SCORERS or (kind == "dims") != bool(r)
                or (r and not (r.isdigit() and 0 < int(r) <= cfg.head_dim and int(r) % 4 == 0))):
            raise ValueError(f"sparse draft scorer must be exact, int8, int4 or dims:R (R a multiple of 4 in "
                             f"[4, {cfg.head_dim}]), got {scorer!r}")
        self.cfg, self.budget, self.sinks, self.recent = cfg, budget, sinks, recent
        self.scorer, self.dims = kind, int(r) if r else 0
        self.group = self.GROUP if cfg.head_dim % self.GROUP == 0 else cfg.head_dim
        self.main: KVCache | None = None
        self.kq: torch.Tensor | None = None  # the score copy of the keys: [L, KVH, C, Dh]; dims [L, KVH, Dh, C]
        self.ks: torch.Tensor | None = None  # [L, KVH, C, Dh / GROUP or 1] float32 scales
        self.synced = 0  # main entries [0, synced) are in the copy
        self.reads = 0  # entries the last pass attended to, per KV head
        self.hold = hold
        # hold > 0: layer -> (b, chosen [KVH, B] int64): its kept choice, made by a query when the
        # recent window began at entry b (every entry from b on is read while the choice holds)
        self.held: dict[int, tuple[int, torch.Tensor]] = {}
        self.refreshes = 0  # passes in which kept choices were made afresh
        self._chose_at = -1  # S of the last pass that made one
        self._attached = 0  # N of the last attach

    @staticmethod
    def bytes_per_token(cfg: ModelConfig, scorer: str) -> int:
        """What the score copy of `scorer` ("exact", "int8", "int4" or "dims:R") holds a token."""
        kind, D = scorer.partition(":")[0], cfg.head_dim
        if kind == "exact":
            return 0
        if kind == "int4":  # 4-bit values, a scale per GROUP (a row's one where Dh is not a multiple)
            per_head = D // 2 + 4 * (D // SparseKV.GROUP if D % SparseKV.GROUP == 0 else 1)
        else:  # int8 values and a row scale, row- or dimension-major
            per_head = D + 4
        return cfg.num_layers * cfg.num_kv_heads * per_head

    def attach(self, main: KVCache, N: int) -> None:
        """Views `main`, whose entries [0, N) are committed: the copy catches up with them."""
        if main is not self.main or N < self._attached:  # another cache, or this one rewound: choose anew
            self.held.clear()
        self.main, self._attached = main, N
        if self.scorer == "exact":
            return
        L, _, KH, C, D = main.k.shape
        cap = self.kq.shape[3 if self.scorer == "dims" else 2] if self.kq is not None else -1
        if cap < C:
            groups = D // self.group if self.scorer == "int4" else 1
            shape = (L, KH, D, C) if self.scorer == "dims" else (L, KH, C, D)
            # small pages, as the int8 copy's (Q8KVCache): written at the prefill
            self.kq = torch.empty(shape, dtype=torch.int8, device=main.k.device)
            self.ks = torch.empty(L, KH, C, groups, dtype=torch.float32, device=main.k.device)
            self.synced = 0
        a = min(self.synced, N)
        # the int8 rows by the native kernel where it runs (a 16K-entry copy: 0.75 s in torch's
        # operations, inside the first draft's time), the same codes and scales as `_quantize`'s
        native = self.scorer in ("int8", "dims") and main.k.device.type == "cpu" and kernels.native()
        for b in range(a, N, Q8KVCache.SYNC_ROWS):
            e = min(N, b + Q8KVCache.SYNC_ROWS)
            x = main.k[:, 0, :, b:e]  # [L, KVH, n, Dh]
            if native:
                q = torch.empty(x.shape, dtype=torch.int8)
                kernels.quantize_q8(x, q, self.ks[:, :, b:e, 0])
            else:
                q, self.ks[:, :, b:e] = self._quantize(x.float())
            if self.scorer == "dims":
                self.kq[:, :, :, b:e] = q.transpose(2, 3)
            else:
                self.kq[:, :, b:e] = q
        self.synced = N

    def _quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [..., Dh] float32 -> (int8 [..., Dh], scales [..., groups]): round(x / scale)."""
        if self.scorer in ("int8", "dims"):
            q, s = kernels.quantize_q8_reference(x)
            return q, s[..., None]
        g = x.unflatten(-1, (-1, self.group))  # [..., groups, group]
        s = g.abs().amax(-1) / 7.0
        r = torch.where(s[..., None] > 0, g / s[..., None], torch.zeros_like(g))
        return r.round().clamp(-8, 7).to(torch.int8).flatten(-2), s

    # the main cache's state, which a pass over the view reads and advances
    pos = property(lambda self: self.main.pos)
    ringed = property(lambda self: self.main.ringed)
    window = property(lambda self: self.main.window)
    dtype = property(lambda self: self.main.dtype)
    capacity = property(lambda self: self.main.capacity)
    batch = property(lambda self: self.main.batch)
    rope_len = property(lambda self: self.main.rope_len)

    @property
    def length(self) -> int:
        return self.main.length

    @length.setter
    def length(self, n: int) -> None:
        self.main.length = n

    def truncate(self, n: int) -> None:
        self.main.truncate(n)

    def slot(self, li: int) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        return self.main.slot(li)

    def make_room(self, first: int, end: int) -> None:
        self.main.make_room(first, end)

    def _index(self, li: int) -> int:
        """Layer li's index in main's whole-context K/V and in the score copy (the layers a
        query chooses entries in: a ringed sliding-window layer reads its window whole)."""
        g, j = self.main.where[li]
        if g:
            raise ValueError(f"layer {li} keeps a sliding-window ring: it reads its window, not a chosen few")
        return j

    def _scores(self, li: int, qg: torch.Tensor, a: int, b: int) -> torch.Tensor:
        """qg [KVH, G, Dh] -> approximate scores [KVH, G, b - a] of entries [a, b)."""
        li = self._index(li)
        keys = self.main.k[li, 0, :, a:b]  # [KVH, M, Dh]
        if self.scorer == "exact":
            return qg @ keys.to(qg.dtype).transpose(-1, -2)
        q, s = self.kq[li, :, a:b], self.ks[li, :, a:b]  # [KVH, M, Dh], [KVH, M, groups]
        if self.scorer == "int8":  # the query rows rounded to int8 too, as `attention` over int8 keys
            q8, qs = kernels.quantize_q8_reference(qg.float())  # [KVH, G, Dh], [KVH, G]
            dots = q8.double() @ q.double().transpose(-1, -2)  # [KVH, G, M], exact integers
            return (dots.float() * qs[..., None] * s[:, None, :, 0]).to(qg.dtype)
        deq = (q.float().unflatten(-1, (s.shape[-1], -1)) * s[..., None]).flatten(-2)  # [KVH, M, Dh]
        return qg @ deq.to(qg.dtype).transpose(-1, -2)

    def select(self, li: int, q: torch.Tensor, S: int) -> torch.Tensor:
        """The entries of [0, S) layer li's KV heads attend to for the query q [1, 1, H, Dh]
        (scaled): sinks + the top `budget` of the rest by score + the recent window, ascending.
        -> rows [KVH, R] int64."""
        from .model import attention_path

        _, T, H, D = q.shape
        if T != 1:
            raise ValueError(f"the sparse draft view takes one query a pass, got {T}")
        KH = self.cfg.num_kv_heads
        s, r = min(self.sinks, S), min(self.recent, S)
        a, b = s, S - r  # the entries that compete for the budget
        native = attention_path(q.device, q.dtype, D) == "native"
        if native and (choice := self.native_choice(li, S)):  # all in one call
            kt, ks, a, b, budget, dims = choice
            return kernels.sparse_select_dims(q, kt, ks, a, b, S, budget, dims)
        every = torch.arange(S, device=q.device)
        kept = self.held.get(li)  # (hold > 0 only)
        if kept is not None and kept[0] <= S <= kept[0] + r + self.hold:
            b, idx = kept  # the choice holds: its entries, and every entry from its recent window on
        else:
            if b - a <= self.budget:
                return every.expand(KH, -1).contiguous()
            if self.scorer == "dims":
                w = self.dims_weights(li, q[0, 0].view(KH, H // KH, D).float(), a, b)  # [KVH, M]
                idx = torch.sort(w, dim=-1, descending=True, stable=True).indices[:, : self.budget].sort(-1).values + a
            else:
                qg = q[0, 0].view(KH, H // KH, D)  # [KVH, G, Dh]
                w = torch.softmax(self._scores(li, qg, a, b).float(), dim=-1).sum(1)  # [KVH, M]
                idx = w.topk(self.budget, dim=-1).indices.sort(dim=-1).values + a  # [KVH, B]
            if self.hold:
                self.held[li] = (b, idx)
                if S != self._chose_at:
                    self.refreshes, self._chose_at = self.refreshes + 1, S
        return torch.cat((every[:s].expand(KH, -1), idx, every[b:S].expand(KH, -1)), dim=1)  # [KVH, s+B+r]

    def native_choice(self, li: int, S: int) -> tuple[torch.Tensor, torch.Tensor, int, int, int, int] | None:
        """The arguments of the native choice of layer li's rows of [0, S) (`sparse_select_dims`,
        alone in `select` or inside `kernels.attn_block_sparse`): (copy [KVH, Dh, C] int8, scales
        [KVH, C], a, b, budget, dims); None where `select` takes another road (another scorer,
        kept choices, a context within the budget). Counts the rows it will read (`reads`)."""
        if self.scorer != "dims" or self.hold:
            return None
        a, b = min(self.sinks, S), S - min(self.recent, S)
        if b - a <= self.budget:
            return None
        j = self._index(li)
        self.reads = a + self.budget + S - b
        return self.kq[j], self.ks[j, :, :, 0], a, b, self.budget, self.dims

    def dims_weights(self, li: int, qg: torch.Tensor, a: int, b: int) -> torch.Tensor:
        """The dims scorer's weights of entries [a, b) for qg [KVH, G, Dh] float32 -> [KVH, M]
        float64: the scores `sparse_select_dims` computes (the group's R dims, each row rounded
        to 7 bits, exact integer dot products times the same float32 scales), each row's softmax
        in float64, summed over the group."""
        KH, G, D = qg.shape
        mass = qg.abs().double().sum(1)  # [KVH, Dh]
        top = torch.sort(mass, dim=-1, descending=True, stable=True).indices[:, : self.dims].sort(-1).values
        qsel = qg.gather(2, top[:, None].expand(-1, G, -1))  # [KVH, G, R]
        qs = qsel.abs().amax(-1) / 64.0  # [KVH, G]
        q7 = torch.where(qs[..., None] > 0, qsel / qs[..., None], torch.zeros_like(qsel)).round()
        j = self._index(li)
        keys = self.kq[j][:, :, a:b].gather(1, top[..., None].expand(-1, -1, b - a))  # [KVH, R, M]
        dots = q7.double() @ keys.double()  # [KVH, G, M], exact
        s = (dots.float() * self.ks[j, :, a:b, 0][:, None]) * qs[..., None]
        return torch.softmax(s.double(), dim=-1).sum(1)

    def attend(self, li: int, q: torch.Tensor, S: int) -> torch.Tensor:
        """Layer li's attention for one query q [1, 1, H, Dh] (scaled) over the entries `select`
        chooses of main's [0, S) (the query's own K/V written at S-1), read in place by the
        native kernel, else gathered. -> [1, 1, H*Dh]."""
        from .model import _attention_plain, attention_path

        rows = self.select(li, q, S)  # [KVH, R]
        self.reads = rows.shape[1]
        j = self._index(li)
        if attention_path(q.device, q.dtype, q.shape[-1]) == "native":  # the layer's whole storage: rows < S
            return kernels.attention_rows(q, self.main.k[j], self.main.v[j], rows)
        keys, vals = self.main.k[j, :, :, :S], self.main.v[j, :, :, :S]  # [1, KVH, S, Dh]
        g = rows[None, :, :, None].expand(-1, -1, -1, q.shape[-1])
        return _attention_plain(q, keys.gather(2, g).to(q.dtype), vals.gather(2, g).to(q.dtype), None, None, 0, None)
