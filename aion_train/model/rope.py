"""Rotary position embedding (RoFormer): rotate each pair (x_2i, x_2i+1) by m * theta_i,
theta_i = base^(-2i/d), so <RoPE(q, m), RoPE(k, n)> depends on m - n only."""

from __future__ import annotations

import torch
from torch import nn

from aion_train.kernels import select


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_seq_len: int, theta: float = 10000.0, kernels: str = "auto"):
        super().__init__()
        self._rope = select("rope", kernels)  # interleaved-pair rotation (kernels/reference.py)
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
        angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def _apply(self, fn, recurse=True):
        """Keep the cos/sin tables fp32 when the module is cast (`.bfloat16()`, as DeepSpeed's
        bf16 mode does): bf16 angles would be off by up to 2^-9 relative; only move device."""
        tables = (self.cos, self.sin)
        super()._apply(fn, recurse)
        self.cos, self.sin = (t.to(self.cos.device) for t in tables)
        return self

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x: [B, T, H, D]; positions: [T] (absolute positions, e.g. offset by the KV cache)."""
        return self._rope(x, self.cos[positions], self.sin[positions])
