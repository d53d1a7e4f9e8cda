"""Draft heads: cheap extra predictions for positions r+2 … r+γ from one hidden state.

Head k maps h_{k-1} to h_k = h_{k-1} + W_k · RMSNorm_k(h_{k-1}); its logits are
lm_head(RMSNorm'_k(h_k)) with the model's own LM head. h_0 is the last layer's residual output
before the final norm (what `Decoder.forward` returns).

Files are safetensors with metadata naming the base model: hidden size, vocabulary, layer count
and a sample of the embedding matrix. Loading heads into a model that does not match is an error.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .model import Decoder, linear

log = logging.getLogger("tokenswift")

FORMAT = "tokenswift-heads"
_FP_SAMPLES = 256
# Correlation of embedding samples above which two models count as the same weights (a
# quantized or bfloat16 copy of a model correlates > 0.99 with the original; unrelated ~0).
_FP_MIN_CORR = 0.9
# Heads shipped inside the package, by embedded model name.
SHIPPED = {"smollm2-135m": "smollm2-135m.safetensors"}


class DraftHeads(nn.Module):
    def __init__(self, hidden: int, num_heads: int, eps: float, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> None:
        super().__init__()
        if num_heads < 1:
            raise ValueError(f"need at least one draft head, got {num_heads}")
        self.hidden = hidden
        self.num_heads = num_heads
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(num_heads, hidden, hidden, dtype=dtype, device=device))  # [K, D, D]
        self.norm_in = nn.Parameter(torch.ones(num_heads, hidden, dtype=dtype, device=device))  # [K, D]
        self.norm_out = nn.Parameter(torch.ones(num_heads, hidden, dtype=dtype, device=device))  # [K, D]
        self.meta: dict[str, Any] = {}

    def states(self, h0: torch.Tensor) -> torch.Tensor:
        """h0 [..., D] -> normed head states [K, ..., D], ready for the LM head."""
        D = self.hidden
        out = []
        h = h0
        for k in range(self.num_heads):
            h = h + F.linear(F.rms_norm(h, (D,), self.norm_in[k], self.eps), self.weight[k])
            out.append(F.rms_norm(h, (D,), self.norm_out[k], self.eps))
        return torch.stack(out)

    def draft_logits(self, model: Decoder, h0: torch.Tensor) -> torch.Tensor:
        """h0 [D] -> logits [1 + K, V]: the base prediction (r+1) then each head's (r+1+k).
        One LM-head matmul for all rows."""
        D = self.hidden
        rows = torch.empty(1 + self.num_heads, D, dtype=h0.dtype, device=h0.device)  # [1+K, D]
        rows[0] = model.final_norm(h0)
        rows[1:] = self.states(h0)
        return linear(rows, model.lm_head, None).float()


def base_draft_logits(model: Decoder, h0: torch.Tensor) -> torch.Tensor:
    """h0 [D] -> [1, V] when there are no heads."""
    return model.logits(h0.unsqueeze(0))


# --- identity of the base model ------------------------------------------------------------


def model_identity(model: Decoder, name: str = "") -> dict[str, Any]:
    cfg = model.cfg
    g = torch.Generator().manual_seed(1234)
    rows = torch.randint(0, cfg.vocab_size, (_FP_SAMPLES,), generator=g)
    cols = torch.randint(0, cfg.hidden_size, (_FP_SAMPLES,), generator=g)
    with torch.no_grad():  # the embedding may be GGUF blocks: the sampled rows, dequantized
        sample = model.embed_rows(rows.to(model.device)).float().cpu()[torch.arange(_FP_SAMPLES), cols]
    return {
        "base_model": name,
        "hidden_size": cfg.hidden_size,
        "vocab_size": cfg.vocab_size,
        "num_layers": cfg.num_layers,
        "fingerprint": [round(float(x), 6) for x in sample],
    }


def _describe(ident: dict[str, Any]) -> str:
    name = ident.get("base_model") or "?"
    return (f"{name!r} (hidden {ident.get('hidden_size')}, vocab {ident.get('vocab_size')}, "
            f"{ident.get('num_layers')} layers)")


def _correlation(a: list[float], b: list[float]) -> float:
    if len(a) != len(b) or not a:
        return 0.0
    ta, tb = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    ta, tb = ta - ta.mean(), tb - tb.mean()
    den = float(ta.norm() * tb.norm())
    return float((ta * tb).sum()) / den if den > 0 else 0.0


def check_identity(heads_ident: dict[str, Any], model_ident: dict[str, Any], path: str,
                   subject: str | None = None) -> None:
    """Refuses weights trained for another model; `subject` opens the message ("draft heads PATH were")."""
    same_shape = all(int(heads_ident.get(k, -1)) == model_ident[k] for k in ("hidden_size", "vocab_size", "num_layers"))
    corr = _correlation(list(heads_ident.get("fingerprint", [])), model_ident["fingerprint"])
    if not same_shape or corr < _FP_MIN_CORR:
        raise ValueError(
            f"{subject or f'draft heads {path} were'} trained for model {_describe(heads_ident)}, "
            f"not for the loaded model {_describe(model_ident)}"
            + ("" if not same_shape else f" (embedding fingerprints differ: correlation {corr:.2f})")
        )


# --- files -------------------------------------------------------------------------------------


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str]) -> None:
    """Writes a safetensors file atomically: to a temporary file renamed over `path`, so a
    reader (or a run killed mid-write) never sees half a file."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.replace(path)


def save_heads(heads: DraftHeads, path: str | Path, identity: dict[str, Any], extra: dict[str, Any] | None = None,
               dtype: torch.dtype = torch.float16) -> None:
    meta = {
        "format": FORMAT,
        "version": "1",
        "num_heads": str(heads.num_heads),
        "rms_norm_eps": repr(heads.eps),
        "identity": json.dumps(identity),
        "info": json.dumps(extra or {}),
    }
    tensors = {
        "weight": heads.weight.detach().to(dtype).contiguous().cpu(),
        "norm_in": heads.norm_in.detach().to(dtype).contiguous().cpu(),
        "norm_out": heads.norm_out.detach().to(dtype).contiguous().cpu(),
    }
    save_safetensors(tensors, path, meta)


def load_heads(path: str | Path, model: Decoder, model_name: str = "") -> DraftHeads:
    """Loads heads for `model`; errors name the file and both models when they do not match."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"draft heads file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own types for damaged files
        raise ValueError(f"draft heads file {path} is not a readable safetensors file: {e}") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a tokenswift draft heads file (metadata format {meta.get('format')!r})")
    try:
        ident = json.loads(meta["identity"])
        k = int(meta["num_heads"])
        eps = float(meta["rms_norm_eps"])
    except (KeyError, ValueError) as e:
        raise ValueError(f"draft heads file {path} has damaged metadata ({e})") from None
    check_identity(ident, model_identity(model, model_name), str(path))
    D = model.cfg.hidden_size
    want = {"weight": (k, D, D), "norm_in": (k, D), "norm_out": (k, D)}
    for name, shape in want.items():
        if name not in tensors or tuple(tensors[name].shape) != shape:
            got = tuple(tensors[name].shape) if name in tensors else "missing"
            raise ValueError(f"draft heads file {path}: tensor {name!r} is {got}, expected {shape}")
    extra = set(tensors) - set(want)
    if extra:
        raise ValueError(f"draft heads file {path} has unexpected tensors: {', '.join(sorted(extra))}")
    heads = DraftHeads(D, k, eps, dtype=model.dtype, device=model.device)
    with torch.no_grad():
        for name in want:
            getattr(heads, name).copy_(tensors[name])
    heads.requires_grad_(False)
    heads.meta = {"path": str(path), **json.loads(meta.get("info", "{}"))}
    for name, t in tensors.items():
        if not torch.isfinite(t).all():
            raise ValueError(f"draft heads file {path}: tensor {name!r} holds NaN or infinite values")
    return heads


def shipped_heads_path(model_name: str) -> Path | None:
    fname = SHIPPED.get(model_name.lower())
    if fname is None:
        return None
    p = Path(__file__).resolve().parent / "data" / "heads" / fname
    return p if p.is_file() else None


def resolve_heads(spec: str | Path | None, model: Decoder, model_name: str) -> DraftHeads | None:
    """heads="auto": shipped heads for a known model, else none; "none"; or a file path."""
    if spec is None or str(spec) == "none":
        return None
    if str(spec) == "auto":
        p = shipped_heads_path(model_name)
        if p is None:
            log.info("no shipped draft heads for %s: drafting without heads", model_name)
            return None
        return load_heads(p, model, model_name)
    return load_heads(spec, model, model_name)


def random_heads(model: Decoder, num_heads: int = 3, scale: float = 0.02, seed: int = 0) -> DraftHeads:
    """Randomly initialised heads, for tests and experiments (training starts from zeros)."""
    cfg = model.cfg
    g = torch.Generator().manual_seed(seed)
    heads = DraftHeads(cfg.hidden_size, num_heads, cfg.rms_norm_eps, dtype=model.dtype, device=model.device)
    with torch.no_grad():
        heads.weight.copy_(torch.randn(heads.weight.shape, generator=g) * scale)
        heads.norm_in.copy_(1 + 0.1 * torch.randn(heads.norm_in.shape, generator=g))
        heads.norm_out.copy_(model.norm.detach().float().cpu() * (1 + 0.1 * torch.randn(heads.norm_out.shape, generator=g)))
    heads.requires_grad_(False)
    return heads
