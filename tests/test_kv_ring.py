"""Sliding-window layers kept in a ring (`KVCache(ring=...)`): passes over a ring give the bits of
passes over a whole cache (one token, causal blocks, trees kept by `keep`, a pass longer than the
ring), runs that keep one write the tokens of `ar`, and a checkpoint's KV rows written from one
resume to the same tokens. A tiny random Mistral whose first layer sees a 16-token window and
whose second sees the whole context (Gemma 3's mix, in two layers)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import tokenswift
import tokenswift.cache as kvc
from conftest import tiny_hf_model
from tokenswift.cache import KVCache, Q8KVCache, cache_bytes, ring_slots
from tokenswift.checkpoint import Checkpoint

WINDOW = 16


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("window")
    tiny_hf_model("mistral-window", seed=1, scale=0.3).save_pretrained(d, safe_serialization=True)
    return d


def _load(d):
    lm = tokenswift.load(str(d), device="cpu", heads="none", drafter="none")
    lm.model.cfg = replace(lm.model.cfg, layer_windows=(WINDOW, None))
    return lm


@pytest.fixture(scope="module")
def lm(tiny_dir):
    return _load(tiny_dir)


def _passes(m, cache, ids):
    """A chunked prefill, then one-token passes, causal blocks and tree passes whose accepted
    path `keep` keeps: every pass's hidden states, in order."""
    out = [m.prefill(ids[:, :50], cache, chunk=7)]
    n = 50
    for T in (1, 3, 1, 5, 2, 1, 8, 1, 1, 4, 6, 1, 12, 1, 3, 1, 1, 2):
        out.append(m(ids[:, n : n + T], torch.arange(n, n + T)[None], cache))
        n += T
        if T == 3:  # the same three tokens as a tree: root, two children of the root; keep root + 2nd
            cache.truncate(n - 3)
            mask = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 0, 1]], dtype=torch.bool)
            pos = torch.tensor([[n - 3, n - 2, n - 2]])
            out.append(m(ids[:, n - 3 : n], pos, cache, mask=mask))
            cache.keep(torch.tensor([n - 3, n - 1]))
            n -= 1
            out.append(m(ids[:, n : n + 1], torch.tensor([[n]]), cache))
            n += 1
    return out, n


@pytest.mark.parametrize("portable", [False, True], ids=["native", "portable"])
def test_passes_over_a_ring_give_the_bits_of_passes_over_the_whole_cache(lm, monkeypatch, portable):
    if portable:
        monkeypatch.setenv("TOKENSWIFT_PORTABLE_ATTENTION", "1")
    monkeypatch.setattr(kvc, "RING_SLACK", 8)
    monkeypatch.setattr(kvc, "RING_MARGIN", 4)
    m = lm.model
    ids = torch.randint(0, 96, (1, 200), generator=torch.Generator().manual_seed(0))
    whole, ring = KVCache(m.cfg, capacity=200), KVCache(m.cfg, capacity=200, ring=WINDOW + 8)
    with torch.no_grad():
        want, n = _passes(m, whole, ids)
        got, n2 = _passes(m, ring, ids)
    assert n == n2 and len(want) == len(got)
    for i, (a, b) in enumerate(zip(want, got)):
        assert torch.equal(a, b), i
    # the windowed layer kept a ring, which moved along and grew for the 12-token pass (12 + 15 > 24)
    assert ring.k.shape[0] == 1 and ring.rk.shape[0] == 1 and ring.base > 50
    assert ring.ring == 32 + 8  # 27 rounded up to the slack, and a slack more
    k, v, held = ring.rows(0, n)
    assert held == ring.base and torch.equal(k[1], whole.k[1, :, :, :n]) and not k[0, :, :, :held].any()
    assert torch.equal(k[0, :, :, held:], whole.k[0, :, :, held:n])
    assert torch.equal(v[0, :, :, held:], whole.v[0, :, :, held:n])


def test_a_ring_is_given_where_the_context_is_much_longer_than_it(lm, monkeypatch):
    cfg = lm.model.cfg
    monkeypatch.setattr(kvc, "RING_SLACK", 8)
    monkeypatch.setattr(kvc, "RING_MARGIN", 4)
    assert ring_slots(cfg, 48) is None and ring_slots(cfg, 49) == WINDOW + 8
    assert ring_slots(replace(cfg, layer_windows=(None, None)), 10_000) is None
    assert lm.model.kv_ring(10_000, "partial") == WINDOW + 8 and lm.model.kv_ring(10_000, "int8") == WINDOW + 8
    # off the native kernels the partial cache copies its choice from every layer: no ring under it
    monkeypatch.setenv("TOKENSWIFT_PORTABLE_ATTENTION", "1")
    assert lm.model.kv_ring(10_000, "partial") is None and lm.model.kv_ring(10_000, "int8") == WINDOW + 8
    monkeypatch.delenv("TOKENSWIFT_PORTABLE_ATTENTION")
    assert lm.model.kv_ring(10_000, "sparse") == WINDOW + 8
    # bytes: the whole-context layer for every entry, the windowed one for its ring
    assert cache_bytes(cfg, 10_000, 2, WINDOW + 8) == 2 * 2 * 16 * 2 * (10_000 + WINDOW + 8)
    c = KVCache(cfg, capacity=10_000, dtype=torch.float16, ring=WINDOW + 8)
    held = sum(t.numel() * t.element_size() for t in (c.k, c.v, c.rk, c.rv))
    assert held == cache_bytes(cfg, 10_000, 2, WINDOW + 8)
    # the draft's int8 copy holds the whole-context layer; the windowed one it reads in main's ring
    q8 = Q8KVCache(cfg, 10_000, main=c)
    assert q8.k.shape[0] == 1 and q8.ringed and q8.slot(0)[0] is c.rk
    with pytest.raises(ValueError, match="serves that cache only"):
        q8.sync(KVCache(cfg, capacity=10_000, dtype=torch.float16, ring=WINDOW + 8), 10)
    with pytest.raises(ValueError, match="ring must exceed the sliding window \\(16 entries\\), got 16"):
        KVCache(cfg, capacity=100, ring=16)
    with pytest.raises(ValueError, match="needs sliding-window layers"):
        KVCache(replace(cfg, layer_windows=(None, None)), capacity=100, ring=40)


@pytest.mark.parametrize("sampling", ["greedy", "paper"])
def test_tokenswift_over_a_ring_writes_the_tokens_of_ar(lm, monkeypatch, sampling):
    """The runs' caches keep the windowed layer in a 24-slot ring (RING_SLACK 8), ar's and
    tokenswift's: the tokens of ar without a ring, for the planner's drafts and the paper's tree."""
    kw = dict(temperature=0.0) if sampling == "greedy" else dict(tokenswift.PAPER_SAMPLING, seed=4)
    prompt = list(range(3, 43))
    want = lm.generate(prompt, 120, method="ar", ignore_eos=True, **kw).tokens
    monkeypatch.setattr(kvc, "RING_SLACK", 8)
    monkeypatch.setattr(kvc, "RING_MARGIN", 4)
    tree = dict(method="tokenswift", tree="1,3,3", draft_budget=64)  # past 64 entries: the draft's own cache
    for opts in (dict(method="ar"), dict(method="tokenswift"), dict(tree, draft_kv="int8"),
                 dict(tree, draft_kv="sparse"), dict(tree, draft_kv="full"), dict(tree, draft_kv="partial")):
        last = None
        for step in lm.steps(prompt, 120, ignore_eos=True, **opts, **kw):
            last = step if step.kv is not None else last
        assert last.kv.ringed and last.stats.get("draft_kv") == opts.get("draft_kv"), opts
        assert last.kv.base > 100 or not last.kv.ringed, opts
        got = lm.generate(prompt, 120, ignore_eos=True, **opts, **kw)
        assert got.tokens == want, opts
        if "draft_kv" in opts:
            assert got.stats["accepted_draft_tokens"] > 0, opts
        if opts.get("draft_kv") == "partial":  # its choice in the whole-context layer, kept and made afresh
            assert got.stats["draft_refreshes"] > 1, got.stats


def test_a_resume_from_a_rings_kv_rows_writes_the_uninterrupted_tokens(tiny_dir, tmp_path, monkeypatch):
    """Rows written from a ring carry zeros (and a flag) where the windowed layer no longer held
    the entry; a resume reads them (the last window of rows is whole) and writes the tokens of
    the uninterrupted run. A cache without a ring does not read such a file."""
    import tokenswift.checkpoint as cp
    from tokenswift.checkpoint import continue_run, model_fingerprint

    import tokenswift.model as model

    monkeypatch.setattr(kvc, "RING_SLACK", 8)
    monkeypatch.setattr(kvc, "RING_MARGIN", 4)
    monkeypatch.setattr(model, "_PREFILL_SCORE_BUDGET", 1)  # the prompt in 16-token chunks: the ring moves
    lm = _load(tiny_dir)
    sampling = dict(tokenswift.PAPER_SAMPLING, seed=6)
    prompt = [3 + i % 90 for i in range(100)]
    want = lm.generate(prompt, 140, method="tokenswift", ignore_eos=True, **sampling).tokens
    ck = Checkpoint(options=dict(model=str(tiny_dir), max_new_tokens=140, method="tokenswift", ignore_eos=True,
                                 sampling=sampling, spec={}),
                    prompt="", prompt_ids=prompt, model_fingerprint=model_fingerprint(lm.config))
    fresh = ck
    files = []
    for rows_a_write in (4096, 7):  # rows written whole, and in slices of 7 (the prompt's 100 at once): the same file
        monkeypatch.setattr(cp.KVRows, "SLICE", rows_a_write)
        ck = Checkpoint(**{f: getattr(fresh, f) for f in ("options", "prompt", "prompt_ids", "model_fingerprint")})
        path, kv = tmp_path / f"ck{rows_a_write}.json", tmp_path / f"ck{rows_a_write}.json.kv"
        steps = continue_run(ck, lm, path, every=8, kv=kv)
        for _ in steps:
            if len(ck.tokens) >= 50:
                break
        steps.close()
        files.append(kv.read_bytes())
    assert files[0] == files[1]
    ck = Checkpoint.load(path)
    ids = ck.prompt_ids + ck.tokens
    raw = kv.read_bytes()
    head = len(cp.KVRows.MAGIC) + 8 + int.from_bytes(raw[len(cp.KVRows.MAGIC) : len(cp.KVRows.MAGIC) + 8], "little")
    rows = len(ids) - 1  # the last token's K/V are not computed yet
    row = (len(raw) - head) // rows
    assert head + rows * row == len(raw)
    flags = [int.from_bytes(raw[head + r * row : head + r * row + 8], "little") >> 62 for r in range(rows)]
    assert b'"ring": true' in raw[:head] and flags[0] == 1 and flags[-1] == 0  # the prompt's first rows moved out

    m = lm.model
    assert cp.KVRows(kv, ck).load(torch.tensor(ids), KVCache(m.cfg, capacity=len(ids) + 8)) == 0  # no ring: not read
    loaded = []
    real = cp.KVRows.load
    monkeypatch.setattr(cp.KVRows, "load", lambda self, t, c: loaded.append(real(self, t, c)) or loaded[-1])
    steps = continue_run(ck, lm, path, every=8, kv=kv)
    for _ in steps:
        pass
    assert ck.tokens == want and loaded == [len(ids) - 1]


def test_a_draft_running_ahead_leaves_the_roots_window_in_the_ring(lm, monkeypatch):
    """Draft passes at positions past the root move the ring for their own windows; the verify
    pass at the root then still finds its window (a 100K Gemma run failed there: "no longer hold
    entries before 98387; a pass needs them from 98386")."""
    monkeypatch.setattr(kvc, "RING_SLACK", 8)
    monkeypatch.setattr(kvc, "RING_MARGIN", 8)  # >= the chain; with 0 this test fails
    m = lm.model
    ids = torch.randint(0, 96, (1, 120), generator=torch.Generator().manual_seed(1))
    whole, ring = KVCache(m.cfg, capacity=130), KVCache(m.cfg, capacity=130, ring=WINDOW + 8)
    with torch.no_grad():
        for c in (whole, ring):
            m.prefill(ids[:, :100], c, chunk=4)
        for d in range(8):  # an eight-token chain drafted in the ring, as the sparse view does
            m(ids[:, 100 + d : 101 + d], torch.tensor([[100 + d]]), ring)
        ring.truncate(100)
        want = m(ids[:, 100:104], torch.arange(100, 104)[None], whole)
        got = m(ids[:, 100:104], torch.arange(100, 104)[None], ring)
    assert torch.equal(want, got)
