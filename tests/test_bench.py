"""`tokenswift bench`: Distinct-n, checkpoint records, equality with ar, outputs, CLI errors."""

from __future__ import annotations

import csv
import json

import pytest
import torch

import tokenswift
from conftest import tiny_hf_model
from tokenswift.bench import distinct_n, run_bench, table, write_csv, write_png
from tokenswift.cli import main
from tokenswift.config import PAPER_SAMPLING, RopeScaling


@pytest.mark.parametrize("tokens, n, want", [
    ([1, 2, 3, 4], 1, 1.0),
    ([1, 1, 1, 1], 1, 0.25),
    ([1, 2, 1, 2, 1], 2, 2 / 4),  # (1,2) (2,1) (1,2) (2,1)
    ([1, 2, 3], 4, 0.0),  # too short
    ([5, 5, 6, 5, 5, 6], 3, 3 / 4),
])
def test_distinct_n(tokens, n, want):
    assert distinct_n(tokens, n) == pytest.approx(want)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-bench")
    tiny_hf_model("llama", seed=1, max_position_embeddings=1024, scale=0.3).save_pretrained(d)
    return tokenswift.load(str(d), heads="none")


def test_bench_records_every_checkpoint_of_one_run(tiny, tmp_path):
    torch.manual_seed(0)
    prompt = torch.randint(0, 96, (64,)).tolist()
    # 130 tokens: runs this long self-draft (SELF_DRAFT_MIN_TOKENS)
    res = run_bench(tiny, prompt, [40, 10, 130], ["tokenswift", "ar", "ngram", "tokenswift-paper"],
                    dict(PAPER_SAMPLING, seed=3))
    assert res["methods"][0] == "ar" and res["lengths"] == [10, 40, 130]
    recs = res["records"]
    assert len(recs) == 4 * 3
    want = tiny.generate(prompt, 130, method="ar", ignore_eos=True, **PAPER_SAMPLING, seed=3).tokens
    for r in recs:
        assert r["same_as_ar"] is True
        assert r["wall_seconds"] > r["decode_seconds"] > 0
        assert r["tokens_per_s"] == pytest.approx(r["length"] / r["wall_seconds"])
        assert r["distinct_2"] == pytest.approx(distinct_n(want[: r["length"]], 2))
        assert r["distinct_2_vs_ar"] == pytest.approx(0.0)  # same tokens, same Distinct-n
        assert r["peak_memory_mib"] > 0
        if r["method"] == "ar":
            assert r["speedup"] == pytest.approx(1.0) and r["depth_acceptance"] is None
        elif r["method"] == "tokenswift":  # the chain's per-depth acceptance, each a share
            assert r["depth_acceptance"] and all(0.0 <= a <= 1.0 for a in r["depth_acceptance"])
    by = {(r["method"], r["length"]): r for r in recs}
    assert by[("ar", 10)]["wall_seconds"] < by[("ar", 130)]["wall_seconds"]  # checkpoints of one run
    assert "auto" in res["runs"]["tokenswift"] and res["runs"]["tokenswift"]["auto"]["changes"]

    write_csv(res, tmp_path / "b.csv")
    rows = list(csv.DictReader(open(tmp_path / "b.csv")))
    assert len(rows) == 12 and {"speedup", "distinct_4", "acceptance_rate", "depth_acceptance"} <= set(rows[0])
    md = table(res)
    assert md.count("\n") == 1 + 12 and "| tokenswift-paper | 130 |" in md
    write_png(res, tmp_path / "b.png")
    assert (tmp_path / "b.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_skips_missing_extras_and_names_bad_methods(tiny, monkeypatch):
    import tokenswift.bench as bench

    monkeypatch.setattr(bench.importlib.util, "find_spec", lambda name: None)
    res = run_bench(tiny, [1, 2, 3], [4], ["ar", "llamacpp"])
    assert "llama-cpp-python is not installed" in res["runs"]["llamacpp"]["skipped"]
    with pytest.raises(ValueError, match="unknown method 'fast'"):
        run_bench(tiny, [1, 2, 3], [4], ["ar", "fast"])
    with pytest.raises(ValueError, match="lengths must be positive"):
        run_bench(tiny, [1, 2, 3], [0], ["ar"])


@pytest.mark.parametrize("kv, rope, want", [
    (torch.float32, None, {"type_k": 0, "type_v": 0}),
    (torch.float16, RopeScaling("yarn", 4.0, 8192), {"type_k": 1, "type_v": 1, "rope_scaling_type": 2,
                                                      "rope_freq_scale": 0.25, "yarn_orig_ctx": 8192}),
    (torch.bfloat16, RopeScaling("linear", 2.0), {"type_k": 30, "type_v": 30, "rope_scaling_type": 1,
                                                   "rope_freq_scale": 0.5}),
])
def test_llamacpp_gets_our_kv_type_and_rope_scaling(kv, rope, want):
    from types import SimpleNamespace

    from tokenswift.bench import llamacpp_options

    lm = SimpleNamespace(model=SimpleNamespace(kv_dtype=kv),
                         config=SimpleNamespace(rope_scaling=rope, max_position_embeddings=8192))
    assert llamacpp_options(lm) == want
    lm.config.rope_scaling = RopeScaling("llama3", 8.0)
    with pytest.raises(ValueError, match="RoPE scaling 'llama3'"):
        llamacpp_options(lm)


def test_a_failing_external_method_keeps_the_other_runs(tiny, monkeypatch):
    """Another project's API changing under us (it did: llama-cpp-python moved the seed) must
    not lose the runs made before it; our own methods' errors still raise."""
    import tokenswift.bench as bench

    def broken(*a, **k):
        raise TypeError("generate() got an unexpected keyword argument 'seed'")

    monkeypatch.setattr(bench, "available", lambda name: None)
    monkeypatch.setattr(bench, "run_llamacpp", broken)
    res = run_bench(tiny, [1, 2, 3], [4], ["ar", "llamacpp", "tokenswift"])
    assert res["runs"]["llamacpp"] == {"skipped": "TypeError: generate() got an unexpected keyword argument 'seed'"}
    assert {r["method"] for r in res["records"]} == {"ar", "tokenswift"}
    monkeypatch.setattr(bench, "run_ours", broken)
    with pytest.raises(TypeError):
        run_bench(tiny, [1, 2, 3], [4], ["ar"])


def test_an_external_method_runs_in_its_own_process_and_its_crash_skips_only_it(tiny, monkeypatch):
    """llama.cpp built for a CPU with AMX segfaulted on prompt batches: a crash in another engine's
    native code must end that method, not the bench. Its process reports progress and results;
    its error or its death is the method's skip reason, and the runs before and after it stay."""
    import os

    import bench_children
    import tokenswift.bench as bench

    seen = []
    recs, tokens, stats = bench.run_isolated(bench_children.finishes, {"name": "llamacpp", "total": 3}, "llamacpp", 3,
                                             lambda name, done, total: seen.append((name, done, total)))
    assert seen == [("llamacpp", 1, 3), ("llamacpp", 2, 3), ("llamacpp", 3, 3)]
    assert tokens == [0, 1, 2] and stats == {"prompt_batch": 1} and recs[0]["pid"] != os.getpid()
    with pytest.raises(bench.ExternalFailure, match=r"^TypeError: generate\(\) got an unexpected keyword"):
        bench.run_isolated(bench_children.fails, {}, "llamacpp", 3)

    def crashing(lm, prompt, lengths, name, sampling, progress=None):
        return bench.run_isolated(bench_children.crashes, {}, name, max(lengths), progress)

    monkeypatch.setattr(bench, "available", lambda name: None)
    monkeypatch.setattr(bench, "run_llamacpp", crashing)
    res = run_bench(tiny, [1, 2, 3], [4], ["ar", "llamacpp", "tokenswift"])
    assert res["runs"]["llamacpp"] == {"skipped": "llamacpp's process ended without a result (killed by SIGSEGV)"}
    assert {r["method"] for r in res["records"]} == {"ar", "tokenswift"}


def test_llamacpp_evaluates_its_prompt_a_token_at_a_time_where_its_build_has_amx(tiny, monkeypatch):
    """What the bench's table says of such a run, from the stats the child returns."""
    import tokenswift.bench as bench

    def amx_run(lm, prompt, lengths, name, sampling, progress=None):
        rec = {"method": name, "length": lengths[0], "wall_seconds": 1.0, "prefill_seconds": 0.5,
               "decode_seconds": 0.5, "tokens_per_s": 4.0, "decode_tokens_per_s": 8.0, "peak_memory_mib": 1.0,
               **{f"distinct_{n}": 0.0 for n in (1, 2, 3, 4)}}
        return [rec], [1] * lengths[0], {"prompt_batch": 1, "prompt_batch_why": "llama.cpp built with AMX"}

    monkeypatch.setattr(bench, "available", lambda name: None)
    monkeypatch.setattr(bench, "run_llamacpp", amx_run)
    res = run_bench(tiny, [1, 2, 3], [4], ["ar", "llamacpp"])
    rec = next(r for r in res["records"] if r["method"] == "llamacpp")
    assert rec["kernels"] == "llama.cpp, prompt a token a batch"
    assert res["runs"]["llamacpp"]["stats"]["prompt_batch"] == 1


def test_each_finished_method_is_handed_over_before_the_next_runs(tiny, monkeypatch):
    """A 16K bench runs for hours: what it finished must survive a stop (Ctrl-C, a crash)."""
    import tokenswift.bench as bench

    seen = []
    res = run_bench(tiny, [1, 2, 3], [4, 6], ["tokenswift", "ar", "ngram"], on_method=seen.append)
    assert [sorted({r["method"] for r in p["records"]}) for p in seen] == [["ar"], ["ar", "tokenswift"]]
    assert all(p["partial"] for p in seen) and "partial" not in res
    assert [r["speedup"] for r in seen[1]["records"] if r["method"] == "ar"] == [1.0, 1.0]

    real = bench.run_ours

    def stopped(lm, prompt, lengths, name, *a):
        if name == "tokenswift":
            raise KeyboardInterrupt
        return real(lm, prompt, lengths, name, *a)

    monkeypatch.setattr(bench, "run_ours", stopped)
    seen.clear()
    with pytest.raises(KeyboardInterrupt):
        run_bench(tiny, [1, 2, 3], [4], ["ar", "tokenswift"], on_method=seen.append)
    assert len(seen) == 1 and {r["method"] for r in seen[0]["records"]} == {"ar"}


def test_same_as_ar_is_judged_per_length_and_the_first_difference_is_kept(tiny, monkeypatch):
    import tokenswift.bench as bench

    real = bench.run_ours

    def one_token_off(lm, prompt, lengths, name, *a):
        recs, tokens, stats = real(lm, prompt, lengths, name, *a)
        if name == "ngram":
            tokens = list(tokens)
            tokens[6] = (tokens[6] + 1) % 96
        return recs, tokens, stats

    monkeypatch.setattr(bench, "run_ours", one_token_off)
    res = run_bench(tiny, [1, 2, 3], [4, 6, 10], ["ar", "ngram", "tokenswift"])
    same = {(r["method"], r["length"]): r["same_as_ar"] for r in res["records"]}
    assert [same[("ngram", L)] for L in (4, 6, 10)] == [True, True, False]
    assert all(same[("tokenswift", L)] for L in (4, 6, 10))
    assert res["runs"]["ngram"]["first_difference"] == 6 and res["runs"]["ngram"]["same_as_ar"] is False
    assert res["runs"]["tokenswift"]["first_difference"] is None


def test_rounds_run_the_methods_round_robin_and_take_medians_of_same_round_ratios(tiny, monkeypatch):
    """A drifting machine slows whole stretches of time: with rounds the methods alternate, and a
    speedup is the median of each round's ratio to the same round's ar, not a ratio of two runs
    taken minutes apart."""
    import tokenswift.bench as bench

    real = bench.run_ours
    calls = []
    # the machine's speed per call: round 0 fast, round 1 three times slower, round 2 fast
    slow = {0: 1.0, 1: 1.0, 2: 3.0, 3: 3.0, 4: 1.0, 5: 1.0}
    cost = {"ar": 2.0, "ngram": 1.0}  # ngram: half ar's decode time in every round

    def timed(lm, prompt, lengths, name, *a):
        recs, tokens, stats = real(lm, prompt, lengths, name, *a)
        k = slow[len(calls)]
        calls.append(name)
        for r in recs:
            r["prefill_seconds"], r["decode_seconds"] = 0.5 * k, cost[name] * k * r["length"] / 10
            r["wall_seconds"] = r["prefill_seconds"] + r["decode_seconds"]
            r["decode_tokens_per_s"] = r["length"] / r["decode_seconds"]
        return recs, tokens, stats

    monkeypatch.setattr(bench, "run_ours", timed)
    seen = []
    phases = []
    res = run_bench(tiny, [1, 2, 3], [5, 10], ["ngram", "ar"], rounds=3, on_method=seen.append,
                    progress=lambda phase, done, total: phases.append(phase) if done == total else None)
    assert calls == ["ar", "ngram"] * 3
    assert phases == [f"{m} (round {r}/3)" for r in (1, 2, 3) for m in ("ar", "ngram")]
    assert res["rounds"] == 3 and len(seen) == 5 and all(p["partial"] for p in seen)
    # saved after round 1's ar: ngram has one round, paired with ar's round 0 only (not with the
    # median of ar's two rounds, one of them slow)
    early = {r["method"]: r for r in seen[2]["records"] if r["length"] == 10}
    assert early["ngram"]["decode_speedup_rounds"] == [2.0] and early["ngram"]["decode_speedup"] == 2.0
    recs = {(r["method"], r["length"]): r for r in res["records"]}
    assert len(recs) == 4
    ng, ar = recs[("ngram", 10)], recs[("ar", 10)]
    assert ng["decode_speedup_rounds"] == [2.0, 2.0, 2.0] and ng["decode_speedup"] == 2.0
    assert ar["decode_speedup"] == 1.0 and ng["rounds"] == 3
    assert ng["decode_seconds_rounds"] == [1.0, 3.0, 1.0] and ng["decode_seconds"] == 1.0  # the median
    assert ng["decode_tokens_per_s"] == 10.0 and ng["decode_tokens_per_s_rounds"] == [10.0, 10 / 3, 10.0]
    assert all(r["same_as_ar"] for r in recs.values())
    assert res["runs"]["ngram"]["rounds"] == 3 and res["runs"]["ngram"]["same_as_ar"] is True


def test_a_difference_in_any_round_is_kept(tiny, monkeypatch):
    import tokenswift.bench as bench

    real = bench.run_ours
    n = {"ngram": 0}

    def second_round_off(lm, prompt, lengths, name, *a):
        recs, tokens, stats = real(lm, prompt, lengths, name, *a)
        if name == "ngram":
            n["ngram"] += 1
            if n["ngram"] == 2:
                tokens = list(tokens)
                tokens[7] = (tokens[7] + 1) % 96
        return recs, tokens, stats

    monkeypatch.setattr(bench, "run_ours", second_round_off)
    res = run_bench(tiny, [1, 2, 3], [4, 10], ["ar", "ngram"], rounds=3)
    same = {(r["method"], r["length"]): r["same_as_ar"] for r in res["records"]}
    assert same[("ngram", 4)] is True and same[("ngram", 10)] is False
    assert res["runs"]["ngram"]["first_difference"] == 7 and res["runs"]["ngram"]["same_as_ar"] is False


@pytest.mark.parametrize("rounds", [0, -1, 1.5, True])
def test_rounds_must_be_a_positive_integer(tiny, rounds):
    with pytest.raises(ValueError, match=f"rounds must be an integer >= 1, got {rounds!r}"):
        run_bench(tiny, [1, 2, 3], [4], ["ar"], rounds=rounds)


def test_transformers_runs_our_sampler(tiny):
    """The hf methods get one logits processor = our penalty + filters, so transformers samples
    the same distribution; and the hf run itself yields checkpoint records."""
    from tokenswift.bench import _sampler_processor, run_hf
    from tokenswift.config import SamplingConfig
    from tokenswift.sampling import final_logprobs

    s = dict(PAPER_SAMPLING, penalty_window=8, seed=0)
    proc = _sampler_processor(s)
    torch.manual_seed(1)
    ids = torch.randint(0, 96, (2, 30))
    scores = torch.randn(2, 96)
    want = final_logprobs(scores, ids[:, -8:], SamplingConfig(**s))
    assert torch.equal(proc(ids, scores), want)
    recs, tokens, _ = run_hf(tiny, list(range(1, 20)), [5, 12], "hf", dict(PAPER_SAMPLING, seed=0))
    assert [r["length"] for r in recs] == [5, 12] and len(tokens) == 12


@pytest.mark.parametrize("argv, msg", [
    (["bench", "--methods", "ar,fast"], "--methods: unknown method 'fast'"),
    (["bench", "--lengths", "2k"], "--lengths must be comma-separated integers, got '2k'"),
    (["bench", "--lengths", "0,5"], "--lengths must be positive"),
    (["bench", "--prompt-file", "/nonexistent/x.txt"], "prompt file /nonexistent/x.txt: No such file"),
    (["bench", "--contexts", "4k"], "--contexts must be comma-separated integers, got '4k'"),
    (["bench", "--kv-dtype", "int8"], "argument --kv-dtype: invalid choice: 'int8'"),
    (["bench", "--rounds", "0"], "--rounds must be >= 1, got 0"),
    (["bench", "--rounds", "two"], "--rounds must be an integer, got 'two'"),
])
def test_bench_cli_errors_are_one_line(argv, msg, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert msg in err and err.count("\n") == 1


@pytest.fixture
def no_work(monkeypatch):
    """A bench that got as far as loading its model fails the test: its checks come first."""
    from tokenswift.bench import BenchSetup

    def load(*a, **kw):
        raise AssertionError("the bench started its work")

    monkeypatch.setattr(BenchSetup, "load", load)


@pytest.mark.parametrize("argv, msg", [
    (["--out", "{f}"], "--out {f} exists and is not a folder"),
    (["--name", "../../x"], "--name must be a file name without a folder (/), got '../../x'"),
    (["--name", ".."], "--name must be a file name without a folder (/), got '..'"),
    (["--out", "{d}", "--name", "taken"], "cannot write {d}/taken.json: is a folder"),
])
def test_bench_checks_its_outputs_before_any_work(tmp_path, capsys, no_work, argv, msg):
    f = tmp_path / "results.txt"
    f.write_text("last week's results")
    (tmp_path / "taken.json").mkdir()
    assert main(["bench", "--methods", "ar", *[a.format(f=f, d=tmp_path) for a in argv]]) == 2
    err = capsys.readouterr().err
    assert msg.format(f=f, d=tmp_path) in err and err.count("\n") == 1, err
    assert f.read_text() == "last week's results"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.txt", "taken.json"]


def test_a_bench_whose_every_method_is_skipped_is_one_line_exit_2(tmp_path, capsys, no_work, monkeypatch):
    import tokenswift.bench as bench

    monkeypatch.setattr(bench, "available", lambda name: "llama-cpp-python is not installed")
    assert main(["bench", "--methods", "llamacpp", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "no method can run here: llamacpp: llama-cpp-python is not installed" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_bench_cli_writes_json_csv_png(tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("The history of the hacker culture, told in many small pieces. " * 20)
    out = tmp_path / "out"
    rc = main(["bench", "--prompt-file", str(text), "--prefix", "32",
               "--lengths", "8,16", "--methods", "ar,tokenswift", "--out", str(out), "--name", "t"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| tokenswift | 16 |" in printed
    res = json.loads((out / "t.json").read_text())
    assert res["prompt_tokens"] == 32 and len(res["records"]) == 4
    assert all(r["same_as_ar"] for r in res["records"])
    assert (out / "t.csv").exists() and (out / "t.png").exists()


def test_bench_cli_rounds(tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("The history of the hacker culture, told in many small pieces. " * 20)
    out = tmp_path / "out"
    rc = main(["bench", "--prompt-file", str(text), "--prefix", "32", "--lengths", "8", "--methods", "ar,ngram",
               "--rounds", "2", "--out", str(out), "--name", "t"])
    assert rc == 0
    assert "the median of 2 rounds" in capsys.readouterr().out
    res = json.loads((out / "t.json").read_text())
    assert res["rounds"] == 2 and all(r["rounds"] == 2 and r["same_as_ar"] for r in res["records"])
    assert all(len(r["decode_speedup_rounds"]) == 2 for r in res["records"])
    with open(out / "t.csv") as f:
        assert [r["rounds"] for r in csv.DictReader(f)] == ["2", "2"]


def test_context_sweep_runs_each_context_side_by_side(tiny, tmp_path):
    from tokenswift.bench import run_sweep, sweep_table, write_sweep_png

    torch.manual_seed(1)
    prompt = torch.randint(0, 96, (96,)).tolist()
    seen = []
    res = run_sweep(tiny, prompt, [96, 32], [20], ["ar", "tokenswift"], dict(PAPER_SAMPLING, seed=2),
                    on_context=lambda r: seen.append(list(r["contexts"])))
    assert res["contexts"] == [32, 96] and seen == [[32]] and "partial" not in res
    recs = {(r["context"], r["method"]): r for r in res["records"]}
    assert set(recs) == {(32, "ar"), (32, "tokenswift"), (96, "ar"), (96, "tokenswift")}
    for C in (32, 96):  # each context's prompt is the first C tokens, and ar is its reference
        want = tiny.generate(prompt[:C], 20, method="ar", ignore_eos=True, **PAPER_SAMPLING, seed=2).tokens
        assert recs[(C, "tokenswift")]["same_as_ar"] is True
        assert recs[(C, "ar")]["decode_speedup"] == pytest.approx(1.0)
        assert res["runs"][str(C)]["ar"]["new_tokens"] == len(want) == 20
    lines = sweep_table(res).splitlines()
    assert len(lines) == 2 + 4 and lines[2].startswith("| 32 | ar | 20 |")
    write_sweep_png(res, tmp_path / "sweep.png")
    assert (tmp_path / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match=r"contexts must lie in \[1, 96\]"):
        run_sweep(tiny, prompt, [200], [8], ["ar"])


def test_a_sweep_runs_its_rounds_at_each_context(tiny):
    from tokenswift.bench import run_sweep, sweep_table

    prompt = list(range(1, 65))
    res = run_sweep(tiny, prompt, [32, 64], [6], ["ar", "tokenswift"], rounds=2)
    assert res["rounds"] == 2 and len(res["records"]) == 4
    assert all(r["rounds"] == 2 and len(r["decode_speedup_rounds"]) == 2 and r["same_as_ar"] for r in res["records"])
    assert len(sweep_table(res).splitlines()) == 2 + 4
    with pytest.raises(ValueError, match="rounds must be an integer >= 1, got 0"):  # before any prefill
        run_sweep(tiny, prompt, [32], [6], ["ar"], rounds=0)


def test_the_sweep_prefills_each_context_once(tiny, monkeypatch):
    """Every method starts from a copy of one prefill per context, bit for bit the cache and
    hidden state a prefill of its own would give; outside the sweep each run prefills."""
    from tokenswift.bench import run_sweep
    from tokenswift.cache import KVCache

    m = tiny.model
    torch.manual_seed(2)
    prompt = torch.randint(0, 96, (70,)).tolist()
    toks = torch.tensor([prompt])
    fresh = KVCache(m.cfg, capacity=90)
    h_fresh = m.prefill(toks, fresh)
    m.prefill_memo = {}
    try:
        m.prefill(toks, KVCache(m.cfg, capacity=90))  # computes and keeps it
        copy = KVCache(m.cfg, capacity=100)
        h_copy = m.prefill(toks, copy)  # a copy
        assert torch.equal(h_copy, h_fresh) and copy.length == 70
        assert torch.equal(copy.k[:, :, :, :70], fresh.k[:, :, :, :70]) and torch.equal(copy.pos[:70], fresh.pos[:70])
        other = KVCache(m.cfg, capacity=100, rope_len=500)  # another RoPE length: computed afresh
        calls = []
        real = type(m).forward
        monkeypatch.setattr(type(m), "forward", lambda self, *a, **kw: calls.append(1) or real(self, *a, **kw))
        m.prefill(toks, other)
        assert calls
    finally:
        m.prefill_memo = None
        monkeypatch.undo()
    passes, inside = [], []
    real_prefill, real_forward = type(m).prefill, type(m).forward

    def prefill(self, t, c, *a, **kw):
        inside.append(0)
        try:
            return real_prefill(self, t, c, *a, **kw)
        finally:
            passes.append(inside.pop())

    def forward(self, *a, **kw):
        if inside:
            inside[-1] += 1
        return real_forward(self, *a, **kw)

    monkeypatch.setattr(type(m), "prefill", prefill)
    monkeypatch.setattr(type(m), "forward", forward)
    res = run_sweep(tiny, prompt, [70], [12], ["ar", "tokenswift"], dict(PAPER_SAMPLING, seed=2))
    assert len(passes) == 2 and passes[0] > 0 and passes[1] == 0  # ar prefilled; tokenswift took the copy
    assert res["records"][1]["same_as_ar"] is True and m.prefill_memo is None


def test_bench_cli_context_sweep(tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("The history of the hacker culture, told in many small pieces. " * 20)
    out = tmp_path / "out"
    rc = main(["bench", "--prompt-file", str(text), "--contexts", "48,24", "--lengths", "8",
               "--methods", "ar,tokenswift", "--kv-dtype", "bfloat16", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| 24 | tokenswift | 8 |" in printed and "| 48 | ar | 8 |" in printed
    res = json.loads((out / "bench-sweep-48-8.json").read_text())
    assert res["contexts"] == [24, 48] and res["kv_dtype"] == "bfloat16"
    assert all(r["same_as_ar"] for r in res["records"] if r["method"] == "tokenswift")
    assert (out / "bench-sweep-48-8.png").exists()
    with open(out / "bench-sweep-48-8.csv") as f:
        assert {r["context"] for r in csv.DictReader(f)} == {"24", "48"}


def test_a_sweep_saves_each_contexts_prefill_and_a_later_sweep_reads_it(tiny, tmp_path, monkeypatch):
    """`--prefill-kv`: the first sweep computes each context's prefill and saves its rows; a later
    one reads them (its prefill passes then cover only each prompt's last token) and writes the
    same tokens; rows saved under other numerics are not read."""
    import tokenswift.bench as bench

    m = tiny.model
    torch.manual_seed(3)
    prompt = torch.randint(0, 96, (80,)).tolist()
    opts = bench.numerics(tiny, None)
    sampling = dict(PAPER_SAMPLING, seed=4)
    written, inside, passes = [], [], []
    real_ours, real_prefill, real_forward = bench.run_ours, type(m).prefill, type(m).forward

    def ours(*a, **kw):
        recs, toks, stats = real_ours(*a, **kw)
        written.append(toks)
        return recs, toks, stats

    def prefill(self, t, c, *a, **kw):
        inside.append(1)
        try:
            return real_prefill(self, t, c, *a, **kw)
        finally:
            inside.pop()

    def forward(self, t, *a, **kw):
        if inside:
            passes.append(t.shape[1])
        return real_forward(self, t, *a, **kw)

    monkeypatch.setattr(bench, "run_ours", ours)
    monkeypatch.setattr(type(m), "prefill", prefill)
    monkeypatch.setattr(type(m), "forward", forward)
    first = bench.run_sweep(tiny, prompt, [40, 80], [10], ["ar", "tokenswift"], sampling, kv_dir=tmp_path, options=opts)
    assert {C: p["rows_read"] for C, p in first["prefills"].items()} == {"40": 0, "80": 0}
    assert sum(passes) == 40 + 80  # each context prefilled once, every method took the copy
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 2 and all(f.startswith("prefill-") and f.endswith(".kv") for f in files)
    passes.clear()
    again = bench.run_sweep(tiny, prompt, [40, 80], [10], ["ar", "tokenswift"], sampling, kv_dir=tmp_path, options=opts)
    assert {C: p["rows_read"] for C, p in again["prefills"].items()} == {"40": 39, "80": 79}
    assert passes == [1, 1]  # the last token of each prompt; the rest came from the files
    assert len(written) == 8 and written[:4] == written[4:] and all(len(t) == 10 for t in written)
    assert all(r["same_as_ar"] for r in again["records"])
    other = bench.run_sweep(tiny, prompt, [40], [10], ["ar"], sampling, kv_dir=tmp_path, options=dict(opts, kv_dtype="x"))
    assert other["prefills"]["40"]["rows_read"] == 0


def test_bench_cli_prefill_kv_needs_contexts(tmp_path, capsys, no_work):
    assert main(["bench", "--prefill-kv", str(tmp_path), "--lengths", "8"]) == 2
    assert "--prefill-kv" in capsys.readouterr().err
    f = tmp_path / "file"
    f.write_text("x")
    assert main(["bench", "--prefill-kv", str(f), "--contexts", "8", "--lengths", "8"]) == 2
    assert "must be a folder" in capsys.readouterr().err
