"""Draft-head training with a frozen backbone, and head evaluation.

Head k (1-based) reads the hidden state h_t of position t (the residual stream after token t)
and predicts token t+1+k; the base model's own LM head predicts t+1. Only the heads train.

Data comes in two modes:
- text: windows of `seq_len` tokens from the given files; targets are the text's tokens.
- self-distill: prompts of `prompt_len` tokens from the files, continued by the model itself
  with the paper's sampler (temperature 1, min-p 0.1, penalty 1.2 over 1024); targets are the
  generated tokens, so the heads learn the model's own distribution.

The backbone's hidden states are computed once and stored on disk (float16 memmaps under the
cache directory, keyed by model, data and options), so further epochs and reruns skip the
backbone. Training is deterministic for a seed, and resumable from its checkpoint: batches are
a function of (seed, step) alone, and the checkpoint holds the heads and Adam's state.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .cache import KVCache
from .config import DRAFTER_POOLS, PAPER_SAMPLING, SamplingConfig
from .heads import DraftHeads, model_identity, save_heads, save_safetensors
from .model import Decoder
from .sampling import draw, final_logprobs, history_windows

log = logging.getLogger("tokenswift")

# The sampler self-distillation generates with (the paper's defaults).
DISTILL_SAMPLING = dict(PAPER_SAMPLING)

Progress = Callable[[str, int, int, dict[str, Any]], None]  # (phase, done, total, info)


def _need(ok: bool, name: str, value: Any, want: str) -> None:
    """A training option's check: ValueError naming the option, what it must be and its value."""
    if not ok:
        raise ValueError(f"{name} must be {want}, got {value!r}")


@dataclass
class TrainConfig:
    num_heads: int = 3
    steps: int = 1000
    seq_len: int = 256
    lr: float = 1e-3
    batch_size: int = 8
    seed: int = 0
    self_distill: bool = False
    max_tokens: int = 262_144  # size of the training pool (tokens whose hidden states are cached)
    prompt_len: int = 32  # self-distill: prompt tokens at the start of each sequence
    gen_batch: int = 64  # self-distill: sequences generated side by side
    warmup: float = 0.05  # fraction of steps with a linear warm-up
    min_lr_ratio: float = 0.1  # cosine decay ends at lr × this
    weight_decay: float = 0.0
    clip: float = 1.0
    checkpoint_every: int = 25

    def __post_init__(self) -> None:
        _need(isinstance(self.num_heads, int) and 1 <= self.num_heads <= 16, "num_heads", self.num_heads, "in [1, 16]")
        _need(isinstance(self.steps, int) and self.steps >= 1, "steps", self.steps, "an integer >= 1")
        _need(isinstance(self.seq_len, int) and self.seq_len >= self.num_heads + 2, "seq_len", self.seq_len,
             f">= num_heads + 2 = {self.num_heads + 2}")
        _need(self.lr > 0 and math.isfinite(self.lr), "lr", self.lr, "> 0")
        _need(isinstance(self.batch_size, int) and self.batch_size >= 1, "batch_size", self.batch_size, ">= 1")
        _need(self.max_tokens >= self.seq_len, "max_tokens", self.max_tokens, f">= seq_len ({self.seq_len})")
        _need(not self.self_distill or 1 <= self.prompt_len < self.seq_len - self.num_heads, "prompt_len", self.prompt_len,
             f"in [1, seq_len - num_heads) = [1, {self.seq_len - self.num_heads})")
        _need(self.gen_batch >= 1, "gen_batch", self.gen_batch, ">= 1")
        _need(0 <= self.warmup < 1, "warmup", self.warmup, "in [0, 1)")

    @property
    def sequences(self) -> int:
        return self.max_tokens // self.seq_len

    def data_key(self) -> dict[str, Any]:
        """The options that decide the cached hidden states."""
        k = {"seq_len": self.seq_len, "sequences": self.sequences, "seed": self.seed, "self_distill": self.self_distill}
        if self.self_distill:
            k.update(prompt_len=self.prompt_len, sampling=DISTILL_SAMPLING)
        return k


# --- data ----------------------------------------------------------------------------------------


def read_texts(files: Sequence[str | os.PathLike[str]]) -> list[str]:
    if not files:
        raise ValueError("no training data: give at least one text file")
    out = []
    for f in files:
        p = Path(f)
        if not p.is_file():
            raise FileNotFoundError(f"data file not found: {p}")
        try:
            out.append(p.read_bytes().decode("utf-8"))
        except UnicodeDecodeError as e:
            raise ValueError(f"data file {p} is not UTF-8 (bad byte at offset {e.start})") from None
    return out


def tokenize(tokenizer: Any, texts: Sequence[str]) -> list[np.ndarray]:
    """Each text as one int32 array; long texts go through the tokenizer in paragraph batches."""
    docs = []
    for text in texts:
        parts = text.split("\n\n")
        pieces = [p + "\n\n" for p in parts[:-1]] + [parts[-1]]
        ids: list[int] = []
        for i in range(0, len(pieces), 4096):
            for row in tokenizer(pieces[i : i + 4096], add_special_tokens=False).input_ids:
                ids.extend(row)
        docs.append(np.asarray(ids, dtype=np.int32))
    return docs


def pick_windows(docs: Sequence[np.ndarray], length: int, count: int, seed: int) -> np.ndarray:
    """`count` non-overlapping windows of `length` tokens, drawn uniformly from all the documents
    -> [count, length] int32. Deterministic for a seed."""
    spans = [(d, s) for d, doc in enumerate(docs) for s in range(0, len(doc) - length + 1, length)]
    if not spans:
        raise ValueError(f"the data holds fewer than {length} tokens")
    if count > len(spans):
        log.info("data holds %d windows of %d tokens; using all of them", len(spans), length)
        count = len(spans)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(spans), generator=g)[:count].tolist()
    out = np.empty((count, length), dtype=np.int32)
    for i, j in enumerate(order):
        d, s = spans[j]
        out[i] = docs[d][s : s + length]
    return out


class HiddenStore:
    """On-disk pool of training sequences: tokens [N, S] int32, hidden [N, S, D] float16 (the
    backbone's pre-norm residual output), start [N] (first position whose targets count).
    `filled` sequences are complete; filling resumes where it stopped."""

    def __init__(self, root: Path, n: int, s: int, d: int, key: dict[str, Any]) -> None:
        self.root = root
        self.meta_path = root / "meta.json"
        root.mkdir(parents=True, exist_ok=True)
        meta = json.loads(self.meta_path.read_text()) if self.meta_path.is_file() else None
        shape_ok = meta is not None and meta.get("key") == key and meta.get("shape") == [n, s, d]
        mode = "r+" if shape_ok else "w+"
        self.tokens = np.lib.format.open_memmap(root / "tokens.npy", mode=mode, dtype=np.int32, shape=(n, s))
        self.hidden = np.lib.format.open_memmap(root / "hidden.npy", mode=mode, dtype=np.float16, shape=(n, s, d))
        self.start = np.lib.format.open_memmap(root / "start.npy", mode=mode, dtype=np.int32, shape=(n,))
        self.key = key
        self.filled = int(meta.get("filled", 0)) if shape_ok else 0
        if not shape_ok:
            self._save_meta()

    def _save_meta(self) -> None:
        tmp = self.meta_path.with_name("meta.json.tmp")
        tmp.write_text(json.dumps({"key": self.key, "shape": list(self.hidden.shape), "filled": self.filled}))
        tmp.replace(self.meta_path)

    def commit(self, upto: int) -> None:
        """Marks sequences [0, upto) complete, after flushing them to disk."""
        self.tokens.flush()
        self.hidden.flush()
        self.start.flush()
        self.filled = upto
        self._save_meta()

    @property
    def size(self) -> int:
        return self.hidden.shape[0]


def store_dir(cache_dir: Path, model: Decoder, files: Sequence[str | os.PathLike[str]], cfg: TrainConfig) -> Path:
    ident = model_identity(model)
    files_id = [(str(Path(f).resolve()), Path(f).stat().st_size, int(Path(f).stat().st_mtime)) for f in files]
    blob = json.dumps({"model": ident, "files": files_id, "data": cfg.data_key()}, sort_keys=True)
    return cache_dir / hashlib.sha256(blob.encode()).hexdigest()[:20]


@torch.inference_mode()
def fill_text(store: HiddenStore, model: Decoder, windows: np.ndarray, batch: int, progress: Progress | None) -> None:
    """Hidden states of text windows, `batch` windows per backbone pass."""
    n, s = windows.shape
    store.tokens[:] = windows
    store.start[:] = 0
    t0 = time.perf_counter()
    done0 = i = store.filled
    while i < n:
        j = min(n, i + batch)
        toks = torch.from_numpy(windows[i:j].astype(np.int64)).to(model.device)  # [b, S]
        cache = KVCache(model.cfg, capacity=s, batch=j - i, dtype=model.dtype, device=model.device)
        h = model.prefill(toks, cache, return_all=True)  # [b, S, D]
        store.hidden[i:j] = h.float().cpu().numpy().astype(np.float16)
        store.commit(j)
        if progress:
            progress("hidden", j, n, {"tokens_per_s": (j - done0) * s / max(1e-9, time.perf_counter() - t0)})
        i = j


STORED_FLOOR = -60.0  # stored log-probabilities are clamped here (float16; filtered tokens are -inf)


def stored_top(lp: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """lp [..., V] final log-probabilities -> the k likeliest (ids int32, log-probs float16), as
    the pools store them."""
    top = lp.topk(k, dim=-1)
    return (top.indices.cpu().numpy().astype(np.int32),
            top.values.clamp(min=STORED_FLOOR).cpu().numpy().astype(np.float16))


@torch.inference_mode()
def generate_batch(
    model: Decoder,
    prompts: torch.Tensor,  # [b, P] int64
    total: int,
    sampling: Sequence[SamplingConfig],
    hidden_out: np.ndarray | None = None,  # [b, total, D] float16, filled with each position's hidden
    taps: tuple[tuple[int, ...], np.ndarray] | None = None,  # (layers, out [b, total, 3, D] float16)
    dist_out: tuple[np.ndarray, np.ndarray] | None = None,  # ids [b, total, K] int32, logprobs float16
) -> torch.Tensor:  # [b, total] int64: prompt then generated tokens
    """Plain sampling of b sequences side by side (one pass per position for all of them).
    Row i uses `sampling[i]` (its own seed), so each row is exactly what `ar` would write for it.
    With `taps`, the residual stream at those layers is kept for every position; with `dist_out`,
    the K likeliest tokens of the sampler's final distribution each generated token was drawn from
    (row t: the distribution of token t)."""
    b, p = prompts.shape
    dev = model.device
    toks = torch.empty(b, total, dtype=torch.int64)  # [b, total]
    toks[:, :p] = prompts
    cache = KVCache(model.cfg, capacity=total, batch=b, dtype=model.dtype, device=dev)
    tap = None
    if taps is not None:
        tap = (taps[0], torch.empty(b, p, len(taps[0]), model.cfg.hidden_size, dtype=model.dtype, device=dev))
    h = model.prefill(prompts.to(dev), cache, return_all=True, taps=tap)  # [b, P, D]
    if tap is not None:
        taps[1][:, :p] = tap[1].float().cpu().numpy().astype(np.float16)
        tap = (taps[0], torch.empty(b, 1, len(taps[0]), model.cfg.hidden_size, dtype=model.dtype, device=dev))
    if hidden_out is not None:
        hidden_out[:, :p] = h.float().cpu().numpy().astype(np.float16)
    last = h[:, -1]  # [b, D]
    pos = torch.empty(b, 1, dtype=torch.int64, device=dev)  # [b, 1]
    W = sampling[0].penalty_width
    for t in range(p, total):
        logits = model.logits(last)  # [b, V]
        window = toks[:, max(0, t - W) : t].to(dev) if W else None  # [b, W]
        lp = final_logprobs(logits, window, sampling[0])  # [b, V]; the rows differ only in seed
        for r in range(b):
            toks[r, t] = draw(lp[r : r + 1], [t], sampling[r])[0]
        if dist_out is not None:
            dist_out[0][:, t], dist_out[1][:, t] = stored_top(lp, dist_out[0].shape[-1])
        if t == total - 1:
            break
        pos.fill_(t)
        h = model(toks[:, t : t + 1].to(dev), pos, cache, taps=tap)  # [b, 1, D]
        if tap is not None:
            taps[1][:, t] = tap[1][:, 0].float().cpu().numpy().astype(np.float16)
        last = h[:, -1]
        if hidden_out is not None:
            hidden_out[:, t] = h[:, 0].float().cpu().numpy().astype(np.float16)
    if hidden_out is not None:
        # the last position's hidden state is never needed for a target; keep the memmap defined
        hidden_out[:, total - 1] = 0
    return toks


def fill_self_distill(store: HiddenStore, model: Decoder, prompts: np.ndarray, cfg: TrainConfig,
                      progress: Progress | None) -> None:
    n = store.size
    s = cfg.seq_len
    t0 = time.perf_counter()
    done0 = store.filled
    i = store.filled
    while i < n:
        j = min(n, i + cfg.gen_batch)
        samplers = [SamplingConfig(seed=cfg.seed * 1_000_003 + r, **DISTILL_SAMPLING) for r in range(i, j)]
        buf = np.empty((j - i, s, model.cfg.hidden_size), dtype=np.float16)
        toks = generate_batch(model, torch.from_numpy(prompts[i:j].astype(np.int64)), s, samplers, buf)
        store.hidden[i:j] = buf
        store.tokens[i:j] = toks.numpy().astype(np.int32)
        # targets start with the first generated token: h_{P-1} predicts it (base), heads the next
        store.start[i:j] = cfg.prompt_len - 1
        store.commit(j)
        if progress:
            rate = (j - done0) * (s - cfg.prompt_len) / max(1e-9, time.perf_counter() - t0)
            progress("generate", j, n, {"tokens_per_s": rate})
        i = j


def build_store(model: Decoder, tokenizer: Any, files: Sequence[str | os.PathLike[str]], cfg: TrainConfig,
                cache_dir: Path, progress: Progress | None = None) -> HiddenStore:
    if tokenizer is None:
        raise ValueError("head training needs a model with a tokenizer (to read the text files)")
    docs = tokenize(tokenizer, read_texts(files))
    length = cfg.prompt_len if cfg.self_distill else cfg.seq_len
    windows = pick_windows(docs, length, cfg.sequences, cfg.seed)
    root = store_dir(cache_dir, model, files, cfg)
    store = HiddenStore(root, windows.shape[0], cfg.seq_len, model.cfg.hidden_size, cfg.data_key())
    if store.filled < store.size:
        log.info("caching hidden states in %s (%d of %d sequences done)", root, store.filled, store.size)
        if cfg.self_distill:
            fill_self_distill(store, model, windows, cfg, progress)
        else:
            fill_text(store, model, windows, max(1, 2048 // cfg.seq_len), progress)
    return store


# --- training ------------------------------------------------------------------------------------


def batch_indices(step: int, batch_size: int, n: int, seed: int) -> list[int]:
    """Sequences of a step: epochs are seeded permutations, so any step's batch is known
    without replaying the ones before it (what makes resuming exact)."""
    out = []
    perm_epoch, perm = -1, None
    for i in range(step * batch_size, (step + 1) * batch_size):
        e = i // n
        if e != perm_epoch:
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + e)).tolist()
            perm_epoch = e
        out.append(perm[i % n])
    return out


def lr_at(step: int, cfg: "TrainConfig | DrafterConfig") -> float:
    warm = max(1, int(cfg.steps * cfg.warmup))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    t = (step - warm) / max(1, cfg.steps - warm)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def new_heads(model: Decoder, num_heads: int, hidden_rms: float = 1.0) -> DraftHeads:
    """Zero residual weights: every head starts by repeating the base prediction's hidden state.

    The input norms start at the RMS of the hidden states: the residual stream of a trained
    model is large (about 40 for SmolLM2, with outlier dimensions in the thousands), and with
    unit norms W would need entries that far from its zero start before a head could move
    its prediction at all, which Adam's per-step updates take thousands of steps to reach."""
    cfg = model.cfg
    heads = DraftHeads(cfg.hidden_size, num_heads, cfg.rms_norm_eps, dtype=torch.float32, device=model.device)
    with torch.no_grad():
        heads.norm_in.fill_(hidden_rms)
        heads.norm_out.copy_(model.norm.detach().float().expand(num_heads, -1))
    return heads


def hidden_rms(store: HiddenStore, sequences: int = 8) -> float:
    x = store.hidden[: min(sequences, store.size)].astype(np.float32)
    return float(np.sqrt(np.mean(x * x)))


class LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of `x @ w.T` against `y`, for a frozen `w`, computed in row chunks into
    one reused buffer: the [M, V] logits are never stored, and the gradient for x is formed in
    the forward pass. Allocating and freeing [M, V] tensors every step cost as much system time
    in page faults as the matmuls themselves on CPU."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, y: torch.Tensor, chunk: int = 512):  # type: ignore[override]
        # x [M, D] float32, w [V, D] (no grad), y [M] int64 -> (loss [], hits [])
        M = x.shape[0]
        grad = torch.empty_like(x)  # [M, D] d(loss)/dx
        buf = torch.empty(min(chunk, M), w.shape[0], dtype=x.dtype, device=x.device)  # [c, V]
        total = torch.zeros((), dtype=torch.float64, device=x.device)
        hits = torch.zeros((), dtype=torch.int64, device=x.device)
        for i in range(0, M, chunk):
            xc, yc = x[i : i + chunk], y[i : i + chunk]
            n = xc.shape[0]
            lg = buf[:n]
            torch.matmul(xc, w.t(), out=lg)
            rows = torch.arange(n, device=x.device)
            hits += (lg.argmax(-1) == yc).sum()
            m = lg.amax(-1, keepdim=True)  # [n, 1]
            z = lg[rows, yc].unsqueeze(-1)  # [n, 1] target logits
            lg.sub_(m).exp_()
            ssum = lg.sum(-1, keepdim=True)  # [n, 1]
            total += (m + ssum.log() - z).sum().double()
            lg.div_(ssum)  # softmax
            lg[rows, yc] -= 1.0
            torch.matmul(lg, w, out=grad[i : i + n])
        grad.div_(M)
        ctx.save_for_backward(grad)
        return (total / M).to(x.dtype), hits

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, _grad_hits: torch.Tensor):  # type: ignore[override]
        (grad,) = ctx.saved_tensors
        return grad * grad_loss, None, None, None


def head_losses(heads: DraftHeads, lm_head: torch.Tensor, hidden: torch.Tensor, tokens: torch.Tensor,
                start: torch.Tensor) -> tuple[list[torch.Tensor], list[float]]:
    """hidden [b, S, D] float32, tokens [b, S], start [b] -> per-head mean cross-entropy and top-1
    accuracy over positions t >= start whose target t+1+k lies in the window."""
    b, S, D = hidden.shape
    states = heads.states(hidden)  # [K, b, S, D]
    t = torch.arange(S, device=hidden.device)
    losses, accs = [], []
    for k in range(1, heads.num_heads + 1):
        valid = (t.unsqueeze(0) >= start.unsqueeze(1)) & (t.unsqueeze(0) < S - 1 - k)  # [b, S]
        x = states[k - 1][valid]  # [M, D]
        y = F.pad(tokens[:, 1 + k :], (0, 1 + k))[valid]  # [M] token t+1+k for each kept t
        loss, hits = LinearCrossEntropy.apply(x, lm_head, y)
        losses.append(loss)
        accs.append(int(hits) / max(1, y.numel()))
    return losses, accs


def _ckpt_path(out: Path) -> Path:
    return out.with_name(out.name + ".ckpt")


def _save_checkpoint(path: Path, named: Sequence[tuple[str, torch.Tensor]], opt: torch.optim.Optimizer, step: int,
                     meta: dict[str, Any], prefix: str = "heads.") -> None:
    """The trained tensors (`named`, saved as prefix + name) and Adam's state, written atomically."""
    tensors = {f"{prefix}{n}": p.detach().contiguous() for n, p in named}
    adam_steps = {}
    for n, p in named:
        st = opt.state.get(p, {})
        if st:
            tensors[f"adam.{n}.exp_avg"] = st["exp_avg"].contiguous()
            tensors[f"adam.{n}.exp_avg_sq"] = st["exp_avg_sq"].contiguous()
            adam_steps[n] = float(st["step"])
    save_safetensors(tensors, path, {"step": str(step), "meta": json.dumps(meta), "adam_steps": json.dumps(adam_steps)})


def _load_checkpoint(path: Path, named: Sequence[tuple[str, torch.Tensor]], opt: torch.optim.Optimizer,
                     meta: dict[str, Any], prefix: str = "heads.") -> int:
    """Restores what `_save_checkpoint` wrote, after checking it was made with the same options."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        md = f.metadata() or {}
        saved = json.loads(md.get("meta", "{}"))
        if saved != meta:
            a, b = {**saved.get("config", {}), **saved}, {**meta.get("config", {}), **meta}
            diff = sorted(k for k in set(a) | set(b) if k != "config" and a.get(k) != b.get(k))
            raise ValueError(f"checkpoint {path} was made with other options ({', '.join(diff)} differ); "
                             f"delete it or train without --resume")
        adam_steps = json.loads(md.get("adam_steps", "{}"))
        with torch.no_grad():
            for n, p in named:
                p.copy_(f.get_tensor(f"{prefix}{n}"))
                if n in adam_steps:
                    opt.state[p] = {
                        "step": torch.tensor(adam_steps[n]),
                        "exp_avg": f.get_tensor(f"adam.{n}.exp_avg"),
                        "exp_avg_sq": f.get_tensor(f"adam.{n}.exp_avg_sq"),
                    }
        return int(md["step"])


def train_heads(model: Decoder, store: HiddenStore, cfg: TrainConfig, out: str | os.PathLike[str],
                resume: bool = False, progress: Progress | None = None, model_name: str = "",
                info: dict[str, Any] | None = None) -> dict[str, Any]:
    """Trains heads on the stored hidden states and writes them (float16) to `out`.
    Checkpoints go to `<out>.ckpt` every `checkpoint_every` steps."""
    if model.packed:
        raise ValueError("head training needs unpacked weights: load the model with pack=False")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    lm_head = model.lm_head.detach().float()  # [V, D] frozen
    heads = new_heads(model, cfg.num_heads, hidden_rms(store))
    opt = torch.optim.AdamW(heads.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    meta = {"config": asdict(cfg), "store": store.root.name}
    ckpt = _ckpt_path(out)
    step = 0
    if resume and ckpt.is_file():
        step = _load_checkpoint(ckpt, list(heads.named_parameters()), opt, meta)
        log.info("resuming from %s at step %d", ckpt, step)
    n = store.size
    t0 = time.perf_counter()
    seen = 0
    loss_v: list[float] = []
    accs: list[float] = []
    while step < cfg.steps:
        idx = sorted(batch_indices(step, cfg.batch_size, n, cfg.seed))
        hidden = torch.from_numpy(store.hidden[idx].astype(np.float32)).to(model.device)  # [b, S, D]
        tokens = torch.from_numpy(store.tokens[idx].astype(np.int64)).to(model.device)  # [b, S]
        start = torch.from_numpy(store.start[idx].astype(np.int64)).to(model.device)  # [b]
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        losses, accs = head_losses(heads, lm_head, hidden, tokens, start)
        loss = torch.stack(losses).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.clip > 0:
            torch.nn.utils.clip_grad_norm_(heads.parameters(), cfg.clip)
        opt.step()
        step += 1
        seen += int((tokens.shape[1] - start).sum())
        loss_v = [float(x.detach()) for x in losses]
        if progress:
            progress("train", step, cfg.steps, {"loss": float(loss.detach()), "acc": accs,
                                                 "tokens_per_s": seen / max(1e-9, time.perf_counter() - t0)})
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            _save_checkpoint(ckpt, list(heads.named_parameters()), opt, step, meta)
    seconds = time.perf_counter() - t0
    summary = {
        "steps": cfg.steps, "seq_len": cfg.seq_len, "batch_size": cfg.batch_size, "lr": cfg.lr, "seed": cfg.seed,
        "self_distill": cfg.self_distill, "pool_sequences": n, "final_loss": loss_v, "final_train_acc": accs,
        "train_seconds_this_run": round(seconds, 1),
    }
    save_heads(heads, out, model_identity(model, model_name), extra={**summary, **(info or {})})
    return summary


# --- evaluation ----------------------------------------------------------------------------------


@dataclass
class EvalResult:
    top1: list[float]  # per head
    top3: list[float]
    base_top1: float  # the base LM head on the same positions (next token), for reference
    positions: int
    greedy: dict[str, Any] = field(default_factory=dict)


@torch.inference_mode()
def head_accuracy(model: Decoder, heads: DraftHeads, windows: np.ndarray, batch: int = 4) -> EvalResult:
    """Per-head top-1 / top-3 on text windows [N, S]: head k at t against token t+1+k."""
    n, S = windows.shape
    K = heads.num_heads
    lm_head = model.lm_head
    hit1 = [0] * K
    hit3 = [0] * K
    count = [0] * K
    base_hits = base_count = 0
    from .model import linear

    for i in range(0, n, batch):
        toks = torch.from_numpy(windows[i : i + batch].astype(np.int64)).to(model.device)  # [b, S]
        b = toks.shape[0]
        cache = KVCache(model.cfg, capacity=S, batch=b, dtype=model.dtype, device=model.device)
        h = model.prefill(toks, cache, return_all=True)  # [b, S, D]
        base = model.logits(h[:, : S - 1]).argmax(-1)  # [b, S-1]
        base_hits += int((base == toks[:, 1:]).sum())
        base_count += base.numel()
        states = heads.states(h)  # [K, b, S, D]
        for k in range(1, K + 1):
            x = states[k - 1][:, : S - 1 - k]  # [b, S-1-k, D]
            y = toks[:, 1 + k :]  # [b, S-1-k]
            top = linear(x, lm_head, None).topk(3, dim=-1).indices  # [b, S-1-k, 3]
            hit1[k - 1] += int((top[..., 0] == y).sum())
            hit3[k - 1] += int((top == y.unsqueeze(-1)).any(-1).sum())
            count[k - 1] += y.numel()
    return EvalResult(
        top1=[h / c for h, c in zip(hit1, count)],
        top3=[h / c for h, c in zip(hit3, count)],
        base_top1=base_hits / max(1, base_count),
        positions=count[0],
    )


def greedy_accepted_length(model: Decoder, heads: DraftHeads, prompts: np.ndarray, new_tokens: int,
                           tree: str = "1,3,3,3", eos_ids: Sequence[int] = ()) -> dict[str, Any]:
    """Runs greedy TokenSwift with these heads and the tree alone (no n-grams, full KV draft), so
    the figure measures the heads: mean accepted draft tokens per iteration over the prompts."""
    from .config import SpecConfig
    from .engine import generate_speculative

    spec = SpecConfig(tree=tree, use_ngrams=False, draft_kv="full", gamma=1 + heads.num_heads)
    greedy = SamplingConfig(temperature=0.0)
    accepted = iterations = produced = 0
    for row in prompts:
        stats: dict[str, Any] = {}
        for step in generate_speculative(model, heads, row.tolist(), new_tokens, greedy, spec, eos_ids, ignore_eos=True):
            stats = step.stats
        accepted += stats["accepted_draft_tokens"]
        iterations += stats["iterations"]
        produced += stats["new_tokens"]
    return {
        "tree": tree,
        "prompts": len(prompts),
        "new_tokens": produced,
        "iterations": iterations,
        "mean_accepted_length": accepted / max(1, iterations),
        "tokens_per_iteration": (produced - len(prompts)) / max(1, iterations),
    }


# --- the seq drafter: self-distillation ----------------------------------------------------------
#
# The target writes continuations of prompts from the data with the paper's sampler. Kept per
# sequence: its tokens, the target's residual stream at the drafter's three tap layers at every
# position, and the K likeliest tokens of the final distribution each generated token was drawn
# from, with their log-probabilities; the row's seed, so that evaluation can redo each coupled draw.
# Training unrolls the drafter `unroll` steps on its own outputs (training-time test): depth s reads
# the drafter's depth s-1 output at the previous position and attends to the true entries up to the
# chain's root plus its own chain entries, exactly as drafting does.


@dataclass
class DrafterConfig:
    steps: int = 400
    seq_len: int = 256
    prompt_len: int = 64  # prompt tokens at the start of each sequence; the rest the model writes
    sequences: int = 512  # size of the self-distillation pool
    gen_batch: int = 64
    vocab: int = 8192  # draft vocabulary: the tokens the model writes most (expected counts)
    unroll: int = 4  # training-time test depth
    lr: float = 1e-3
    batch_size: int = 4
    seed: int = 0
    top_k: int = 64  # stored tokens of each target distribution
    warmup: float = 0.05
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    clip: float = 1.0
    checkpoint_every: int = 25
    window: int = 256
    # "generated": the model continues prompts of the data (its own text, the run's distribution);
    # "text": the data's own windows, teacher-forced: one prefill a window instead of one pass a
    # token, so a pool many times larger costs the same time (EAGLE trains on a fixed corpus)
    pool: str = "generated"

    def __post_init__(self) -> None:
        _need(isinstance(self.steps, int) and self.steps >= 1, "steps", self.steps, "an integer >= 1")
        _need(self.pool in DRAFTER_POOLS, "pool", self.pool, " or ".join(DRAFTER_POOLS))
        _need(isinstance(self.seq_len, int) and 8 <= self.seq_len <= 4096, "seq_len", self.seq_len, "in [8, 4096]")
        _need(isinstance(self.prompt_len, int) and 1 <= self.prompt_len < self.seq_len - 2, "prompt_len",
             self.prompt_len, f"in [1, seq_len - 2) = [1, {self.seq_len - 2})")
        _need(isinstance(self.sequences, int) and self.sequences >= 1, "sequences", self.sequences, "an integer >= 1")
        _need(isinstance(self.vocab, int) and self.vocab >= 16, "vocab", self.vocab, "an integer >= 16")
        _need(isinstance(self.unroll, int) and 1 <= self.unroll <= 16, "unroll", self.unroll, "in [1, 16]")
        _need(self.lr > 0 and math.isfinite(self.lr), "lr", self.lr, "> 0")
        _need(isinstance(self.batch_size, int) and self.batch_size >= 1, "batch_size", self.batch_size, ">= 1")
        _need(isinstance(self.top_k, int) and 1 <= self.top_k <= 1024, "top_k", self.top_k, "in [1, 1024]")
        _need(self.gen_batch >= 1, "gen_batch", self.gen_batch, ">= 1")
        _need(0 <= self.warmup < 1, "warmup", self.warmup, "in [0, 1)")
        _need(isinstance(self.window, int) and self.window >= 1, "window", self.window, ">= 1")

    def data_key(self) -> dict[str, Any]:
        key = {"kind": "seq-drafter", "seq_len": self.seq_len, "prompt_len": self.prompt_len,
               "sequences": self.sequences, "seed": self.seed, "top_k": self.top_k, "sampling": DISTILL_SAMPLING}
        if self.pool != "generated":  # generated pools keep the keys they were cached under
            key["pool"] = self.pool
        return key


class DistillStore:
    """On-disk self-distillation pool (memmaps): tokens [n, S] int32, feats [n, S, 3, D] float16,
    ids / logprobs [n, S, K] (the distribution of token t at row t), seeds [n] int64. Filling
    resumes at the first incomplete batch."""

    def __init__(self, root: Path, n: int, s: int, taps: int, d: int, k: int, key: dict[str, Any]) -> None:
        self.root = root
        self.meta_path = root / "meta.json"
        root.mkdir(parents=True, exist_ok=True)
        meta = json.loads(self.meta_path.read_text()) if self.meta_path.is_file() else None
        shape = [n, s, taps, d, k]
        ok = meta is not None and meta.get("key") == key and meta.get("shape") == shape
        mode = "r+" if ok else "w+"

        def mm(name: str, dtype: Any, shp: tuple[int, ...]) -> np.ndarray:
            return np.lib.format.open_memmap(root / f"{name}.npy", mode=mode, dtype=dtype, shape=shp)

        self.tokens = mm("tokens", np.int32, (n, s))
        self.feats = mm("feats", np.float16, (n, s, taps, d))
        self.ids = mm("ids", np.int32, (n, s, k))
        self.logprobs = mm("logprobs", np.float16, (n, s, k))
        self.seeds = mm("seeds", np.int64, (n,))
        self.key = key
        self.shape = shape
        self.filled = int(meta.get("filled", 0)) if ok else 0
        if not ok:
            self._save_meta()

    def _save_meta(self) -> None:
        tmp = self.meta_path.with_name("meta.json.tmp")
        tmp.write_text(json.dumps({"key": self.key, "shape": self.shape, "filled": self.filled}))
        tmp.replace(self.meta_path)

    def commit(self, upto: int) -> None:
        for a in (self.tokens, self.feats, self.ids, self.logprobs, self.seeds):
            a.flush()
        self.filled = upto
        self._save_meta()

    def put(self, i: int, tokens: np.ndarray, feats: np.ndarray, ids: np.ndarray, logprobs: np.ndarray,
            seeds: np.ndarray) -> None:
        """Writes rows i.. (as many as `tokens` holds) and commits the pool up to their end."""
        j = i + tokens.shape[0]
        self.tokens[i:j] = tokens
        self.feats[i:j] = feats
        self.ids[i:j] = ids
        self.logprobs[i:j] = logprobs
        self.seeds[i:j] = seeds
        self.commit(j)

    @property
    def size(self) -> int:
        return self.tokens.shape[0]


def distill_dir(cache_dir: Path, model: Decoder, files: Sequence[str | os.PathLike[str]], cfg: DrafterConfig,
                taps: tuple[int, ...], seed_base: int = 0) -> Path:
    ident = model_identity(model)
    files_id = [(str(Path(f).resolve()), Path(f).stat().st_size, int(Path(f).stat().st_mtime)) for f in files]
    key = {"model": ident, "files": files_id, "data": cfg.data_key(), "taps": list(taps)}
    if seed_base:
        key["seed_base"] = seed_base
    blob = json.dumps(key, sort_keys=True)
    return cache_dir / ("seq-" + hashlib.sha256(blob.encode()).hexdigest()[:20])


@torch.inference_mode()
def build_distill_store(model: Decoder, tokenizer: Any, files: Sequence[str | os.PathLike[str]], cfg: DrafterConfig,
                        taps: tuple[int, ...], cache_dir: Path, progress: Progress | None = None,
                        seed_base: int = 0) -> DistillStore:
    """The model continues `cfg.sequences` prompts drawn from `files` (paper sampler), or with
    `cfg.pool == "text"` reads windows of the files themselves; see `DistillStore`. `seed_base`
    offsets the rows' sampling seeds (evaluation uses other seeds)."""
    if tokenizer is None:
        raise ValueError("drafter training needs a model with a tokenizer (to read the text files)")
    docs = tokenize(tokenizer, read_texts(files))
    text = cfg.pool == "text"
    prompts = pick_windows(docs, cfg.seq_len if text else cfg.prompt_len, cfg.sequences, cfg.seed)
    root = distill_dir(cache_dir, model, files, cfg, taps, seed_base)
    store = DistillStore(root, prompts.shape[0], cfg.seq_len, len(taps), model.cfg.hidden_size, cfg.top_k,
                         {**cfg.data_key(), "seed_base": seed_base})
    if store.filled < store.size:
        log.info("distillation pool in %s (%d of %d sequences done)", root, store.filled, store.size)
    if text:
        fill_text_distill(store, model, prompts, cfg, taps, progress)
    else:
        fill_distill(store, model, prompts, cfg, taps, progress, seed_base)
    return store


@torch.inference_mode()
def fill_distill(store: DistillStore, model: Decoder, prompts: np.ndarray, cfg: DrafterConfig, taps: tuple[int, ...],
                 progress: Progress | None = None, seed_base: int = 0) -> None:
    """Fills the pool from its first incomplete batch: row r continues prompts[r] with the seed
    seed_base + seed·1000003 + r, so each row is what `ar` writes for that seed."""
    n, S, D = store.size, cfg.seq_len, model.cfg.hidden_size
    t0 = time.perf_counter()
    done0 = i = store.filled
    while i < n:
        j = min(n, i + cfg.gen_batch)
        seeds = [seed_base + cfg.seed * 1_000_003 + r for r in range(i, j)]
        samplers = [SamplingConfig(seed=sd, **DISTILL_SAMPLING) for sd in seeds]
        feats = np.zeros((j - i, S, len(taps), D), dtype=np.float16)
        ids = np.zeros((j - i, S, cfg.top_k), dtype=np.int32)
        lps = np.full((j - i, S, cfg.top_k), STORED_FLOOR, dtype=np.float16)
        toks = generate_batch(model, torch.from_numpy(prompts[i:j].astype(np.int64)), S, samplers,
                              taps=(taps, feats), dist_out=(ids, lps))
        store.put(i, toks.numpy().astype(np.int32), feats, ids, lps, np.asarray(seeds, dtype=np.int64))
        if progress:
            rate = (j - done0) * (S - cfg.prompt_len) / max(1e-9, time.perf_counter() - t0)
            progress("generate", j, n, {"tokens_per_s": rate})
        i = j


@torch.inference_mode()
def fill_text_distill(store: DistillStore, model: Decoder, windows: np.ndarray, cfg: DrafterConfig,
                      taps: tuple[int, ...], progress: Progress | None = None) -> None:
    """Fills the pool with text windows [n, S] (teacher-forced): one prefill a batch of windows
    gives every position's features, and the sampler's processing of its logits (the penalty
    over the window's own earlier tokens) the distribution of each next token. Row t holds the
    distribution of token t, as in a generated pool; seeds are -1 (there was no draw)."""
    n, S, D = store.size, cfg.seq_len, model.cfg.hidden_size
    s_cfg = SamplingConfig(**DISTILL_SAMPLING)
    W = s_cfg.penalty_width
    batch = max(1, cfg.gen_batch // 4)  # a prefill's batch is whole windows: commit (and resume) every few
    t0 = time.perf_counter()
    done0 = i = store.filled
    while i < n:
        j = min(n, i + batch)
        toks = torch.from_numpy(windows[i:j].astype(np.int64)).to(model.device)  # [b, S]
        b = j - i
        cache = KVCache(model.cfg, capacity=S, batch=b, dtype=model.dtype, device=model.device)
        tap = (taps, torch.empty(b, S, len(taps), D, dtype=model.dtype, device=model.device))  # [b, S, 3, D]
        h = model.prefill(toks, cache, return_all=True, taps=tap)  # [b, S, D]
        ids = np.zeros((b, S, cfg.top_k), dtype=np.int32)
        lps = np.full((b, S, cfg.top_k), STORED_FLOOR, dtype=np.float16)
        for r in range(b):
            for c0 in range(0, S - 1, 128):  # rows of logits at positions c0.. predict tokens c0+1..
                c1 = min(S - 1, c0 + 128)
                logits = model.logits(h[r, c0:c1])  # [c, V]
                win = history_windows([toks[r, max(0, t + 1 - W) : t + 1] for t in range(c0, c1)], W,
                                      model.device) if W else None
                lp = final_logprobs(logits, win, s_cfg)  # [c, V]
                ids[r, c0 + 1 : c1 + 1], lps[r, c0 + 1 : c1 + 1] = stored_top(lp, cfg.top_k)
        store.put(i, windows[i:j], tap[1].float().cpu().numpy().astype(np.float16), ids, lps,
                  np.full(b, -1, dtype=np.int64))
        if progress:
            progress("prefill", j, n, {"tokens_per_s": (j - done0) * S / max(1e-9, time.perf_counter() - t0)})
        i = j


def draft_vocabulary(store: DistillStore, size: int, prompt_len: int, vocab_size: int) -> torch.Tensor:
    """The `size` tokens the model writes most: expected counts (the summed probabilities of the
    stored distributions over the generated positions), ascending ids -> [size] int64."""
    mass = torch.zeros(vocab_size, dtype=torch.float64)
    for i in range(0, store.size, 64):
        ids = torch.from_numpy(store.ids[i : i + 64, prompt_len:].astype(np.int64)).flatten()
        p = torch.from_numpy(store.logprobs[i : i + 64, prompt_len:].astype(np.float32)).flatten().exp()
        mass.index_add_(0, ids, p.double())
    size = min(size, vocab_size)
    return mass.topk(size).indices.sort().values


def _shift(x: torch.Tensor, o: int) -> torch.Tensor:
    """x [b, M, ...] -> y with y[:, i] = x[:, i - o] (zeros for i < o)."""
    if o == 0:
        return x
    return F.pad(x, (0, 0) * (x.dim() - 2) + (o, 0))[:, : x.shape[1]]


def unrolled_outputs(net: Any, feats: torch.Tensor, tokens: torch.Tensor, unroll: int) -> list[torch.Tensor]:
    """The drafter on whole sequences, `unroll` chained depths at every position at once.

    feats [b, S, 3, D], tokens [b, S] -> per depth s (1-based) h_s [b, M, D], M = S - 1: row i is
    the entry of position p = i + 1 at chain depth s, whose root is position p - s + 1: it read
    the drafter's depth s-1 output at p-1 (the fused target features at p-1 for s = 1) and token
    p, and attended to the true entries of positions <= root (within the window) and to the
    chain's entries at depths 2..s. It predicts token p + 1 (rows where i < s - 1 are padding)."""
    b, S = tokens.shape
    M = S - 1
    cfg = net.cfg
    H, K, Dh = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    G = H // K
    pos = torch.arange(1, S, device=tokens.device).expand(b, -1)  # [b, M]
    toks = tokens[:, 1:]  # [b, M]
    i = torch.arange(M, device=tokens.device)
    keys: list[torch.Tensor] = []
    vals: list[torch.Tensor] = []
    outs: list[torch.Tensor] = []
    g = net.fused(feats[:, :-1])  # [b, M, D]
    for s in range(1, unroll + 1):
        if s > 1:
            g = _shift(outs[-1], 1)
        u = net.inputs(g, toks)  # [b, M, D]
        q, k, v = net.qkv(u, pos)  # [b, M, H, Dh], [b, M, K, Dh]
        keys.append(k.repeat_interleave(G, dim=2))
        vals.append(v.repeat_interleave(G, dim=2))
        qh = q.transpose(1, 2)  # [b, H, M, Dh]
        k1 = keys[0].transpose(1, 2)  # [b, H, M, Dh]
        sc = torch.matmul(qh, k1.transpose(-1, -2))  # [b, H, M, M]
        root = i - (s - 1)  # [M]
        j = i.unsqueeze(0)
        ok = (j <= root.unsqueeze(1)) & (j > root.unsqueeze(1) - net.window)  # [M, M]
        sc = sc.masked_fill(~ok, float("-inf"))
        diag = [(q * _shift(keys[d - 1], s - d)).sum(-1).transpose(1, 2) for d in range(2, s + 1)]  # [b, H, M]
        allsc = torch.cat([sc] + [x.unsqueeze(-1) for x in diag], dim=-1) if diag else sc  # [b, H, M, M+s-1]
        p = torch.softmax(allsc.float(), dim=-1).to(q.dtype)
        o = torch.matmul(p[..., :M], vals[0].transpose(1, 2))  # [b, H, M, Dh]
        for n, d in enumerate(range(2, s + 1)):
            o = o + p[..., M + n].unsqueeze(-1) * _shift(vals[d - 1], s - d).transpose(1, 2)
        att = o.transpose(1, 2).reshape(b, M, H * Dh)
        outs.append(net.out(u, att))
    return outs


def _seen_mask(tokens: torch.Tensor, vocab: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """tokens [b, S] -> seen [b, S-1, N] bool: row i marks draft-vocabulary tokens among tokens
    0..i+1, the penalty history of the token at i+2 (windows longer than the sequence)."""
    b, S = tokens.shape
    where = torch.full((vocab_size,), -1, dtype=torch.int64, device=tokens.device)
    where[vocab] = torch.arange(vocab.numel(), device=tokens.device)
    idx = where[tokens]  # [b, S]
    oh = torch.zeros(b, S, vocab.numel() + 1, dtype=torch.bool, device=tokens.device)
    oh.scatter_(2, (idx % (vocab.numel() + 1)).unsqueeze(-1), True)  # -1 -> the spare column
    seen = oh.cumsum(1, dtype=torch.int32) > 0
    return seen[:, 1:, : vocab.numel()]


def penalized(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """The repetition penalty of the sampler (sampling.apply_penalty), differentiable."""
    if penalty == 1.0:
        return logits
    pen = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, pen, logits)


def distill_targets(ids: torch.Tensor, logprobs: torch.Tensor, vocab: torch.Tensor,
                    vocab_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stored target rows [..., K] (full ids, log-probs) -> (draft-vocab index [..., K] (0 where
    outside), probabilities renormalized over the draft vocabulary [..., K], mass inside [...])."""
    where = torch.full((vocab_size,), -1, dtype=torch.int64, device=ids.device)
    where[vocab] = torch.arange(vocab.numel(), device=ids.device)
    j = where[ids]  # [..., K]
    p = logprobs.float().exp() * (j >= 0)
    mass = p.sum(-1)
    return j.clamp(min=0), p / mass.clamp(min=1e-9).unsqueeze(-1), mass


def drafter_losses(net: Any, feats: torch.Tensor, tokens: torch.Tensor, ids: torch.Tensor, logprobs: torch.Tensor,
                   start: int, unroll: int, penalty: float) -> tuple[list[torch.Tensor], list[float]]:
    """Per depth: cross-entropy of the target's processed distribution (renormalized over the
    draft vocabulary) under the drafter's penalized one, and 1 - total variation between them
    (the best coupling's acceptance) -> (losses, acceptance)."""
    b, S = tokens.shape
    M = S - 1
    outs = unrolled_outputs(net, feats, tokens, unroll)
    V = net.cfg.vocab_size
    seen = _seen_mask(tokens, net.vocab, V)  # [b, M, N]
    tj, tp, _ = distill_targets(ids[:, 2:], logprobs[:, 2:], net.vocab, V)  # rows i -> token i + 2
    i = torch.arange(M - 1, device=tokens.device)
    losses, accs = [], []
    for s, h in enumerate(outs, 1):
        valid = (i >= s - 1) & (i + 2 >= start)  # [M-1]
        x = h[:, : M - 1][:, valid]  # [b, m, D]
        lg = penalized(net.logits(x), seen[:, : M - 1][:, valid], penalty)  # [b, m, N]
        lq = torch.log_softmax(lg, dim=-1)
        jj, pp = tj[:, valid], tp[:, valid]  # [b, m, K]
        losses.append(-(pp * lq.gather(-1, jj)).sum(-1).mean())
        with torch.no_grad():
            q = lq.exp()
            tv_in = (pp - q.gather(-1, jj)).abs().sum(-1)  # on the target's stored tokens
            rest = (1 - q.gather(-1, jj).sum(-1)).clamp(min=0)  # the draft's mass elsewhere
            accs.append(float(1 - 0.5 * (tv_in + rest).mean()))
    return losses, accs


def train_drafter(model: Decoder, store: DistillStore, cfg: DrafterConfig, taps: tuple[int, ...],
                  out: str | os.PathLike[str], resume: bool = False, progress: Progress | None = None,
                  model_name: str = "", info: dict[str, Any] | None = None) -> dict[str, Any]:
    """Trains a seq drafter on the pool and writes it (float16) to `out`; checkpoints (the net
    and Adam's state) to `<out>.ckpt` every `checkpoint_every` steps. Batches are a function of
    (seed, step), so a resumed run ends with the drafter an uninterrupted one makes."""
    from .seqdraft import new_seq_drafter, save_seq_drafter

    if model.packed:
        raise ValueError("drafter training needs unpacked weights: load the model with pack=False")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    vocab = draft_vocabulary(store, cfg.vocab, cfg.prompt_len, model.cfg.vocab_size)
    torch.manual_seed(cfg.seed)
    last = store.feats[: min(8, store.size), cfg.prompt_len :, -1].astype(np.float32)
    net = new_seq_drafter(model, vocab, taps, window=cfg.window, seed=cfg.seed,
                          stream_rms=float(np.sqrt(np.mean(last * last))))
    params = net.trainable()
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    meta = {"config": asdict(cfg), "store": store.root.name, "taps": list(taps)}
    ckpt = _ckpt_path(out)
    step = 0
    if resume and ckpt.is_file():
        step = _load_checkpoint(ckpt, net.named_tensors(), opt, meta, prefix="net.")
        log.info("resuming from %s at step %d", ckpt, step)
    penalty = float(DISTILL_SAMPLING["penalty"])
    dev = model.device
    t0 = time.perf_counter()
    seen = 0
    loss_v: list[float] = []
    accs: list[float] = []
    while step < cfg.steps:
        idx = sorted(batch_indices(step, cfg.batch_size, store.size, cfg.seed))
        feats = torch.from_numpy(store.feats[idx].astype(np.float32)).to(dev)  # [b, S, 3, D]
        tokens = torch.from_numpy(store.tokens[idx].astype(np.int64)).to(dev)  # [b, S]
        ids = torch.from_numpy(store.ids[idx].astype(np.int64)).to(dev)  # [b, S, K]
        lps = torch.from_numpy(store.logprobs[idx].astype(np.float32)).to(dev)  # [b, S, K]
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        losses, accs = drafter_losses(net, feats, tokens, ids, lps, cfg.prompt_len, cfg.unroll, penalty)
        loss = torch.stack(losses).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.clip)
        opt.step()
        step += 1
        seen += len(idx) * (cfg.seq_len - cfg.prompt_len)
        loss_v = [float(x.detach()) for x in losses]
        if progress:
            progress("train", step, cfg.steps, {"loss": float(loss.detach()), "acc": accs,
                                                 "tokens_per_s": seen / max(1e-9, time.perf_counter() - t0)})
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            _save_checkpoint(ckpt, net.named_tensors(), opt, step, meta, prefix="net.")
    seconds = time.perf_counter() - t0
    summary = {"steps": cfg.steps, "seq_len": cfg.seq_len, "batch_size": cfg.batch_size, "lr": cfg.lr,
               "seed": cfg.seed, "unroll": cfg.unroll, "vocab": int(vocab.numel()), "pool_sequences": store.size,
               "pool_generated_tokens": store.size * (cfg.seq_len - cfg.prompt_len), "final_loss": loss_v,
               "final_train_one_minus_tv": accs, "train_seconds_this_run": round(seconds, 1)}
    save_seq_drafter(net, out, model_identity(model, model_name), extra={**summary, **(info or {})})
    return summary


@torch.inference_mode()
def eval_drafter(net: Any, store: DistillStore, prompt_len: int, depth: int = 4, batch: int = 8,
                 rows_per_chunk: int = 256) -> dict[str, Any]:
    """What the drafter would do in a run, measured on the target's own continuations (a pool
    generated with the paper's sampler, each row with its seed):

    - coupled acceptance per depth: the drafter's distribution at depth s for position t, put
      through the whole sampler (penalty over the row's own history, min-p, …) and drawn with
      position t's own Gumbel noise, gives the token the target drew there — given that it did
      at depths 1 … s-1 of the same chain (teacher-forced, which is what acceptance means);
    - total variation per depth between the drafter's and the target's processed distributions;
    - expected tokens per iteration of a chain of `depth`: 1 + a1 + a1·a2 + …"""
    from .sampling import gumbel

    s_cfg = SamplingConfig(**DISTILL_SAMPLING)
    V = net.cfg.vocab_size
    hits = [0] * depth  # per depth: chains that reached it and matched
    reach = [0] * depth  # per depth: chains that reached it
    tv_sum = [0.0] * depth
    tv_n = [0] * depth
    inside = 0.0
    inside_n = 0
    dev = net.fuse.device
    for b0 in range(0, store.size, batch):
        idx = list(range(b0, min(store.size, b0 + batch)))
        feats = torch.from_numpy(store.feats[idx].astype(np.float32)).to(dev)
        tokens = torch.from_numpy(store.tokens[idx].astype(np.int64)).to(dev)  # [b, S]
        ids = torch.from_numpy(store.ids[idx].astype(np.int64)).to(dev)
        lps = torch.from_numpy(store.logprobs[idx].astype(np.float32)).to(dev)
        seeds = store.seeds[idx].tolist()
        b, S = tokens.shape
        outs = unrolled_outputs(net, feats, tokens, depth)  # per depth [b, S-1, D]
        match = torch.zeros(depth, b, S, dtype=torch.bool)  # [s, b, t]: depth s drew token t right
        for s, h in enumerate(outs, 1):
            # row i predicts token t = i + 2; valid where the chain's root t - s >= the first generated
            # token's predecessor and the row is not padding
            for r in range(b):
                ts = [t for t in range(max(prompt_len, s + 1), S)]
                for c0 in range(0, len(ts), rows_per_chunk):
                    tt = ts[c0 : c0 + rows_per_chunk]
                    ti = torch.tensor(tt, device=dev)
                    lg = net.logits(h[r, ti - 2])  # [n, N]
                    full = torch.full((len(tt), V), float("-inf"), device=dev)
                    full[:, net.vocab] = lg
                    win = history_windows([tokens[r, max(0, t - s_cfg.penalty_width) : t] for t in tt],
                                          s_cfg.penalty_width, dev)
                    lq = final_logprobs(full, win, s_cfg)  # [n, V]
                    noise = torch.stack([gumbel(seeds[r], t, V) for t in tt]).to(dev)
                    drawn = (lq + noise).argmax(-1)
                    match[s - 1, r, ti] = drawn == tokens[r, ti]
                    # total variation against the stored target distribution (its top K)
                    p = lps[r, ti].exp()  # [n, K]
                    qk = lq.gather(-1, ids[r, ti]).exp()
                    tv = 0.5 * ((p - qk).abs().sum(-1) + (1 - qk.sum(-1)).clamp(min=0))
                    tv_sum[s - 1] += float(tv.sum())
                    tv_n[s - 1] += len(tt)
                    if s == 1:
                        _, _, mass = distill_targets(ids[r, ti], lps[r, ti], net.vocab, V)
                        inside += float(mass.sum())
                        inside_n += len(tt)
        for s in range(1, depth + 1):
            # chain reached depth s at root R iff depths 1..s-1 matched at R+1..R+s-1
            R = torch.arange(prompt_len - 1, S - s)  # roots whose depth-s token exists
            alive = torch.ones(b, R.numel(), dtype=torch.bool)
            for d in range(1, s):
                alive &= match[d - 1][:, R + d]
            reach[s - 1] += int(alive.sum())
            hits[s - 1] += int((alive & match[s - 1][:, R + s]).sum())
    acc = [h / r if r else 0.0 for h, r in zip(hits, reach)]
    tau, run = 1.0, 1.0
    for a in acc:
        run *= a
        tau += run
    return {"positions": tv_n[0], "coupled_acceptance": [round(a, 4) for a in acc],
            "total_variation": [round(t / n, 4) if n else None for t, n in zip(tv_sum, tv_n)],
            "expected_tokens_per_iteration": round(tau, 3), "depth": depth,
            "target_mass_in_draft_vocab": round(inside / max(1, inside_n), 4)}
