"""Drafters: each only proposes tokens for the positions after the root; the engine builds the
trie, verifies, walks and commits (DESIGN.md, "The method in one picture").

- `SelfDrafter` — the target model itself, made cheap: its int4 copy (or its own float
  weights) over the partial KV cache. In `chain` mode it drafts autoregressively, one pass per
  drafted token, each token a coupled draw (the sampler's processing with the chain's own
  penalty history, then the position's own Gumbel noise), so a draft close to the target is
  accepted at every depth. In `heads` mode (the paper's) it runs one pass and the draft heads
  predict the following positions from its hidden state.
- `SeqDrafter` — a one-block network (`seqdraft.SeqDraftModel`) on the target's features from
  the last verify pass and the embeddings of the drawn tokens, chained on its own draws: no
  target pass at all. Each drafted token is a coupled draw, as the self-draft's.
- `NGramDrafter` — continuations of a token seen so far in prompt + output.

Everything here changes speed only: the float32 target verifies every proposed token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import logging

import torch

from . import kernels
from .cache import DraftCache, KVCache, Q8KVCache, SparseKV
from .config import SamplingConfig
from .heads import DraftHeads, base_draft_logits
from .model import Decoder, _attention_plain, attention_path, linear
from .params import ParamError
from .ngram import NGramFeeder, NGramTable
from .sampling import coupled_candidates, penalty_window
from .seqdraft import SeqDraftModel


log = logging.getLogger("tokenswift")


@dataclass
class Proposal:
    """Ranked candidates per drafted position (candidates[d] for root position + d + 1), best
    first; in chain mode candidates[d][0] were drafted one after another (each pass saw the
    previous ones), the rest are siblings."""

    candidates: list[list[int]]


def resolve_draft_kv(kv: str, draft: Decoder) -> str:
    """draft_kv "auto" -> "int8" where the draft's attention takes the native CPU kernel (the one
    that reads int8 K/V; elsewhere each pass would dequantize the whole copy), else "partial"; an
    explicit "int8" or "sparse" there is an error (off the native kernels each pass would run
    torch's reference code)."""
    path = attention_path(draft.device, draft.dtype, draft.cfg.head_dim)
    if kv == "auto":
        return "int8" if path == "native" else "partial"
    if kv in ("int8", "sparse") and (path != "native" or draft.cfg.head_dim % 4):
        why = kernels.why_not() or (f"attention takes torch's {path} kernel here" if path != "native"
                                    else f"head_dim {draft.cfg.head_dim} is not a multiple of 4")
        raise ParamError("draft_kv", "", f" '{kv}' needs the native CPU kernels ({why}); use ",
                         " 'partial' or 'full'")
    return kv


# draft_kv "sparse": the entries each KV head's query chooses, as a share of the context, by context
# (benchmarks/draft_acceptance.py: coupled depth-1 agreement against B); between rows, the lower row's
SPARSE_SHARES = ((0, 0.05),)


def sparse_budget(n: int, draft_budget: int) -> int:
    """Entries a sparse draft pass chooses per KV head at context n (besides sinks and recent): its
    share of the context, and at least a quarter of draft_budget (the context up to which the
    draft reads every entry: a choice much smaller than that is too coarse to pay)."""
    share = [f for c, f in SPARSE_SHARES if c <= n][-1]
    return max(draft_budget // 4, round(share * n))


def sparse_scorer(head_dim: int) -> str:
    """The shipped scorer: a quarter of the key dimensions, at least 4 (SparseKV "dims")."""
    return f"dims:{max(4, head_dim // 16 * 4)}"


class DraftVocab:
    """The self-draft's LM head over part of the vocabulary (as FR-Spec's): the first `base` ids
    of the model's `vocab_order` where it has one (Gemma 3's 16,384 most frequent ids in the
    training texts cover 0.91 of held-out cdne, its first 16,384 ids 0.71), else the ids below
    `base` — a BPE vocabulary numbers its tokens roughly by how often its corpus had them
    (SmolLM2's first 16,384 of 49,152 cover 0.93 of held-out cdne text) — and every token the
    text so far holds (with them, 0.95). Its rows are the model's own head's, so its logits are the full
    head's at those ids, bit for bit; a token outside is never proposed (the target still
    verifies over the whole vocabulary, so this changes speed only). The head is rebuilt once
    `REBUILD` new tokens of the text have joined the set."""

    REBUILD = 64

    def __init__(self, model: Decoder, base: int) -> None:
        V = model.cfg.vocab_size
        self.model = model
        self.member = torch.zeros(V, dtype=torch.bool)  # [V]
        order = getattr(model, "vocab_order", None)
        if order is not None:
            self.member[order[:base]] = True
            if base > order.numel():  # past the shipped order: the ids below base too
                self.member[: min(base, V)] = True
        else:
            self.member[: min(base, V)] = True
        self.pending = 1  # tokens of the text not in the head yet (1: build at the first use)
        self.seen = 0  # history [0, seen) has been looked at
        self.ids: torch.Tensor | None = None  # [n] int64 on the model's device, ascending: the head's rows
        self.head = None
        self.full = torch.empty(1, V, dtype=torch.float32, device=model.device)  # [1, V]
        self.rebuilds = 0

    @staticmethod
    def fits(model: Decoder) -> bool:
        """A head this can take rows of (GGUF blocks, native float panels, a plain matrix)."""
        head = model.lm_head
        return model.head_rows is None and (isinstance(head, (kernels.QuantLinear, kernels.PackedLinear))
                                            or (isinstance(head, torch.Tensor) and not head.is_mkldnn))

    def see(self, history: torch.Tensor, n: int) -> None:
        """history [0, n) is committed text: its tokens join the set."""
        if n > self.seen:
            t = history[self.seen : n]
            new = t[~self.member[t]].unique()
            self.member[new] = True
            self.pending += int(new.numel())
            self.seen = n

    def build(self) -> None:
        """The head's rows for the set as it stands."""
        self.ids = self.member.nonzero().squeeze(1).to(self.model.device)
        head = self.model.lm_head
        self.head = head.subset(self.ids) if not isinstance(head, torch.Tensor) else head[self.ids]
        self.pending = 0
        self.rebuilds += 1

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [1, D] -> [1, V], -inf outside the set
        if self.pending >= (1 if self.head is None else self.REBUILD):
            self.build()
        sub = linear(self.model.final_norm(hidden), self.head, None).float()  # [1, n]
        self.full.fill_(float("-inf"))
        self.full.index_copy_(1, self.ids, sub)
        return self.full


class SelfDrafter:
    def __init__(
        self,
        target: Decoder,
        draft: Decoder,  # the target or its int4 copy (`Decoder.int4_copy`)
        heads: DraftHeads | None,
        sampling: SamplingConfig,
        budget: int,
        sinks: int,
        kv: str,  # draft_kv: "auto", "int8", "partial", "full", or "sparse" (`SparseKV`)
        max_depth: int,
        rope_len: int,
        scorer: str | None = None,  # kv "sparse": how each query scores every key (SparseKV.SCORERS); None: shipped
        vocab: int = 0,  # chains draw from the ids below this and the text's own tokens (DraftVocab); 0: all
    ) -> None:
        cfg = target.cfg
        self.target = target
        self.model = draft
        self.heads = heads
        self.sampling = sampling
        self.budget = budget
        self.kv = resolve_draft_kv(kv, draft)
        self.rope_len = rope_len
        self.cache: DraftCache | None = None
        self.q8: Q8KVCache | None = None  # built when the context first passes the budget
        # kv "sparse": every draft query attends to sinks + its top `budget` entries + a recent window
        self.sparse = (SparseKV(cfg, budget, sinks, max(64, max_depth + 1), scorer or sparse_scorer(cfg.head_dim))
                       if self.kv == "sparse" else None)
        self.fixed_budget = scorer is not None  # a measurement's own budget; else sparse_budget per context
        self.probs: torch.Tensor | None = None
        self.vocab: DraftVocab | None = None
        if 0 < vocab < cfg.vocab_size:
            if DraftVocab.fits(draft):
                self.vocab = DraftVocab(draft, vocab)
            else:
                log.warning("draft_vocab %d is ignored: the %s draft's head cannot be cut to part of the vocabulary "
                            "(draft_weights float can)", vocab, "int4" if draft is not target else "model's")
        self.held: SparseKV | None = None  # kv "partial" over a cache whose windowed layers keep a ring
        if self.kv == "partial":
            self.cache = DraftCache(cfg, budget=budget, sinks=sinks, extra=max_depth + 1, dtype=target.kv_dtype,
                                    device=target.device, rope_len=rope_len)
            # the same selection as a view of main's whole-context layers (`SparseKV` with `hold`):
            # the windowed layers' old entries are gone from the ring, and their windows are small
            recent = max(64, max_depth + 1)
            self.held = SparseKV(cfg, max(1, budget - sinks - recent - budget // 4), sinks, recent, "exact",
                                 hold=budget // 4)
        dev = target.device
        self.tok = torch.empty(1, 1, dtype=torch.int64, device=dev)  # [1, 1]
        self.pos = torch.empty(1, 1, dtype=torch.int64, device=dev)  # [1, 1]
        # stats
        self.max_reads = 0  # most KV entries one ordinary draft pass attended to
        self.refresh_reads = 0  # KV entries read by re-selection passes, in total

    @property
    def refreshes(self) -> int:
        return (self.cache.refreshes + self.held.refreshes) if self.cache is not None else 0

    def _cache_for(self, main: KVCache, N: int, root: int) -> tuple[KVCache, int]:
        """The cache the draft attends to at root position N, and its length to restore."""
        if N <= self.budget or self.kv == "full":
            return main, N
        if self.kv == "sparse":
            if not self.fixed_budget:
                self.sparse.budget = sparse_budget(N, self.budget)
            self.sparse.attach(main, N)
            return self.sparse, N
        if self.kv == "int8":
            q8 = self._q8_for(main)
            q8.sync(main, N)
            return q8, N
        if main.ringed:  # kv "partial"
            self.held.attach(main, N)
            return self.held, N
        c = self.cache
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
        reads = cache.length + 1
        if cache.sparse:
            reads = min(reads, cache.sinks + cache.budget + cache.recent + cache.hold)
        self.max_reads = max(self.max_reads, reads)
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
        if self.vocab is not None:
            self.vocab.see(history, N + 1)
        for d in range(depth):
            p = N + 1 + d  # the position this pass predicts
            h = self._step(cache, tok, p - 1)
            logits = self.vocab.logits(h.unsqueeze(0)) if self.vocab is not None else self.model.logits(h.unsqueeze(0))
            win = penalty_window(history, p, s)
            win = win.to(dev) if win is not None else None
            row = coupled_candidates(logits, win, [p], s, max(1, width))[0]
            cands.append(row)
            tok = row[0]
            history[p] = tok  # the next pass's penalty window sees the chain
        cache.truncate(restore)
        return Proposal(cands)

    def prepare(self, main: KVCache, N: int, history: torch.Tensor | None = None) -> None:
        """Builds the int8 copy (or the sparse view's key copy) of a prompt that reaches the
        budget, and the head over part of the vocabulary for the prompt's tokens (history
        [0, N)), now, so that the first draft's time (which the planner learns the draft's cost
        from) is a draft's, not theirs."""
        self.catch_up(main, N, ahead=1)  # the first draft's root comes after the prompt's N entries
        if self.vocab is not None and history is not None:
            self.vocab.see(history, N)
            self.vocab.build()

    def catch_up(self, main: KVCache, N: int, ahead: int = 0) -> None:
        """Brings the int8 copy / the key copy up to main's committed entries [0, N) where a draft
        at root N + ahead would read one: the entries committed since the last draft (hundreds
        after a stretch of plain steps) are quantized here, before the draft is timed, and not
        inside it."""
        if self.kv not in ("int8", "sparse") or N + ahead <= self.budget:
            return
        if self.kv == "sparse":
            self.sparse.attach(main, N)
        else:
            self._q8_for(main).sync(main, N)

    def _q8_for(self, main: KVCache) -> Q8KVCache:
        if self.q8 is None or (main.ringed and self.q8.main is not main):
            self.q8 = Q8KVCache(self.target.cfg, main.capacity, device=main.k.device, rope_len=self.rope_len,
                                main=main)
        return self.q8

    def committed(self, main: KVCache, start: int, n: int) -> None:
        """main entries [start, start+n) were just committed (exact target K/V)."""
        if self.cache is not None:
            self.cache.append(main, start, n)


class SeqDrafter:
    """Drafts with a `SeqDraftModel` over its own window of recent entries.

    Entry p pairs the target's features at p-1 with token p. The engine hands over the features
    of every committed position (`committed`); the entries they make are computed at the next
    `propose`, all in one block pass, whose last row (the root's entry) predicts root + 1. The
    chain then feeds the drafter's own outputs and draws back, one row a drafted token, and is
    dropped afterwards: only true entries stay."""

    def __init__(self, net: SeqDraftModel, sampling: SamplingConfig, max_depth: int) -> None:
        self.net = net
        self.sampling = sampling
        cfg = net.cfg
        W = net.window
        dev, dt = net.fuse.device, net.fuse.dtype
        self.W = W
        self.max_depth = max_depth
        # committed entries fill [0, length); when a pass would overflow, the last W move to the front
        self.extra = W + 1 + max_depth + 64  # pending entries held before they are computed
        C = 2 * W + self.extra + max_depth
        self.k = torch.zeros(1, cfg.num_kv_heads, C, cfg.head_dim, dtype=dt, device=dev)  # [1, KVH, C, Dh]
        self.v = torch.zeros_like(self.k)
        self.length = 0
        D = cfg.hidden_size
        self.pend_feats = torch.empty(self.extra, len(net.taps), D, dtype=dt, device=dev)  # [E, 3, D]
        self.pend_tokens: list[int] = []
        self.pend_pos: list[int] = []
        self.full = torch.empty(1, cfg.vocab_size, dtype=torch.float32, device=dev)  # [1, V] scratch
        self.compactions = 0

    @property
    def taps(self) -> tuple[int, ...]:
        return self.net.taps

    def committed(self, feats: torch.Tensor, tokens: Sequence[int], first_pos: int) -> None:
        """feats [n, 3, D]: the target's features at positions first_pos-1 … first_pos+n-2;
        tokens: the committed tokens at first_pos … first_pos+n-1 (entry p = (F[p-1], x[p]))."""
        n = len(tokens)
        if n > self.extra:  # only the last W entries could ever be attended to
            feats, tokens, first_pos = feats[n - self.W :], tokens[n - self.W :], first_pos + n - self.W
            n = self.W
        if len(self.pend_tokens) + n > self.extra:  # iterations without this drafter: enter them now
            self._flush()
        have = len(self.pend_tokens)
        self.pend_feats[have : have + n] = feats
        self.pend_tokens.extend(int(t) for t in tokens)
        self.pend_pos.extend(range(first_pos, first_pos + n))

    def _flush(self) -> torch.Tensor:  # [D] the last pending entry's output
        """Computes the pending entries in one block pass and keeps their K/V."""
        net = self.net
        n = len(self.pend_tokens)
        if self.length + n + self.max_depth > self.k.shape[2]:  # keep the last W entries, at the front
            W = min(self.W, self.length)
            self.k[:, :, :W] = self.k[:, :, self.length - W : self.length].clone()
            self.v[:, :, :W] = self.v[:, :, self.length - W : self.length].clone()
            self.length = W
            self.compactions += 1
        toks = torch.tensor(self.pend_tokens, dtype=torch.int64, device=self.k.device)  # [n]
        u = net.inputs(net.fused(self.pend_feats[:n]), toks).unsqueeze(0)  # [1, n, D]
        h = self._pass(u, self.pend_pos, self.length + n - self.W)
        self.pend_tokens, self.pend_pos = [], []
        return h

    def _pass(self, u: torch.Tensor, positions: list[int], lo: int) -> torch.Tensor:  # -> [D]
        """u [1, T, D] inputs at `positions`: their K/V go in at `length`; returns the last row's
        output, attending to the entries from index `lo` on. Only the last row's output is ever
        used (a pass's earlier rows are committed entries, whose K/V need no attention)."""
        net = self.net
        T = u.shape[1]
        pos = torch.tensor([positions], dtype=torch.int64, device=u.device)  # [1, T]
        q, k, v = net.qkv(u, pos)
        n = self.length
        self.k[0, :, n : n + T] = k[0].transpose(0, 1)
        self.v[0, :, n : n + T] = v[0].transpose(0, 1)
        lo = max(0, lo)
        att = _attention_plain(q[:, -1:], self.k[:, :, lo : n + T], self.v[:, :, lo : n + T], None, None, 0, None)
        self.length = n + T
        return net.out(u[:, -1:], att)[0, 0]

    def _candidates(self, h: torch.Tensor, history: torch.Tensor, p: int, width: int) -> list[int]:
        """h [D] -> ranked candidates for position p: a coupled draw, then the next best."""
        s = self.sampling
        lg = self.net.logits(h)  # [N]
        full = self.full
        full.fill_(float("-inf"))
        full[0, self.net.vocab] = lg
        win = penalty_window(history, p, s)
        win = win.to(full.device) if win is not None else None
        return coupled_candidates(full, win, [p], s, max(1, width))[0]

    def propose(self, history: torch.Tensor, N: int, root: int, depth: int, width: int) -> Proposal:
        """Candidates for positions N+1 .. N+depth (chain token first), root at N.

        history [capacity]: committed tokens, root at N; the chain writes its draws after N."""
        net = self.net
        if not self.pend_tokens or self.pend_pos[-1] != N or self.pend_tokens[-1] != root:
            raise RuntimeError(f"seq drafter out of step: pending entries end at {self.pend_pos[-1:]} "
                               f"{self.pend_tokens[-1:]}, root {root} at {N}")
        h = self._flush()  # [D]: the root's entry
        dev = self.k.device
        restore = self.length
        lo = restore - self.W  # the chain sees the root's window of true entries, and itself
        cands: list[list[int]] = []
        for d in range(depth):
            p = N + 1 + d
            row = self._candidates(h, history, p, width)
            cands.append(row)
            history[p] = row[0]  # the next draw's penalty window sees the chain
            if d + 1 < depth:
                tok = torch.tensor([row[0]], dtype=torch.int64, device=dev)
                h = self._pass(net.inputs(h.unsqueeze(0), tok).unsqueeze(0), [p], lo)
        self.length = restore
        return Proposal(cands)


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
