"""The `seq` drafter's network: one decoder block of the target's own shape that reads the
target's features and feeds its own draws back (EAGLE-3's shape, sized for the model).

Inputs, for the entry at position p (it predicts token p+1):
- true entries (committed positions): the residual stream of the target at three layers (low,
  middle, last) at position p-1, as the verify pass computed them, fused by one linear map;
- chained entries (drafted positions): the drafter's own output at p-1 in place of that fusion;
- either way, the target's frozen embedding of token p.

`u = combine · [rms(g), rms(embed[x_p])]`, `h = block(u)` (attention over the drafter's own recent
entries), `logits = head · rmsnorm(h)` over a draft vocabulary: the target's LM-head rows of the
N tokens the model itself writes most, mapped back to full ids. Only the fusion, the combine
map, the block and the final norm are trained; the head rows come from the target at load time,
so a drafter file holds the vocabulary's ids, not its rows.

The drafter's RoPE is the unscaled one of the target's config: it attends only within its own
window, so the run's RoPE scaling (YaRN for long runs) is the target's business alone.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .heads import check_identity, model_identity, save_safetensors
from .model import Decoder, Layer, layer_out, layer_qkv, rope_inv_freq

FORMAT = "tokenswift-seq-drafter/1"
WINDOW = 256  # the drafter's own recent entries each query attends to


def default_taps(num_layers: int) -> tuple[int, int, int]:
    """Low, middle and last layer (0-based indices of the layers whose output is read)."""
    return (min(1, num_layers - 1), num_layers // 2, num_layers - 1)


class SeqDraftModel(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab: torch.Tensor, taps: tuple[int, ...], window: int = WINDOW,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        super().__init__()
        if len(taps) != 3 or not all(0 <= t < cfg.num_layers for t in taps):
            raise ValueError(f"seq drafter taps must be 3 layer indices in [0, {cfg.num_layers}), got {taps!r}")
        D = cfg.hidden_size
        self.cfg = cfg
        self.taps = tuple(int(t) for t in taps)
        self.window = int(window)
        self.tap_norm = nn.Parameter(torch.ones(3, D, dtype=dtype, device=device))  # [3, D]
        self.fuse = nn.Parameter(torch.empty(D, 3 * D, dtype=dtype, device=device))  # [D, 3D]
        self.in_norm = nn.Parameter(torch.ones(2, D, dtype=dtype, device=device))  # [2, D]: feature, embedding
        self.combine = nn.Parameter(torch.empty(D, 2 * D, dtype=dtype, device=device))  # [D, 2D]
        # The block's input is put at the scale of the target's residual stream, which its weights
        # were trained for (the RMS of the last tap): a unit-scale input would be drowned by the
        # block's own outputs, and Adam would take thousands of steps to grow it.
        self.register_buffer("scale", torch.ones((), dtype=dtype, device=device))
        self.layer = Layer(cfg, dtype, device)
        self.norm = nn.Parameter(torch.empty(D, dtype=dtype, device=device))
        self.register_buffer("vocab", vocab.to(device=device, dtype=torch.int64))  # [N] full ids
        # frozen, set by `attach`: the target's embedding and LM-head rows of the draft vocabulary
        self.embed: torch.Tensor | None = None  # [V, D]
        self.head: torch.Tensor | None = None  # [N, D]
        inv, _ = rope_inv_freq(dataclasses.replace(cfg, rope_scaling=None))
        self.register_buffer("inv_freq", inv.to(device), persistent=False)  # [Dh/2]

    @property
    def vocab_size(self) -> int:
        return self.vocab.numel()

    def attach(self, target: Decoder) -> "SeqDraftModel":
        """Takes the target's frozen embedding and head rows (plain tensors, never packed)."""
        from .model import _plain

        from .kernels import QuantLinear

        dt = self.fuse.dtype
        if isinstance(target.embed, QuantLinear):  # GGUF blocks: rows dequantized as looked up, no dense copy
            self.embed = target.embed
        else:
            self.embed = _plain(target.embed).to(dt)
        src = target.embed if target.cfg.tie_word_embeddings else target.lm_head
        if isinstance(src, QuantLinear):
            self.head = src.rows(self.vocab.cpu()).to(device=self.fuse.device, dtype=dt)
        else:
            self.head = _plain(src).to(dt)[self.vocab].contiguous()
        return self

    def trainable(self) -> list[nn.Parameter]:
        ps = [p for _, p in self.named_tensors()]
        for p in ps:
            p.requires_grad_(True)
        return ps

    def named_tensors(self) -> list[tuple[str, nn.Parameter]]:
        """The learned tensors by their file names."""
        out = [("tap_norm", self.tap_norm), ("fuse", self.fuse), ("in_norm", self.in_norm),
               ("combine", self.combine), ("norm", self.norm)]
        return out + [(f"layer.{n}", p) for n, p in self.layer._parameters.items() if p is not None]

    # -- pieces shared by drafting and training ---------------------------------------------------

    def _rms(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), None, self.cfg.rms_norm_eps)

    def fused(self, feats: torch.Tensor) -> torch.Tensor:
        """feats [..., 3, D] (target residual stream at the three taps) -> [..., D]."""
        f = (self._rms(feats) * self.tap_norm).flatten(-2)  # [..., 3D]
        return F.linear(f, self.fuse)

    def inputs(self, g: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """g [..., D] (a fusion or the drafter's own previous output), tokens [...] -> u [..., D]."""
        if isinstance(self.embed, torch.Tensor):
            e = F.embedding(tokens, self.embed)  # [..., D]
        else:  # the target's GGUF blocks
            e = self.embed.rows(tokens).to(self.fuse.dtype)
        x = torch.cat([self._rms(g) * self.in_norm[0], self._rms(e) * self.in_norm[1]], dim=-1)  # [..., 2D]
        return F.linear(x, self.combine) * self.scale

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [B, T] -> cos, sin [B, T, 1, Dh/2]."""
        ang = positions.to(torch.float32).unsqueeze(-1) * self.inv_freq  # [B, T, Dh/2]
        dt = self.fuse.dtype
        return ang.cos().unsqueeze(2).to(dt), ang.sin().unsqueeze(2).to(dt)

    def qkv(self, u: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """u [B, T, D] -> q [B, T, H, Dh] (scaled), k, v [B, T, KVH, Dh]."""
        cos, sin = self.cos_sin(positions)
        q, k, v = layer_qkv(self.layer, self.cfg, u, cos, sin)
        return q * self.cfg.head_dim**-0.5, k, v

    def out(self, u: torch.Tensor, att: torch.Tensor) -> torch.Tensor:
        """u [B, T, D], att [B, T, H*Dh] -> h [B, T, D] (the block's output, pre-norm)."""
        return layer_out(self.layer, self.cfg, u, att)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """h [..., D] -> logits over the draft vocabulary [..., N] (float32)."""
        x = F.rms_norm(h, (h.shape[-1],), self.norm, self.cfg.rms_norm_eps)
        return F.linear(x, self.head).float()


# --- construction and files -------------------------------------------------------------------


def new_seq_drafter(target: Decoder, vocab: torch.Tensor, taps: tuple[int, ...] | None = None,
                    window: int = WINDOW, seed: int = 0, scale: float = 0.02,
                    stream_rms: float = 1.0) -> SeqDraftModel:
    """A drafter to train (or a random one for tests): the block starts as the target's last layer,
    the final norm as the target's; the fusion starts as a copy of the last tap's normalized
    stream and the combine map as the sum of its two halves, so the untrained drafter reads
    "the last layer's state + the new token" and small noise breaks the symmetry. `stream_rms`: the
    RMS of the target's residual stream at the last tap (the block input's scale)."""
    from .model import _plain

    if target.tp is not None:
        raise ValueError("a seq drafter is trained in one process (the block copies the target's whole "
                         "last layer); run train-drafter without torchrun")
    cfg = target.cfg
    taps = taps or default_taps(cfg.num_layers)
    m = SeqDraftModel(cfg, vocab, taps, window, dtype=torch.float32, device=target.device)
    g = torch.Generator().manual_seed(seed)
    D = cfg.hidden_size
    with torch.no_grad():
        last = target.layers[taps[-1]]
        for name, p in m.layer._parameters.items():
            if p is not None:
                p.copy_(_plain(getattr(last, name)).float())
        m.norm.copy_(_plain(target.norm).float())
        eye = torch.eye(D)
        fuse = torch.randn(D, 3 * D, generator=g) * scale
        fuse[:, 2 * D :] += eye
        m.fuse.copy_(fuse)
        comb = torch.randn(D, 2 * D, generator=g) * scale
        comb[:, :D] += eye
        comb[:, D:] += eye
        m.combine.copy_(comb)
        m.scale.fill_(stream_rms)
    return m.attach(target)


def random_seq_drafter(target: Decoder, vocab_size: int | None = None, seed: int = 0) -> SeqDraftModel:
    """An untrained drafter over the first `vocab_size` ids (all by default): for tests, where only
    the speed may depend on the drafter."""
    V = target.cfg.vocab_size
    n = V if vocab_size is None else min(V, vocab_size)
    perm = torch.randperm(V, generator=torch.Generator().manual_seed(seed))[:n]
    return new_seq_drafter(target, perm.sort().values, seed=seed, scale=0.5)


def save_seq_drafter(m: SeqDraftModel, path: str | Path, identity: dict[str, Any],
                     extra: dict[str, Any] | None = None, dtype: torch.dtype = torch.float16) -> None:
    tensors = {**dict(m.named_tensors()), "vocab": m.vocab, "scale": m.scale}
    tensors = {k: (v.detach().to(dtype) if v.is_floating_point() else v.detach()).contiguous().cpu()
               for k, v in tensors.items()}
    meta = {"format": FORMAT, "taps": json.dumps(list(m.taps)), "window": str(m.window),
            "identity": json.dumps(identity), "extra": json.dumps(extra or {})}
    save_safetensors(tensors, path, meta)


def load_seq_drafter(path: str | Path, target: Decoder, model_name: str = "") -> SeqDraftModel:
    """Reads a drafter file and checks it was trained for this target (like heads)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"seq drafter file not found: {path}")
    try:
        f = safe_open(str(path), framework="pt")
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
        raise ValueError(f"{path} is not a safetensors seq drafter file ({e})") from None
    with f:
        md = f.metadata() or {}
        if md.get("format") != FORMAT:
            raise ValueError(f"{path} is not a seq drafter file (format {md.get('format')!r}, expected {FORMAT!r})")
        check_identity(json.loads(md["identity"]), model_identity(target, model_name), str(path),
                       f"seq drafter {path} was")
        t = {k: f.get_tensor(k) for k in f.keys()}
    cfg = target.full_cfg  # the whole model's shape, also when the target is one rank's share
    m = SeqDraftModel(cfg, t["vocab"], tuple(json.loads(md["taps"])), int(md["window"]),
                      dtype=torch.float32, device=target.device)
    with torch.no_grad():
        for name, p in m.named_tensors() + [("scale", m.scale)]:
            if name not in t or tuple(t[name].shape) != tuple(p.shape):
                got = tuple(t[name].shape) if name in t else None
                raise ValueError(f"{path}: tensor {name} has shape {got}, expected {tuple(p.shape)}")
            p.copy_(t[name].float())
    m.meta = {"path": str(path), **json.loads(md.get("extra", "{}"))}
    return m.attach(target)


def shipped_seq_drafter_path(model_name: str) -> Path | None:
    p = Path(__file__).resolve().parent / "data" / "drafters" / f"{model_name.lower()}.safetensors"
    return p if p.is_file() else None


def resolve_seq_drafter(spec: str | Path | None, target: Decoder, model_name: str) -> SeqDraftModel | None:
    """"auto": the drafter shipped for this model, if any; "none"/None: no drafter; else a path."""
    if spec is None or str(spec) == "none":
        return None
    if str(spec) == "auto":
        p = shipped_seq_drafter_path(model_name)
        return load_seq_drafter(p, target, model_name) if p is not None else None
    return load_seq_drafter(spec, target, model_name)
