"""TokenSwift decoding: the pure pieces (n-grams, tries, the walk) and end-to-end losslessness."""

from __future__ import annotations

import itertools
import math
import re

import pytest
import torch

import tokenswift
from conftest import tiny_hf_model
from tokenswift import kernels
from tokenswift.cache import DraftCache
from tokenswift.config import PAPER_SAMPLING, SamplingConfig, SpecConfig
from tokenswift.heads import random_heads
from tokenswift.ngram import NGramFeeder, NGramTable
from tokenswift.sampling import gumbel
from tokenswift.tree import SRC_NGRAM, SRC_TREE, Trie, build_trie, parse_tree
from tokenswift.verify import walk

# --- n-grams -----------------------------------------------------------------------------------


def test_repeated_updates_of_one_continuation_lose_nothing():
    t = NGramTable(4)
    for _ in range(5):
        t.add([1, 2, 3, 4])
    t.add([1, 5, 6, 7])
    for _ in range(3):
        t.add([1, 8, 9, 10])
    t.add([1, 5, 6, 7])
    assert t.count(1, (2, 3, 4)) == 5
    assert t.count(1, (8, 9, 10)) == 3
    assert t.count(1, (5, 6, 7)) == 2
    assert t.top(1, 10) == [(2, 3, 4), (8, 9, 10), (5, 6, 7)]
    assert t.top(1, 1) == [(2, 3, 4)]
    assert t.top(99, 5) == []


@pytest.mark.parametrize("seed", range(5))
def test_table_matches_a_plain_counter(seed):
    """Random streams: counts and the top-k order agree with collections.Counter."""
    import collections
    import random

    rng = random.Random(seed)
    toks = [rng.randrange(6) for _ in range(3000)]
    t = NGramTable(3)
    t.add_all(toks, 0, len(toks))
    ref: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
    for i in range(len(toks) - 2):
        ref[toks[i]][tuple(toks[i + 1 : i + 3])] += 1
    for key, counter in ref.items():
        assert {c: t.count(key, c) for c in counter} == dict(counter)
        top = t.top(key, 8)
        assert [counter[c] for c in top] == sorted(counter.values(), reverse=True)[:8]
        assert len(t.top(key, 100)) == len(counter)  # every distinct continuation is kept


def test_ngrams_enter_after_leaving_the_penalty_window():
    t = NGramTable(4)
    f = NGramFeeder(t, delay=5)
    toks = list(range(100, 120))
    f.catch_up(toks, 9)  # 4-grams must end at index <= 9-1-5 = 3: only the one starting at 0
    assert t.size == 1 and t.count(100, (101, 102, 103)) == 1
    f.catch_up(toks, 20)  # ends <= 14: starts 0..11
    assert t.size == 12
    f.catch_up(toks, 20)
    assert t.size == 12  # nothing added twice
    g = NGramFeeder(NGramTable(4), delay=0)
    g.catch_up(toks, 20)
    assert g.table.size == 17


# --- trees and tries -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec,count,first,last",
    [
        ("1,3,3,3", 40, (0,), (0, 2, 2, 2)),
        ("2,2", 6, (0,), (1, 1)),
        ([1, 1, 1, 1], 4, (0,), (0, 0, 0, 0)),
        ("[[0, 1, 0], [2]]", 4, (0,), (0, 1, 0)),  # missing prefixes (0,) and (0, 1) added
    ],
)
def test_parse_tree(spec, count, first, last):
    paths = parse_tree(spec)
    assert len(paths) == count and paths[0] == first and paths[-1] == last
    assert all(p[:-1] in paths for p in paths if len(p) > 1)


@pytest.mark.parametrize("bad,msg", [("1,x", "bad tree '1,x'"),
                                     ("0,3", "branching factor must be an integer in [1, 1024]"),
                                     ("[[-1]]", "ranks must be integers in [0, 1024)"), ("", "empty"),
                                     # limits are checked before any path is enumerated
                                     ("100,100,100,100", "more than 4096 nodes"),
                                     ("[[1e400]]", "ranks must be integers"), ("[[NaN]]", "ranks must be integers"),
                                     ("[[100000000]]", "ranks must be integers in [0, 1024)"),
                                     ("[1.5]", "is not a non-empty list of ranks")])
def test_bad_trees_are_named(bad, msg):
    with pytest.raises(ValueError, match=re.escape(msg)) as e:
        parse_tree(bad)
    assert e.value.param == "tree"  # a ParamError: each surface names its own option


def test_deeply_nested_tree_is_refused_not_a_recursion_error():
    with pytest.raises(ValueError, match="expected e.g."):
        parse_tree("[" * 100000 + "]" * 100000)


def test_trie_merges_tree_paths_and_chains_without_repeating_siblings():
    cands = [[10, 11], [20, 21], [30]]
    paths = parse_tree("2,2,1")
    chains = [[10, 20, 30], [10, 20, 99], [11, 55]]
    trie = build_trie(7, cands, paths, chains)
    assert trie.tokens[0] == 7 and trie.parents[0] == -1
    for kids in trie.children:
        assert len(set(kids)) == len(kids)
    # static: 2 + 4 + 4 nodes; chains add 99 under (10, 20) and 55 under 11
    assert len(trie) == 1 + 2 + 4 + 4 + 2
    n_10_20_30 = trie.children[trie.children[trie.children[0][10]][20]][30]
    assert trie.sources[n_10_20_30] == SRC_TREE | SRC_NGRAM
    assert trie.sources[trie.children[trie.children[0][11]][55]] == SRC_NGRAM
    m = trie.mask()
    for i in range(len(trie)):
        anc = set()
        j = i
        while j >= 0:
            anc.add(j)
            j = trie.parents[j]
        assert set(torch.nonzero(m[i]).flatten().tolist()) == anc
    assert trie.positions(50).tolist() == [50 + d for d in trie.depths]
    capped = build_trie(7, cands, paths, chains, max_nodes=5)
    assert len(capped) == 5


# --- the walk ----------------------------------------------------------------------------------


def _trie(spec: dict[int, list[int]], tokens: list[int]) -> Trie:
    """spec: parent index -> child indices; tokens per node index."""
    t = Trie.rooted(tokens[0])
    order = sorted(i for kids in spec.values() for i in kids)
    parent = {c: p for p, kids in spec.items() for c in kids}
    for i in order:
        p = parent[i]
        assert i == len(t.tokens)
        t.tokens.append(tokens[i])
        t.parents.append(p)
        t.depths.append(t.depths[p] + 1)
        t.sources.append(SRC_TREE)
        t.children.append({})
        t.children[p][tokens[i]] = i
    return t


@pytest.mark.parametrize(
    "root_row,node_rows,want_tokens,want_accepted",
    [
        # greedy: root prefers 3 (a child), node 3 prefers 5 (its child), node 5 prefers 1 (no child)
        ([0, 0, 0, 9, 0, 0], {1: [0, 0, 0, 0, 0, 9], 2: [0, 9, 0, 0, 0, 0]}, [3, 5, 1], [1, 2]),
        # root prefers 4: not drafted, nothing accepted
        ([0, 0, 0, 0, 9, 0], {1: [9, 0, 0, 0, 0, 0], 2: [9, 0, 0, 0, 0, 0]}, [4], []),
        # root prefers 3, node 3 prefers 2 (not its child)
        ([0, 0, 0, 9, 0, 0], {1: [0, 0, 9, 0, 0, 0], 2: [9, 0, 0, 0, 0, 0]}, [3, 2], [1]),
    ],
)
def test_greedy_walk(root_row, node_rows, want_tokens, want_accepted):
    trie = _trie({0: [1], 1: [2]}, [7, 3, 5])
    logits = torch.tensor([root_row, node_rows[1], node_rows[2]], dtype=torch.float32)
    hist = torch.zeros(32, dtype=torch.long)
    res = walk(trie, logits, hist, 10, SamplingConfig(temperature=0))
    assert res.tokens == want_tokens and res.accepted == want_accepted
    assert hist[11 : 11 + len(want_tokens)].tolist() == want_tokens


def test_walk_penalizes_along_the_path():
    """Node 1's draw must see the path token (3) in its penalty window, as AR would."""
    trie = _trie({0: [1]}, [7, 3])
    logits = torch.tensor([[0, 0, 0, 9.0, 0], [0, 0, 1.0, 1.5, 0]])
    hist = torch.zeros(32, dtype=torch.long)
    res = walk(trie, logits, hist, 10, SamplingConfig(temperature=0, penalty=2.0, penalty_window=4))
    assert res.tokens == [3, 2]  # 1.5 / 2 = 0.75 < 1.0


# Target distributions for the statistical tests: node token -> next-token distribution.
V = 6
P_ROOT = [0.28, 0.25, 0.20, 0.12, 0.10, 0.05]
P_NODE = {0: [0.05, 0.10, 0.15, 0.40, 0.25, 0.05], 1: [0.5, 0.1, 0.1, 0.1, 0.1, 0.1],
          2: [0.2, 0.2, 0.2, 0.2, 0.1, 0.1]}
P_AFTER = [1 / 6] * 6  # what the next iteration would draw from after a rejection


def _stat_trie() -> Trie:
    # root(9) -> {0, 1, 2} cover 73% of the root's mass; 0 -> {3, 4}
    return _trie({0: [1, 2, 3], 1: [4, 5]}, [9, 0, 1, 2, 3, 4])


def _stat_logits(trie: Trie) -> torch.Tensor:
    rows = []
    for i, tok in enumerate(trie.tokens):
        if i == 0:
            rows.append(P_ROOT)
        elif trie.depths[i] == 1:
            rows.append(P_NODE[tok])
        else:
            rows.append(P_AFTER)
    return torch.tensor(rows).log()


def _expected_pairs() -> dict[tuple[int, int], float]:
    out = {}
    for a in range(V):
        nxt = P_NODE.get(a, P_AFTER)
        for b in range(V):
            out[(a, b)] = P_ROOT[a] * nxt[b]
    return out


def _chi2(counts: dict, expected: dict, n: int) -> tuple[float, int]:
    stat, cells = 0.0, 0
    for k, p in expected.items():
        e = p * n
        stat += (counts.get(k, 0) - e) ** 2 / e
        cells += 1
    return stat, cells - 1


def _chi2_critical(df: int) -> float:
    """99.9% quantile, Wilson-Hilferty approximation."""
    z = 3.090
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def _first_two_ours(seed: int, trie: Trie, logits: torch.Tensor) -> tuple[int, int]:
    s = SamplingConfig(seed=seed)
    hist = torch.zeros(16, dtype=torch.long)
    res = walk(trie, logits, hist, 0, s)
    if len(res.tokens) >= 2:
        return res.tokens[0], res.tokens[1]
    # rejected at the root: the next iteration draws position 2 from the model, with its noise
    nxt = torch.tensor(P_AFTER).log() + gumbel(seed, 2, V)
    return res.tokens[0], int(nxt.argmax())


def _first_two_per_leaf(seed: int, trie: Trie, logits: torch.Tensor) -> tuple[int, int]:
    """The paper's rule: sample every leaf path independently, keep the longest match."""
    leaves = [i for i in range(len(trie)) if not trie.children[i]]
    best = None
    for j, leaf in enumerate(leaves):
        path = []
        i = leaf
        while i > 0:
            path.append(i)
            i = trie.parents[i]
        path.reverse()
        drawn, node = [], 0
        for d in range(len(path) + 1):
            g = gumbel(seed * 1000 + j, d + 1, V)
            t = int((logits[node] + g).argmax())
            drawn.append(t)
            if d < len(path) and trie.tokens[path[d]] == t:
                node = path[d]
                continue
            break
        if best is None or len(drawn) > len(best):
            best = drawn
    if len(best) >= 2:
        return best[0], best[1]
    nxt = torch.tensor(P_AFTER).log() + gumbel(seed, 2, V)
    return best[0], int(nxt.argmax())


def test_walk_is_distribution_exact_and_the_per_leaf_rule_is_not():
    trie = _stat_trie()
    logits = _stat_logits(trie)
    n = 20_000
    expected = _expected_pairs()
    ours: dict = {}
    for seed in range(n):
        k = _first_two_ours(seed, trie, logits)
        ours[k] = ours.get(k, 0) + 1
    stat, df = _chi2(ours, expected, n)
    assert stat < _chi2_critical(df), f"chi2 {stat:.1f} with {df} dof"

    per_leaf: dict = {}
    for seed in range(n // 4):  # the bias is large; fewer draws already reject it
        k = _first_two_per_leaf(seed, trie, logits)
        per_leaf[k] = per_leaf.get(k, 0) + 1
    stat_bad, _ = _chi2(per_leaf, expected, n // 4)
    assert stat_bad > 10 * _chi2_critical(df), f"per-leaf chi2 only {stat_bad:.1f}"


# --- end to end: TokenSwift == AR -----------------------------------------------------------------

SAMPLERS = {"greedy": dict(temperature=0.0), "paper": dict(PAPER_SAMPLING, seed=7)}
# heads, ngrams, the draft's cache past the budget (budget 64 < context for partial and int8)
# (the int8 copy needs the native kernels; without them test_draft_kv checks that it is refused)
PAST_BUDGET = ["partial", "int8", "sparse"] if kernels.native() else ["partial"]
COMBOS = [*itertools.product([True, False], [True, False], PAST_BUDGET), (True, True, "full")]


@pytest.fixture(scope="module")
def tiny_lms(tmp_path_factory):
    out = {}
    for kind in ("llama", "qwen2"):
        hf = tiny_hf_model(kind, seed=1, max_position_embeddings=2048, scale=0.3)
        d = tmp_path_factory.mktemp(kind)
        hf.save_pretrained(d)
        lm = tokenswift.load(str(d), heads="none")
        out[kind] = (lm, random_heads(lm.model, 3, scale=0.05, seed=2))
    return out


@pytest.mark.parametrize("n", [400, pytest.param(1000, marks=pytest.mark.slow)])
@pytest.mark.parametrize("sampler", list(SAMPLERS))
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_tokenswift_equals_ar_on_tiny_models(tiny_lms, kind, sampler, n):
    """Static tree (the paper's): every drafting path is taken every iteration; n tokens (1,000
    in the slow run)."""
    lm, heads = tiny_lms[kind]
    torch.manual_seed(3)
    prompt = torch.randint(0, 96, (100,)).tolist()
    kw = dict(ignore_eos=True, **SAMPLERS[sampler])
    lm.heads = None
    want = lm.generate(prompt, n, method="ar", **kw).tokens
    accepted = 0
    for use_heads, use_ngrams, kv in COMBOS:
        lm.heads = heads if use_heads else None
        res = lm.generate(prompt, n, method="tokenswift", use_ngrams=use_ngrams, tree="1,3,3,3",
                          draft_budget=64, draft_kv=kv, **kw)
        assert res.tokens == want, f"heads={use_heads} ngrams={use_ngrams} draft_kv={kv}"
        assert res.stats["draft_kv"] == kv
        accepted += res.stats["accepted_draft_tokens"]
        if kv == "partial":
            assert res.stats["draft_refreshes"] > 0  # B=64 < context: the partial cache was used
        else:
            assert res.stats["draft_refreshes"] == 0 and res.stats["draft_kv_max"] > 100
    lm.heads = None
    ngram = lm.generate(prompt, n, method="ngram", **kw)
    assert ngram.tokens == want
    assert accepted > 20  # the walk really descended into drafts, not only rejected them


def _force_costs(monkeypatch, drafts_pay: bool) -> None:
    """Pins the planner's measured costs: a flat verify curve and free drafts (chains, siblings
    and n-grams every iteration), or a steep curve and dear drafts (AR steps, a draft now and then)."""
    import tokenswift.plan as plan

    def observe(self, *a, **k):
        if drafts_pay:
            self.costs, self.t_draft = {1: 0.02, 60: 0.0201}, {w: 0.0 for w in self.drafters}
        else:
            self.costs, self.t_draft = {1: 0.01, 9: 0.06}, {w: 0.02 for w in self.drafters}

    monkeypatch.setattr(plan.AutoPlanner, "observe", observe)


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_auto_plan_equals_ar_whatever_it_plans(tiny_lms, sampler, monkeypatch):
    """The auto planner switches between AR steps, chains, siblings and n-grams by measured
    cost; the text must not notice. Costs are forced both ways so that both kinds run."""
    lm, _ = tiny_lms["llama"]
    torch.manual_seed(5)
    prompt = torch.randint(0, 96, (300,)).tolist()
    kw = dict(ignore_eos=True, **SAMPLERS[sampler])
    want = lm.generate(prompt, 600, method="ar", **kw).tokens
    for drafts_pay in (True, False):
        _force_costs(monkeypatch, drafts_pay)
        for partial in (True, False):
            res = lm.generate(prompt, 600, method="tokenswift", draft_budget=64 if partial else 4096, **kw)
            assert res.tokens == want, f"drafts_pay={drafts_pay} partial={partial}"
            auto = res.stats["auto"]
            assert auto["changes"]
            if drafts_pay:  # big tries (chains with siblings, n-gram chains) every iteration
                assert res.stats["mean_trie_size"] > 8 and res.stats["accepted_draft_tokens"] > 20
                assert auto["draft_iterations"] > 0
            else:  # mostly single-token passes, with a draft now and then to keep statistics
                assert res.stats["mean_trie_size"] < 2
                assert 0 < auto["draft_iterations"] < res.stats["iterations"] / 4


@pytest.fixture(scope="module")
def int4_lms(tmp_path_factory):
    """Tiny models whose every matrix fits torch's int4 kernel (input widths multiples of 32)."""
    out = {}
    for kind in ("llama", "qwen2", "qwen3"):
        hf = tiny_hf_model(kind, seed=1, max_position_embeddings=2048, scale=0.3, intermediate_size=128)
        d = tmp_path_factory.mktemp(kind)
        hf.save_pretrained(d)
        out[kind] = tokenswift.load(str(d), heads="none", draft_weights="int4")
    return out


@pytest.mark.parametrize("n", [300, pytest.param(1000, marks=pytest.mark.slow)])
@pytest.mark.parametrize("sampler", list(SAMPLERS))
@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
def test_int4_self_draft_equals_ar_on_tiny_models(int4_lms, kind, sampler, n, monkeypatch):
    """The chained int4 self-draft (the default drafter) over each draft cache past a 64-entry
    budget (the int8 copy, the partial selection, the main cache itself), with chains, siblings
    and n-grams every iteration: n tokens identical to AR (1,000 in the slow run)."""
    lm = int4_lms[kind]
    assert lm.int4 is not None and lm.int4.layers[0].w_down.kernel  # the real int4 kernel runs
    torch.manual_seed(3)
    prompt = torch.randint(0, 96, (100,)).tolist()
    kw = dict(ignore_eos=True, **SAMPLERS[sampler])
    want = lm.generate(prompt, n, method="ar", **kw).tokens
    _force_costs(monkeypatch, drafts_pay=True)
    for kv in (*PAST_BUDGET, "full"):
        res = lm.generate(prompt, n, method="tokenswift", draft_budget=64, draft_kv=kv, **kw)
        assert res.tokens == want, f"draft_kv={kv}"
        st = res.stats
        assert st["drafter"] == "chain" and st["draft_weights"] == "int4" and st["draft_kv"] == kv
        assert st["accepted_draft_tokens"] > n // 20  # the walk descends the chains
        assert (st["draft_refreshes"] > 0) == (kv == "partial")


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_short_runs_draft_with_ngrams_only_and_build_no_int4_copy(tmp_path, sampler):
    """Below SELF_DRAFT_MIN_TOKENS the auto plan does not self-draft, so the int4 copy is not
    built (a second of work a short run cannot pay back); the first longer run builds it."""
    from tokenswift.engine import SELF_DRAFT_MIN_TOKENS
    from tokenswift.quant import int4_kernel_available

    hf = tiny_hf_model("llama", seed=1, max_position_embeddings=2048, scale=0.3, intermediate_size=128)
    hf.save_pretrained(tmp_path)
    lm = tokenswift.load(str(tmp_path), heads="none")
    torch.manual_seed(6)
    prompt = torch.randint(0, 96, (50,)).tolist() * 2  # repeated: n-grams have something to match
    kw = dict(ignore_eos=True, **SAMPLERS[sampler])
    n = SELF_DRAFT_MIN_TOKENS
    want = lm.generate(prompt, n, method="ar", **kw).tokens
    short = lm.generate(prompt, n - 1, **kw)
    assert short.tokens == want[: n - 1]
    assert short.stats["drafter"] == "none" and lm._int4 is None
    full = lm.generate(prompt, n, **kw)
    assert full.tokens == want and full.stats["drafter"] == "chain"
    if int4_kernel_available():
        assert full.stats["draft_weights"] == "int4" and lm._int4 is not None
    # a static tree is the paper's draft, asked for: it drafts whatever the length
    assert lm.generate(prompt, 20, tree="1,2", **kw).stats["drafter"] != "none"


def test_draft_pass_reads_at_most_the_budget(tiny_lms, monkeypatch):
    """At a context 18x the budget, every ordinary draft pass attends to <= B+1 entries per layer;
    full-context refreshes happen only once per recent window."""
    lm, heads = tiny_lms["llama"]
    lm.heads = heads
    seen = []
    model = lm.model
    orig = type(model).forward

    def spy(self, tokens, positions, cache=None, mask=None, attn_probs=None, **kw):
        if isinstance(cache, DraftCache):
            seen.append(cache.length + tokens.shape[1])  # entries the new token attends to
        return orig(self, tokens, positions, cache, mask, attn_probs, **kw)

    monkeypatch.setattr(type(model), "forward", spy)
    torch.manual_seed(4)
    prompt = torch.randint(0, 96, (1000,)).tolist()
    B = 64
    res = lm.generate(prompt, 150, method="tokenswift", tree="1,3,3,3", draft_budget=B, draft_kv="partial",
                      ignore_eos=True, temperature=0)
    lm.heads = None
    assert seen and max(seen) <= B + 1
    st = res.stats
    assert st["draft_kv_max"] <= B + 1
    recent = B // 4
    assert 1 <= st["draft_refreshes"] <= st["new_tokens"] / (recent - 4) + 1
    assert len(seen) == st["iterations"]  # one draft pass over the partial cache per iteration


def test_spec_config_validates():
    for kw, msg in [({"gamma": 0}, "gamma must be"), ({"ngram_topk": -1}, "ngram_topk must be"),
                    ({"draft_budget": 10}, "draft_budget must be"), ({"tree": "a,b"}, "bad tree")]:
        with pytest.raises(ValueError, match=msg):
            SpecConfig(**kw)


# --- the embedded model --------------------------------------------------------------------------


@pytest.mark.parametrize("n", [300, pytest.param(1000, marks=pytest.mark.slow)])
@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_tokenswift_equals_ar_on_smollm2(smollm, cdne_ids, sampler, n):
    """The paper's static tree over a partial cache and the defaults (int4 chains, auto plan, the
    int8 copy of the cache past the budget): n tokens identical to AR (1,000 in the slow run)."""
    prompt = cdne_ids[2000:2512]
    kw = dict(ignore_eos=True, **SAMPLERS[sampler])
    want = smollm.generate(prompt, n, method="ar", **kw).tokens
    got = smollm.generate(prompt, n, method="tokenswift", tree="1,3,3,3", draft_budget=256, draft_kv="partial",
                          **kw)
    assert got.tokens == want
    assert got.stats["draft_refreshes"] > 0
    auto = smollm.generate(prompt, n, draft_budget=256, **kw)
    assert auto.tokens == want
    # how often drafts pay depends on this machine's measured costs: ask only that some were taken
    # (with the native float32 kernels a 2.5K-context step costs ~22 ms and the int4 draft about as
    # much as before, so the planner drafts far less than it did over oneDNN: 17 accepted of 300)
    # over GGUF blocks (the default load) the draft runs the model's own weights, not an int4 copy
    assert auto.stats["draft_weights"] == ("float" if smollm.model.quantized else "int4")
    assert auto.stats["accepted_draft_tokens"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_tokenswift_equals_ar_on_smollm2_all_combinations(smollm, cdne_ids, sampler):
    prompt = cdne_ids[3000:3512]
    kw = dict(ignore_eos=True, **SAMPLERS[sampler])
    want = smollm.generate(prompt, 1000, method="ar", **kw).tokens
    saved = smollm.heads
    heads = random_heads(smollm.model, 3, scale=0.02, seed=5)
    try:
        for use_heads, use_ngrams, kv in COMBOS:
            smollm.heads = heads if use_heads else None
            got = smollm.generate(prompt, 1000, method="tokenswift", use_ngrams=use_ngrams, tree="1,3,3,3",
                                  draft_budget=256, draft_kv=kv, **kw)
            assert got.tokens == want, f"heads={use_heads} ngrams={use_ngrams} draft_kv={kv}"
    finally:
        smollm.heads = saved
