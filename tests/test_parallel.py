"""Tensor parallelism on CPU (gloo): two processes under torchrun write exactly the tokens of one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tokenswift
from conftest import tiny_hf_model
from tokenswift.config import ModelConfig, PAPER_SAMPLING
from tokenswift.parallel import shard_config, shard_tensors

WORKER = Path(__file__).with_name("tp_worker.py")
PROMPT = [1, 5, 9, 2, 7, 3, 8]
SAMPLERS = [dict(temperature=0.0), dict(PAPER_SAMPLING, seed=5)]
# 200 new tokens: past SELF_DRAFT_MIN_TOKENS, so the int4 self-draft (sharded too) runs
CASES = [dict(prompt=PROMPT, max_new_tokens=200, method=m, **s) for m in ("ar", "tokenswift") for s in SAMPLERS]
CASES.append(dict(prompt=PROMPT, max_new_tokens=120, method="tokenswift", tree="1,3,3", **SAMPLERS[1]))


def _torchrun(n: int, *args: str, env: dict | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", *args]
    e = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, capture_output=True, timeout=timeout, env=e, text=True)


def test_two_processes_write_the_tokens_of_one(tmp_path):
    """Tiny random Llama, Qwen2 and Qwen3 (q/k norms, head_dim != hidden/heads), 2 KV heads split
    one a rank: ar and tokenswift (the int4 self-draft's copy sharded too, and the paper's static
    tree), greedy and seeded, the tokens of one process."""
    dirs = []
    for kind in ("llama", "qwen2", "qwen3"):
        d = tmp_path / kind
        tiny_hf_model(kind, seed=1, scale=0.3).save_pretrained(d, safe_serialization=True)
        dirs.append(str(d))
    out = tmp_path / "out.json"
    r = _torchrun(2, str(WORKER), str(out), json.dumps(CASES), *dirs)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(out.read_text())
    assert got["world"] == 2 and set(got["kv_heads"].values()) == {1}  # each rank held one of the two KV heads
    for d in dirs:
        lm = tokenswift.load(d, device="cpu", heads="none", drafter="none")
        for case, tokens in zip(CASES, got["tokens"][d]):
            c = dict(case)
            want = lm.generate(c.pop("prompt"), c.pop("max_new_tokens"), ignore_eos=True, **c).tokens
            assert tokens == want, (d, case)


def test_a_process_count_that_does_not_divide_the_kv_heads_is_one_line(tmp_path):
    d = tmp_path / "llama"
    tiny_hf_model("llama").save_pretrained(d, safe_serialization=True)  # 2 KV heads
    r = _torchrun(3, "-m", "tokenswift", "generate", "--model", str(d), "--prompt", "hi",
                  "--max-new-tokens", "4", "--device", "cpu")
    assert r.returncode != 0
    assert "tensor parallel over 3 processes needs the model's 2 KV heads to divide evenly" in r.stderr
    assert "src/tokenswift/" not in r.stderr  # no traceback of ours (torchrun reports the exit its own way)


def test_the_cli_prints_from_rank_0_only(smollm, tmp_path):
    """generate under torchrun prints its text once, the text of one process (a tiny random model
    with SmolLM2's tokenizer); bench, which runs in one process, says so in one line."""
    d = tmp_path / "llama"
    tiny_hf_model("llama", scale=0.3, vocab_size=smollm.config.vocab_size).save_pretrained(d, safe_serialization=True)
    smollm.tokenizer.save_pretrained(d)
    args = ["--model", str(d), "--prompt", "The history of the hacker culture", "--max-new-tokens", "150",
            "--device", "cpu", "--paper-defaults", "--seed", "3"]
    r = _torchrun(2, "-m", "tokenswift", "generate", *args)
    assert r.returncode == 0, r.stderr[-3000:]
    one = subprocess.run([sys.executable, "-m", "tokenswift", "generate", *args], capture_output=True, text=True,
                         timeout=240)
    assert one.returncode == 0, one.stderr
    assert r.stdout == one.stdout and len(r.stdout) > 100
    r = _torchrun(2, "-m", "tokenswift", "bench", "--lengths", "8")
    assert r.returncode != 0
    assert "bench runs in one process; under torchrun (WORLD_SIZE 2) tokenswift runs generate and serve" in r.stderr


def test_shards_put_back_together_are_the_model():
    """Slices along heads and MLP columns: concatenated over ranks they are the whole tensors,
    and output-projection biases stay whole (added once, after the all-reduce)."""
    cfg = ModelConfig(arch="llama", vocab_size=10, hidden_size=8, intermediate_size=12, num_layers=1, num_heads=4,
                      num_kv_heads=2, head_dim=2, qkv_bias=True, o_bias=True, mlp_bias=True)
    g = torch.Generator().manual_seed(0)
    p = "model.layers.0."
    shapes = {p + "self_attn.q_proj.weight": (8, 8), p + "self_attn.q_proj.bias": (8,),
              p + "self_attn.k_proj.weight": (4, 8), p + "self_attn.v_proj.weight": (4, 8),
              p + "self_attn.o_proj.weight": (8, 8), p + "self_attn.o_proj.bias": (8,),
              p + "mlp.gate_proj.weight": (12, 8), p + "mlp.up_proj.weight": (12, 8),
              p + "mlp.down_proj.weight": (8, 12), p + "mlp.down_proj.bias": (8,),
              "model.embed_tokens.weight": (10, 8)}
    full = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    parts = [shard_tensors(full, cfg, r, 2) for r in range(2)]
    local = shard_config(cfg, 2)
    assert (local.num_heads, local.num_kv_heads, local.intermediate_size) == (2, 1, 6)
    for k, t in full.items():
        dim = 1 if k.endswith(("o_proj.weight", "down_proj.weight")) else 0
        if k.endswith(("o_proj.bias", "down_proj.bias")) or k.startswith("model.embed"):
            assert all(torch.equal(q[k], t) for q in parts), k
        else:
            assert torch.equal(torch.cat([q[k] for q in parts], dim=dim), t), k
    wide = ModelConfig(arch="llama", vocab_size=10, hidden_size=8, intermediate_size=10, num_layers=1, num_heads=4,
                       num_kv_heads=4, head_dim=2)
    with pytest.raises(ValueError, match="needs the MLP width 10 to divide evenly"):
        shard_config(wide, 4)
