"""The native CPU kernels against their float64 references, and their row invariance bit for bit."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from tokenswift import kernels

pytestmark = pytest.mark.skipif(not kernels.native(), reason=f"native kernels off: {kernels.why_not()}")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _tree_mask(parents: list[int]) -> torch.Tensor:  # -> [1, T, T]: each node sees its ancestors and itself
    T = len(parents)
    m = torch.zeros(1, T, T, dtype=torch.bool)
    for i in range(T):
        j = i
        while j >= 0:
            m[0, i, j] = True
            j = parents[j]
    return m


def _random_parents(T: int, gen: torch.Generator) -> list[int]:
    return [-1] + [int(torch.randint(0, i, (1,), generator=gen)) for i in range(1, T)]


def _qkv(B, T, H, KH, S, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, D, generator=g) * 0.3
    k = torch.randn(B, KH, S, D, generator=g).to(dtype)
    v = torch.randn(B, KH, S, D, generator=g).to(dtype)
    return q, k, v


# (B, T, H, KH, cached, D): one query, GQA groups 1-4, contexts on and off the 256-key chunk
# boundaries, head dims 16-128
SHAPES = [(1, 1, 9, 3, 4, 64), (1, 1, 9, 3, 511, 64), (1, 8, 9, 3, 1000, 64), (2, 16, 8, 2, 700, 128),
          (1, 64, 4, 4, 1536, 16), (1, 3, 6, 2, 300, 24), (1, 128, 4, 2, 255, 32)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("masked", [False, True], ids=["causal", "tree"])
def test_attention_matches_reference(shape, dtype, masked):
    B, T, H, KH, n, D = shape
    q, k, v = _qkv(B, T, H, KH, n + T, D, dtype)
    mask = _tree_mask(_random_parents(T, torch.Generator().manual_seed(1))) if masked else None
    out = kernels.attention(q, k, v, mask)
    ref = kernels.attention_reference(q, k, v, mask)
    assert out.shape == (B, T, H * D)
    # float32 arithmetic over up to 1.7K keys: a few ulp of the outputs (which are below ~1)
    assert (out - ref).abs().max().item() < 1e-5


def test_attention_log_sum_exp():
    q, k, v = _qkv(1, 4, 6, 2, 900, 32, torch.float32)
    _, lse = kernels.attention(q, k, v, None, lse=True)  # [1, 4, 6]
    s = torch.einsum("bthd,bhsd->bhts", q.double(), k.double().repeat_interleave(3, dim=1))  # [1, 6, 4, S]
    S = s.shape[-1]
    allow = torch.ones(4, S, dtype=torch.bool)
    allow[:, S - 4 :] = torch.ones(4, 4, dtype=torch.bool).tril()
    ref = torch.logsumexp(s.masked_fill(~allow, float("-inf")), -1).permute(0, 2, 1)  # [1, 4, 6]
    assert (lse.double() - ref).abs().max().item() < 1e-5


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("n", [0, 100, 256, 1000, 1300])
def test_attention_rows_equal_one_token_passes_bitwise(dtype, n):
    """Row t of a tree pass == a one-token pass over the cache with t's ancestors committed in
    path order: the same visible keys, the same bits (what makes tokenswift == ar)."""
    T, H, KH, D = 24, 9, 3, 64
    q, k, v = _qkv(1, T, H, KH, n + T, D, dtype, seed=n)
    parents = _random_parents(T, torch.Generator().manual_seed(n + 1))
    mask = _tree_mask(parents)
    out = kernels.attention(q, k, v, mask)
    for t in range(T):
        path = torch.tensor([j for j in range(T) if mask[0, t, j]])  # ancestors, then t itself
        kk = torch.cat([k[:, :, :n], k[:, :, n + path]], 2)
        vv = torch.cat([v[:, :, :n], v[:, :, n + path]], 2)
        one = kernels.attention(q[:, t : t + 1].contiguous(), kk, vv)
        assert torch.equal(one[0, 0], out[0, t]), f"row {t} (depth {len(path) - 1}) differs"


def test_attention_reads_strided_cache_views():
    """K/V are views into the cache [L, B, KH, capacity, D]: strides, not copies."""
    cache = torch.randn(2, 1, 3, 700, 64)
    q = torch.randn(1, 5, 9, 64) * 0.3
    view = cache[1, :, :, :605]
    out = kernels.attention(q, view, view)
    assert torch.equal(out, kernels.attention(q, view.contiguous(), view.contiguous()))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("R", [1, 7, 256, 257, 700])  # on and off the chunk boundaries
def test_attention_over_listed_rows_equals_attention_over_their_copy_bitwise(dtype, R):
    """Each KV head reads its own rows of a cache layer in place (the sparse draft's choice): the
    same bits as `attention` over a gathered copy of those rows, the values of the reference."""
    H, KH, S, D = 9, 3, 1500, 64
    cache = torch.randn(2, 1, KH, S + 20, D).to(dtype)  # [L, B, KH, capacity, D]: strided views of it
    k, v = cache[0, :, :, :S], cache[1, :, :, :S]
    g = torch.Generator().manual_seed(R)
    q = torch.randn(1, 1, H, D, generator=g) * 0.3
    rows = torch.stack([torch.randperm(S - 1, generator=g)[: R - 1].sort().values for _ in range(KH)])
    rows = torch.cat([rows, torch.full((KH, 1), S - 1)], 1)  # the query's own entry last, as a draft's
    out = kernels.attention_rows(q, k, v, rows)
    G = H // KH
    for h in range(KH):
        kk, vv = k[:, h : h + 1, rows[h]], v[:, h : h + 1, rows[h]]
        one = kernels.attention(q[:, :, h * G : (h + 1) * G].contiguous(), kk.contiguous(), vv.contiguous())
        assert torch.equal(out[..., h * G * D : (h + 1) * G * D], one), f"KV head {h}"
        ref = kernels.attention_reference(q[:, :, h * G : (h + 1) * G], kk.float(), vv.float())
        assert torch.allclose(one, ref, atol=1e-5, rtol=1e-4)


def test_attention_over_listed_rows_names_bad_rows():
    q, k, v = _qkv(1, 1, 4, 2, 10, 16, torch.float32)
    with pytest.raises(RuntimeError, match="a row lies outside k"):
        kernels.attention_rows(q, k, v, torch.tensor([[0, 10], [1, 2]]))
    with pytest.raises(RuntimeError, match=r"rows must be contiguous int64 \[KH, R >= 1\]"):
        kernels.attention_rows(q, k, v, torch.tensor([[0, 1]]))


def _q8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # [B, KH, S, D] -> int8 rows, scales [B, KH, S]
    q = torch.empty(x.shape, dtype=torch.int8)
    s = torch.empty(x.shape[:3])
    kernels.quantize_q8(x, q, s)
    return q, s


def test_quantize_q8_matches_its_reference_bitwise():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 50, 64, generator=g) * torch.rand(2, 3, 50, 1, generator=g) * 10
    x[0, 1, 7] = 0.0  # an all-zero row: scale 0, codes 0
    x[1, 2, 3, 5] = 1e4  # one outlier owns its row's scale
    q, s = _q8(x)
    rq, rs = kernels.quantize_q8_reference(x)
    assert torch.equal(q, rq) and torch.equal(s, rs)
    assert s[0, 1, 7] == 0 and not q[0, 1, 7].any() and q[1, 2, 3, 5] == 127
    # each value within half a step of its row's scale
    assert ((q.float() * s[..., None] - x).abs() <= 0.5 * s[..., None] + 1e-6).all()
    # written in place into strided views of a cache, as the draft's cache stores a pass
    cache, scales = torch.zeros(4, 2, 3, 80, 64, dtype=torch.int8), torch.zeros(4, 2, 3, 80)
    kernels.quantize_q8(x.transpose(1, 2).contiguous().transpose(1, 2), cache[2, :, :, 10:60], scales[2, :, :, 10:60])
    assert torch.equal(cache[2, :, :, 10:60], q) and torch.equal(scales[2, :, :, 10:60], s)
    assert not cache[2, :, :, :10].any() and not cache[1].any()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_quantize_q8_reads_a_16_bit_cache_in_place_with_the_bits_of_its_float32_copy(dtype):
    """The draft's int8 copy is built from a bfloat16/float16 cache directly (`Q8KVCache.sync`):
    each row widened exactly, so the codes and scales of quantizing x.float()."""
    g = torch.Generator().manual_seed(1)
    cache = (torch.randn(3, 2, 4, 70, 64, generator=g) * 3).to(dtype)  # [L, B, KH, S, D]
    cache[1, 0, 2, 9] = 0.0
    x = cache[:, 0, :, 5:61]  # a strided view, as sync passes it: [L, KH, 56, D]
    q, s = torch.empty(x.shape, dtype=torch.int8), torch.empty(x.shape[:3])
    kernels.quantize_q8(x, q, s)
    rq, rs = _q8(x.float())
    assert torch.equal(q, rq) and torch.equal(s, rs)
    with pytest.raises(RuntimeError, match="quantize_q8: x must be float32, bfloat16 or float16, got Double"):
        kernels.quantize_q8(x.double(), q, s)


@pytest.mark.parametrize("shape", SHAPES[:5], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("masked", [False, True], ids=["causal", "tree"])
def test_int8_attention_matches_reference(shape, masked):
    """int8 K/V with row scales (the draft's cache): the float64 attention of the dequantized rows."""
    B, T, H, KH, n, D = shape
    q, k, v = _qkv(B, T, H, KH, n + T, D, torch.float32)
    (k8, ks), (v8, vs) = _q8(k), _q8(v)
    mask = _tree_mask(_random_parents(T, torch.Generator().manual_seed(1))) if masked else None
    out = kernels.attention(q, k8, v8, mask, k_scale=ks, v_scale=vs)
    ref = kernels.attention_reference(q, k8, v8, mask, ks, vs)
    assert (out - ref).abs().max().item() < 1e-5
    # and near the float32 attention it stands for (int8 rows, the query's too: steps of 0.4-1% of
    # a row's largest value; D = 128's sharp scores carry the most error, ~0.1 of outputs ~1)
    assert (out - kernels.attention(q, k, v, mask)).abs().max().item() < 0.2


@pytest.mark.parametrize("n", [0, 300, 1300])
def test_int8_attention_rows_equal_one_token_passes_bitwise(n):
    T, H, KH, D = 16, 9, 3, 64
    q, k, v = _qkv(1, T, H, KH, n + T, D, torch.float32, seed=n)
    (k8, ks), (v8, vs) = _q8(k), _q8(v)
    out = kernels.attention(q, k8, v8, None, k_scale=ks, v_scale=vs)
    for t in range(T):
        m = n + t + 1
        one = kernels.attention(q[:, t : t + 1].contiguous(), k8[:, :, :m], v8[:, :, :m], None,
                                k_scale=ks[:, :, :m], v_scale=vs[:, :, :m])
        assert torch.equal(one[0, 0], out[0, t]), f"row {t} differs"


def test_int8_attention_needs_its_scales():
    q, k, v = _qkv(1, 2, 4, 2, 10, 16, torch.float32)
    (k8, ks), (v8, vs) = _q8(k), _q8(v)
    with pytest.raises(RuntimeError, match="int8 K/V need k_scale and v_scale"):
        kernels.attention(q, k8, v8)
    with pytest.raises(RuntimeError, match="int8 K/V need k_scale and v_scale"):
        kernels.attention(q, k, v, k_scale=ks, v_scale=vs)
    with pytest.raises(RuntimeError, match=r"scales must be float32 \[B, KH, S\]"):
        kernels.attention(q, k8, v8, k_scale=ks[:, :, :5], v_scale=vs)


@pytest.mark.parametrize("shape", [(960, 576), (576, 1536), (50, 33), (7, 8)])
def test_linear_matches_reference_and_is_row_invariant(shape):
    N, K = shape
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(N, K, generator=g), torch.randn(N, generator=g)
    x = torch.randn(130, K, generator=g)
    p = kernels.PackedLinear(w)
    assert torch.equal(p.dense(), w)
    for bias in (None, b):
        y = p.matmul(x, bias)
        ref = kernels.linear_reference(x, w, bias)
        # a sequential float32 sum of K products: relative error ~ K * 2^-24 of the sum of |products|
        bound = 4 * K * 2**-24 * (x.abs() @ w.abs().T).max().item()
        assert (y - ref).abs().max().item() <= bound
        rows = torch.cat([p.matmul(x[i : i + 1], bias) for i in range(x.shape[0])])
        for M in (1, 2, 3, 8, 17, 128):
            assert torch.equal(p.matmul(x[:M], bias), rows[:M]), f"M={M}"
    assert p.matmul(x.view(2, 65, K)).shape == (2, 65, N)


def test_bad_inputs_name_the_problem():
    q, k, v = _qkv(1, 2, 4, 2, 10, 12, torch.float32)
    with pytest.raises(RuntimeError, match="multiple of 8"):
        kernels.attention(q, k, v)
    q, k, v = _qkv(1, 2, 4, 2, 10, 16, torch.float32)
    with pytest.raises(RuntimeError, match="mask must be bool"):
        kernels.attention(q, k, v, torch.ones(1, 3, 3, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="input width"):
        kernels.PackedLinear(torch.randn(8, 16)).matmul(torch.randn(2, 15))


def test_fallback_when_disabled():
    """TOKENSWIFT_NATIVE=0: the kernels are off, one log line says why, the model takes torch's
    paths and still runs."""
    code = (
        "import logging, torch; logging.basicConfig(level=logging.INFO)\n"
        "from tokenswift import kernels\n"
        "from tokenswift.model import attention_path\n"
        "print(kernels.native(), kernels.why_not(), attention_path(torch.device('cpu'), torch.float32, 64))\n"
    )
    env = {**os.environ, "TOKENSWIFT_NATIVE": "0"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["False", "TOKENSWIFT_NATIVE=0", "fused"]
    assert "native CPU kernels off: TOKENSWIFT_NATIVE=0" in r.stderr


@pytest.mark.parametrize("S,budget,dims", [(3000, 150, 16), (700, 1, 8), (400, 320, 64), (9000, 2000, 16), (99, 5, 4)])
def test_sparse_select_dims_takes_the_top_budget_of_its_references_weights(S, budget, dims):
    """The native choice from the dimension-major int8 copy is a top-`budget` set of the weights
    `SparseKV.dims_weights` computes in float64 from the same integer scores (float32 exps and
    sums inside the kernel: ties within 1e-5 aside), distinct and ascending inside [a, b), with
    the sinks before and the recent window after; spans off 32 and past 4,096 entries included."""
    from tokenswift.cache import SparseKV
    from tokenswift.config import ModelConfig

    H, KH, D = 9, 3, 64
    cfg = ModelConfig(arch="llama", vocab_size=32, hidden_size=H * D, intermediate_size=8, num_layers=1, num_heads=H,
                      num_kv_heads=KH, head_dim=D)
    g = torch.Generator().manual_seed(S + dims)
    view = SparseKV(cfg, budget=budget, sinks=16, recent=64 if S > 200 else 8, scorer=f"dims:{dims}")

    class Main:  # what attach reads of a cache
        k = torch.randn(1, 1, KH, S + 5, D, generator=g).to(torch.float16)
        where = [(0, 0)]  # layer 0 is whole (no sliding-window ring)
    view.attach(Main, S)
    q = torch.randn(1, 1, H, D, generator=g) * 0.6
    q[0, 0, :, 5] *= 6  # a dominant dimension, as RoPE's low frequencies give
    a, b = view.sinks, S - view.recent
    rows = kernels.sparse_select_dims(q, view.kq[0], view.ks[0, :, :, 0], a, b, S, budget, dims)
    assert rows.shape == (KH, a + budget + S - b)
    assert torch.equal(rows[:, :a], torch.arange(a).expand(KH, -1))
    assert torch.equal(rows[:, a + budget :], torch.arange(b, S).expand(KH, -1))
    w = view.dims_weights(0, q[0, 0].view(KH, H // KH, D), a, b)  # [KH, M]
    for h in range(KH):
        chosen = rows[h, a : a + budget] - a
        assert (chosen[1:] > chosen[:-1]).all() and chosen.min() >= 0 and chosen.max() < b - a
        rest = torch.ones(b - a, dtype=torch.bool)
        rest[chosen] = False
        if rest.any():
            assert w[h, chosen].min() >= w[h, rest].max() * (1 - 1e-5)


def test_sparse_select_dims_breaks_ties_by_the_earlier_entry():
    """Entries with equal keys score equal: the earlier ones are taken (as the reference's stable sort)."""
    from tokenswift.cache import SparseKV
    from tokenswift.config import ModelConfig

    H, KH, D, S = 4, 2, 32, 600
    cfg = ModelConfig(arch="llama", vocab_size=32, hidden_size=H * D, intermediate_size=8, num_layers=1, num_heads=H,
                      num_kv_heads=KH, head_dim=D)
    view = SparseKV(cfg, budget=37, sinks=4, recent=8, scorer="dims:8")

    class Main:
        k = torch.randn(1, 1, KH, 20, D).repeat(1, 1, 1, 30, 1)  # each key 30 times
        where = [(0, 0)]
    view.attach(Main, S)
    q = torch.randn(1, 1, H, D)
    rows = kernels.sparse_select_dims(q, view.kq[0], view.ks[0, :, :, 0], 4, S - 8, S, 37, 8)
    w = view.dims_weights(0, q[0, 0].view(KH, H // KH, D), 4, S - 8)
    for h in range(KH):
        # the 37 best: whole copies of the best keys, then the earliest copies of the next
        order = torch.sort(w[h], descending=True, stable=True).indices[:37].sort().values + 4
        assert torch.equal(rows[h, 4:41], order)
        assert len(set(w[h, rows[h, 4:41] - 4].tolist())) < 37  # ties were there to break


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_attention_with_per_row_starts_equals_each_rows_window_alone(dtype):
    """`kv_start` (a sliding window): row t of a 5-row pass sees cached keys from its own start
    on, then its new ancestors; it equals a one-token pass over exactly those keys bit for bit
    (chunked from its start), and starts outside [0, cached] are refused."""
    g = torch.Generator().manual_seed(3)
    B, KH, G, D, n, T = 1, 2, 3, 64, 1200, 5
    q = torch.randn(B, T, KH * G, D, generator=g)
    k = torch.randn(B, KH, n + T, D, generator=g).to(dtype)
    v = torch.randn(B, KH, n + T, D, generator=g).to(dtype)
    mask = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 0, 1, 0, 0], [1, 1, 0, 1, 0], [1, 0, 1, 0, 1]],
                        dtype=torch.bool).unsqueeze(0)  # a trie: rows see their ancestors
    start = torch.tensor([[700, 701, 701, 702, 702]])
    out = kernels.attention(q, k, v, mask, kv_start=start)
    for t in range(T):
        keep = list(range(int(start[0, t]), n)) + [n + i for i in range(T) if mask[0, t, i]]
        idx = torch.tensor(keep)
        one = kernels.attention(q[:, t : t + 1], k[:, :, idx].contiguous(), v[:, :, idx].contiguous())
        assert torch.equal(out[:, t : t + 1], one), t
    with pytest.raises(RuntimeError, match=r"kv_start 1201 outside \[0, 1200\]"):
        kernels.attention(q, k, v, mask, kv_start=torch.full((1, T), 1201))


def _huge_kb(t: torch.Tensor) -> int:
    """AnonHugePages (kB) of the mapping that holds t's memory (/proc/self/smaps)."""
    a, kb, inside = t.data_ptr(), 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and all(c in "0123456789abcdef-" for c in head):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= a < hi
            elif inside and head == "AnonHugePages:":
                kb = int(line.split()[1])
    return kb


def _thp_mode() -> str:
    try:
        text = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    except OSError:
        return "none"
    return text[text.index("[") + 1 : text.index("]")]


@pytest.mark.skipif(_thp_mode() not in ("madvise", "always"), reason="no transparent huge pages on this system")
def test_the_kv_cache_and_packed_weights_lie_on_huge_pages():
    """A step streams the cache and the large packed weights: both lie in fresh memory advised
    onto 2 MiB pages, so the OS backs them with huge pages (the system allowing it) as they are
    first written; small tensors are left alone."""
    from tokenswift.cache import KVCache
    from tokenswift.config import ModelConfig

    cfg = ModelConfig(arch="llama", vocab_size=32, hidden_size=256, intermediate_size=8, num_layers=4, num_heads=4,
                      num_kv_heads=2, head_dim=64)
    c = KVCache(cfg, capacity=8192, dtype=torch.bfloat16)  # 8 MiB each of K and V
    assert not c.k.any() and not c.v.any()  # zeros, as torch.zeros
    c.k.fill_(1.0)  # the first write faults the pages in
    assert _huge_kb(c.k) >= 4096
    small = torch.arange(1000)
    assert kernels.huge_copy(small) is small  # under 4 MiB: no huge page would fit, left as it is
    w = kernels.huge_copy(torch.arange(3 << 20, dtype=torch.int32))  # 12 MiB, as a packed weight
    assert torch.equal(w, torch.arange(3 << 20, dtype=torch.int32)) and _huge_kb(w) >= 8192
    assert w.data_ptr() % kernels.HUGE_PAGE == 0
