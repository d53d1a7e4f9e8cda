"""Cost of one verify pass of T tokens (a chain: causal mask among the new tokens) over a cached
prefix of C entries, against one token's, with the parts split out: the whole pass (decoder and
LM head for every row), the 30 layers' attention alone, and the weight products alone.

    python benchmarks/verify_cost.py --contexts 4096,16384 --tokens 1,2,4,8,16

The cache holds random K/V (the cost does not depend on the values); positions past the model's
trained context only extend the RoPE table. Medians of `--repeats` passes, 2 threads unless
`--threads` says otherwise. Run it alone on the machine.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import tokenswift
from tokenswift.cache import KVCache
from tokenswift.model import _attention


def median_ms(fn, repeats: int) -> float:
    fn()  # warm-up: RoPE tables, oneDNN primitives
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", help="model path (default: the embedded SmolLM2-135M)")
    ap.add_argument("--contexts", default="4096,16384")
    ap.add_argument("--tokens", default="1,2,4,8,16")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    lm = tokenswift.load(args.model, heads="none", draft_weights="float")
    m = lm.model
    cfg = m.cfg
    tokens = [int(t) for t in args.tokens.split(",")]
    print(f"model {cfg.num_layers} layers, {cfg.num_heads} query / {cfg.num_kv_heads} KV heads; "
          f"oneDNN packed: {m.packed}; {args.threads} threads")
    print("context  T  pass ms  x one  attention ms  x one")
    for C in (int(c) for c in args.contexts.split(",")):
        cache = KVCache(cfg, capacity=C + max(tokens), dtype=m.dtype, rope_len=C + max(tokens))
        cache.k.normal_()
        cache.v.normal_()
        cache.pos[:C] = torch.arange(C)
        one = one_att = None
        for T in tokens:
            x = torch.randint(0, cfg.vocab_size, (1, T))
            pos = torch.arange(C, C + T).unsqueeze(0)
            mask = torch.ones(T, T, dtype=torch.bool).tril()

            def full() -> None:
                cache.length = C
                h = m(x, pos, cache, mask=mask if T > 1 else None)
                m.logits(h[0])

            q = torch.randn(1, T, cfg.num_heads, cfg.head_dim, dtype=m.dtype)
            bias = torch.zeros(1, 1, T, T, dtype=m.dtype).masked_fill_(~mask, float("-inf"))

            def attention() -> None:
                for li in range(cfg.num_layers):
                    keys, vals = cache.k[li, :, :, : C + T], cache.v[li, :, :, : C + T]
                    _attention(q, keys, vals, mask.unsqueeze(0), bias if T > 1 else None, None, 0, None)

            t_full = median_ms(full, args.repeats)
            t_att = median_ms(attention, args.repeats)
            one = one or t_full
            one_att = one_att or t_att
            print(f"{C:7d} {T:2d} {t_full:8.1f} {t_full / one:6.2f} {t_att:12.1f} {t_att / one_att:6.2f}", flush=True)


if __name__ == "__main__":
    main()
