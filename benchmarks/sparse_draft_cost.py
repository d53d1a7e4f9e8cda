"""What one drafted token costs over the per-query sparse view (`SparseKV`), against a target
step, both timed in the same run at one context: the held-out text's first C tokens prefilled,
then `--reps` one-token passes of each kind at entry C (each truncated away), medians reported.
The draft pass is the self-draft's: the model's own weights (GGUF blocks), one token, LM head
included; the step is `ar`'s. Run it alone on the machine.

    python benchmarks/sparse_draft_cost.py --context 16384 --budgets 2%,5%,10% --scorers dims:16,int8 --vocab 0,16384
        [--kv-dtype bfloat16 --attention-dtype bfloat16] [--activations int8]

`--vocab N`: the draft's head over the ids below N and the context's tokens (`DraftVocab`; 0: the
whole head, as the step's).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import tokenswift
from tokenswift.bench import default_text
from tokenswift.cache import KVCache, SparseKV
from tokenswift.drafters import DraftVocab
from draft_acceptance import prefill_cached  # this folder's: the scripts run as python benchmarks/NAME.py
from verify_cost import median_ms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--context", type=int, default=16384)
    ap.add_argument("--budgets", default="2%,5%,10%")
    ap.add_argument("--scorers", default="dims:16,int8")
    ap.add_argument("--vocab", default="0", help="draft heads to time: 0 (the whole) or N (DraftVocab)")
    ap.add_argument("--kv-dtype", default="float16")
    ap.add_argument("--activations", default="float", choices=["float", "int8"])
    ap.add_argument("--attention-dtype", default="float32", choices=["float32", "bfloat16", "bfloat16-amx"])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--prefill-cache", default=None, help="as draft_acceptance.py's: the context's K/V rows")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    C = args.context
    probe = tokenswift.load(args.model, heads="none")
    factor = 1
    while probe.config.context_length * factor < C + 64:
        factor *= 2
    lm = tokenswift.load(args.model, heads="none", kv_dtype=args.kv_dtype, activations=args.activations,
                         attention_dtype=args.attention_dtype, rope_scaling=f"yarn:{factor}" if factor > 1 else None)
    m = lm.model
    text = Path(default_text()).read_text(encoding="utf-8")
    ids = lm.encode(text[: 8 * C], max_tokens=10**9)[:C]
    main_cache = KVCache(m.cfg, capacity=C + 64, dtype=m.kv_dtype, rope_len=C + 64)
    how = prefill_cached(lm, torch.tensor(ids), main_cache, args.prefill_cache, f"yarn:{factor}" if factor > 1 else None)
    print(f"{lm.name}, {args.kv_dtype} cache, yarn:{factor}; {how}", flush=True)
    tok, pos = torch.tensor([[ids[-1]]]), torch.tensor([[C]])

    def step(cache, head=m.logits) -> None:
        head(m(tok, pos, cache)[0, -1:])
        main_cache.truncate(C)

    ar = median_ms(lambda: step(main_cache), args.reps)
    print(f"ar step: {ar:.1f} ms", flush=True)
    history = torch.tensor(ids)
    for n in (int(v) for v in args.vocab.split(",")):
        head = m.logits
        if n:
            vocab = DraftVocab(m, n)
            vocab.see(history, C)
            head = vocab.logits
            head(m(tok, pos, main_cache)[0, -1:])  # builds the head
            main_cache.truncate(C)
            print(f"draft vocabulary {n}: {int(vocab.ids.numel())} ids", flush=True)
        for scorer in args.scorers.split(","):
            for b in args.budgets.split(","):
                B = round(C * float(b[:-1]) / 100) if b.endswith("%") else int(b)
                view = SparseKV(m.cfg, budget=B, sinks=16, recent=64, scorer=scorer)
                view.attach(main_cache, C)
                ms = median_ms(lambda: step(view, head), args.reps)
                print(f"sparse {scorer} B={B} ({b}) vocab {n or 'all'}: draft pass {ms:.1f} ms = {ms / ar:.3f} of a step",
                      flush=True)


if __name__ == "__main__":
    main()
