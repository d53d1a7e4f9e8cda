"""One input contract for the Python API and the CLI (the server's column is in test_server.py):
every bad input below gets a message that names the offending value. The API raises ValueError /
FileNotFoundError; the CLI prints that message as one line (flags instead of keyword names) and
exits 2, with no traceback and nothing on stdout."""

from __future__ import annotations

import pytest
import torch

import tokenswift
from conftest import tiny_hf_model, write_foreign_gguf
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
    return d


# name, API call (lm, dir) -> anything, API message, CLI arguments of `generate`, CLI message
CONTRACT = [
    ("max tokens 0", lambda lm, d: lm.generate("hi", 0), "max_new_tokens must be an integer >= 1, got 0",
     ["--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1, got 0"),
    ("max tokens negative", lambda lm, d: lm.generate("hi", -3), "max_new_tokens must be an integer >= 1, got -3",
     ["--prompt", "hi", "--max-new-tokens", "-3"], "--max-new-tokens must be >= 1, got -3"),
    ("temperature < 0", lambda lm, d: lm.generate("hi", 4, temperature=-0.5),
     "temperature must be >= 0 (0 = greedy), got -0.5",
     ["--prompt", "hi", "--temperature", "-0.5"], "--temperature must be >= 0 (0 = greedy), got -0.5"),
    ("top_p 0", lambda lm, d: lm.generate("hi", 4, top_p=0.0), "top_p must be in (0, 1], got 0.0",
     ["--prompt", "hi", "--top-p", "0"], "--top-p must be in (0, 1], got 0.0"),
    ("top_p > 1", lambda lm, d: lm.generate("hi", 4, top_p=1.5), "top_p must be in (0, 1], got 1.5",
     ["--prompt", "hi", "--top-p", "1.5"], "--top-p must be in (0, 1], got 1.5"),
    ("min_p 1", lambda lm, d: lm.generate("hi", 4, min_p=1.0), "min_p must be in [0, 1), got 1.0",
     ["--prompt", "hi", "--min-p", "1"], "--min-p must be in [0, 1), got 1.0"),
    ("min_p < 0", lambda lm, d: lm.generate("hi", 4, min_p=-0.1), "min_p must be in [0, 1), got -0.1",
     ["--prompt", "hi", "--min-p", "-0.1"], "--min-p must be in [0, 1), got -0.1"),
    ("penalty 0", lambda lm, d: lm.generate("hi", 4, penalty=0.0), "repetition penalty must be > 0 (1 = off), got 0.0",
     ["--prompt", "hi", "--repetition-penalty", "0"], "--repetition-penalty must be > 0 (1 = off), got 0.0"),
    ("penalty < 0", lambda lm, d: lm.generate("hi", 4, penalty=-1.2),
     "repetition penalty must be > 0 (1 = off), got -1.2",
     ["--prompt", "hi", "--repetition-penalty", "-1.2"], "--repetition-penalty must be > 0 (1 = off), got -1.2"),
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


@pytest.mark.parametrize("msg,want", [
    ("top_p must be in (0, 1], got 0.0", "--top-p must be in (0, 1], got 0.0"),
    ("prompt (1 tokens) + max_new_tokens (9000) exceeds; lower max_new_tokens to 8191",
     "prompt (1 tokens) + --max-new-tokens (9000) exceeds; lower --max-new-tokens to 8191"),
    ("repetition penalty must be > 0 (1 = off), got 0.0", "--repetition-penalty must be > 0 (1 = off), got 0.0"),
    ("use --max-new-tokens or seeded runs", "use --max-new-tokens or seeded runs"),  # whole names only
])
def test_library_names_become_cli_flags(msg, want):
    from tokenswift.cli import _cli_names

    assert _cli_names(msg) == want
