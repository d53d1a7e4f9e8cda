"""Draft-head files: round trip, identity checks, damaged files."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import tokenswift
from conftest import tiny_hf_model
from tokenswift.heads import DraftHeads, load_heads, model_identity, random_heads, save_heads


@pytest.fixture
def two_models(tmp_path):
    out = []
    for kind, seed in (("llama", 0), ("llama", 1)):
        hf = tiny_hf_model(kind, seed=seed)
        d = tmp_path / f"m{seed}"
        hf.save_pretrained(d)
        out.append((tokenswift.load(str(d), heads="none"), d))
    return out


def test_round_trip_preserves_weights_and_draft_logits(two_models, tmp_path):
    (lm, _), _ = two_models
    heads = random_heads(lm.model, 3, scale=0.05)
    path = tmp_path / "h.safetensors"
    save_heads(heads, path, model_identity(lm.model, "tiny-a"), extra={"steps": 7}, dtype=torch.float32)
    back = load_heads(path, lm.model, "tiny-a")
    assert back.num_heads == 3 and back.meta["steps"] == 7
    h0 = torch.randn(64)
    assert torch.allclose(heads.draft_logits(lm.model, h0), back.draft_logits(lm.model, h0), atol=1e-5)
    # the base row is the model's own next-token prediction
    assert torch.allclose(back.draft_logits(lm.model, h0)[0], lm.model.logits(h0), atol=1e-5)


def test_heads_of_another_model_are_refused_naming_both(two_models, tmp_path):
    (lm_a, _), (lm_b, _) = two_models
    path = tmp_path / "h.safetensors"
    save_heads(random_heads(lm_a.model, 2), path, model_identity(lm_a.model, "tiny-a"))
    with pytest.raises(ValueError) as e:
        load_heads(path, lm_b.model, "tiny-b")
    msg = str(e.value)
    assert "trained for model 'tiny-a' (hidden 64, vocab 96, 2 layers)" in msg
    assert "not for the loaded model 'tiny-b'" in msg
    assert "correlation" in msg


def test_heads_through_load_and_cli_paths(two_models, tmp_path):
    (lm, d), _ = two_models
    path = tmp_path / "h.safetensors"
    save_heads(random_heads(lm.model, 3), path, model_identity(lm.model, "tiny"))
    with_heads = tokenswift.load(str(d), heads=str(path))
    assert with_heads.heads is not None and with_heads.heads.num_heads == 3
    assert tokenswift.load(str(d), heads="auto").heads is None  # nothing shipped for this model
    assert tokenswift.load(str(d), heads="none").heads is None


@pytest.mark.parametrize("damage,msg", [
    ("garbage", "not a readable safetensors file"),
    ("foreign", "is not a tokenswift draft heads file"),
    ("shape", "tensor 'weight' is (3, 64, 32), expected (3, 64, 64)"),
    ("nan", "holds NaN or infinite values"),
])
def test_damaged_heads_files(two_models, tmp_path, damage, msg):
    (lm, _), _ = two_models
    path = tmp_path / "h.safetensors"
    if damage == "garbage":
        path.write_bytes(b"\x00\x01not safetensors at all" * 10)
    elif damage == "foreign":
        save_file({"x": torch.zeros(2)}, str(path), metadata={"format": "pt"})
    else:
        heads = random_heads(lm.model, 3)
        save_heads(heads, path, model_identity(lm.model, "tiny"), dtype=torch.float32)
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta, t = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
        if damage == "shape":
            t["weight"] = t["weight"][:, :, :32].contiguous()
        else:
            t["norm_in"][0, 0] = float("nan")
        save_file(t, str(path), metadata=meta)
    with pytest.raises(ValueError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        load_heads(path, lm.model, "tiny")


def test_zero_heads_predict_like_the_base():
    """Zero-initialised heads (training's start) repeat the base state: a sane starting point."""
    hf = tiny_hf_model("llama")
    from tokenswift.config import ModelConfig
    from tokenswift.model import Decoder

    m = Decoder(ModelConfig.from_hf(hf.config.to_dict()))
    m.load_tensors(hf.state_dict())
    heads = DraftHeads(64, 2, m.cfg.rms_norm_eps)
    with torch.no_grad():
        heads.norm_out.copy_(m.norm.expand(2, -1))
    h0 = torch.randn(64)
    rows = heads.draft_logits(m, h0)
    assert torch.allclose(rows[1], rows[0], atol=1e-5) and torch.allclose(rows[2], rows[0], atol=1e-5)


def test_shipped_heads_load_for_the_default_model_by_auto(smollm):
    from tokenswift.heads import shipped_heads_path

    path = shipped_heads_path("smollm2-135m")
    assert path is not None and path.stat().st_size < 8 * 2**20  # float16, a few MB
    assert smollm.heads is not None and smollm.heads.num_heads == 3
    assert smollm.heads.meta["path"] == str(path)
    # shipped heads draft better than chance: head 1's top-3 on cdne text holds token t+2 often
    from conftest import cdne_text
    from tokenswift.train import head_accuracy, pick_windows, tokenize

    windows = pick_windows(tokenize(smollm.tokenizer, [cdne_text()]), 256, 4, seed=0)
    acc = head_accuracy(smollm.model, smollm.heads, windows)
    assert acc.top3[0] > 0.1, acc
