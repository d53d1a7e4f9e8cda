"""`draft_kv`: the self-draft's cache past the budget, above all its int8 copy of the whole cache."""

from __future__ import annotations

import pytest
import torch

import tokenswift
from conftest import tiny_hf_model
from tokenswift import api, drafters, kernels
from tokenswift.cache import KVCache, Q8KVCache
from tokenswift.params import ParamError

native = pytest.mark.skipif(not kernels.native(), reason=f"native kernels off: {kernels.why_not()}")


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-draft-kv")
    tiny_hf_model("llama", seed=3, max_position_embeddings=1024, scale=0.3).save_pretrained(d)
    return tokenswift.load(str(d), heads="none")


def _prefilled(m, n: int) -> KVCache:
    cache = KVCache(m.cfg, capacity=n + 8)
    m.prefill(torch.arange(3, 3 + n).unsqueeze(0) % m.cfg.vocab_size, cache)
    return cache


@native
@pytest.mark.parametrize("rows", [4096, 7])  # one block, and blocks of 7 entries (the last short)
def test_sync_quantizes_the_committed_entries_and_only_those(lm, monkeypatch, rows):
    monkeypatch.setattr(Q8KVCache, "SYNC_ROWS", rows)
    m = lm.model
    main = _prefilled(m, 90)
    q8 = Q8KVCache(m.cfg, main.capacity)
    q8.k.fill_(5)
    q8.v.fill_(5)
    q8.sync(main, 50)
    q8.sync(main, 90)  # the second sync adds [50, 90)
    assert q8.length == 90 and torch.equal(q8.pos[:90], main.pos[:90])
    for src, q, s in ((main.k, q8.k, q8.ks), (main.v, q8.v, q8.vs)):
        rq, rs = kernels.quantize_q8_reference(src[:, :, :, :90])
        assert torch.equal(q[:, :, :, :90], rq) and torch.equal(s[:, :, :, :90], rs)
        assert (q[:, :, :, 90:] == 5).all()  # nothing past N written
    q8.length = 95  # a draft's own entries past N are dropped by the next sync's truncation
    q8.sync(main, 90)
    assert q8.length == 90


@native
def test_a_pass_over_the_int8_copy_stores_quantized_kv_and_stays_near_the_float_pass(lm, monkeypatch):
    m = lm.model
    main = _prefilled(m, 300)
    q8 = Q8KVCache(m.cfg, main.capacity)
    q8.sync(main, 300)
    tok, pos = torch.tensor([[11]]), torch.tensor([[300]])
    h8 = m(tok, pos, q8)[0, 0]
    hf = m(tok, pos, main)[0, 0]  # the same token over the float cache: K/V at entry 300
    for src, q, s in ((main.k, q8.k, q8.ks), (main.v, q8.v, q8.vs)):
        # layer 0's K/V come from the token alone: the float pass's, quantized; deeper layers'
        # follow attention over the int8 rows, so they are near those
        rq, rs = kernels.quantize_q8_reference(src[:1, :, :, 300:301])
        assert torch.equal(q[:1, :, :, 300:301], rq) and torch.equal(s[:1, :, :, 300:301], rs)
        deq = q[1:, :, :, 300].float() * s[1:, :, :, 300, None]
        assert (deq - src[1:, :, :, 300]).abs().max().item() < 0.05 * src[1:, :, :, 300].abs().max().item()
    l8, lf = m.logits(h8), m.logits(hf)
    assert not torch.equal(l8, lf)
    assert (l8 - lf).abs().max().item() < 0.1 * lf.abs().max().item()  # rounded, not broken
    # the torch fallback (a dequantized copy) computes the same attention
    q8.truncate(300)
    monkeypatch.setenv("TOKENSWIFT_PORTABLE_ATTENTION", "1")
    hp = m(tok, pos, q8)[0, 0]
    assert (hp - h8).abs().max().item() < 1e-4


@native
def test_auto_takes_the_int8_copy_past_the_budget_and_the_tokens_stay_ar(lm):
    prompt = [i % 90 + 3 for i in range(117)]
    kw = dict(ignore_eos=True, temperature=1.0, min_p=0.1, seed=5)
    want = lm.generate(prompt, 120, method="ar", **kw).tokens
    got = lm.generate(prompt, 120, draft_budget=64, tree="1,3,3,3", **kw)
    assert got.tokens == want
    st = got.stats
    assert st["draft_kv"] == "int8" and st["draft_refreshes"] == 0 and st["draft_kv_max"] > 120


@pytest.mark.parametrize("kv", ["int8", "sparse"])
def test_int8_without_the_native_kernels_is_a_named_error(lm, monkeypatch, kv):
    monkeypatch.setattr(kernels, "native", lambda: False)
    monkeypatch.setattr(kernels, "why_not", lambda: "TOKENSWIFT_NATIVE=0")
    assert drafters.resolve_draft_kv("auto", lm.model) == "partial"
    with pytest.raises(ParamError, match=rf"draft_kv '{kv}' needs the native CPU kernels \(TOKENSWIFT_NATIVE=0\); "
                                         r"use draft_kv 'partial' or 'full'"):
        lm.generate(list(range(3, 40)), 20, draft_kv=kv, tree="1,3,3,3", ignore_eos=True)


@native
def test_auto_takes_the_int8_copy_only_where_attention_runs_natively(lm, monkeypatch):
    """Kernels built, but the pass takes torch's portable attention: int8 would dequantize the
    whole copy every pass, so auto keeps the partial cache and an explicit int8 is refused."""
    assert drafters.resolve_draft_kv("auto", lm.model) == "int8"
    monkeypatch.setenv("TOKENSWIFT_PORTABLE_ATTENTION", "1")
    assert drafters.resolve_draft_kv("auto", lm.model) == "partial"
    with pytest.raises(ParamError, match=r"draft_kv 'int8' needs the native CPU kernels \(attention takes "
                                         r"torch's portable kernel here\)"):
        drafters.resolve_draft_kv("int8", lm.model)


def test_bad_draft_kv_is_named(lm):
    with pytest.raises(ParamError, match=r"draft_kv must be one of auto, sparse, int8, partial, full, got 'int4'"):
        lm.generate(list(range(3, 40)), 20, draft_kv="int4")


@native
def test_the_memory_check_counts_the_int8_copy(lm, monkeypatch):
    n = 200 + 800
    kv = n * lm.kv_bytes_per_token
    monkeypatch.setattr(api, "available_memory", lambda device: kv + n * Q8KVCache.bytes_per_token(lm.model.cfg) // 2)
    prompt = [i % 90 + 3 for i in range(200)]
    # steps() checks before it returns its iterator
    lm.steps(prompt, 800, method="ar", ignore_eos=True)  # the float cache alone fits
    lm.steps(prompt, 800, draft_budget=64, draft_kv="partial", ignore_eos=True)
    with pytest.raises(ParamError, match="needs a KV cache of"):
        lm.steps(prompt, 800, draft_budget=64, ignore_eos=True)
    lm.steps(prompt, 800, draft_budget=64, draft_kv="sparse", ignore_eos=True)  # its copy holds keys alone: half
    monkeypatch.setattr(api, "available_memory", lambda device: kv + n * Q8KVCache.bytes_per_token(lm.model.cfg) // 2 - 1)
    with pytest.raises(ParamError, match="needs a KV cache of"):
        lm.steps(prompt, 800, draft_budget=64, draft_kv="sparse", ignore_eos=True)


# -- the per-query sparse view (SparseKV) ------------------------------------

def _rows_attended(view, m, main, tok: int, n: int) -> list[torch.Tensor]:
    """Runs one draft pass over the view at entry n; returns, per layer, the rows each KV head
    attended to ([KVH, s+B+r] sorted entry indices), read off the gather."""
    from tokenswift.cache import SparseKV

    seen = []
    real = SparseKV.attend

    def spy(self, li, q, S):
        out = real(self, li, q, S)
        seen.append(self.reads)
        return out

    SparseKV.attend = spy
    try:
        view.attach(main, n)
        h = m(torch.tensor([[tok]]), torch.tensor([[n]]), view)[0, -1]
    finally:
        SparseKV.attend = real
    main.truncate(n)
    return h, seen


@pytest.mark.parametrize("scorer", ["exact", "int8", "int4", "dims:8"])
def test_a_budget_past_the_context_attends_to_every_entry_as_the_main_cache(lm, scorer):
    from tokenswift.cache import SparseKV

    m = lm.model
    main = _prefilled(m, 200)
    view = SparseKV(m.cfg, budget=500, sinks=4, recent=8, scorer=scorer)
    h, reads = _rows_attended(view, m, main, 11, 200)
    ref = m(torch.tensor([[11]]), torch.tensor([[200]]), main)[0, -1]
    main.truncate(200)
    assert reads == [201] * m.cfg.num_layers
    assert torch.allclose(h, ref, atol=1e-4, rtol=1e-4)


def test_the_exact_scorer_attends_to_the_sinks_recent_and_the_top_budget_by_its_query(lm):
    """One layer's choice, recomputed by hand: the group's summed softmax over the competing
    entries, its top B, with the sinks and the recent window; the view's attention over them
    equals attention over a copy of exactly those rows."""
    from tokenswift.cache import SparseKV
    from tokenswift.model import _attention_plain

    m = lm.model
    cfg = m.cfg
    main = _prefilled(m, 300)
    view = SparseKV(cfg, budget=20, sinks=4, recent=8, scorer="exact")
    view.attach(main, 300)
    S = 301  # the query's own K/V at entry 300
    main.length = S
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, cfg.num_heads, cfg.head_dim, generator=g) * 0.5
    KH, G, D = cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads, cfg.head_dim
    keys, vals = main.k[0, 0, :, :S], main.v[0, 0, :, :S]
    a, b = 4, S - 8
    w = torch.softmax(q[0, 0].view(KH, G, D) @ keys[:, a:b].transpose(-1, -2), dim=-1).sum(1)  # [KVH, M]
    rows = [sorted([*range(a), *(int(i) + a for i in w[h].topk(20).indices), *range(b, S)]) for h in range(KH)]
    assert view.select(0, q, S).tolist() == rows
    out = view.attend(0, q, S)
    assert view.reads == 4 + 20 + 8
    want = torch.cat([_attention_plain(q[:, :, h * G:(h + 1) * G], keys[h, rows[h]][None, None],
                                       vals[h, rows[h]][None, None], None, None, 0, None) for h in range(KH)], -1)
    assert torch.allclose(out, want, atol=1e-5)
    main.truncate(300)


def test_a_held_choice_serves_the_queries_after_it_until_hold_entries_joined(lm):
    """`hold` (the paper's partial cache as a view): the first query's choice, then for later
    queries the same sinks and chosen entries plus every entry from its recent window on, while
    at most `hold` entries joined; past that, or after the cache rewinds, a query chooses afresh."""
    from tokenswift.cache import SparseKV

    m = lm.model
    cfg = m.cfg
    main = _prefilled(m, 300)
    main.length = 300
    view = SparseKV(cfg, budget=20, sinks=4, recent=8, scorer="exact", hold=5)
    plain = SparseKV(cfg, budget=20, sinks=4, recent=8, scorer="exact")
    view.attach(main, 300)
    plain.attach(main, 300)
    g = torch.Generator().manual_seed(1)
    q = [torch.randn(1, 1, cfg.num_heads, cfg.head_dim, generator=g) * 0.5 for _ in range(9)]
    first = view.select(0, q[0], 301)
    assert first.tolist() == plain.select(0, q[0], 301).tolist() and view.refreshes == 1
    chosen = first[:, 4:24]  # [KVH, 20]
    for i, S in enumerate(range(302, 307), 1):  # 5 entries joined since the choice: it holds
        rows = view.select(0, q[i], S)
        every = torch.arange(S)
        want = torch.cat((every[:4].expand(cfg.num_kv_heads, -1), chosen, every[301 - 8 : S].expand(cfg.num_kv_heads, -1)), 1)
        assert rows.tolist() == want.tolist(), S
        assert rows.tolist() != plain.select(0, q[i], S).tolist()  # another query would choose others
    assert view.refreshes == 1
    assert view.select(0, q[6], 307).tolist() == plain.select(0, q[6], 307).tolist()  # the 6th: afresh
    assert view.refreshes == 2
    assert view.select(1, q[6], 307).tolist() == plain.select(1, q[6], 307).tolist()  # each layer its own
    assert view.refreshes == 2  # one pass, one refresh
    view.attach(main, 200)  # rewound: nothing held
    assert not view.held



@pytest.mark.parametrize("scorer", ["int8", "int4", "dims:8"])
def test_the_score_copy_holds_the_committed_keys_quantized(lm, scorer):
    """int8 / int4 copies row by row; dims: the int8 copy dimension-major ([L, KVH, Dh, C])."""
    from tokenswift.cache import SparseKV

    m = lm.model
    main = _prefilled(m, 120)
    view = SparseKV(m.cfg, budget=16, scorer=scorer)
    view.attach(main, 60)
    view.attach(main, 120)  # the second attach adds [60, 120)
    k = main.k[:, 0, :, :120].float()  # [L, KVH, 120, Dh]
    kq = view.kq[:, :, :, :120].transpose(2, 3) if scorer.startswith("dims") else view.kq[:, :, :120]
    deq = (kq.float().unflatten(-1, (view.ks.shape[-1], -1)) * view.ks[:, :, :120, :, None]).flatten(-2)
    step = k.abs().amax(-1, keepdim=True) / (7 if scorer == "int4" else 127)  # the coarsest scale of a row
    assert (deq - k).abs().max() <= step.max() / 2 + 1e-6
    assert view.synced == 120


@pytest.mark.parametrize("scorer", ["int8", "dims:16"])
def test_the_score_copy_has_the_same_bits_from_the_native_kernel_and_from_torch(lm, monkeypatch, scorer):
    """attach quantizes with `kernels.quantize_q8` where the kernels run, else `_quantize`'s
    torch operations: the same codes and scales, over a float32 and a bfloat16 cache."""
    from tokenswift import kernels
    from tokenswift.cache import SparseKV

    if not kernels.native():
        pytest.skip(f"native kernels off: {kernels.why_not()}")
    m = lm.model
    for dtype in (torch.float32, torch.bfloat16):
        main = _prefilled(m, 150)
        main.k = main.k.to(dtype)
        native = SparseKV(m.cfg, budget=16, scorer=scorer)
        native.attach(main, 70)
        native.attach(main, 150)
        with monkeypatch.context() as mp:
            mp.setattr(kernels, "native", lambda: False)
            torch_ = SparseKV(m.cfg, budget=16, scorer=scorer)
            torch_.attach(main, 150)
        n = 150
        kq = (lambda v: v.kq[:, :, :, :n]) if scorer.startswith("dims") else (lambda v: v.kq[:, :, :n])
        assert torch.equal(kq(native), kq(torch_)) and torch.equal(native.ks[:, :, :n], torch_.ks[:, :, :n]), dtype


def test_bad_sparse_scorers_are_named(lm):
    from tokenswift.cache import SparseKV

    for bad in ("int2", "dims", "dims:0", "dims:x", "dims:6", "dims:68", "exact:3"):
        with pytest.raises(ValueError, match=f"sparse draft scorer must be exact, int8, int4 or dims:R .*got '{bad}'"):
            SparseKV(lm.model.cfg, budget=16, scorer=bad)


@native
@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.bfloat16])
def test_the_fused_sparse_layer_gives_the_three_calls_bits(lm, monkeypatch, kv_dtype):
    """`kernels.attn_block_sparse` (attn_in, the dims choice and attention_rows in one call) is
    what a draft pass over the view runs: the hidden state, the rows read and the K/V written are
    those of the unfused path, bit for bit."""
    from tokenswift.cache import SparseKV

    m = lm.model
    calls = []
    real = kernels.attn_block_sparse
    monkeypatch.setattr(kernels, "attn_block_sparse", lambda *a, **k: calls.append(1) or real(*a, **k))
    out = {}
    for fused in (True, False):
        main = KVCache(m.cfg, capacity=408, dtype=kv_dtype)
        m.prefill(torch.arange(3, 403).unsqueeze(0) % m.cfg.vocab_size, main)
        view = SparseKV(m.cfg, budget=37, sinks=4, recent=8, scorer="dims:8")
        view.attach(main, 400)
        if not fused:
            view.fuse = False  # the three calls: attn_in, sparse_select_dims, attention_rows
        with torch.inference_mode():  # as a draft pass runs (the native layer halves take no autograd)
            h = m(torch.tensor([[17]]), torch.tensor([[400]]), view)[0, -1]
        out[fused] = (h, view.reads, main.k[:, :, :, 400].clone(), main.v[:, :, :, 400].clone())
    assert len(calls) == m.cfg.num_layers  # the fused run alone, every layer
    (h1, r1, k1, v1), (h0, r0, k0, v0) = out[True], out[False]
    assert torch.equal(h1, h0) and r1 == r0 == 4 + 37 + 8
    assert torch.equal(k1, k0) and torch.equal(v1, v0)


@native  # draft_kv "sparse" is refused without the native kernels (test_int8_without_the_native_kernels_...)
@pytest.mark.parametrize("scorer", ["exact", "int4", "dims:8"])
def test_drafting_over_the_sparse_view_writes_the_ar_tokens(lm, monkeypatch, scorer):
    """The view changes what the draft proposes, never the text: greedy and seeded sampling write
    ar's tokens past the budget (a context of 117 against a budget of 64), drafting every
    iteration (static chains), and the draft read sinks + budget + recent entries a pass."""
    from tokenswift import engine

    real = engine.SelfDrafter

    def sparse(*a, **kw):  # the engine's self-draft, over the sparse view
        return real(*a[:6], "sparse", *a[7:], **kw, scorer=scorer)

    monkeypatch.setattr(engine, "SelfDrafter", sparse)
    prompt = [i % 90 + 3 for i in range(117)]
    for kw in (dict(temperature=0.0), dict(temperature=1.0, min_p=0.1, penalty=1.2, seed=5)):
        want = lm.generate(prompt, 60, method="ar", ignore_eos=True, **kw).tokens
        got = lm.generate(prompt, 60, draft_budget=64, sinks=4, tree="1,1,1", ignore_eos=True, draft_weights="float",
                          **kw)
        assert got.tokens == want
        assert got.stats["draft_kv"] == "sparse" and got.stats["draft_kv_max"] == 4 + 64 + 64


# -- the draft's head over part of the vocabulary (DraftVocab) ------------------------------------

@native
def test_the_draft_vocab_gives_the_heads_logits_at_its_ids_and_learns_the_texts_tokens(smollm):
    """Ids below the base and the text's own tokens: there the full head's logits bit for bit,
    -inf elsewhere; new tokens of the text join at the next rebuild (every REBUILD of them)."""
    m = smollm.model
    V = m.cfg.vocab_size
    vocab = drafters.DraftVocab(m, 1000)
    history = torch.tensor([5, 40000, 41000, 5, 999])
    vocab.see(history, 5)
    h = torch.randn(1, m.cfg.hidden_size)
    got, want = vocab.logits(h).clone(), m.logits(h)
    inside = torch.zeros(V, dtype=torch.bool)
    inside[:1000] = True
    inside[[40000, 41000]] = True
    assert torch.equal(got[0, inside], want[0, inside])
    assert torch.isneginf(got[0, ~inside]).all()
    more = torch.arange(20000, 20000 + drafters.DraftVocab.REBUILD)
    vocab.see(torch.cat([history, more]), 5 + len(more) - 1)  # one short of a rebuild
    assert torch.isneginf(vocab.logits(h)[0, 20000])
    vocab.see(torch.cat([history, more]), 5 + len(more))
    assert torch.equal(vocab.logits(h)[0, more], m.logits(h)[0, more]) and vocab.rebuilds == 2


@native
def test_the_draft_vocab_takes_the_models_frequency_order_where_it_has_one(smollm, monkeypatch):
    """With `vocab_order` (shipped for Gemma 3: its ids do not follow frequency) the head holds
    the first `base` ids of the order, not the lowest ids; past the order's end, the low ids too."""
    m = smollm.model
    monkeypatch.setattr(m, "vocab_order", torch.tensor([40000, 7, 30000, 12]), raising=False)
    vocab = drafters.DraftVocab(m, 3)
    assert vocab.member.nonzero().squeeze(1).tolist() == [7, 30000, 40000]
    vocab = drafters.DraftVocab(m, 6)  # beyond the 4 ids of the order: ids below 6 join
    assert vocab.member.nonzero().squeeze(1).tolist() == [0, 1, 2, 3, 4, 5, 7, 12, 30000, 40000]
    h = torch.randn(1, m.cfg.hidden_size)
    got, want = vocab.logits(h), m.logits(h)
    assert torch.equal(got[0, [7, 12, 30000, 40000]], want[0, [7, 12, 30000, 40000]])


def test_gemma_3_ships_its_draft_vocabulary_order():
    import numpy as np
    from pathlib import Path

    import tokenswift

    order = np.load(Path(tokenswift.__file__).parent / "data" / "vocab" / "gemma3-270m.npy")
    assert order.dtype == np.int32 and order.shape == (32768,) and len(np.unique(order)) == 32768
    assert order.min() >= 0 and order.max() < 262144


@native
@pytest.mark.parametrize("kv", ["full", "sparse"])
def test_drafting_over_part_of_the_vocabulary_writes_the_ar_tokens(lm, monkeypatch, kv):
    """A draft that can propose only the ids below 24 and the text's own tokens (of 128) changes
    speed only: greedy and seeded sampling write ar's tokens, chains drafted every iteration,
    over the main cache and over the sparse view past a 64-entry budget."""
    from test_speculative import _force_costs
    from tokenswift import engine

    real = engine.SelfDrafter
    made = []

    def spy(*a, **kw):
        made.append(real(*a, **kw))
        return made[-1]

    monkeypatch.setattr(engine, "SelfDrafter", spy)
    _force_costs(monkeypatch, drafts_pay=True)
    prompt = [i * 7 % 90 + 3 for i in range(100)]
    for kw in (dict(temperature=0.0), dict(temperature=0.8, top_p=0.9, penalty=1.1, seed=3)):
        want = lm.generate(prompt, 200, method="ar", ignore_eos=True, **kw).tokens
        got = lm.generate(prompt, 200, ignore_eos=True, draft_vocab=24, draft_kv=kv, draft_budget=64,
                          draft_weights="float", **kw)
        assert got.tokens == want
        assert got.stats["accepted_draft_tokens"] > 20 and got.stats["draft_kv"] == kv
        assert made[-1].vocab is not None and made[-1].vocab.rebuilds >= 1
        assert 24 < got.stats["draft_vocab"] < lm.config.vocab_size


@native
@pytest.mark.parametrize("kv", ["int8", "sparse"])
def test_a_long_prompts_copy_is_built_before_the_first_draft(lm, monkeypatch, kv):
    """The int8 copy / the sparse view's key copy of a prompt past the budget, and the draft's
    head over the prompt's part of the vocabulary, are made at the prefill (`prepare`), and the
    entries committed since the last draft are copied before the next one is timed
    (`catch_up`), so that a draft's time, from which the planner learns what a draft costs, is a
    draft's: measured, a 16K prompt's copy made the first sparse draft cost 178 ms a token
    against ~25, and a 1,024-token prompt (the budget) 23 ms against 8.7."""
    from tokenswift import engine

    made = []
    real = engine.SelfDrafter

    def spy(*a, **kw):
        made.append(real(*a, **kw))
        return made[-1]

    monkeypatch.setattr(engine, "SelfDrafter", spy)
    proposals = []
    real_propose = drafters.SelfDrafter.propose

    def propose(self, main, history, N, *a, **kw):  # the copy and the vocabulary's head are ready before it
        proposals.append((self.q8.length if self.q8 is not None else self.sparse.synced, self.vocab.rebuilds,
                          self.vocab.member[prompt].all().item(), N))
        return real_propose(self, main, history, N, *a, **kw)

    monkeypatch.setattr(drafters.SelfDrafter, "propose", propose)
    prompt = [i * 5 % 90 + 3 for i in range(300)]
    lm.generate(prompt, 130, ignore_eos=True, draft_kv=kv, draft_budget=64, draft_weights="float", tree="auto",
                draft_vocab=24, temperature=0.0)
    d = made[-1]
    assert (d.q8.length if kv == "int8" else d.sparse.synced) >= 300
    assert proposals and proposals[0][1:3] == (1, True)
    # every draft, the first and those after stretches of plain steps, finds the copy holding
    # every committed entry: their quantization is timed as the loop's, not as the draft's
    assert all(length == N for length, _, _, N in proposals)
