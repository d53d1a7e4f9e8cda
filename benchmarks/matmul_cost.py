"""Cost of the weight matrices' products for a pass of M rows, per way of holding the weights:
the 30 layers' q/k/v, o, gate/up and down products and the LM head, each timed as a whole
(every layer's matrices once, in order, as a pass runs them), beside the bytes they read.

    python benchmarks/matmul_cost.py --rows 1,2,4,8,16 [--model m.gguf]

`gguf` is the model's own blocks (`--weights auto`: Q4_1 layers and a Q8_0 embedding/head on the
embedded SmolLM2), `float` the same matrices dequantized (`--weights float`, the native float32
kernel), `q8_0` the dequantized matrices quantized to Q8_0 at load, `gguf-int8` the model's own
blocks multiplying int8-rounded activations (`--activations int8`; the Q8_0 head stays float).
`--isa avx2,avx512` times each kind on each instruction level in turn (the same process and
weights, the kernels' levels swapped; `tokenswift.kernels.LEVELS`). Medians of `--repeats`; run
it alone on the machine.
"""

from __future__ import annotations

import argparse

import torch

import tokenswift
from tokenswift.kernels import PackedLinear, QuantLinear
from tokenswift.model import _MATRICES, linear
from verify_cost import median_ms  # benchmarks/, beside this script


def nbytes(w) -> int:
    if isinstance(w, QuantLinear):
        return w.nbytes
    if isinstance(w, PackedLinear):
        return w.packed.numel() * 4
    return w.numel() * w.element_size()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rows", default="1,2,4,8,16")
    ap.add_argument("--weights", default="gguf,gguf-int8,float,q8_0")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--isa", default="", help="levels to time in turn (default: the one chosen)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    rows = [int(r) for r in a.rows.split(",")]
    from tokenswift import kernels

    levels = a.isa.split(",") if a.isa else [kernels.isa()]
    print(f"| weights | isa | MB read | " + " | ".join(f"{m} row{'s' * (m > 1)} layers / head (ms)" for m in rows)
          + f" | {rows[-1]} rows / 1 (layers) |")
    print("|---|---|---|" + "---|" * (len(rows) + 1))
    for kind in a.weights.split(","):
        lm = tokenswift.load(a.model, heads="none", drafter="none",
                             weights="auto" if kind.startswith("gguf") else kind,
                             activations="int8" if kind == "gguf-int8" else "float")
        dec = lm.model
        mats = [(getattr(L, n), getattr(L, n).shape[1]) for L in dec.layers for n in _MATRICES]  # (weight, width)
        mb = sum(nbytes(w) for w, _ in mats) / 1e6
        for level in levels:
            kernels.use_level(level)
            cells, first = [], None
            for m in rows:
                xs = {k: torch.randn(m, k) for k in {k for _, k in mats}}
                layers = median_ms(lambda: [linear(xs[k], w, None) for w, k in mats], a.repeats)
                xh = torch.randn(m, dec.cfg.hidden_size)
                head = median_ms(lambda: linear(xh, dec.lm_head, None), a.repeats)
                first = first or layers
                cells.append(f"{layers:.2f} / {head:.2f}")
            print(f"| {kind} ({dec.quantized or 'float32'}) | {level} | {mb:.0f} + head "
                  f"{nbytes(dec.lm_head) / 1e6:.0f} | " + " | ".join(cells) + f" | {layers / first:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
