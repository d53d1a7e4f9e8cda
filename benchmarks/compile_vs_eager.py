"""`load(compile=True)` against eager, side by side in one process: SmolLM2-135M, a 512-token
cdne.txt prompt, 512 new tokens under the paper sampler (seed 1), `ar` and `tokenswift`; prints
decode tokens/s of each, their ratio, and whether both wrote the same tokens. The compiled model
first runs one warm-up generation, which compiles the pass sizes it meets (timed).

    python benchmarks/compile_vs_eager.py [--new 512]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import tokenswift
from tokenswift.config import PAPER_SAMPLING

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cdne.txt"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--new", type=int, default=512)
    args = ap.parse_args()
    eager = tokenswift.load("smollm2-135m", device="cpu")
    ids = eager.tokenizer(DATA.read_text(encoding="utf-8")).input_ids[5000:5512]
    kw = dict(ignore_eos=True, **PAPER_SAMPLING, seed=1)
    t = time.perf_counter()
    compiled = tokenswift.load("smollm2-135m", device="cpu", compile=True)
    compiled.generate(ids, 300, method="tokenswift", **kw)
    print(f"load + compiling warm-up: {time.perf_counter() - t:.1f} s")
    for method in ("ar", "tokenswift"):
        res = {}
        for name, lm in (("eager", eager), ("compiled", compiled)):
            lm.generate(ids, 16, method=method, **kw)
            res[name] = lm.generate(ids, args.new, method=method, **kw)
            print(f"{method:10s} {name:8s} {res[name].stats['decode_tokens_per_s']:6.2f} tok/s")
        ratio = res["compiled"].stats["decode_tokens_per_s"] / res["eager"].stats["decode_tokens_per_s"]
        print(f"{method:10s} compiled / eager {ratio:.3f}, same tokens: {res['eager'].tokens == res['compiled'].tokens}")


if __name__ == "__main__":
    main()
