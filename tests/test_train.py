"""Head training: data order, learning, exact resume, self-distill data == AR, eval, CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import tokenswift
from tokenswift.config import SamplingConfig
from tokenswift.engine import generate_ar
from tokenswift.heads import load_heads
from tokenswift.train import (
    HiddenStore, TrainConfig, batch_indices, fill_text, generate_batch, head_accuracy, lr_at, pick_windows,
    train_heads,
)


@pytest.mark.parametrize("n,bs", [(10, 3), (7, 7), (5, 8)])
def test_batches_walk_seeded_permutations_epoch_by_epoch(n, bs):
    seq = [i for step in range(6) for i in batch_indices(step, bs, n, seed=4)]
    for e in range(len(seq) // n):
        assert sorted(seq[e * n : (e + 1) * n]) == list(range(n))  # each epoch sees every sequence once
    assert seq == [i for step in range(6) for i in batch_indices(step, bs, n, seed=4)]
    assert seq != [i for step in range(6) for i in batch_indices(step, bs, n, seed=5)]


def test_lr_warms_up_then_decays_to_the_floor():
    cfg = TrainConfig(steps=100, lr=1e-3, warmup=0.1, min_lr_ratio=0.1)
    lrs = [lr_at(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lrs[-1] == pytest.approx(1e-4, rel=0.05)


@pytest.mark.parametrize("bad,msg", [
    (dict(steps=0), "steps must be"), (dict(num_heads=0), "num_heads must be"), (dict(lr=-1.0), "lr must be"),
    (dict(seq_len=4), "seq_len must be"), (dict(max_tokens=10), "max_tokens must be"),
    (dict(prompt_len=300, self_distill=True), "prompt_len must be"),
])
def test_bad_training_options_name_the_value(bad, msg):
    with pytest.raises(ValueError, match=msg):
        TrainConfig(**bad)


def test_windows_are_disjoint_and_deterministic():
    docs = [np.arange(0, 100, dtype=np.int32), np.arange(1000, 1050, dtype=np.int32)]
    w = pick_windows(docs, 10, 12, seed=0)
    assert w.shape == (12, 10)
    starts = {int(r[0]) for r in w}
    assert len(starts) == 12 and all(s % 10 == 0 for s in starts)  # whole, non-overlapping windows
    assert (pick_windows(docs, 10, 12, seed=0) == w).all()
    assert pick_windows(docs, 10, 99, seed=0).shape == (15, 10)  # capped at what the data holds


def _cyclic_store(loaded, tmp_path, n=24, s=32, period=11):
    """Text where token t+2 is a fixed function of token t: learnable by head 1 from h_t."""
    rng = np.random.default_rng(0)
    cycle = rng.permutation(loaded.model.cfg.vocab_size)[:period]
    windows = np.stack([np.roll(np.resize(cycle, s), -int(o)) for o in rng.integers(0, period, n)]).astype(np.int32)
    cfg = TrainConfig(seq_len=s, max_tokens=n * s, num_heads=2, batch_size=4, steps=150, lr=3e-2, checkpoint_every=10)
    store = HiddenStore(tmp_path / "store", n, s, loaded.model.cfg.hidden_size, cfg.data_key())
    fill_text(store, loaded.model, windows, batch=8, progress=None)
    return store, cfg, windows


def test_training_learns_what_the_base_model_cannot(tiny_plain, tmp_path):
    store, cfg, windows = _cyclic_store(tiny_plain, tmp_path)
    out = tmp_path / "h.safetensors"
    train_heads(tiny_plain.model, store, cfg, out)
    heads = load_heads(out, tiny_plain.model)
    acc = head_accuracy(tiny_plain.model, heads, windows)
    assert acc.top1[0] > 0.9 and acc.top1[1] > 0.9, acc
    assert acc.base_top1 < 0.5  # the random backbone itself does not know the cycle
    assert heads.meta["steps"] == 150


def test_resumed_training_ends_with_the_same_heads(tiny_plain, tmp_path):
    store, cfg, _ = _cyclic_store(tiny_plain, tmp_path)
    cfg6 = TrainConfig(**{**cfg.__dict__, "steps": 6, "checkpoint_every": 3})
    full = tmp_path / "full.safetensors"
    train_heads(tiny_plain.model, store, cfg6, full)
    part = tmp_path / "part.safetensors"

    class Stop(Exception):
        pass

    def stop_after_4(phase, done, total, info):
        if done == 4:  # the checkpoint holds step 3; step 4 is lost, as in a crash
            raise Stop

    with pytest.raises(Stop):
        train_heads(tiny_plain.model, store, cfg6, part, progress=stop_after_4)
    train_heads(tiny_plain.model, store, cfg6, part, resume=True)
    a = load_heads(full, tiny_plain.model)
    b = load_heads(part, tiny_plain.model)
    for name in ("weight", "norm_in", "norm_out"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    # a checkpoint made with other options is refused, naming what differs
    cfg_other = TrainConfig(**{**cfg6.__dict__, "lr": 0.5})
    with pytest.raises(ValueError, match="lr"):
        train_heads(tiny_plain.model, store, cfg_other, part, resume=True)


def test_self_distill_sequences_are_what_ar_writes_for_each_row_seed(tiny_plain):
    model = tiny_plain.model
    prompts = torch.randint(0, model.cfg.vocab_size, (3, 8), generator=torch.Generator().manual_seed(1))
    samplers = [SamplingConfig(seed=100 + r, temperature=1.0, min_p=0.1, min_keep=20, penalty=1.2,
                               penalty_window=16) for r in range(3)]
    buf = np.zeros((3, 40, model.cfg.hidden_size), dtype=np.float16)
    toks = generate_batch(model, prompts, 40, samplers, buf)
    for r in range(3):
        ar = [t for step in generate_ar(model, prompts[r].tolist(), 32, samplers[r], ignore_eos=True) for t in step.tokens]
        assert toks[r, 8:].tolist() == ar
    assert np.abs(buf[:, :39]).sum(-1).min() > 0  # every used position got its hidden state


@pytest.mark.slow
def test_train_and_eval_heads_cli_on_the_embedded_model(tmp_path):
    from tokenswift.loading import embedded_path

    try:
        embedded_path("smollm2-135m")
    except FileNotFoundError as e:
        pytest.skip(str(e))
    from conftest import DATA

    out = tmp_path / "h.safetensors"
    cmd = [sys.executable, "-m", "tokenswift", "train-heads", "--data", str(DATA / "jargon.txt"), "--out", str(out),
           "--steps", "3", "--max-tokens", "2048", "--seq-len", "128", "--batch-size", "2", "--text-targets",
           "--cache-dir", str(tmp_path / "cache")]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stderr.strip().splitlines()[-1])["steps"] == 3
    r = subprocess.run([sys.executable, "-m", "tokenswift", "eval-heads", "--heads", str(out), "--data",
                        str(DATA / "cdne.txt"), "--max-tokens", "1024", "--prompts", "1", "--new-tokens", "16",
                        "--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert len(res["top1"]) == 3 and all(0 <= a <= b <= 1 for a, b in zip(res["top1"], res["top3"]))
    assert res["greedy"]["mean_accepted_length"] >= 1.0  # greedy base prediction over the full cache is exact


def test_cli_refuses_bad_training_input_in_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "tokenswift", "train-heads", "--data", str(tmp_path / "nope.txt"),
                        "--out", str(tmp_path / "h.safetensors")], capture_output=True, text=True)
    assert r.returncode == 2 and "data file not found" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ok \xff\xfe")
    r = subprocess.run([sys.executable, "-m", "tokenswift", "train-heads", "--data", str(bad), "--steps", "0",
                        "--out", str(tmp_path / "h.safetensors")], capture_output=True, text=True)
    assert r.returncode == 2 and "steps must be an integer >= 1, got 0" in r.stderr


@pytest.mark.parametrize("m,v,chunk", [(1, 7, 4), (10, 33, 3), (64, 50, 64), (65, 50, 16)])
def test_chunked_linear_cross_entropy_matches_autograd(m, v, chunk):
    from tokenswift.train import LinearCrossEntropy

    g = torch.Generator().manual_seed(m * 100 + v)
    w = torch.randn(v, 12, generator=g)
    y = torch.randint(0, v, (m,), generator=g)
    x1 = (3 * torch.randn(m, 12, generator=g)).requires_grad_()
    x2 = x1.detach().clone().requires_grad_()
    loss, hits = LinearCrossEntropy.apply(x1, w, y, chunk)
    (2.5 * loss).backward()
    logits = x2 @ w.T
    ref = torch.nn.functional.cross_entropy(logits, y)
    (2.5 * ref).backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-6)
    assert torch.allclose(x1.grad, x2.grad, atol=1e-6, rtol=1e-4)
    assert int(hits) == int((logits.argmax(-1) == y).sum())
