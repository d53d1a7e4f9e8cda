"""The decoder against transformers: logits parity per architecture, tree masks, cache moves."""

from __future__ import annotations

import pytest
import torch

from conftest import ARCH_CASES, tiny_hf_model
from tokenswift.cache import KVCache
from tokenswift.config import ModelConfig
from tokenswift.loading import load_model
from tokenswift.model import Decoder

TOL = 1e-4


def _ours(hf_model, packed: bool) -> Decoder:
    cfg = ModelConfig.from_hf(hf_model.config.to_dict())
    m = Decoder(cfg)
    m.load_tensors(hf_model.state_dict())
    if packed:
        assert m.pack(), "oneDNN packing should be available on this CPU build"
    return m


@pytest.mark.parametrize("kind", ARCH_CASES)
@pytest.mark.parametrize("packed", [False, True], ids=["plain", "onednn"])
def test_logits_match_transformers(kind, packed):
    hf = tiny_hf_model(kind)
    m = _ours(hf, packed)
    torch.manual_seed(1)
    toks = torch.randint(0, hf.config.vocab_size, (2, 48))
    pos = torch.arange(48).expand(2, -1)
    with torch.no_grad():
        ref = hf(toks).logits
        out = m.logits(m(toks, pos))
    assert (ref - out).abs().max().item() <= TOL
    # the reference is not trivially flat: logits vary across the vocabulary
    assert ref.std().item() > 0.1


@pytest.mark.parametrize("kind", ["llama", "qwen3", "yarn", "mistral-window"])
def test_chunked_prefill_then_decode_matches_full_forward(kind):
    hf = tiny_hf_model(kind)
    m = _ours(hf, packed=True)
    torch.manual_seed(2)
    toks = torch.randint(0, hf.config.vocab_size, (1, 48))
    with torch.no_grad():
        ref = hf(toks).logits[0]  # [48, V]
        cache = KVCache(m.cfg, capacity=64)
        m.prefill(toks[:, :37], cache, chunk=5)
        outs = []
        for t in range(37, 48):
            h = m(toks[:, t : t + 1], torch.tensor([[t]]), cache)
            outs.append(m.logits(h[0, -1]))
    assert cache.length == 48
    assert (torch.stack(outs) - ref[37:]).abs().max().item() <= TOL


def test_hf_directory_loads_through_loader(tiny_dir):
    hf, d = tiny_dir("qwen2")
    loaded = load_model(d, device="cpu")
    assert loaded.tokenizer is None  # a directory without tokenizer files still loads
    toks = torch.randint(0, 96, (1, 20))
    with torch.no_grad():
        diff = (hf(toks).logits - loaded.model.logits(loaded.model(toks, torch.arange(20)[None]))).abs().max()
    assert diff.item() <= TOL


# --- tree masks -------------------------------------------------------------------------------

# A trie under a root (node 0): parents of nodes 1..7. Depth = distance to the root.
PARENTS = [-1, 0, 0, 1, 1, 2, 3, 3]


def _depths(parents):
    d = []
    for i, p in enumerate(parents):
        d.append(0 if p < 0 else d[p] + 1)
    return d


def _ancestors_mask(parents) -> torch.Tensor:
    T = len(parents)
    m = torch.zeros(T, T, dtype=torch.bool)
    for i in range(T):
        j = i
        while j >= 0:
            m[i, j] = True
            j = parents[j]
    return m


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
@pytest.mark.parametrize("form", ["block", "full"])
def test_tree_mask_gives_each_node_its_path_logits(kind, form):
    hf = tiny_hf_model(kind)
    m = _ours(hf, packed=True)
    torch.manual_seed(3)
    V = hf.config.vocab_size
    prefix = torch.randint(0, V, (1, 30))
    nodes = torch.randint(0, V, (1, len(PARENTS)))
    depth = torch.tensor(_depths(PARENTS))
    block = _ancestors_mask(PARENTS)
    n = prefix.shape[1]
    with torch.no_grad():
        cache = KVCache(m.cfg, capacity=64)
        m.prefill(prefix, cache)
        mask = block if form == "block" else torch.cat([torch.ones(len(PARENTS), n, dtype=torch.bool), block], 1)
        tree = m.logits(m(nodes, (n + depth)[None], cache, mask=mask))[0]  # [T, V]
        for i in range(len(PARENTS)):
            path = []
            j = i
            while j >= 0:
                path.append(j)
                j = PARENTS[j]
            path.reverse()
            seq = torch.cat([prefix[0], nodes[0, path]])[None]
            alone = hf(seq).logits[0, -1]
            assert (tree[i] - alone).abs().max().item() <= TOL, f"node {i} (path {path})"


def test_mask_shape_errors_name_the_shape():
    hf = tiny_hf_model("llama")
    m = _ours(hf, packed=False)
    with pytest.raises(ValueError, match=r"mask shape \(3, 5\)"):
        m(torch.zeros(1, 3, dtype=torch.long), torch.arange(3)[None], mask=torch.ones(3, 5, dtype=torch.bool))


# --- KVCache ----------------------------------------------------------------------------------


def test_keep_then_decode_equals_prefill_of_kept_tokens():
    """Verify-style: 6 tree tokens appended, the accepted path (indices 0, 2, 4) kept."""
    hf = tiny_hf_model("llama")
    m = _ours(hf, packed=True)
    torch.manual_seed(4)
    V = hf.config.vocab_size
    prefix = torch.randint(0, V, (1, 25))
    n = prefix.shape[1]
    parents = [-1, 0, 0, 1, 2, 2]  # path 0 -> 2 -> 4 is "accepted"
    nodes = torch.randint(0, V, (1, 6))
    depth = torch.tensor(_depths(parents))
    nxt = torch.randint(0, V, (1, 1))
    with torch.no_grad():
        cache = KVCache(m.cfg, capacity=64)
        m.prefill(prefix, cache)
        m(nodes, (n + depth)[None], cache, mask=_ancestors_mask(parents))
        cache.keep(torch.tensor([n + 0, n + 2, n + 4]))
        assert cache.length == n + 3
        assert cache.pos[: cache.length].tolist() == list(range(n + 3))
        got = m.logits(m(nxt, torch.tensor([[n + 3]]), cache))[0, -1]

        fresh = KVCache(m.cfg, capacity=64)
        kept = torch.cat([prefix, nodes[:, [0, 2, 4]], nxt], 1)
        want = m.logits(m.prefill(kept, fresh))[0]
    assert (got - want).abs().max().item() <= TOL
    assert (got - hf(kept).logits[0, -1]).abs().max().item() <= TOL


def test_keep_and_truncate_validate_arguments():
    hf = tiny_hf_model("llama")
    cfg = ModelConfig.from_hf(hf.config.to_dict())
    c = KVCache(cfg, capacity=16)
    c.length = 10
    with pytest.raises(ValueError, match="ascending"):
        c.keep(torch.tensor([5, 4]), start=3)
    with pytest.raises(ValueError, match=r"\[3, 10\)"):
        c.keep(torch.tensor([3, 12]))
    with pytest.raises(ValueError, match="to 11"):
        c.truncate(11)
    c.keep(torch.tensor([], dtype=torch.long), start=7)
    assert c.length == 7


# --- the embedded SmolLM2 -----------------------------------------------------------------------


def test_smollm2_logits_match_transformers_gguf(smollm, hf_smollm):
    torch.manual_seed(5)
    toks = torch.randint(0, smollm.config.vocab_size, (1, 256))
    with torch.no_grad():
        ref = hf_smollm(toks).logits
        out = smollm.model.logits(smollm.model(toks, torch.arange(256)[None]))
    assert (ref - out).abs().max().item() <= 1e-3


def test_smollm2_greedy_matches_transformers_generate(smollm, hf_smollm, cdne_ids):
    prompt = cdne_ids[:512]
    with torch.no_grad():
        ref = hf_smollm.generate(torch.tensor([prompt]), max_new_tokens=64, min_new_tokens=64,
                                 do_sample=False, pad_token_id=2)[0, len(prompt):].tolist()
    ours = smollm.generate(prompt, 64, method="ar", temperature=0, ignore_eos=True).tokens
    assert ours == ref
