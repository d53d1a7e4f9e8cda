"""Writes a model's draft-vocabulary order: its token ids by how often they occur in the training
texts (kjv and jargon from ../shared/data, never the held-out cdne), most frequent first, for
`--draft-vocab N` to take the first N of (`drafters.DraftVocab`). A vocabulary whose ids do not
follow frequency needs one: Gemma 3's first 16,384 ids cover 0.72 of cdne's tokens, its 16,384
most frequent here 0.91.

    python benchmarks/draft_vocab_order.py --model gemma3-270m --keep 32768

It prints the coverage of held-out cdne text by the first N ids of the order and of plain id
order, and writes src/tokenswift/data/vocab/<model>.npy (int32), which the loader attaches to
the embedded model of that name.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from tokenswift.loading import embedded_path, gguf_tokenizer

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
OUT = Path(__file__).resolve().parents[1] / "src" / "tokenswift" / "data" / "vocab"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma3-270m", help="an embedded model name")
    ap.add_argument("--keep", type=int, default=32768, help="ids kept in the order (the most --draft-vocab can use)")
    args = ap.parse_args()
    tok = gguf_tokenizer(embedded_path(args.model))
    vocab = len(tok)
    counts = np.zeros(vocab, dtype=np.int64)
    for name in ("kjv.txt", "jargon.txt"):
        ids = np.asarray(tok((DATA / name).read_text(encoding="utf-8")).input_ids, dtype=np.int64)
        counts += np.bincount(ids, minlength=vocab)[:vocab]
    order = np.lexsort((np.arange(vocab), -counts))[: args.keep].astype(np.int32)  # by count, ties by id
    held = np.asarray(tok((DATA / "cdne.txt").read_text(encoding="utf-8")).input_ids, dtype=np.int64)
    for n in (4096, 8192, 16384, 32768):
        if n <= args.keep:
            member = np.zeros(vocab, dtype=bool)
            member[order[:n]] = True
            print(f"first {n:6d}: cdne coverage {member[held].mean():.3f} by frequency, {(held < n).mean():.3f} by id")
    OUT.mkdir(parents=True, exist_ok=True)
    np.save(OUT / f"{args.model}.npy", order)
    print(f"wrote {OUT / (args.model + '.npy')}: {len(order)} ids, {int((counts > 0).sum())} seen in training text")


if __name__ == "__main__":
    main()
