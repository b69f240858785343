"""Multi-head causal self-attention with optional grouped KV heads and RoPE.

Head counts are read from the projection shapes at run time, so the same module works
unchanged when `parallelize` swaps its projections for tensor-parallel shards."""
from __future__ import annotations

import torch
from torch import nn

from .attention_backend import attention
from .rope import RotaryEmbedding


class Attention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, rope: RotaryEmbedding,
                 backend: str = "auto"):
        super().__init__()
        self.head_dim = d_model // n_heads
        self.q_proj = nn.Linear(d_model, n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d_model, n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d_model, n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(n_heads * self.head_dim, d_model, bias=False)
        self.rope = rope
        self.backend = backend

    def forward(self, x: torch.Tensor, positions: torch.Tensor, kv_cache=None, layer_idx: int = 0):
        # shapes come from the projections' outputs: a parallel projection may change the head
        # count (tensor parallel) or the sequence length (sequence parallel gathers it)
        q, k, v = (proj(x) for proj in (self.q_proj, self.k_proj, self.v_proj))
        b, t = q.shape[0], q.shape[1]
        q = q.view(b, t, -1, self.head_dim)
        k = k.view(b, t, -1, self.head_dim)
        v = v.view(b, t, -1, self.head_dim)
        q, k = self.rope(q, positions), self.rope(k, positions)
        if kv_cache is not None:
            k, v = kv_cache.update(layer_idx, k, v)
        out = attention(q, k, v, causal=True, backend=self.backend)
        return self.o_proj(out.reshape(b, t, -1))
