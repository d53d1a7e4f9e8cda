"""Run under torchrun by test_parallel.py: every rank loads the model (its share) and generates
alike; rank 0 writes the tokens of each case, per model directory, to the JSON file named on the
command line."""

import json
import sys

import tokenswift


def main() -> None:
    out, cases, dirs = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3:]
    results, kv_heads, tp = {}, {}, None
    for d in dirs:
        lm = tokenswift.load(d, device="cpu", heads="none", drafter="none")
        tp = lm.model.tp
        kv_heads[d] = lm.model.cfg.num_kv_heads
        results[d] = []
        for case in cases:
            c = dict(case)
            results[d].append(lm.generate(c.pop("prompt"), c.pop("max_new_tokens"), ignore_eos=True, **c).tokens)
    if tp is None or tp.rank == 0:
        with open(out, "w", encoding="utf-8") as f:
            json.dump({"tokens": results, "world": tp.world if tp else 1, "kv_heads": kv_heads}, f)


if __name__ == "__main__":
    main()
