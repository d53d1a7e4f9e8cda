"""How often a model with some layers skipped (each replaced by the identity on the residual
stream, as a layer-skipping self-draft would run) picks the full model's greedy token, teacher
forced over held-out cdne text. A draft that skips layers needs no training and costs the
layers it keeps; this measures what it agrees on before any planner sees it.

    python benchmarks/layer_skip_agreement.py --model gemma3-270m --tokens 1500

Prints, for each skip set, the layers kept and the share of positions whose argmax equals the
full model's.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import torch

import tokenswift

CDNE = Path(__file__).resolve().parents[2] / "shared" / "data" / "cdne.txt"


def argmax_with(m, keep: list[int], t: torch.Tensor) -> torch.Tensor:
    """t [1, T] -> [T] greedy ids of the model running only the layers in `keep`."""
    layers, cfg = m.layers, m.cfg
    m.layers = torch.nn.ModuleList([layers[i] for i in keep])
    m.cfg = replace(cfg, layer_windows=tuple(cfg.layer_windows[i] for i in keep), num_layers=len(keep))
    try:
        with torch.no_grad():
            h = m(t, torch.arange(t.shape[1])[None])  # [1, T, D]
            return torch.cat([m.logits(h[:, a : a + 128]).argmax(-1) for a in range(0, h.shape[1], 128)], 1)[0]
    finally:
        m.layers, m.cfg = layers, cfg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--tokens", type=int, default=1500, help="teacher-forced positions (one pass, no cache)")
    ap.add_argument("--offset", type=int, default=100_000, help="where in cdne.txt the text starts (characters)")
    a = ap.parse_args()
    lm = tokenswift.load(a.model)
    m, L = lm.model, lm.model.cfg.num_layers
    text = CDNE.read_text(encoding="utf-8")[a.offset : a.offset + 40 * a.tokens]
    ids = lm.tokenizer(text, add_special_tokens=False).input_ids[: a.tokens]
    t = torch.tensor([ids])
    full = argmax_with(m, list(range(L)), t)
    print(f"{a.model}: {L} layers, windows {m.cfg.layer_windows}; {len(ids)} positions of cdne")
    print(f"full model's argmax = the text's next token: {(full[:-1] == t[0, 1:]).float().mean():.3f}")
    sets = {
        f"skip layer {L - 3}": [i for i in range(L) if i != L - 3],
        "skip the last 3": list(range(L - 3)),
        f"skip {2 * L // 3}-{L - 2}": [i for i in range(L) if not 2 * L // 3 <= i <= L - 2],
        f"skip {L // 2}-{L - 2}": [i for i in range(L) if not L // 2 <= i <= L - 2],
        "every other layer from 2": [i for i in range(L) if i < 2 or i % 2 == 1 or i == L - 1],
        f"skip {L // 4}-{L - 3}": [i for i in range(L) if not L // 4 <= i <= L - 3],
    }
    for name, keep in sets.items():
        t0 = time.perf_counter()
        got = argmax_with(m, keep, t)
        print(f"{name:28s} keeps {len(keep):2d}/{L}: agreement {(got == full).float().mean():.3f} "
              f"({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
