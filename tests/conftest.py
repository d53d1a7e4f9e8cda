from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("TOKENSWIFT_DATA", REPO.parent / "shared" / "data"))

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def cdne_text() -> str:
    path = DATA / "cdne.txt"
    if not path.is_file():
        pytest.fail(f"{path} is missing: the tests read ../shared/data (or set TOKENSWIFT_DATA)")
    return path.read_text(encoding="utf-8")


# --- tiny random Hugging Face models --------------------------------------------------------

TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)


def tiny_hf_config(kind: str, **override):
    """A small transformers config for each architecture/RoPE case the decoder supports."""
    import transformers as tf

    if override:
        cfg = tiny_hf_config(kind)
        for k, v in override.items():
            setattr(cfg, k, v)
        return cfg

    if kind == "llama":
        return tf.LlamaConfig(**TINY)
    if kind == "llama-bias":
        return tf.LlamaConfig(**TINY, attention_bias=True, mlp_bias=True)
    if kind == "llama-tied":
        return tf.LlamaConfig(**TINY, tie_word_embeddings=True)
    if kind == "llama-mha":
        return tf.LlamaConfig(**{**TINY, "num_key_value_heads": 4})
    if kind == "llama3":
        return tf.LlamaConfig(**{**TINY, "max_position_embeddings": 64}, rope_parameters={
            "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16})
    if kind == "yarn":
        return tf.LlamaConfig(**{**TINY, "max_position_embeddings": 64}, rope_parameters={
            "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16})
    if kind == "linear":
        return tf.LlamaConfig(**TINY, rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0})
    if kind == "dynamic":
        # max_position 32 < the 48-token test sequences, so the NTK rescaling is exercised
        return tf.LlamaConfig(**{**TINY, "max_position_embeddings": 32},
                              rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0})
    if kind == "qwen2":
        return tf.Qwen2Config(**TINY)
    if kind == "qwen3":
        return tf.Qwen3Config(**TINY, head_dim=24)  # q/k width != hidden size, as in real Qwen3
    if kind == "mistral":
        return tf.MistralConfig(**TINY, sliding_window=None)
    if kind == "mistral-window":
        return tf.MistralConfig(**TINY, sliding_window=16)
    raise KeyError(kind)


ARCH_CASES = ["llama", "llama-bias", "llama-tied", "llama-mha", "llama3", "yarn", "linear", "dynamic",
              "qwen2", "qwen3", "mistral", "mistral-window"]


def tiny_hf_model(kind: str, seed: int = 0, scale: float = 0.08, **override):
    """A transformers model with every weight random (norms around 1), float32, eval mode.
    A larger `scale` gives peakier next-token distributions."""
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tiny_hf_config(kind, **override)
    model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(scale * torch.randn_like(p))
    return model


def write_foreign_gguf(path, arch: str = "gpt2") -> None:
    """A minimal GGUF file of an architecture the decoder does not implement (one tensor)."""
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture
def tiny_dir(tmp_path):
    """Factory: saves a tiny random model as a HF directory (safetensors, no tokenizer)."""

    def make(kind: str = "llama", seed: int = 0):
        model = tiny_hf_model(kind, seed)
        d = tmp_path / f"{kind}-{seed}"
        model.save_pretrained(d, safe_serialization=True)
        return model, d

    return make


@pytest.fixture
def tiny_plain(tmp_path):
    """A tiny random Llama as the training code loads it: `load_model(..., pack=False)`."""
    from tokenswift.loading import load_model

    hf = tiny_hf_model("llama", seed=3, scale=0.3)
    d = tmp_path / "tiny"
    hf.save_pretrained(d)
    return load_model(str(d), device="cpu", pack=False)


# --- the embedded default model ------------------------------------------------------------


@pytest.fixture(scope="session")
def smollm():
    import tokenswift
    from tokenswift.loading import embedded_path

    try:
        embedded_path("smollm2-135m")
    except FileNotFoundError as e:
        pytest.skip(str(e))
    return tokenswift.load("smollm2-135m", device="cpu")


@pytest.fixture(scope="session")
def hf_smollm(smollm):
    """transformers' own model from the same GGUF: the reference."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        str(smollm.source.parent), gguf_file=smollm.source.name, dtype=torch.float32
    ).eval()


@pytest.fixture(scope="session")
def cdne_ids(smollm):
    return smollm.tokenizer(cdne_text()).input_ids
