"""How often the self-draft's chain matches the target, by depth, at long context: for each
context C, `ar` writes N tokens after the first C tokens of a held-out text (paper sampler), then
every draft configuration (weights x draft cache: a partial cache of B entries, the whole
context in int8, the whole float cache, or the per-query sparse view) drafts a chain of
`--depth` tokens from each root position of that text, teacher-forced, with the engine's own
`SelfDrafter` (the same partial cache, refreshed when its recent window fills, and the same
coupled draws). A drafted token counts when it and every token before it in its chain equal the
target's.

    python benchmarks/draft_acceptance.py --contexts 2048,8192,16384,32768 --new 256 \\
        --budgets 1024,2048,4096,int8,full --weights int4,float

The sparse view (`SparseKV`): `sparse-SCORER:B`, B entries per KV head (or `B%` of the context)
chosen afresh by every draft query, beside 16 sinks and the last 64 entries; SCORER is exact
(the oracle), int8, int4 or dimsR (the R largest query dimensions of an int8 dimension-major copy:
the shipped scorer, R = 16). Each row then also gives the
KV bytes one drafted token reads (scoring every key, then the chosen rows in full), against a
step's (every K and V in the cache's dtype):

    python benchmarks/draft_acceptance.py --contexts 16384,32768 --new 64 --depth 1 --weights float \\
        --budgets sparse-exact:1%,sparse-exact:2%,sparse-exact:5%,sparse-exact:10%,sparse-int8:5%,...

One prefill of the largest context serves every context (the cache of a prefix is the first C
entries of the longer one), so one RoPE scaling holds for the whole run (the one the bench's
sweep would choose for the largest context unless `--rope-scaling` says otherwise);
`--prefill-cache FILE` keeps its K/V rows for the next run. Not a timing: it may run beside other
work.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import tokenswift
from tokenswift.bench import PAPER_SAMPLING, default_text
from tokenswift.cache import KVCache
from tokenswift.config import SamplingConfig
from tokenswift.drafters import SelfDrafter
from tokenswift.sampling import penalty_window, sample


def prefill_cached(lm, prompt: torch.Tensor, cache: KVCache, path: str | None, rope: str | None) -> str:
    """Prefills `prompt` [C] into `cache`, or loads the K/V rows a run with the same model, RoPE
    scaling, cache dtype and tokens saved at `path` (torch.save; a 32K prefill takes 8-12 minutes
    on 2 cores). -> how the rows came."""
    m = lm.model
    meta = dict(model=lm.name, rope=rope, kv_dtype=str(m.kv_dtype), ids=prompt.tolist())
    C = prompt.numel()
    if path and Path(path).exists():
        saved = torch.load(path)
        if saved["meta"] == meta:
            cache.k[:, :, :, :C] = saved["k"]
            cache.v[:, :, :, :C] = saved["v"]
            cache.pos[:C] = torch.arange(C)
            cache.length = C
            return f"K/V of {C} tokens read from {path}"
    t0 = time.perf_counter()
    m.prefill(prompt.unsqueeze(0), cache)
    if path:
        torch.save(dict(meta=meta, k=cache.k[:, :, :, :C].clone(), v=cache.v[:, :, :, :C].clone()), path)
    return f"prefill {C} tokens: {time.perf_counter() - t0:.0f} s"


def chain_matches(drafter: SelfDrafter, main: KVCache, history: torch.Tensor, truth: torch.Tensor, C: int, N: int,
                  depth: int, stride: int) -> list[int]:
    """matched[d]: roots whose first d+1 drafted tokens all equal the target's."""
    matched = [0] * depth
    roots = 0
    saved_k = torch.empty_like(main.k[:, :, :, : depth + 1])
    saved_v = torch.empty_like(saved_k)
    for n in range(C, C + N - depth):
        main.truncate(n)
        if (n - C) % stride == 0:
            # the draft writes its own K/V at [n, n + depth] (full cache) or for a refresh: keep the target's
            saved_k.copy_(main.k[:, :, :, n : n + depth + 1])
            saved_v.copy_(main.v[:, :, :, n : n + depth + 1])
            prop = drafter.propose(main, history, n, int(truth[n]), depth, 1, chain=True)
            main.k[:, :, :, n : n + depth + 1] = saved_k
            main.v[:, :, :, n : n + depth + 1] = saved_v
            history[n + 1 : n + depth + 1] = truth[n + 1 : n + depth + 1]
            roots += 1
            for d in range(depth):
                if prop.candidates[d][0] != int(truth[n + 1 + d]):
                    break
                matched[d] += 1
        main.length = n + 1
        drafter.committed(main, n, 1)
    return [roots, *matched]


def sparse_bytes(model, scorer: str, C: int, budget: int, sinks: int, recent: int) -> int:
    """KV bytes a draft pass at context C reads over the sparse view: every key scored (exact: the
    key itself; int8: D bytes + a float32 scale; int4: D/2 bytes + a scale per 32; dims:R: R
    int8 values of a dimension-major copy and a row scale), then K and V of the sinks + budget + recent rows in the
    cache's dtype. scorer "step": what a target step reads, every K and V."""
    cfg = model.cfg
    D, e = cfg.head_dim, model.kv_dtype.itemsize
    heads = cfg.num_layers * cfg.num_kv_heads
    if scorer == "step":
        return heads * C * 2 * D * e
    per_key = {"exact": D * e, "int8": D + 4, "int4": D // 2 + 4 * max(1, D // 32)}.get(scorer)
    if per_key is None:  # dims:R: R int8 values and a row scale
        per_key = int(scorer.split(":")[1]) + 4
    return heads * (C * per_key + min(C, sinks + budget + recent) * 2 * D * e)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--contexts", default="2048,8192,16384,32768")
    ap.add_argument("--new", type=int, default=256, help="tokens ar writes after each context")
    ap.add_argument("--budgets", default="1024,2048,4096,int8,full",
                    help="partial-cache sizes, and/or int8 (the whole context, int8 copy) and full")
    ap.add_argument("--weights", default="int4,float")
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--stride", type=int, default=1, help="draft from every stride-th root")
    ap.add_argument("--sinks", type=int, default=16)
    ap.add_argument("--rope-scaling", default=None)
    ap.add_argument("--kv-dtype", default="auto", help="the main cache's element type (auto: the weights')")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="draft_acceptance.json")
    ap.add_argument("--prefill-cache", default=None,
                    help="a file for the largest context's K/V rows: written after a prefill, read by later runs")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    contexts = sorted({int(c) for c in args.contexts.split(",")}, reverse=True)
    N, depth = args.new, args.depth
    need = contexts[0] + N + depth + 2
    rope = args.rope_scaling
    probe = tokenswift.load(args.model, heads="none")
    if rope is None and need > probe.config.context_length:
        factor = 2
        while probe.config.context_length * factor < contexts[0] + N:
            factor *= 2
        rope = f"yarn:{factor}"
    lm = tokenswift.load(args.model, heads="none", rope_scaling=rope, kv_dtype=args.kv_dtype) \
        if rope or args.kv_dtype != "auto" else probe
    target = lm.model
    int4 = lm.int4
    text = Path(default_text()).read_text(encoding="utf-8")
    chars = 8 * contexts[0]
    while True:
        ids = lm.encode(text[:chars])
        if len(ids) > contexts[0] or chars >= len(text):
            break
        chars *= 2
    s = SamplingConfig(**dict(PAPER_SAMPLING, seed=args.seed))
    main_cache = KVCache(target.cfg, capacity=need, dtype=target.kv_dtype, rope_len=need)
    prompt = torch.as_tensor(ids[: contexts[0]], dtype=torch.int64)
    print(f"rope {rope}; {prefill_cached(lm, prompt, main_cache, args.prefill_cache, rope)}", flush=True)
    results = []
    tok = torch.empty(1, 1, dtype=torch.int64)
    pos = torch.empty(1, 1, dtype=torch.int64)
    for C in contexts:
        history = torch.zeros(need, dtype=torch.int64)
        history[:C] = prompt[:C]
        main_cache.truncate(C - 1)  # ar from the prompt's last token: its logits give the first new token
        t0 = time.perf_counter()
        for n in range(C - 1, C + N + depth):
            tok.fill_(int(history[n]))
            pos.fill_(n)
            h = target(tok, pos, main_cache)[0, -1]
            history[n + 1] = sample(target.logits(h.unsqueeze(0)), penalty_window(history, n + 1, s), [n + 1], s)[0]
        truth = history.clone()
        print(f"context {C}: ar {N} tokens in {time.perf_counter() - t0:.0f} s", flush=True)
        for w in args.weights.split(","):
            draft = int4 if w == "int4" else target
            if draft is None:  # a model kept as GGUF blocks has no int4 copy: its own blocks are as small
                print(f"  {w}: no int4 copy of {args.model} (draft_weights auto builds none for it)", flush=True)
                continue
            for b in args.budgets.split(","):
                # a number: the partial cache of that many entries; full / int8: the whole context
                # through the main cache / its int8 copy (from the first root on: budget 64);
                # sparse-SCORER:B the sparse view
                kv = b if b in ("full", "int8") else "sparse" if b.startswith("sparse-") else "partial"
                scorer, kv_bytes = "int8", None
                if kv == "sparse":
                    scorer, _, size = b.removeprefix("sparse-").partition(":")
                    scorer = scorer.replace("dims", "dims:") if scorer.startswith("dims") else scorer
                    budget = round(C * float(size[:-1]) / 100) if size.endswith("%") else int(size)
                    kv_bytes = sparse_bytes(target, scorer, C, budget, args.sinks, 64)
                else:
                    budget = 64 if kv != "partial" else int(b)
                d = SelfDrafter(target, draft, None, s, budget, args.sinks, kv, depth, rope_len=need, scorer=scorer)
                t0 = time.perf_counter()
                roots, *m = chain_matches(d, main_cache, history.clone(), truth, C, N, depth, args.stride)
                rate = [x / roots for x in m]
                cond = [m[0] / roots] + [m[i] / m[i - 1] if m[i - 1] else 0.0 for i in range(1, depth)]
                r = dict(context=C, weights=w, budget=b, roots=roots, matched=m, rate=rate, conditional=cond,
                         tokens_per_draft=sum(rate), refreshes=d.refreshes, seconds=time.perf_counter() - t0)
                if kv_bytes is not None:
                    r.update(entries=budget, kv_bytes=kv_bytes, step_kv_bytes=sparse_bytes(target, "step", C, 0, 0, 0))
                results.append(r)
                read = (f"  KV read {kv_bytes / 2**20:.1f} MiB a drafted token "
                        f"({kv_bytes / r['step_kv_bytes']:.3f} of a step's)" if kv_bytes is not None else "")
                print(f"  {w:5s} budget {b:>5s}: depth-1 {rate[0]:.3f}  conditional "
                      + " ".join(f"{c:.2f}" for c in cond)
                      + f"  drafted tokens accepted per chain {sum(rate):.2f}  refreshes {d.refreshes}"
                      + f"{read}  ({r['seconds']:.0f} s)", flush=True)
        Path(args.out).write_text(json.dumps(dict(rope=rope, new=N, depth=depth, results=results), indent=1))


if __name__ == "__main__":
    main()
