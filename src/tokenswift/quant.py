"""Int4 weight-only copies of weight matrices, for the `self` draft pass.

Weights are quantized group-wise along the input dimension (32 values a group, asymmetric:
w ≈ (q - 8)·scale + zero with q in 0..15), the layout of torch's int4 weight-only CPU kernel
(`_weight_int4pack_mm_for_cpu`; `_weight_int4pack_mm` on CUDA), which reads a quarter of float32's bytes and multiplies with
bfloat16 activations. Q4_1 GGUF blocks are exactly this form (scale = d, zero = m + 8·d), so a
Q4_1 model's int4 copy holds its own 4-bit codes again (min/max of a block are codes 0 and 15).

Only the draft uses these weights: the float32 target verifies, so they change speed, never
the text. Where the kernel is missing or a shape does not fit it (input width not a multiple
of 32), the dequantized weights run through a plain float matmul: the same numbers, slower.
"""

from __future__ import annotations

import logging
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger("tokenswift")

GROUP = 32  # values per quantization group (a GGUF Q4 block)


def int4_kernel_available(device: torch.device | str = "cpu") -> bool:
    """Whether torch has the int4 weight-only kernel for `device`: `_weight_int4pack_mm_for_cpu`
    on CPUs, `_weight_int4pack_mm` on CUDA GPUs (compute capability 8.0 and newer)."""
    ops = torch.ops.aten
    kind = torch.device(device).type
    if kind == "cpu":
        return hasattr(ops, "_weight_int4pack_mm_for_cpu") and hasattr(ops, "_convert_weight_to_int4pack_for_cpu")
    if kind == "cuda":
        return (hasattr(ops, "_weight_int4pack_mm") and hasattr(ops, "_convert_weight_to_int4pack")
                and torch.cuda.is_available() and torch.cuda.get_device_capability(torch.device(device))[0] >= 8)
    return False


# CUDA's packed layout groups the input dimension in tiles of 16·INNER_K_TILES values.
INNER_K_TILES = 2


def quantize_int4(w: torch.Tensor, group: int = GROUP) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [N, K] float -> (codes [N, K] int32 in 0..15, scale [N, K/g], zero [N, K/g]) in
    bfloat16, with w ≈ (codes - 8)·scale + zero per group. Codes are computed against the
    bfloat16-rounded scale and zero, so the rounding of those costs nothing extra."""
    N, K = w.shape
    if K % group:
        raise ValueError(f"input width {K} is not a multiple of the group size {group}")
    wg = w.detach().float().reshape(N, K // group, group)  # [N, G, g]
    lo, hi = wg.amin(-1), wg.amax(-1)  # [N, G]
    scale = ((hi - lo) / 15).clamp_min(1e-10).to(torch.bfloat16)
    zero = (lo + 8 * scale.float()).to(torch.bfloat16)
    s32, z32 = scale.float().unsqueeze(-1), zero.float().unsqueeze(-1)
    codes = torch.round((wg - z32) / s32 + 8).clamp_(0, 15).to(torch.int32).reshape(N, K)
    return codes, scale, zero


def dequantize_int4(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """The float32 weights [N, K] that (codes, scale, zero) stand for."""
    N, K = codes.shape
    G = scale.shape[1]
    q = codes.reshape(N, G, K // G).float()
    return ((q - 8) * scale.float().unsqueeze(-1) + zero.float().unsqueeze(-1)).reshape(N, K)


class Int4Weight:
    """A weight matrix [out, in] kept as int4 codes; `matmul(x)` = x @ w^T in x's dtype."""

    def __init__(self, w: torch.Tensor, group: int = GROUP) -> None:
        self.out_features, self.in_features = w.shape
        self.group = group
        self.packed: torch.Tensor | None = None
        self.scale_zero: torch.Tensor | None = None  # [K/g, N, 2] bfloat16, the kernel's layout
        self.dense: torch.Tensor | None = None  # fallback: dequantized [N, K] in w's dtype
        fits = self.in_features % group == 0
        if fits:
            codes, scale, zero = quantize_int4(w, group)
        else:  # too narrow for the kernel: round to bfloat16 instead (the draft is approximate)
            codes = scale = zero = None
        self.cuda = w.device.type == "cuda"
        tiles = not self.cuda or self.in_features % (16 * INNER_K_TILES) == 0
        if fits and tiles and int4_kernel_available(w.device):
            try:
                if self.cuda:  # two codes a byte, the even input index in the high nibble
                    nib = (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8)  # [N, K/2]
                    self.packed = torch.ops.aten._convert_weight_to_int4pack(nib.contiguous(), INNER_K_TILES)
                else:
                    self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.contiguous(), 1)
                self.scale_zero = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous()
                return
            except RuntimeError as e:  # an unusual build: keep the numbers, lose the speed
                log.warning("int4 packing failed, using dequantized weights: %s", e)
        if codes is not None:
            self.dense = dequantize_int4(codes, scale, zero).to(w.dtype)
        else:
            self.dense = w.detach().to(torch.bfloat16).to(w.dtype)

    @property
    def kernel(self) -> bool:
        return self.packed is not None

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:  # [..., in] -> [..., out]
        if self.packed is None:
            return F.linear(x, self.dense, bias)
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16)  # [M, K]
        mm = torch.ops.aten._weight_int4pack_mm if self.cuda else torch.ops.aten._weight_int4pack_mm_for_cpu
        y = mm(x2, self.packed, self.group, self.scale_zero)  # [M, N]
        y = y.to(x.dtype).view(*shape[:-1], self.out_features)
        return y if bias is None else y + bias


class Blocks:
    """A GGUF matrix as the file holds it: uint8 rows [N, K/32 * block bytes] (blocks of 32 inputs)
    of `qtype` ("q4_0", "q4_1", "q8_0"), standing for a float [N, K] = `shape`. The loader passes
    these on for the native kernel to keep (`kernels.QuantLinear`). `data` is the bytes, or a
    function that reads them: a file's matrices are read one at a time as the model repacks them,
    so that loading never holds the whole file beside the model (a memory map's pages would count
    as the process's memory until it closes)."""

    def __init__(self, qtype: str, shape: tuple[int, int], data: "np.ndarray | Callable[[], np.ndarray]") -> None:
        self.qtype = qtype
        self.shape = (int(shape[0]), int(shape[1]))
        self.data = data

    def rows(self) -> np.ndarray:  # [N, row bytes] uint8
        return self.data() if callable(self.data) else np.asarray(self.data)

    def tensor(self) -> torch.Tensor:  # the bytes as a writable uint8 tensor
        return torch.from_numpy(np.array(self.rows(), dtype=np.uint8, copy=True))

    def dequantize(self) -> torch.Tensor:
        """The float32 [N, K] the blocks stand for (the gguf package's reference dequantization)."""
        import gguf

        a = gguf.quants.dequantize(self.rows(), getattr(gguf.GGMLQuantizationType, self.qtype.upper()))
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32).reshape(self.shape))

    @staticmethod
    def cat(parts: "list[Blocks]") -> "Blocks":
        """Row-wise concatenation (a fused q/k/v or gate/up matrix) of blocks of one type and width."""
        return Blocks(parts[0].qtype, (sum(p.shape[0] for p in parts), parts[0].shape[1]),
                      np.concatenate([p.rows() for p in parts]))

    @staticmethod
    def quantize(w: torch.Tensor, qtype: str) -> "Blocks":
        """A float [N, K] matrix quantized to `qtype` blocks by the gguf package's reference
        quantizer (llama.cpp's rounding): `--weights q8_0|q4_0` on a float checkpoint."""
        import gguf

        t = getattr(gguf.GGMLQuantizationType, qtype.upper())
        return Blocks(qtype, tuple(w.shape), gguf.quants.quantize(w.detach().float().numpy(), t))


# GGUF block formats the native kernel multiplies as they are (kernels.QTYPES)
KEPT_QTYPES = ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q4_k", "q5_k", "q6_k")
