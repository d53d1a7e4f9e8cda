"""One very long generation in resumable segments, with its figures: the 100K-token run.

    python benchmarks/long_run.py start DIR [--tokens 100000] [generate options...]
    python benchmarks/long_run.py resume DIR        # after a stop, a SIGTERM or a new machine
    python benchmarks/long_run.py summary DIR       # tokens, wall, tok/s, peak RSS, Distinct-n

`start` writes DIR/prompt.txt (a held-out paragraph of cdne.txt) and runs `tokenswift generate`
with `--checkpoint DIR/run.json --checkpoint-kv --stats`; `resume` continues it (the KV rows in
DIR/run.json.kv make that a matter of seconds on the same machine; without them the resume
prefills the text written so far). Each segment leaves DIR/segN.json: its wall time, the tokens
before and after, the child's peak RSS and the run's own stats (printed also when it is
interrupted). Stop a segment with SIGTERM (or Ctrl-C): the checkpoint is saved and the segment
recorded. A segment whose process was stopped (SIGSTOP) for a while can carry that time as
"stopped_s", which the summary subtracts. A DIR holding run.json.gz instead of run.json (the
checkpoint carried between machines, as in benchmarks/long_run_100k/) is unpacked first.
"""

from __future__ import annotations

import argparse
import gzip
import json
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

from tokenswift.bench import distinct_n

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT.parent / "shared" / "data" / "cdne.txt"
DEFAULTS = ["--paper-defaults", "--ignore-eos", "--rope-scaling", "yarn:16", "--kv-dtype", "float16"]


def prompt_text(chars: int = 400) -> str:
    """A paragraph of the held-out corpus, cut at its last full sentence."""
    text = CORPUS.read_text(encoding="utf-8")
    i = text.index("In 1995, most people think")
    p = text[i:i + chars]
    return p[:p.rfind(".") + 1]


def tokens_in(ck: Path) -> int:
    try:
        return len(json.loads(ck.read_text(encoding="utf-8"))["tokens"])
    except (OSError, ValueError, KeyError):
        return 0


def segment(d: Path, args: list[str]) -> int:
    n = 1 + sum(1 for _ in d.glob("seg*.json"))
    ck = d / "run.json"
    before = tokens_in(ck)
    cmd = [sys.executable, "-m", "tokenswift", "-v", "generate", *args]
    t0 = time.time()
    with open(d / f"out{n}.txt", "wb") as out, open(d / f"err{n}.txt", "wb") as err:
        child = subprocess.Popen(cmd, stdout=out, stderr=err)
        # a SIGTERM to this script stops the segment the same way: the child saves and exits 130
        signal.signal(signal.SIGTERM, lambda *_: child.send_signal(signal.SIGTERM))
        try:
            rc = child.wait()
        except KeyboardInterrupt:
            rc = child.wait()
    wall = time.time() - t0
    stats = None
    for line in (d / f"err{n}.txt").read_text(encoding="utf-8", errors="replace").splitlines():
        if line.startswith("{"):
            stats = json.loads(line)
    rec = {"segment": n, "command": cmd[2:], "rc": rc, "start": t0, "wall_s": round(wall, 1),
           "tokens_before": before, "tokens_after": tokens_in(ck),
           "peak_rss_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, "stats": stats}
    (d / f"seg{n}.json").write_text(json.dumps(rec, indent=1) + "\n", encoding="utf-8")
    print(f"segment {n}: {rec['tokens_before']} -> {rec['tokens_after']} tokens in {wall:.0f} s, exit {rc}")
    return rc


def summary(d: Path) -> dict:
    ck = json.loads((d / "run.json").read_text(encoding="utf-8"))
    toks = ck["tokens"]
    segs = sorted((json.loads(p.read_text(encoding="utf-8")) for p in d.glob("seg*.json")),
                  key=lambda s: s["segment"])
    wall = sum(s["wall_s"] - s.get("stopped_s", 0) for s in segs)
    return {
        "tokens": len(toks), "finish_reason": ck.get("finish_reason"), "segments": len(segs),
        "wall_s": round(wall), "wall_h": round(wall / 3600, 2),
        "tokens_per_s": round(len(toks) / wall, 2) if wall else None,
        "peak_rss_gib": round(max(s["peak_rss_kib"] for s in segs) / 2**20, 2) if segs else None,
        "distinct": {n: round(distinct_n(toks, n), 3) for n in (1, 2, 3, 4)},
        "per_segment": [{"segment": s["segment"], "tokens": [s["tokens_before"], s["tokens_after"]],
                         "wall_s": s["wall_s"], "stopped_s": s.get("stopped_s", 0),
                         "decode_tokens_per_s": (s["stats"] or {}).get("decode_tokens_per_s"),
                         "prefill_s": (s["stats"] or {}).get("prefill_seconds")} for s in segs],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("what", choices=["start", "resume", "summary"])
    ap.add_argument("dir", type=Path)
    ap.add_argument("--tokens", type=int, default=100_000)
    a, rest = ap.parse_known_args()
    d = a.dir
    packed = d / "run.json.gz"  # a checkpoint carried in the repository between machines
    if a.what != "start" and not (d / "run.json").exists() and packed.exists():
        (d / "run.json").write_bytes(gzip.decompress(packed.read_bytes()))
    if a.what == "summary":
        print(json.dumps(summary(d), indent=1))
        return 0
    d.mkdir(parents=True, exist_ok=True)
    common = ["--checkpoint-kv", "--stats"]
    if a.what == "start":
        if (d / "run.json").exists():
            sys.exit(f"{d / 'run.json'} exists: resume it, or start in another folder")
        (d / "prompt.txt").write_text(prompt_text(), encoding="utf-8")
        args = ["--prompt-file", str(d / "prompt.txt"), "--max-new-tokens", str(a.tokens), *DEFAULTS, *rest,
                "--checkpoint", str(d / "run.json"), *common]
    else:
        args = ["--resume", str(d / "run.json"), *common]
    return segment(d, args)


if __name__ == "__main__":
    raise SystemExit(main())
