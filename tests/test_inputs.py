"""One input contract for the Python API and the CLI (the server's column is in test_server.py):
every bad input below — hostile ones included: values that overflow or underflow, shapes that
would size gigabytes of work, text that is not Unicode, hand-edited config.json files and
checkpoints, paths that cannot be written — gets a message that names the offending value. The
API raises ValueError / FileNotFoundError; the CLI prints that message as one line (flags
instead of keyword names) and exits 2, with no traceback, nothing on stdout, nothing left
behind."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys

import pytest
import torch

import tokenswift
from conftest import tiny_hf_model, write_foreign_gguf
from tokenswift import kernels
from tokenswift.cli import main
from tokenswift.heads import model_identity, random_heads, save_heads


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    (d / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    (d / "long.txt").write_text("word " * 9000, encoding="utf-8")
    (d / "garbage.safetensors").write_bytes(b"\x00\x01not safetensors at all" * 10)
    # heads trained for another model (a tiny random one): refused for SmolLM2
    tiny = tiny_hf_model("llama")
    tiny.save_pretrained(d / "tiny", safe_serialization=True)
    lm = tokenswift.load(str(d / "tiny"), heads="none")
    save_heads(random_heads(lm.model, 2), d / "tiny-heads.safetensors", model_identity(lm.model, "tiny"),
               dtype=torch.float32)
    # a GGUF of an architecture the decoder does not implement
    write_foreign_gguf(d / "gpt2.gguf", "gpt2")
    # a model directory holding only pickle weights: never loaded
    (d / "pickled").mkdir()
    (d / "pickled" / "config.json").write_text((d / "tiny" / "config.json").read_text())
    (d / "pickled" / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    # the tiny model's weights under a hand-edited config.json
    for name, field, value in [("heads0", "num_attention_heads", 0), ("hidden-64", "hidden_size", -64),
                               ("hidden1e7", "hidden_size", 10_000_000), ("hiddenabc", "hidden_size", "abc"),
                               ("hidden128", "hidden_size", 128)]:
        shutil.copytree(d / "tiny", d / name)
        cfg = json.loads((d / name / "config.json").read_text())
        cfg[field] = value
        (d / name / "config.json").write_text(json.dumps(cfg))
    return d


# name, API call (lm, dir) -> anything, API message, CLI arguments of `generate`, CLI message
# the default run drafts over an int8 copy of the cache where the native kernels run: the memory
# check counts it (0.27 of the float32 cache)
_COPY = " and its int8 copy for the draft 91.2 GiB" if kernels.native() else ""

CONTRACT = [
    ("max tokens 0", lambda lm, d: lm.generate("hi", 0), "max_new_tokens must be an integer >= 1, got 0",
     ["--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens must be an integer >= 1, got 0"),
    ("max tokens negative", lambda lm, d: lm.generate("hi", -3), "max_new_tokens must be an integer >= 1, got -3",
     ["--prompt", "hi", "--max-new-tokens", "-3"], "--max-new-tokens must be an integer >= 1, got -3"),
    ("temperature < 0", lambda lm, d: lm.generate("hi", 4, temperature=-0.5),
     "temperature must be 0 (greedy) or in [0.0001, 100], got -0.5",
     ["--prompt", "hi", "--temperature", "-0.5"], "--temperature must be 0 (greedy) or in [0.0001, 100], got -0.5"),
    ("temperature that underflows the sampler", lambda lm, d: lm.generate("hi", 4, temperature=1e-300),
     "temperature must be 0 (greedy) or in [0.0001, 100], got 1e-300",
     ["--prompt", "hi", "--temperature", "1e-300"], "--temperature must be 0 (greedy) or in [0.0001, 100], got 1e-300"),
    ("penalty that underflows the sampler", lambda lm, d: lm.generate("hi", 4, penalty=1e-300),
     "penalty must be in [0.0001, 10000] (1 = off), got 1e-300",
     ["--prompt", "hi", "--repetition-penalty", "1e-300"],
     "--repetition-penalty must be in [0.0001, 10000] (1 = off), got 1e-300"),
    ("top_p 0", lambda lm, d: lm.generate("hi", 4, top_p=0.0), "top_p must be in (0, 1], got 0.0",
     ["--prompt", "hi", "--top-p", "0"], "--top-p must be in (0, 1], got 0.0"),
    ("top_p > 1", lambda lm, d: lm.generate("hi", 4, top_p=1.5), "top_p must be in (0, 1], got 1.5",
     ["--prompt", "hi", "--top-p", "1.5"], "--top-p must be in (0, 1], got 1.5"),
    ("min_p 1", lambda lm, d: lm.generate("hi", 4, min_p=1.0), "min_p must be in [0, 1), got 1.0",
     ["--prompt", "hi", "--min-p", "1"], "--min-p must be in [0, 1), got 1.0"),
    ("min_p < 0", lambda lm, d: lm.generate("hi", 4, min_p=-0.1), "min_p must be in [0, 1), got -0.1",
     ["--prompt", "hi", "--min-p", "-0.1"], "--min-p must be in [0, 1), got -0.1"),
    ("penalty 0", lambda lm, d: lm.generate("hi", 4, penalty=0.0), "penalty must be in [0.0001, 10000] (1 = off), got 0.0",
     ["--prompt", "hi", "--repetition-penalty", "0"], "--repetition-penalty must be in [0.0001, 10000] (1 = off), got 0.0"),
    ("penalty < 0", lambda lm, d: lm.generate("hi", 4, penalty=-1.2),
     "penalty must be in [0.0001, 10000] (1 = off), got -1.2",
     ["--prompt", "hi", "--repetition-penalty", "-1.2"],
     "--repetition-penalty must be in [0.0001, 10000] (1 = off), got -1.2"),
    ("draft budget past any memory", lambda lm, d: lm.generate("hi", 4, draft_budget=10**20),
     "draft_budget must be an integer in [64, 16777216], got 100000000000000000000",
     ["--prompt", "hi", "--draft-budget", "100000000000000000000"],
     "--draft-budget must be an integer in [64, 16777216], got 100000000000000000000"),
    ("n-gram top-k past any vocabulary", lambda lm, d: lm.generate("hi", 4, ngram_topk=10**20),
     "ngram_topk must be an integer in [0, 100000], got 100000000000000000000",
     ["--prompt", "hi", "--ngram-topk", "100000000000000000000"],
     "--ngram-topk must be an integer in [0, 100000], got 100000000000000000000"),
    ("tree of 10^8 paths", lambda lm, d: lm.generate("hi", 4, tree="100,100,100,100"),
     "bad tree '100,100,100,100': more than 4096 nodes",
     ["--prompt", "hi", "--tree", "100,100,100,100"], "bad --tree '100,100,100,100': more than 4096 nodes"),
    ("tree rank 1e400", lambda lm, d: lm.generate("hi", 4, tree="[[1e400]]"),
     "bad tree '[[1e400]]': path [inf]: ranks must be integers in [0, 1024)",
     ["--prompt", "hi", "--tree", "[[1e400]]"], "bad --tree '[[1e400]]': path [inf]: ranks must be integers"),
    ("tree rank 10^8", lambda lm, d: lm.generate("hi", 4, tree="[[100000000]]"),
     "ranks must be integers in [0, 1024)",
     ["--prompt", "hi", "--tree", "[[100000000]]"], "bad --tree '[[100000000]]': path [100000000]: ranks must be"),
    ("tree rank NaN", lambda lm, d: lm.generate("hi", 4, tree="[[NaN]]"), "bad tree '[[NaN]]': path [nan]",
     ["--prompt", "hi", "--tree", "[[NaN]]"], "bad --tree '[[NaN]]': path [nan]: ranks must be integers"),
    ("lone surrogate in the prompt", lambda lm, d: lm.generate("a\ud800b", 2),
     "the prompt is not valid Unicode text: lone surrogate '\\ud800' at character 1",
     # what Python makes of the byte 0xff in argv
     ["--prompt", "abc\udcff"], "the prompt is not valid Unicode text: lone surrogate '\\udcff' at character 3"),
    ("RoPE factor inf", lambda lm, d: tokenswift.load(rope_scaling="yarn:inf"),
     "bad RoPE scaling 'yarn:inf': the factor must be in (1, 1024]",
     ["--prompt", "hi", "--rope-scaling", "yarn:inf"], "bad RoPE scaling 'yarn:inf': the factor must be in (1, 1024]"),
    ("a KV cache larger than memory", lambda lm, d: tokenswift.load(rope_scaling="yarn:1024").generate("hi", 8_000_000),
     f"max_new_tokens (8000000) needs a KV cache of 343.3 GiB{_COPY}, more than the",
     ["--prompt", "hi", "--rope-scaling", "yarn:1024", "--max-new-tokens", "8000000"],
     f"--max-new-tokens (8000000) needs a KV cache of 343.3 GiB{_COPY}, more than the"),
    ("unknown device", lambda lm, d: tokenswift.load(device="foo"),
     "device 'foo' is not a device name; use cpu, cuda or cuda:N",
     ["--prompt", "hi", "--device", "foo"], "device 'foo' is not a device name; use cpu, cuda or cuda:N"),
    ("meta device", lambda lm, d: tokenswift.load(device="meta"), "device 'meta' is not supported",
     ["--prompt", "hi", "--device", "meta"], "device 'meta' is not supported"),
    ("config.json with 0 attention heads", lambda lm, d: tokenswift.load(str(d / "heads0")),
     "config.json field num_attention_heads must be an integer in [1, 1024], got 0",
     ["--prompt", "hi", "--model", "{d}/heads0"],
     "config.json field num_attention_heads must be an integer in [1, 1024], got 0"),
    ("config.json with a negative width", lambda lm, d: tokenswift.load(str(d / "hidden-64")),
     "config.json field hidden_size must be an integer in [1, 65536], got -64",
     ["--prompt", "hi", "--model", "{d}/hidden-64"], "config.json field hidden_size must be an integer in [1, 65536]"),
    ("config.json with a width of 10^7", lambda lm, d: tokenswift.load(str(d / "hidden1e7")),
     "config.json field hidden_size must be an integer in [1, 65536], got 10000000",
     ["--prompt", "hi", "--model", "{d}/hidden1e7"], "config.json field hidden_size must be an integer in [1, 65536]"),
    ("config.json with a width that is text", lambda lm, d: tokenswift.load(str(d / "hiddenabc")),
     "config.json field hidden_size must be an integer in [1, 65536], got 'abc'",
     ["--prompt", "hi", "--model", "{d}/hiddenabc"], "config.json field hidden_size must be an integer"),
    ("config.json that disagrees with its weights", lambda lm, d: tokenswift.load(str(d / "hidden128")),
     "has shape (96, 64), expected (96, 128)",
     ["--prompt", "hi", "--model", "{d}/hidden128"], "has shape (96, 64), expected (96, 128)"),
    ("prompt longer than the context", lambda lm, d: lm.generate((d / "long.txt").read_text(), 4),
     "prompt (9001 tokens) is longer than the model's context of 8192 tokens",
     ["--prompt-file", "{d}/long.txt", "--max-new-tokens", "4"],
     "prompt (9001 tokens) is longer than the model's context of 8192 tokens"),
    ("prompt + max tokens past the context", lambda lm, d: lm.generate("hi", 9000),
     "exceeds the model's context of 8192 tokens; lower max_new_tokens to 8191",
     ["--prompt", "hi", "--max-new-tokens", "9000"],
     "exceeds the model's context of 8192 tokens; lower --max-new-tokens to 8191"),
    ("non-UTF-8 prompt", lambda lm, d: lm.generate((d / "latin1.txt").read_bytes(), 4),
     "the prompt must be a str or a list of token ids, got bytes",
     ["--prompt-file", "{d}/latin1.txt"], "prompt file {d}/latin1.txt is not UTF-8 (bad byte at offset 3)"),
    ("empty prompt", lambda lm, d: lm.generate("", 4), "the prompt is empty",
     ["--prompt", ""], "the prompt is empty"),
    ("token id outside the vocabulary", lambda lm, d: lm.generate([1, 49152], 4),
     "prompt token id 49152 is outside the vocabulary [0, 49152)", None, None),
    ("unknown model", lambda lm, d: tokenswift.load("no-such-model"), "unknown model 'no-such-model'",
     ["--prompt", "hi", "--model", "no-such-model"], "unknown model 'no-such-model'"),
    ("corrupted heads file", lambda lm, d: tokenswift.load(heads=str(d / "garbage.safetensors")),
     "garbage.safetensors is not a readable safetensors file",
     ["--prompt", "hi", "--method", "tokenswift", "--heads", "{d}/garbage.safetensors"],
     "garbage.safetensors is not a readable safetensors file"),
    ("heads of another model", lambda lm, d: tokenswift.load(heads=str(d / "tiny-heads.safetensors")),
     "were trained for model 'tiny' (hidden 64, vocab 96, 2 layers)",
     ["--prompt", "hi", "--method", "tokenswift", "--heads", "{d}/tiny-heads.safetensors"],
     "were trained for model 'tiny' (hidden 64, vocab 96, 2 layers)"),
    ("missing heads file", lambda lm, d: tokenswift.load(heads=str(d / "none.safetensors")),
     "draft heads file not found: {d}/none.safetensors",
     ["--prompt", "hi", "--method", "tokenswift", "--heads", "{d}/none.safetensors"],
     "draft heads file not found: {d}/none.safetensors"),
    ("GGUF of an unsupported architecture", lambda lm, d: tokenswift.load(str(d / "gpt2.gguf")),
     "unsupported GGUF architecture 'gpt2'",
     ["--prompt", "hi", "--model", "{d}/gpt2.gguf"], "unsupported GGUF architecture 'gpt2'"),
    ("pickle weights", lambda lm, d: tokenswift.load(str(d / "pickled")),
     "(found pytorch_model.bin: pickle files are never loaded)",
     ["--prompt", "hi", "--model", "{d}/pickled"], "(found pytorch_model.bin: pickle files are never loaded)"),
]


@pytest.mark.parametrize("name,call,msg", [(c[0], c[1], c[2]) for c in CONTRACT], ids=[c[0] for c in CONTRACT])
def test_api_names_the_bad_value(smollm, files, name, call, msg):
    with pytest.raises((ValueError, FileNotFoundError)) as e:
        call(smollm, files)
    assert msg.format(d=files) in str(e.value)


CLI_ROWS = [(c[0], c[3], c[4]) for c in CONTRACT if c[3] is not None]


@pytest.mark.parametrize("name,args,msg", CLI_ROWS, ids=[c[0] for c in CLI_ROWS])
def test_cli_one_line_exit_2(files, capsys, name, args, msg):
    # the console entry point itself, in-process (test_cli.py runs it as a subprocess too)
    code = main(["generate", *[a.format(d=files) for a in args]])
    out, err = capsys.readouterr()
    assert code == 2, err
    assert "Traceback" not in err and out == ""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("tokenswift"), err
    assert msg.format(d=files) in lines[0]


# -- resumable runs: the checkpoint file is input too -------------------------------------------

def _checkpoint(**edits):
    from tokenswift.cli import _run_options, build_parser

    options = _run_options(build_parser().parse_args(["generate", "--prompt", "hi", "--max-new-tokens", "2",
                                                      "--method", "ar"]))  # what the CLI saves
    data = {"format": "tokenswift-checkpoint", "version": 1, "prompt": "hi", "prompt_ids": None, "tokens": [],
            "finish_reason": None, "model_fingerprint": None, "options": options}
    for key, value in edits.items():
        *path, last = key.split(".")
        d = data
        for p in path:
            d = d[p]
        d[last] = value
    return data


# edits to a valid checkpoint, and the line `--resume` answers (it names the checkpoint's key)
CHECKPOINTS = [
    ({"options.sampling.top_p": "0.5"}, "checkpoint {p}: options.sampling.top_p must be in (0, 1], got '0.5'"),
    ({"options.spec.gamma": 0}, "checkpoint {p}: options.spec.gamma must be an integer in [1, 64], got 0"),
    ({"options.max_new_tokens": 10**6, "options.method": "tokenswift"},
     "checkpoint {p}: prompt (1 tokens) + options.max_new_tokens (1000000) exceeds the model's context"),
    ({"options.sampling": []}, "checkpoint {p} is damaged: options.sampling must be an object, got []"),
    ({"options.sampling.bogus": 1}, "checkpoint {p}: sampling: "),
    ({"prompt_ids": "xyz"}, "checkpoint {p} is damaged: prompt_ids must be a list of token ids"),
    ({"tokens": [True, False]}, "checkpoint {p} is damaged: tokens must be a list of token ids (integers >= 0), "
                                "got [True, False]"),
    ({"finish_reason": 5}, "checkpoint {p} is damaged: finish_reason must be one of None, eos, length, got 5"),
    ({"tokens": [10**9, 5], "finish_reason": "length"},
     "checkpoint {p} is damaged: tokens[0] = 1000000000 is outside the model's vocabulary [0, 49152)"),
    ({"prompt_ids": []}, "checkpoint {p} is damaged: prompt_ids is empty: a prompt has at least one token"),
    ({"options.chat": "yes"}, "checkpoint {p} is damaged: options.chat must be true or false, got 'yes'"),
    ({"options.compile": 1}, "checkpoint {p} is damaged: options.compile must be true or false, got 1"),
]


@pytest.mark.parametrize("edits,msg", CHECKPOINTS, ids=[next(iter(e)) + str(i) for i, (e, _) in enumerate(CHECKPOINTS)])
def test_hand_edited_checkpoint_is_named_by_its_keys(tmp_path, capsys, edits, msg):
    p = tmp_path / "run.json"
    p.write_text(json.dumps(_checkpoint(**edits)))
    code = main(["generate", "--resume", str(p)])
    out, err = capsys.readouterr()
    assert code == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert msg.format(p=p) in lines[0]


@pytest.mark.parametrize("where,msg", [
    ("{d}", "cannot write the checkpoint {d}: is a directory"),
    ("/proc/run.json", "cannot write the checkpoint /proc/run.json: "),  # a filesystem nobody may write
])
def test_checkpoint_that_cannot_be_written_is_one_line_and_leaves_nothing(tmp_path, capsys, where, msg):
    target = where.format(d=tmp_path)
    before = sorted(p.name for p in tmp_path.parent.iterdir())
    code = main(["generate", "--prompt", "hi", "--max-new-tokens", "2", "--checkpoint", target])
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and "Traceback" not in err, err
    assert msg.format(d=tmp_path) in err.strip() and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.parent.iterdir()) == before  # no .tmp left beside it
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_cuda_without_a_gpu_is_one_line(capsys):
    with pytest.raises(ValueError, match="torch sees no CUDA GPU on this machine; use cpu"):
        tokenswift.load(device="cuda")
    assert main(["generate", "--prompt", "hi", "--device", "cuda:1"]) == 2
    assert "device 'cuda:1': torch sees no CUDA GPU on this machine; use cpu" in capsys.readouterr().err


@pytest.mark.parametrize("name,data,msg", [
    ("200,000 nested [", b"[" * 200_000, "checkpoint {p} is damaged (arrays or objects nested too deeply)"),
    ("a 5,000-digit number", b'{"format": ' + b"7" * 5000 + b"}",
     "checkpoint {p} is damaged (a number of more than 4300 digits)"),
    ("/dev/zero", None, "{p} is not a tokenswift checkpoint: it is larger than 1 MiB"),
])
def test_resume_of_a_hostile_file_is_one_line(tmp_path, capsys, monkeypatch, name, data, msg):
    import tokenswift.checkpoint as cp

    monkeypatch.setattr(cp, "MAX_BYTES", 1 << 20)  # the bound on a checkpoint's size, made small
    p = tmp_path / "run.json"
    if data is None:
        p = "/dev/zero"
    else:
        p.write_bytes(data)
    code = main(["generate", "--resume", str(p)])
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and msg.format(p=p) in lines[0], err


# -- a checkpoint never replaces a file that is not the run's own ---------------------------------

def _refused(capsys, argv, msg):
    code = main(["generate", *argv])
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and msg in lines[0], err


def test_checkpoint_refuses_an_existing_file(tmp_path, capsys):
    chapter = tmp_path / "ch.txt"
    chapter.write_text("My chapter\n")
    _refused(capsys, ["--prompt-file", str(chapter), "--max-new-tokens", "8", "--checkpoint", str(chapter)],
             f"{chapter} exists and is not this run's checkpoint; it is left as it is")
    assert chapter.read_text() == "My chapter\n"
    fifo = tmp_path / "fifo"  # not a regular file (a device node likewise): never replaced
    os.mkfifo(fifo)
    _refused(capsys, ["--prompt", "hi", "--checkpoint", str(fifo)], f"{fifo} exists and is not this run's checkpoint")
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ch.txt", "fifo"]


def test_checkpoint_refuses_another_runs_checkpoint_and_resume_keeps_writing_its_own(tmp_path, capsys):
    path = tmp_path / "run.json"
    path.write_text(json.dumps(_checkpoint()))
    before = path.read_bytes()
    _refused(capsys, ["--prompt", "hi", "--checkpoint", str(path)],
             f"the checkpoint {path} exists and holds another run: continue it with --resume {path}")
    other = tmp_path / "other.json"
    other.write_text("notes")
    _refused(capsys, ["--resume", str(path), "--checkpoint", str(other)], f"{other} exists and is not this run's")
    assert path.read_bytes() == before and other.read_text() == "notes"
    assert main(["generate", "--resume", str(path), "--json"]) == 0  # its own checkpoint: written on
    out = json.loads(capsys.readouterr().out)
    ck = json.loads(path.read_text())
    assert len(out["tokens"]) == 2 and ck["tokens"] == out["tokens"] and ck["finish_reason"] == "length"


def test_checkpoint_kv_refuses_a_foreign_file_beside_it(tmp_path, capsys):
    path, kv = tmp_path / "run.json", tmp_path / "run.json.kv"
    kv.write_bytes(b"my own data")
    _refused(capsys, ["--prompt", "hi", "--checkpoint", str(path), "--checkpoint-kv"],
             f"{kv} exists and is not a tokenswift KV file; it is left as it is")
    assert not path.exists()
    path.write_text(json.dumps(_checkpoint()))
    _refused(capsys, ["--resume", str(path)], f"{kv} exists and is not a tokenswift KV file")
    assert kv.read_bytes() == b"my own data"


# -- prompts are read and tokenized within bounds --------------------------------------------------

def test_prompt_file_that_never_ends_is_refused(capsys):
    _refused(capsys, ["--prompt-file", "/dev/zero"], "prompt file /dev/zero is larger than 64 MiB")


def test_a_long_prompt_is_refused_in_bounded_memory():
    """20 MB of text against an 8K context: refused after one piece is counted, without tokenizing
    it whole (which took 3.2 GB)."""
    code = (
        "import resource, tokenswift\n"
        "lm = tokenswift.load(heads='none')\n"
        "text = 'word ' * 4_000_000\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "try:\n"
        "    lm.encode(text)\n"
        "except ValueError as e:\n"
        "    print(e)\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    message, grown_kb = r.stdout.strip().splitlines()
    assert message.startswith("prompt (more than ") and "longer than the model's context of 8192 tokens" in message
    assert int(grown_kb) < 100 * 1024, f"peak RSS grew {int(grown_kb) >> 10} MiB"
