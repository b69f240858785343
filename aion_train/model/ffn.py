"""Dense feed-forward networks: SwiGLU, GeLU, ReLU (no biases, LLaMA-style)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from aion_train.kernels import select

ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu}


class DenseFFN(nn.Module):
    """SwiGLU: w_down(silu(w_gate x) * w_up x); GeLU/ReLU: w_down(act(w_up x))."""

    def __init__(self, d_model: int, d_ff: int, activation: str = "swiglu", kernels: str = "auto"):
        super().__init__()
        self.activation = activation
        self._swiglu = select("swiglu", kernels)
        self.w_up = nn.Linear(d_model, d_ff, bias=False)
        self.w_down = nn.Linear(d_ff, d_model, bias=False)
        self.w_gate = nn.Linear(d_model, d_ff, bias=False) if activation == "swiglu" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.w_gate is not None:
            return self.w_down(self._swiglu(self.w_gate(x), self.w_up(x)))
        return self.w_down(ACTIVATIONS[self.activation](self.w_up(x)))
