"""Runs decoding methods one after another on the same prompt and seed, prints each run's stats,
checks that every method wrote the same tokens as `ar`, and reports speed as a ratio to `ar`.

    python benchmarks/methods_side_by_side.py --heads auto --prefix 2048 --new 2048 --ranks

`--ranks` adds where the sampled tokens stood in their exact final distributions (how often the
sampled token was the top-1, top-3, top-8): the ceiling any draft can reach under exact sampling.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import tokenswift
from tokenswift.cache import KVCache
from tokenswift.config import PAPER_SAMPLING, SamplingConfig
from tokenswift.sampling import final_logprobs

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def sampled_ranks(lm, prompt: list[int], tokens: list[int], sampling: dict) -> torch.Tensor:
    """Rank of each generated token in the final distribution it was drawn from."""
    model = lm.model
    seq = torch.tensor(prompt + tokens)
    s = SamplingConfig(**sampling)
    cache = KVCache(model.cfg, capacity=len(seq), dtype=model.dtype, device=model.device)
    ranks = []
    with torch.inference_mode():
        h = model.prefill(seq.unsqueeze(0).to(model.device), cache, return_all=True)[0]  # [N, D]
        W = s.penalty_window if s.penalty != 1.0 else 0
        for p in range(len(prompt), len(seq)):
            window = seq[max(0, p - W) : p].unsqueeze(0).to(model.device) if W else None
            lp = final_logprobs(model.logits(h[p - 1 : p]), window, s)[0]  # [V]
            ranks.append(int((lp > lp[seq[p]]).sum()))
    return torch.tensor(ranks)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--heads", default="auto")
    ap.add_argument("--text", type=Path, default=DATA / "cdne.txt")
    ap.add_argument("--prefix", type=int, default=2048, help="prompt tokens from the start of --text")
    ap.add_argument("--new", type=int, default=1024)
    ap.add_argument("--methods", default="ar,tokenswift")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--greedy", action="store_true", help="greedy instead of the paper's sampler")
    ap.add_argument("--ranks", action="store_true")
    args = ap.parse_args()

    lm = tokenswift.load(args.model, heads=args.heads)
    print("heads:", lm.heads.meta.get("path") if lm.heads is not None else None)
    ids = lm.encode(args.text.read_text(encoding="utf-8"))[: args.prefix]
    sampling = {"temperature": 0.0} if args.greedy else dict(PAPER_SAMPLING)
    results = {}
    for m in args.methods.split(","):
        r = lm.generate(ids, args.new, method=m, seed=args.seed, ignore_eos=True, **sampling)
        results[m] = r
        print(m, json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.stats.items()}), flush=True)
    if "ar" in results:
        ar = results["ar"]
        for m, r in results.items():
            if m != "ar":
                ratio = r.stats["decode_tokens_per_s"] / ar.stats["decode_tokens_per_s"]
                print(f"{m}: same tokens as ar: {r.tokens == ar.tokens}; decode speed {ratio:.2f}x ar")
        if args.ranks and not args.greedy:
            ranks = sampled_ranks(lm, ids, ar.tokens, {**sampling, "seed": args.seed})
            print("sampled token was the top-1: %.3f, in the top-3: %.3f, in the top-8: %.3f" % tuple(
                float((ranks < k).float().mean()) for k in (1, 3, 8)))


if __name__ == "__main__":
    main()
