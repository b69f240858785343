"""Pre-norm layers: RMSNorm and LayerNorm (eps 1e-5 by default)."""

from __future__ import annotations

import torch
from torch import nn

from aion_train.kernels import select


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, computed in fp32."""

    def __init__(self, dim: int, eps: float = 1e-5, kernels: str = "auto"):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self._rms_norm = select("rms_norm", kernels)  # fused Triton kernel or the torch reference

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._rms_norm(x, self.weight, self.eps)


def make_norm(kind: str, dim: int, eps: float, kernels: str = "auto") -> nn.Module:
    if kind == "rmsnorm":
        return RMSNorm(dim, eps, kernels)
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps)
    raise ValueError(f"model.norm={kind!r}: must be rmsnorm or layernorm")
