"""A whole pass is row-invariant: the hidden states and logits of a T-token pass (causal or tree
mask) over a cache equal, bit for bit, those of one-token passes over the same cache with each
node's ancestors committed in path order. That is what makes `tokenswift` write `ar`'s tokens at
any length, not only up to float near-ties."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_hf_model
from tokenswift import kernels
from tokenswift.cache import KVCache
from tokenswift.config import ModelConfig
from tokenswift.model import Decoder

pytestmark = pytest.mark.skipif(not kernels.native(), reason=f"native kernels off: {kernels.why_not()}")


def _tiny(kind: str) -> Decoder:
    hf = tiny_hf_model(kind, scale=0.3)
    m = Decoder(ModelConfig.from_hf(hf.config.to_dict()))
    m.load_tensors(hf.state_dict())
    assert m.pack() == "native"
    return m


def _parents(T: int, tree: bool, seed: int) -> list[int]:
    if not tree:
        return list(range(-1, T - 1))  # a chain: causal
    g = torch.Generator().manual_seed(seed)
    parents, stack = [-1], [0]  # stack: the path from the root to the last node
    for i in range(1, T):  # each node hangs under one of the last node's ancestors (or itself)
        k = int(torch.randint(max(0, len(stack) - 3), len(stack), (1,), generator=g))
        parents.append(stack[k])
        del stack[k + 1 :]
        stack.append(i)
    return parents


@torch.no_grad()
def check_pass_equals_one_token_passes(m: Decoder, context: int, T: int, tree: bool, kv_dtype: torch.dtype,
                                       seed: int = 0) -> None:
    cfg = m.cfg
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, cfg.vocab_size, (1, context), generator=g)
    nodes = torch.randint(0, cfg.vocab_size, (1, T), generator=g)
    parents = _parents(T, tree, seed)
    depth = [0] * T
    for i in range(1, T):
        depth[i] = depth[parents[i]] + 1
    cap = context + T
    cache = KVCache(cfg, capacity=cap, dtype=kv_dtype, rope_len=cap)
    m.prefill(prompt, cache)
    mask = torch.zeros(T, T, dtype=torch.bool)
    for i in range(T):
        j = i
        while j >= 0:
            mask[i, j] = True
            j = parents[j]
    pos = (context + torch.tensor(depth)).unsqueeze(0)  # [1, T]
    h_pass = m(nodes, pos, cache, mask=mask)[0]  # [T, D]
    lg_pass = m.logits(h_pass)  # [T, V]
    # one-token passes, depth first: the cache holds exactly the current node's ancestors
    on_path: list[int] = []
    for i in range(T):  # parents precede children, and a node's subtree follows it when built this way
        while on_path and on_path[-1] != parents[i]:
            on_path.pop()
        cache.truncate(context + len(on_path))
        h = m(nodes[:, i : i + 1], pos[:, i : i + 1], cache)[0, 0]  # [D]
        assert torch.equal(h, h_pass[i]), f"node {i} (depth {depth[i]}): hidden states differ"
        assert torch.equal(m.logits(h[None])[0], lg_pass[i]), f"node {i}: logits differ"
        on_path.append(i)


def _dfs_ordered(parents: list[int]) -> bool:
    """Whether a node's subtree directly follows it (what the depth-first replay above needs)."""
    stack: list[int] = []
    for i, p in enumerate(parents):
        while stack and stack[-1] != p:
            stack.pop()
        if p != -1 and not stack:
            return False
        stack.append(i)
    return True


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("T", [8, 16, 64])
@pytest.mark.parametrize("context", [1024, 4096])
@pytest.mark.parametrize("tree", [False, True], ids=["causal", "tree"])
@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.bfloat16], ids=["kv-f32", "kv-bf16"])
def test_tiny_models(kind, T, context, tree, kv_dtype):
    check_pass_equals_one_token_passes(_tiny(kind), context, T, tree, kv_dtype, seed=T + context)


@pytest.mark.parametrize("T,context,tree,kv_dtype", [
    (8, 1024, True, torch.float32),
    (16, 1024, False, torch.bfloat16),
])
def test_smollm2(smollm, T, context, tree, kv_dtype):
    check_pass_equals_one_token_passes(smollm.model, context, T, tree, kv_dtype, seed=T)


@pytest.mark.slow
@pytest.mark.parametrize("T", [8, 16, 64])
@pytest.mark.parametrize("context", [1024, 4096])
@pytest.mark.parametrize("tree", [False, True], ids=["causal", "tree"])
@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.bfloat16], ids=["kv-f32", "kv-bf16"])
def test_smollm2_all(smollm, T, context, tree, kv_dtype):
    check_pass_equals_one_token_passes(smollm.model, context, T, tree, kv_dtype, seed=T + context)


def test_the_replay_order_holds():
    """The test's tree builder only makes trees the depth-first replay can walk."""
    for T in (8, 16, 64):
        for seed in range(20):
            assert _dfs_ordered(_parents(T, True, seed))
