"""Resumable runs: checkpoint files, --resume, and runs killed at random moments."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from tokenswift.checkpoint import Checkpoint, write_atomic

PROMPT = "Chapter One. The old lighthouse keeper"
# the paper's sampler with a fixed seed: the text is a sample, so equality means the sampling resumed exactly
SAMPLING = dict(temperature=1.0, min_p=0.1, min_keep=20, penalty=1.2, penalty_window=1024)
CLI_SAMPLING = ["--paper-defaults", "--ignore-eos"]


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "tokenswift", "generate", *args]


def _ck(**kw) -> Checkpoint:
    base = dict(options={"max_new_tokens": 10}, prompt="hi", prompt_ids=[1, 2], tokens=[3, 4, 5])
    base.update(kw)
    return Checkpoint(**base)


def test_round_trip_and_no_temp_file_left(tmp_path):
    path = tmp_path / "run.json"
    _ck().save(path)
    _ck(tokens=[3, 4, 5, 6], finish_reason="length").save(path)
    back = Checkpoint.load(path)
    assert back.tokens == [3, 4, 5, 6] and back.finish_reason == "length" and back.prompt_ids == [1, 2]
    assert back.done
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json"]


def test_atomic_write_replaces_whole_files(tmp_path):
    path = tmp_path / "f"
    write_atomic(path, b"old")
    write_atomic(path, b"new contents")
    assert path.read_bytes() == b"new contents"


DAMAGED = [
    ("not json", b"{\"format\": ", "is damaged (not JSON"),
    ("not utf-8", b"\xff\xfe\x00", "is damaged (not UTF-8 (bad byte at offset 0))"),
    ("nested 200,000 deep", b"[" * 200_000, "is damaged (arrays or objects nested too deeply)"),
    ("a 5,000-digit number", b'{"format": "tokenswift-checkpoint", "version": ' + b"9" * 5000 + b"}",
     "is damaged (a number of more than 4300 digits)"),
    ("other json", json.dumps({"hello": 1}).encode(), "is not a tokenswift checkpoint"),
    ("future version", json.dumps({"format": "tokenswift-checkpoint", "version": 99}).encode(),
     "has version 99; this tokenswift reads 1"),
    ("no options", json.dumps({"format": "tokenswift-checkpoint", "version": 1, "prompt": "x"}).encode(),
     "is damaged: options must be an object, got None"),
    ("bad ids", json.dumps({"format": "tokenswift-checkpoint", "version": 1, "prompt": "x",
                            "options": {"max_new_tokens": 5}, "tokens": [1, -2]}).encode(),
     "is damaged: tokens must be a list of token ids (integers >= 0), got [1, -2]"),
    ("too many", json.dumps({"format": "tokenswift-checkpoint", "version": 1, "prompt": "x",
                             "options": {"max_new_tokens": 1}, "tokens": [1, 2]}).encode(),
     "2 tokens > max_new_tokens 1"),
]


@pytest.mark.parametrize("name,data,msg", DAMAGED, ids=[d[0] for d in DAMAGED])
def test_damaged_checkpoints_are_named(tmp_path, name, data, msg):
    path = tmp_path / "ck.json"
    path.write_bytes(data)
    with pytest.raises(ValueError, match=None) as e:
        Checkpoint.load(path)
    assert msg in str(e.value) and str(path) in str(e.value)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint file not found"):
        Checkpoint.load(tmp_path / "nope.json")


def test_resume_from_any_prefix_equals_the_whole_run(smollm, tmp_path):
    want = smollm.generate(PROMPT, 40, method="ar", seed=5, ignore_eos=True, **SAMPLING)
    path = tmp_path / "ck.json"
    r = subprocess.run(_cli("--prompt", PROMPT, "--max-new-tokens", "40", "--seed", "5", *CLI_SAMPLING,
                            "--method", "tokenswift", "--checkpoint", str(path), "--json"),
                       capture_output=True, timeout=300)
    assert r.returncode == 0, r.stderr.decode()
    ck = Checkpoint.load(path)
    assert ck.tokens == want.tokens and ck.finish_reason == "length"
    assert ck.prompt_ids == smollm.encode(PROMPT)
    # cut the saved run at 13 tokens, as if killed there, and continue it
    ck.tokens, ck.finish_reason = ck.tokens[:13], None
    ck.save(path)
    r = subprocess.run(_cli("--resume", str(path), "--json"), capture_output=True, timeout=300)
    assert r.returncode == 0, r.stderr.decode()
    out = json.loads(r.stdout)
    assert out["tokens"] == want.tokens and out["text"] == want.text
    assert out["stats"]["resumed_tokens"] == 13 and out["stats"]["new_tokens"] == 27
    assert Checkpoint.load(path).tokens == want.tokens


@pytest.mark.parametrize("option,value", [("kv_dtype", "bfloat16"), ("attention_dtype", "bfloat16")])
def test_a_resumed_run_keeps_its_kv_dtype(tmp_path, option, value):
    import tokenswift
    from tokenswift import kernels

    if option == "attention_dtype" and not kernels.native():
        pytest.skip(f"bfloat16 attention needs the native kernels: {kernels.why_not()}")
    lm = tokenswift.load("smollm2-135m", **{option: value})
    want = lm.generate(PROMPT, 20, method="ar", seed=2, ignore_eos=True, **SAMPLING)
    path = tmp_path / "ck.json"
    r = subprocess.run(_cli("--prompt", PROMPT, "--max-new-tokens", "20", "--seed", "2", *CLI_SAMPLING,
                            "--" + option.replace("_", "-"), value, "--checkpoint", str(path), "--json"),
                       capture_output=True, timeout=300)
    assert r.returncode == 0, r.stderr.decode()
    ck = Checkpoint.load(path)
    assert ck.options["kv_dtype"] == "bfloat16" and ck.options.get(option) == value and ck.tokens == want.tokens
    ck.tokens, ck.finish_reason = ck.tokens[:7], None
    ck.save(path)
    r = subprocess.run(_cli("--resume", str(path), "--json"), capture_output=True, timeout=300)
    assert r.returncode == 0, r.stderr.decode()
    assert json.loads(r.stdout)["tokens"] == want.tokens


def test_resume_refuses_new_options_and_other_models(tmp_path):
    path = tmp_path / "ck.json"
    _ck(options={"max_new_tokens": 10, "model": "smollm2-135m", "heads": "none", "device": "cpu",
                 "dtype": "float32", "rope_scaling": None, "method": "ar", "chat": False, "ignore_eos": True,
                 "sampling": {"seed": 0}, "spec": {}},
        model_fingerprint={"vocab_size": 7, "hidden_size": 8, "layers": 1, "context_length": 64}).save(path)
    r = subprocess.run(_cli("--resume", str(path), "--seed", "4"), capture_output=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.decode().strip() == f"tokenswift: error: --resume continues with the options saved in {path}; drop --seed"
    r = subprocess.run(_cli("--resume", str(path)), capture_output=True, timeout=120)
    assert r.returncode == 2
    err = r.stderr.decode().strip()
    assert "was written by a model shaped" in err and "'vocab_size': 7" in err and len(err.splitlines()) == 1


def _wait_for_tokens(path, n: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        assert proc.poll() is None, proc.stderr.read().decode()
        try:
            if len(Checkpoint.load(path).tokens) >= n:
                return
        except (FileNotFoundError, ValueError):
            pass
        time.sleep(0.1)
    raise AssertionError(f"no {n} tokens in {path} after {timeout} s")


def test_ctrl_c_leaves_a_valid_checkpoint_and_exit_130(smollm, tmp_path):
    path = tmp_path / "ck.json"
    # long enough to be still running when the signal comes (150 tokens took 1.0 s on a Zen 4 and
    # were done before it), with tokens written past the last every-7 save by then
    n = 400
    want = smollm.generate(PROMPT, n, method="ar", seed=2, ignore_eos=True, **SAMPLING)
    # SIGINT as a terminal's Ctrl-C finds it: a suite started in the background (`cmd &` in a
    # script) hands its children SIGINT ignored, and a CLI run that way rightly keeps ignoring it
    proc = subprocess.Popen(_cli("--prompt", PROMPT, "--max-new-tokens", str(n), "--seed", "2", *CLI_SAMPLING,
                                 "--checkpoint", str(path), "--checkpoint-every", "7", "--stats"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    _wait_for_tokens(path, 7, proc)
    time.sleep(0.3)
    assert proc.poll() is None
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err.decode()
    assert f"tokens saved in {path}: continue with tokenswift generate --resume {path}" in err.decode()
    assert "Traceback" not in err.decode()
    ck = Checkpoint.load(path)
    assert 0 < len(ck.tokens) < n and ck.tokens == want.tokens[: len(ck.tokens)]
    # what was printed is what was saved: the save at exit holds every token written, not only the last
    # every-7 save
    assert out.decode() == smollm.decode(ck.tokens)
    # --stats still reports the interrupted run: one JSON line, counting what it wrote
    stats = json.loads(next(line for line in err.decode().splitlines() if line.startswith("{")))
    assert stats["interrupted"] is True and stats["resumed_tokens"] == 0
    assert 7 <= stats["new_tokens"] <= len(ck.tokens)
    r = subprocess.run(_cli("--resume", str(path), "--json"), capture_output=True, timeout=300)
    assert r.returncode == 0 and json.loads(r.stdout)["tokens"] == want.tokens


def test_an_interrupt_between_a_save_and_the_print_still_prints_every_saved_token(smollm, tmp_path, monkeypatch,
                                                                                   capsys):
    """Ctrl-C landing while a step's tokens are saved, before the CLI printed them (what the
    subprocess test above hit now and then): stdout still ends with the text of every token the
    checkpoint holds."""
    import tokenswift.checkpoint as cp
    from tokenswift import cli

    path = tmp_path / "ck.json"
    real, hit = cp.save_to, []

    def save_then_interrupt(ck, where):
        real(ck, where)
        if len(ck.tokens) >= 7 and not hit:
            hit.append(len(ck.tokens))
            raise KeyboardInterrupt

    monkeypatch.setattr(cp, "save_to", save_then_interrupt)
    rc = cli.main(["generate", "--prompt", PROMPT, "--max-new-tokens", "60", "--seed", "2", *CLI_SAMPLING,
                   "--checkpoint", str(path), "--checkpoint-every", "7", "--method", "ar"])
    assert rc == 130 and hit
    ck = Checkpoint.load(path)
    assert len(ck.tokens) == hit[0]  # saved, never yielded to the CLI's loop
    assert capsys.readouterr().out == smollm.decode(ck.tokens)


def _kill_and_resume(smollm, tmp_path, n: int, kills: int, seed: int, span: int):
    """Starts a seeded sampling run with --checkpoint and SIGKILLs it `kills` times, resuming it each
    time: the first kill at a random moment of its first seconds (usually while the model loads),
    the others once the run has saved a random 1..`span` new tokens, after a random pause of up to
    a second (while it generates, possibly while it writes). Counting in tokens, not seconds, keeps
    every kill inside the run however fast this machine generates. The end must equal an
    uninterrupted run."""
    want = smollm.generate(PROMPT, n, method="ar", seed=seed, ignore_eos=True, **SAMPLING)
    path = tmp_path / "ck.json"
    rng = random.Random(seed)
    cmd = _cli("--prompt", PROMPT, "--max-new-tokens", str(n), "--seed", str(seed), *CLI_SAMPLING,
               "--method", "tokenswift", "--checkpoint", str(path), "--checkpoint-every", "8", "--json")
    saved = [0]
    for k in range(kills):
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if k == 0:
            time.sleep(rng.uniform(0.2, 3.0))
        else:
            _wait_for_tokens(path, saved[-1] + rng.randint(1, span), proc, timeout=300)
            time.sleep(rng.uniform(0.0, 1.0))
        assert proc.poll() is None, f"run {k} ended before its kill: {proc.stderr.read().decode()}"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if not path.exists():  # killed before it wrote anything (Python still starting): run it again
            assert k == 0
            continue
        ck = Checkpoint.load(path)  # whole, whatever the moment of the kill
        assert ck.tokens == want.tokens[: len(ck.tokens)]
        saved.append(len(ck.tokens))
        cmd = _cli("--resume", str(path), "--checkpoint-every", "8", "--json")
    assert saved[-1] < n, saved  # the last kill still left work to resume
    r = subprocess.run(cmd, capture_output=True, timeout=1800)
    assert r.returncode == 0, r.stderr.decode()
    out = json.loads(r.stdout)
    assert out["tokens"] == want.tokens and out["text"] == want.text
    assert out["stats"]["resumed_tokens"] == saved[-1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.json"]
    return saved


def test_sigkill_at_random_moments_then_resume_is_identical(smollm, tmp_path):
    _kill_and_resume(smollm, tmp_path, n=200, kills=3, seed=7, span=40)


@pytest.mark.slow
def test_sigkill_2000_tokens_three_times_then_resume_is_identical(smollm, tmp_path):
    _kill_and_resume(smollm, tmp_path, n=2000, kills=3, seed=2000, span=500)


def _kv_run(lm, max_new: int, seed: int = 5, method: str = "tokenswift", **opts):
    from tokenswift.checkpoint import model_fingerprint

    return Checkpoint(options=dict(model="smollm2-135m", max_new_tokens=max_new, method=method, ignore_eos=True,
                                   sampling=dict(SAMPLING, seed=seed), spec={}, **opts),
                      prompt=PROMPT, prompt_ids=lm.encode(PROMPT), model_fingerprint=model_fingerprint(lm.config))


def _cut(ck, lm, path, kv, at: int) -> None:
    """Runs ck until it holds `at` tokens or more, then stops as a Ctrl-C would."""
    from tokenswift.checkpoint import continue_run

    steps = continue_run(ck, lm, path, every=8, kv=kv)
    for _ in steps:
        if len(ck.tokens) >= at:
            break
    steps.close()


@pytest.mark.parametrize("method", ["ar", "tokenswift"])
def test_kv_rows_beside_a_checkpoint_are_the_runs_own_and_a_resume_reads_them(smollm, tmp_path, monkeypatch, method):
    """The rows saved are the bits the run's cache holds (those a prefill of the same text computes),
    a resume loads all of them but the last token's, and writes the uninterrupted run's tokens."""
    import torch

    import tokenswift.checkpoint as cp
    from tokenswift.cache import KVCache

    want = smollm.generate(PROMPT, 60, method=method, seed=5, ignore_eos=True, **SAMPLING)
    path, kv = tmp_path / "ck.json", tmp_path / "ck.json.kv"
    ck = _kv_run(smollm, 60, method=method)
    _cut(ck, smollm, path, kv, 25)
    ck = Checkpoint.load(path)
    ids = ck.prompt_ids + ck.tokens
    m = smollm.model
    ref = KVCache(m.cfg, capacity=len(ids) + 64, dtype=m.kv_dtype, rope_len=len(ck.prompt_ids) + 60)
    m.prefill(torch.tensor([ids]), ref)
    got = KVCache(m.cfg, capacity=len(ids) + 64, dtype=m.kv_dtype, rope_len=len(ck.prompt_ids) + 60)
    n = cp.KVRows(kv, ck).load(torch.tensor(ids), got)
    assert n == len(ids) - 1  # every committed token's row; the last one's K/V are not computed yet
    assert torch.equal(got.k[:, :, :, :n], ref.k[:, :, :, :n]) and torch.equal(got.v[:, :, :, :n], ref.v[:, :, :, :n])

    loaded = []
    real = cp.KVRows.load
    monkeypatch.setattr(cp.KVRows, "load", lambda self, t, c: loaded.append(real(self, t, c)) or loaded[-1])
    steps = cp.continue_run(ck, smollm, path, every=8, kv=kv)
    for _ in steps:
        pass
    assert ck.tokens == want.tokens and loaded == [len(ids) - 1]
    assert not kv.exists()  # the run is over: its rows are removed


def _cut_ar_run(smollm, tmp_path, seed: int):
    """A 40-token ar run with --checkpoint-kv's rows, stopped after 20: the uninterrupted run's
    result, the checkpoint's and rows' paths, and the checkpoint as saved."""
    want = smollm.generate(PROMPT, 40, method="ar", seed=seed, ignore_eos=True, **SAMPLING)
    path, kv = tmp_path / "ck.json", tmp_path / "ck.json.kv"
    _cut(_kv_run(smollm, 40, seed=seed, method="ar"), smollm, path, kv, 20)
    return want, path, kv, Checkpoint.load(path)


def _kv_layout(raw: bytes, rows: int) -> tuple[int, int]:
    """A KV file's header length and row length, given how many rows it holds."""
    from tokenswift.checkpoint import KVRows

    magic = len(KVRows.MAGIC)
    head = magic + 8 + int.from_bytes(raw[magic : magic + 8], "little")
    row = (len(raw) - head) // rows
    assert head + rows * row == len(raw)
    return head, row


def test_kv_rows_that_do_not_match_are_not_used(smollm, tmp_path, monkeypatch):
    import numpy as np
    import torch

    import tokenswift.checkpoint as cp
    from tokenswift.cache import KVCache

    want, path, kv, ck = _cut_ar_run(smollm, tmp_path, seed=7)
    ids = ck.prompt_ids + ck.tokens
    m = smollm.model

    def rows(c):
        cache = KVCache(m.cfg, capacity=len(ids) + 40, dtype=m.kv_dtype, rope_len=len(ck.prompt_ids) + 40)
        return cp.KVRows(kv, c).load(torch.tensor(ids), cache)

    assert rows(ck) == len(ids) - 1
    whole = KVCache(m.cfg, capacity=len(ids) + 40, dtype=m.kv_dtype, rope_len=len(ck.prompt_ids) + 40)
    cp.KVRows(kv, ck).load(torch.tensor(ids), whole)
    monkeypatch.setattr(cp.KVRows, "BLOCK", 7)  # read in blocks of 7 rows (the last one short): the same bits
    blocks = KVCache(m.cfg, capacity=len(ids) + 40, dtype=m.kv_dtype, rope_len=len(ck.prompt_ids) + 40)
    assert cp.KVRows(kv, ck).load(torch.tensor(ids), blocks) == len(ids) - 1
    assert torch.equal(blocks.k, whole.k) and torch.equal(blocks.v, whole.v) and torch.equal(blocks.pos, whole.pos)
    other = Checkpoint.load(path)
    other.options["kv_dtype"] = "bfloat16"  # rows of another cache type
    assert rows(other) == 0
    # a row whose token differs (another continuation): the rows before it are still right
    raw = bytearray(kv.read_bytes())
    head, row = _kv_layout(raw, len(ids) - 1)
    raw[head + 10 * row: head + 10 * row + 8] = np.int64(ids[10] + 1).tobytes()
    kv.write_bytes(bytes(raw[: len(raw) - row // 2]))  # and a torn last row
    assert rows(ck) == 10
    steps = cp.continue_run(ck, smollm, path, every=8, kv=kv)
    for _ in steps:
        pass
    assert ck.tokens == want.tokens


def test_damaged_kv_rows_cost_a_prefill_never_a_different_token(smollm, tmp_path, monkeypatch):
    """Rows whose K/V bytes were overwritten (their token ids intact) fail their checksums: a resume
    uses the rows before the first damaged one, prefills the rest, and writes the uninterrupted
    run's tokens."""
    import torch

    import tokenswift.checkpoint as cp
    from tokenswift.cache import KVCache

    want, path, kv, ck = _cut_ar_run(smollm, tmp_path, seed=9)
    ids = ck.prompt_ids + ck.tokens
    m = smollm.model
    raw = bytearray(kv.read_bytes())
    n = len(ids) - 1  # rows: every committed token's but the last
    head, row = _kv_layout(raw, n)
    kv_bytes = 2 * m.cfg.num_layers * m.cfg.num_kv_heads * m.cfg.head_dim * m.kv_dtype.itemsize
    for r in range(10, n):  # a row's K and V are its last bytes, whatever stands before them
        end = head + (r + 1) * row
        raw[end - kv_bytes : end] = b"\x7b" * kv_bytes  # float16 57,184, float32 1.3e36: no cache holds those
    kv.write_bytes(bytes(raw))
    monkeypatch.setattr(cp.KVRows, "BLOCK", 7)  # damage in the middle of a block, and in blocks after it

    cache = KVCache(m.cfg, capacity=len(ids) + 40, dtype=m.kv_dtype, rope_len=len(ck.prompt_ids) + 40)
    assert cp.KVRows(kv, ck).load(torch.tensor(ids), cache) == 10
    steps = cp.continue_run(ck, smollm, path, every=8, kv=kv)
    for _ in steps:
        pass
    assert ck.tokens == want.tokens
