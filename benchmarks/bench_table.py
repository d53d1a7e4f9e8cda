"""The benchmark tables of docs/benchmarks.md, made by `tokenswift bench` (this script only fixes the options).

    python benchmarks/bench_table.py cpu       # 2,048-token cdne prefix, 8,192 new tokens,
                                               # ar / tokenswift / llama.cpp on the same GGUF
    python benchmarks/bench_table.py transformers  # the same against transformers (+ its lookup)
    python benchmarks/bench_table.py ablations # short run: auto vs the paper's static trie, no heads
    python benchmarks/bench_table.py long      # one 16,384-token run read at 1K/2K/4K/8K/16K
    python benchmarks/bench_table.py yarn32k   # past SmolLM2's 8K context: YaRN x4, 32K in all

Extra arguments go to `tokenswift bench` (e.g. --out DIR, --device cuda --dtype bfloat16).
"""

from __future__ import annotations

import sys

from tokenswift.cli import main

PRESETS = {
    "cpu": ["--prefix", "2048", "--lengths", "1024,2048,4096,8192", "--methods", "ar,tokenswift,llamacpp"],
    "transformers": ["--prefix", "2048", "--lengths", "512,1024,2048,4096",
                     "--methods", "ar,tokenswift,ngram,hf,hf-lookup"],
    "ablations": ["--prefix", "2048", "--lengths", "256,512",
                  "--methods", "ar,tokenswift,tokenswift-paper,tokenswift-noheads,tokenswift-nongrams"],
    "long": ["--prefix", "2048", "--lengths", "1024,2048,4096,8192,16384", "--methods", "ar,tokenswift,llamacpp"],
    "yarn32k": ["--prefix", "16384", "--lengths", "4096,8192,16384", "--methods", "ar,tokenswift",
                "--rope-scaling", "yarn:4"],
}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in PRESETS:
        sys.exit(f"usage: python benchmarks/bench_table.py {{{'|'.join(PRESETS)}}} [tokenswift bench options]")
    name = sys.argv[1]
    sys.exit(main(["bench", *PRESETS[name], "--name", f"bench-{name}", *sys.argv[2:]]))
