"""Cost of one verify pass of T tokens (a chain: causal mask among the new tokens) over a cached
prefix of C entries, against one token's, with the parts split out: the whole pass (decoder and
LM head for every row) and the layers' attention alone, beside the time to read every layer's K
and V once (the memory floor of one-token attention).

    python benchmarks/verify_cost.py --contexts 4096,16384 --tokens 1,2,4,8,16 [--kv-dtype bfloat16]
        [--attention-dtype bfloat16|bfloat16-amx]
        [--activations int8] [--isa avx2,avx512]

The cache holds random K/V (the cost does not depend on the values); positions past the model's
trained context only extend the RoPE table. Medians of `--repeats` passes, 2 threads unless
`--threads` says otherwise; `--isa` times each instruction level in turn (the kernels' levels
swapped in one process). Run it alone on the machine.

Per context it also prints the ceiling these costs put on a chain draft: with each drafted
token accepted with probability `--acceptance` (given its parent was) and costing
`--draft-cost` of a one-token pass, a chain of d drafts gives 1 + a + ... + a^d tokens for
pass(d + 1) + d * cost, and the best d gives the most any such draft can reach against `ar`
(the walk, sampling and bookkeeping taken as free); also with a free draft (cost 0).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import tokenswift
from tokenswift.cache import KVCache
from tokenswift.model import _attention, attention_path


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
    ap.add_argument("--kv-dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    ap.add_argument("--acceptance", type=float, default=0.87, help="per-depth acceptance of a chained draft")
    ap.add_argument("--draft-cost", type=float, default=0.25, help="a drafted token's cost, share of a one-token pass")
    ap.add_argument("--activations", default="float", choices=["float", "int8"])
    ap.add_argument("--attention-dtype", default="float32", choices=["float32", "bfloat16", "bfloat16-amx"])
    ap.add_argument("--isa", default="", help="instruction levels to time in turn (default: the one chosen)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    lm = tokenswift.load(args.model, heads="none", draft_weights="float", kv_dtype=args.kv_dtype,
                         activations=args.activations, attention_dtype=args.attention_dtype)
    m = lm.model
    cfg = m.cfg
    tokens = [int(t) for t in args.tokens.split(",")]
    path = attention_path(m.device, m.dtype, cfg.head_dim)
    print(f"model {cfg.num_layers} layers, {cfg.num_heads} query / {cfg.num_kv_heads} KV heads; weights packed: "
          f"{m.packed}; attention: {path}; KV {str(m.kv_dtype).removeprefix('torch.')}; {args.threads} threads; "
          f"activations {m.activations}; attention arithmetic {m.attention_dtype}")
    from tokenswift import kernels

    for level in args.isa.split(",") if args.isa else [kernels.isa()]:
        if level != "torch":
            kernels.use_level(level)
        print(f"isa {level}")
        contexts(args, m, cfg, tokens, path)


def contexts(args, m, cfg, tokens: list[int], path: str) -> None:
    print("context  T  pass ms  x one  attention ms  x one  x read")
    for C in (int(c) for c in args.contexts.split(",")):
        cache = KVCache(cfg, capacity=C + max(tokens), dtype=m.kv_dtype, rope_len=C + max(tokens))
        cache.k.normal_()
        cache.v.normal_()
        cache.pos[:C] = torch.arange(C)

        def read() -> None:  # every layer's K and V once: a reduction reads each byte once
            for li in range(cfg.num_layers):
                cache.k[li, :, :, :C].sum()
                cache.v[li, :, :, :C].sum()

        t_read = median_ms(read, args.repeats)
        print(f"{C:7d} read K+V once: {t_read:.1f} ms", flush=True)
        one = one_att = None
        passes: dict[int, float] = {}
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
                    if keys.dtype != q.dtype and path != "native":
                        keys, vals = keys.to(q.dtype), vals.to(q.dtype)  # as the decoder does
                    _attention(q, keys, vals, mask.unsqueeze(0), bias if T > 1 else None, None, 0, None, path,
                               bf16=m.bf16_attention)

            t_full = median_ms(full, args.repeats)
            t_att = median_ms(attention, args.repeats)
            one = one or t_full
            one_att = one_att or t_att
            passes[T] = t_full / one
            print(f"{C:7d} {T:2d} {t_full:8.1f} {t_full / one:6.2f} {t_att:12.1f} {t_att / one_att:6.2f} "
                  f"{t_att / t_read:7.2f}", flush=True)
        for c in (args.draft_cost, 0.0):
            d, x = ceiling(passes, args.acceptance, c)
            print(f"{C:7d} ceiling at acceptance {args.acceptance}, draft {c} of a pass: {x:.2f}x ar (chain of {d})",
                  flush=True)


def ceiling(passes: dict[int, float], a: float, cost: float) -> tuple[int, float]:
    """(chain depth, speedup) of the best chain under the measured pass costs (relative to one
    token's; linear between the sizes measured, none beyond the largest)."""
    sizes = sorted(passes)
    best = (0, 1.0 / passes.get(1, 1.0))
    for d in range(1, sizes[-1]):
        T = d + 1
        lo = max(s for s in sizes if s <= T)
        hi = min(s for s in sizes if s >= T)
        rel = passes[lo] if hi == lo else passes[lo] + (passes[hi] - passes[lo]) * (T - lo) / (hi - lo)
        x = sum(a**i for i in range(d + 1)) / (rel + d * cost)
        if x > best[1]:
            best = (d, x)
    return best


if __name__ == "__main__":
    main()
