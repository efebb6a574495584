"""The layer types of a Llama-family decoder, with tensor parallelism built into them.

`ColumnParallelLinear` holds a slice of the output features (no communication);
`RowParallelLinear` holds a slice of the input features and all-reduces its output once.
Fused projections (QKV, gate+up) are column-parallel layers assembled from several checkpoint
tensors, each already sliced for this rank by the loader (see `sharding.py`).
"""

from __future__ import annotations

import ctypes
import math
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from services.engine.config import ModelConfig
from services.engine.model import cpu_kernels


class AllReduce(Protocol):
    def all_reduce(self, t: torch.Tensor) -> None: ...


def pack_weight(weight: torch.Tensor) -> torch.Tensor | None:
    """oneDNN's blocked layout for a bf16 weight on CPU (what inductor uses when freezing).

    `F.linear` in bf16 on CPU runs well below memory bandwidth for decode-sized inputs; the
    prepacked kernel is about 1.8x faster at batch 1. fp32 keeps `F.linear` (MKL), whose
    numerics the reference tests compare against."""
    if weight.device.type != "cpu" or weight.dtype != torch.bfloat16 or not _onednn_packs_bf16():
        return None
    return torch.ops.mkldnn._reorder_linear_weight(weight, 1)


_PACKS_BF16: bool | None = None


def _onednn_packs_bf16() -> bool:
    """Whether oneDNN can pack bf16 weights on this CPU: it needs AVX-512 (BW, VL, DQ) or
    AVX-NE-CONVERT; on an AVX2-only CPU (AMD Zen 3, say) it refuses, and `F.linear` stays."""
    global _PACKS_BF16
    if _PACKS_BF16 is None:
        try:
            _PACKS_BF16 = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._reorder_linear_weight(
                torch.zeros(16, 16, dtype=torch.bfloat16), 1) is not None
        except RuntimeError:
            _PACKS_BF16 = False
    return _PACKS_BF16


def linear(x: torch.Tensor, weight: torch.Tensor, packed: torch.Tensor | None,
           bias: torch.Tensor | None = None, gemv: ctypes.CDLL | None = None) -> torch.Tensor:
    """`packed`: oneDNN's layout of `weight` (see `pack_weight`); `gemv`: the CPU kernels, for
    one-row inputs (a batch-1 decode step), where they stream the weight faster than oneDNN."""
    if gemv is not None and x.shape[0] == 1 and x.is_contiguous():
        return cpu_kernels.gemv(gemv, x, weight, bias)
    if packed is not None:
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    return F.linear(x, weight, bias)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 as the reference does, so greedy tokens match it exactly.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class ColumnParallelLinear(nn.Module):
    """y = x @ W_r^T (+ b_r): this rank's rows of W, concatenated from `parts` checkpoint tensors."""

    def __init__(self, in_features: int, part_sizes: list[int], bias: bool, dtype: torch.dtype,
                 device: torch.device) -> None:
        super().__init__()
        self.part_sizes = part_sizes
        out = sum(part_sizes)
        self.weight = nn.Parameter(torch.empty(out, in_features, dtype=dtype, device=device), requires_grad=False)
        self.bias = (
            nn.Parameter(torch.zeros(out, dtype=dtype, device=device), requires_grad=False) if bias else None
        )
        self.packed: torch.Tensor | None = None
        self.gemv: ctypes.CDLL | None = None

    def load_part(self, index: int, tensor: torch.Tensor, is_bias: bool = False) -> None:
        start = sum(self.part_sizes[:index])
        target = self.bias if is_bias else self.weight
        assert target is not None
        target.data[start : start + self.part_sizes[index]].copy_(tensor)

    def finalize(self) -> None:
        """Called once the weights are loaded (and again whenever they change)."""
        self.packed = pack_weight(self.weight.data)
        self.gemv = cpu_kernels.gemv_lib(self.weight.data)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.packed, self.bias, self.gemv)


class RowParallelLinear(nn.Module):
    """y = all_reduce(x_r @ W_r^T): this rank's columns of W; one all-reduce when tp > 1."""

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype, device: torch.device,
                 group: AllReduce | None) -> None:
        super().__init__()
        self.weight = nn.Parameter(
            torch.empty(out_features, in_features, dtype=dtype, device=device), requires_grad=False
        )
        self.group = group
        self.packed: torch.Tensor | None = None
        self.gemv: ctypes.CDLL | None = None

    def finalize(self) -> None:
        self.packed = pack_weight(self.weight.data)
        self.gemv = cpu_kernels.gemv_lib(self.weight.data)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = linear(x, self.weight, self.packed, gemv=self.gemv)
        if self.group is not None:
            self.group.all_reduce(y)
        return y


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("rope_type") or scaling.get("type") or "default"
    if kind == "linear":
        return inv_freq / float(scaling["factor"])
    if kind != "llama3":
        return inv_freq
    factor = float(scaling["factor"])
    low, high = float(scaling.get("low_freq_factor", 1.0)), float(scaling.get("high_freq_factor", 4.0))
    old_len = float(scaling.get("original_max_position_embeddings", 8192))
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
    return torch.where(medium, smoothed, scaled)


class Rotary(nn.Module):
    """Rotary position embedding with the checkpoint's scaling; cos/sin cached for every position."""

    def __init__(self, cfg: ModelConfig, max_len: int, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        freqs = torch.outer(torch.arange(max_len, dtype=torch.float32), rope_inv_freq(cfg))
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos: torch.Tensor = emb.cos().to(dtype=dtype, device=device)
        self.sin: torch.Tensor = emb.sin().to(dtype=dtype, device=device)

    def at(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin for the step's positions, [T, 1, d]: looked up once, used by every layer."""
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)


def apply_rotary(cos_sin: tuple[torch.Tensor, torch.Tensor], q: torch.Tensor,
                 k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    cos, sin = cos_sin
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
