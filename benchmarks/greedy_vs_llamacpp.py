"""Greedy ids of ours against llama.cpp's on the same GGUF file: after prompts of several lengths
cut from held-out cdne text, how many new tokens agree before the first difference, and our top
two logits there (llama.cpp multiplies int8-rounded activations, so a near-tie can go the other
way). Needs llama-cpp-python.

    python benchmarks/greedy_vs_llamacpp.py --model gemma3-270m --prompts 200,700 --new 64
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

import tokenswift
from tokenswift.cache import KVCache

CDNE = Path(__file__).resolve().parents[2] / "shared" / "data" / "cdne.txt"


def main() -> None:
    import llama_cpp

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--prompts", default="200,700", help="prompt lengths in tokens, comma-separated")
    ap.add_argument("--new", type=int, default=64, help="greedy tokens after each prompt")
    a = ap.parse_args()
    lm = tokenswift.load(a.model)
    ids = lm.tokenizer(CDNE.read_text(encoding="utf-8")[:60_000]).input_ids
    lengths = [int(n) for n in a.prompts.split(",")]
    llm = llama_cpp.Llama(model_path=str(lm.source), n_ctx=max(lengths) + a.new + 8, n_threads=os.cpu_count() or 1,
                          verbose=False)
    for n in lengths:
        prompt = ids[:n]
        ours = lm.generate(prompt, a.new, method="ar", temperature=0.0, ignore_eos=True).tokens
        llm.reset()
        theirs = []
        for tok in llm.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0):
            theirs.append(int(tok))
            if len(theirs) >= a.new:
                break
        same = next((i for i, (x, y) in enumerate(zip(ours, theirs)) if x != y), min(len(ours), len(theirs)))
        line = f"prompt {n} tokens: {same} of {a.new} greedy ids agree"
        if same < a.new:
            t = torch.tensor([prompt + ours[:same]])
            cache = KVCache(lm.model.cfg, capacity=t.shape[1], dtype=lm.model.kv_dtype)
            logits = lm.model.logits(lm.model.prefill(t, cache))[0]  # [V]
            top = logits.topk(2)
            line += (f"; at new token {same + 1} ours {ours[same]} ({top.values[0]:.3f}), llama.cpp's {theirs[same]} "
                     f"(our logit {logits[theirs[same]]:.3f}; our top two {top.indices.tolist()})")
        print(line)


if __name__ == "__main__":
    main()
