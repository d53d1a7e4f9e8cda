"""The command line, run as a user would: a subprocess, its stdout, stderr and exit code."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def run(*args: str, stdin: bytes | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tokenswift", *args], input=stdin, capture_output=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    (d / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    (d / "long.txt").write_text("word " * 9000, encoding="utf-8")
    (d / "ok.txt").write_text("The story begins", encoding="utf-8")
    return d


# CLI-only cases; the input contract shared with the API (and the server) is in test_inputs.py
BAD = [
    (["--prompt", "hi", "--max-new-tokens", "many"], "--max-new-tokens must be an integer, got 'many'"),
    (["--prompt-file", "{d}/missing.txt"], "prompt file not found: {d}/missing.txt"),
    (["--prompt", "hi", "--rope-scaling", "yarn"], "bad RoPE scaling 'yarn': expected TYPE:FACTOR"),
    (["--prompt", "   "], "the prompt is empty"),
    (["--prompt", "hi", "--method", "magic"], "invalid choice: 'magic'"),
    (["--prompt", "hi", "--gamma", "0"], "--gamma must be an integer in [1, 64], got 0"),
    (["--prompt", "hi", "--tree", "3,zero"], "bad --tree '3,zero'"),
    (["--prompt", "hi", "--draft-budget", "8"], "--draft-budget must be an integer in [64, 16777216], got 8"),
    (["--prompt", "hi", "--checkpoint-every", "0"], "--checkpoint-every must be >= 1, got 0"),
    (["--prompt", "hi", "--attention-dtype", "bfloat16", "--kv-dtype", "float16"],
     "--attention-dtype 'bfloat16' computes over a bfloat16 cache, and the KV dtype asked for is float16"),
    (["--resume", "{d}/missing.json"], "checkpoint file not found: {d}/missing.json"),
    (["--resume", "{d}/ok.txt"], "checkpoint {d}/ok.txt is damaged (not JSON"),
]


@pytest.mark.parametrize("args,fragment", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_is_one_line_exit_2(files, args, fragment):
    args = [a.format(d=files) for a in args]
    r = run("generate", *args)
    err = r.stderr.decode()
    assert r.returncode == 2, err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert fragment.format(d=files) in lines[0]
    assert r.stdout == b""


def test_no_prompt_on_a_terminal_is_an_error():
    # stdin is /dev/null here, which is not a terminal: it reads as an empty prompt
    r = subprocess.run([sys.executable, "-m", "tokenswift", "generate"], stdin=subprocess.DEVNULL,
                       capture_output=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.decode().strip() == "tokenswift: error: the prompt is empty"


def test_json_output_matches_the_api(smollm, files):
    r = run("generate", "--prompt-file", str(files / "ok.txt"), "--max-new-tokens", "12", "--temperature", "0",
            "--ignore-eos", "--json")
    assert r.returncode == 0, r.stderr.decode()
    out = json.loads(r.stdout)
    want = smollm.generate("The story begins", 12, method="ar", temperature=0, ignore_eos=True)
    assert out["tokens"] == want.tokens
    assert out["text"] == want.text
    assert out["stats"]["new_tokens"] == 12


def test_streams_text_from_stdin_with_sampling_options(smollm):
    args = ["--max-new-tokens", "20", "--seed", "9", "--paper-defaults", "--ignore-eos"]
    r = run("generate", *args, stdin=b"In the beginning")
    assert r.returncode == 0, r.stderr.decode()
    want = smollm.generate("In the beginning", 20, method="ar", seed=9, ignore_eos=True,
                           temperature=1.0, min_p=0.1, min_keep=20, penalty=1.2, penalty_window=1024)
    assert r.stdout.decode() == want.text + "\n"


def test_tokenswift_method_writes_the_same_text_as_ar(files):
    common = ["generate", "--prompt-file", str(files / "ok.txt"), "--max-new-tokens", "60", "--paper-defaults",
              "--seed", "4", "--ignore-eos", "--json"]
    ar = run(*common)
    ts = run(*common, "--method", "tokenswift", "--draft-budget", "64", "--tree", "1,2,2", "--ngram-topk", "5")
    ng = run(*common, "--method", "ngram", "--no-ngrams")
    assert ar.returncode == ts.returncode == ng.returncode == 0, ts.stderr.decode()
    a, t, n = json.loads(ar.stdout), json.loads(ts.stdout), json.loads(ng.stdout)
    assert t["tokens"] == a["tokens"] and t["text"] == a["text"] and n["tokens"] == a["tokens"]
    assert t["stats"]["method"] == "tokenswift" and t["stats"]["iterations"] < 60
