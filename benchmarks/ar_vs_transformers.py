"""Plain decoding speed, side by side in one process: tokenswift `ar` vs transformers `generate()`.

Both run SmolLM2-135M-Instruct dequantized from the same GGUF to float32, on the same
cdne.txt prompt, greedy with EOS ignored so both produce exactly `--new` tokens; the script
also checks that they produce the same ids.

    python benchmarks/ar_vs_transformers.py [--prompt-tokens 2048] [--new 256] [--repeats 2]

Prefill time is measured as a 1-token generation; decode tokens/s = (new - 1) / (total - prefill)
for transformers, and new / (total - prefill) for tokenswift (its first token comes from the
prefill logits, sampled inside the decode timer). Each figure is the best of `--repeats` runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
DEFAULT_TEXT = HERE.parent.parent / "shared" / "data" / "cdne.txt"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--text", type=Path, default=DEFAULT_TEXT, help="prompt corpus (default ../shared/data/cdne.txt)")
    ap.add_argument("--prompt-tokens", type=int, default=2048)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.text.is_file():
        print(f"error: prompt text {args.text} not found (pass --text)", file=sys.stderr)
        return 2

    import tokenswift
    from transformers import AutoModelForCausalLM

    lm = tokenswift.load("smollm2-135m", dtype="float32", device="cpu")
    ids = lm.tokenizer(args.text.read_text(encoding="utf-8")).input_ids[: args.prompt_tokens]
    if len(ids) < args.prompt_tokens:
        print(f"error: {args.text} has only {len(ids)} tokens", file=sys.stderr)
        return 2
    hf = AutoModelForCausalLM.from_pretrained(
        str(lm.source.parent), gguf_file=lm.source.name, dtype=torch.float32
    ).eval()
    x = torch.tensor([ids])

    def hf_run(n: int) -> tuple[float, list[int]]:
        t = time.perf_counter()
        with torch.inference_mode():
            out = hf.generate(x, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=2)
        return time.perf_counter() - t, out[0, len(ids):].tolist()

    def ts_run(n: int) -> tuple[float, float, list[int]]:
        r = lm.generate(ids, n, temperature=0, ignore_eos=True)
        return r.stats["seconds"], r.stats["prefill_seconds"], r.tokens

    hf_run(4)  # warm-up
    ts_run(4)
    res: dict[str, dict[str, float]] = {"transformers": {}, "tokenswift_ar": {}}
    best = {"hf_prefill": 1e9, "hf_decode": 0.0, "ts_prefill": 1e9, "ts_decode": 0.0}
    same = True
    for _ in range(args.repeats):
        hf_pre, _ = hf_run(1)
        hf_tot, hf_ids = hf_run(args.new)
        ts_tot, ts_pre, ts_ids = ts_run(args.new)
        same = same and hf_ids == ts_ids
        best["hf_prefill"] = min(best["hf_prefill"], hf_pre)
        best["hf_decode"] = max(best["hf_decode"], (args.new - 1) / (hf_tot - hf_pre))
        best["ts_prefill"] = min(best["ts_prefill"], ts_pre)
        best["ts_decode"] = max(best["ts_decode"], args.new / (ts_tot - ts_pre))
    res["transformers"] = {"prefill_seconds": best["hf_prefill"], "decode_tokens_per_s": best["hf_decode"]}
    res["tokenswift_ar"] = {"prefill_seconds": best["ts_prefill"], "decode_tokens_per_s": best["ts_decode"]}
    summary = {
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to float32)",
        "prompt": f"{args.text.name}, first {args.prompt_tokens} tokens",
        "new_tokens": args.new,
        "sampler": "greedy, EOS ignored",
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "results": res,
        "decode_speedup": best["ts_decode"] / best["hf_decode"],
        "prefill_speedup": best["hf_prefill"] / best["ts_prefill"],
        "same_tokens": same,
    }
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
