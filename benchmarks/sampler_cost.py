"""What one draw costs: the native sampler (`kernels.sample_rows`) against torch's filters and
draw (`draw(final_scores(...))`), the same tokens, at SmolLM2's and Gemma 3's vocabularies.

    python benchmarks/sampler_cost.py [--vocab 49152,262144] [--repeats 200]

Random logits (scale 3), a 1,024-token penalty window, the paper sampler (temperature 1,
min-p 0.1, min_keep 20, penalty 1.2), one row a call, as `ar` and the walk draw. Prints the
median milliseconds of each and checks that both draw the same tokens.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import tokenswift
from tokenswift import kernels
from tokenswift.config import SamplingConfig
from tokenswift.sampling import draw, final_scores, sample


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vocab", default="49152,262144")
    ap.add_argument("--repeats", type=int, default=200)
    a = ap.parse_args()
    if not kernels.native():
        raise SystemExit(f"native kernels off: {kernels.why_not()}")
    s = SamplingConfig(seed=1, **tokenswift.PAPER_SAMPLING)
    g = torch.Generator().manual_seed(0)
    print(f"threads {torch.get_num_threads()}, paper sampler, median of {a.repeats}")
    print("| vocabulary | torch ms | native ms | speedup |")
    print("|---|---|---|---|")
    for V in (int(v) for v in a.vocab.split(",")):
        logits = torch.randn(1, V, generator=g) * 3
        win = torch.randint(0, V, (1, 1024), generator=g)
        times = {}
        for name, f in (("torch", lambda p: draw(final_scores(logits, win, s), [p], s)),
                        ("native", lambda p: sample(logits, win, [p], s))):
            f(0)
            t = []
            for p in range(a.repeats):
                t0 = time.perf_counter()
                f(p)
                t.append(time.perf_counter() - t0)
            times[name] = statistics.median(t) * 1e3
        same = all(int(draw(final_scores(logits, win, s), [p], s)[0]) == int(sample(logits, win, [p], s)[0])
                   for p in range(50))
        if not same:
            raise SystemExit(f"vocabulary {V}: the native sampler drew other tokens")
        print(f"| {V:,} | {times['torch']:.2f} | {times['native']:.2f} | {times['torch'] / times['native']:.1f}x |")


if __name__ == "__main__":
    main()
