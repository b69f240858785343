"""Multi-head causal self-attention with optional grouped KV heads and RoPE.

Head counts are read from the projection shapes at run time, so the same module works
unchanged when `parallelize` swaps its projections for tensor-parallel shards.

Packed rows (several samples in one row): the model hands every layer a `PackedSegments`
(attention_backend.py) as `attn_mask`: SDPA gets its block-diagonal causal mask
(`segment_causal_mask`), flash-attn its varlen kernel (`varlen_from_segments`); positions may be
per row ([B, T], restarting at 0 in every segment). Without them the plain causal path runs
exactly as before."""

from __future__ import annotations

import torch
from torch import nn

from .attention_backend import PackedSegments, attention, segment_causal_mask, varlen_from_segments  # noqa: F401
from .execution import ExecutionPolicy
from .packed_weights import packed_linear
from .rope import RotaryEmbedding


def apply_rope(rope: RotaryEmbedding, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """RoPE with positions [T] (shared by the batch) or [B, T] (per row, e.g. restarting per
    packed segment): the per-row case runs as one row of B*T tokens."""
    if positions.dim() == 1:
        return rope(x, positions)
    b, t = x.shape[:2]
    return rope(x.reshape(1, b * t, *x.shape[2:]), positions.reshape(-1)).reshape(x.shape)


class Attention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, rope: RotaryEmbedding, backend: str = "auto"):
        super().__init__()
        self.head_dim = d_model // n_heads
        self.q_proj = nn.Linear(d_model, n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d_model, n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d_model, n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(n_heads * self.head_dim, d_model, bias=False)
        self.rope = rope
        self.backend = backend
        self.execution: ExecutionPolicy | None = None  # apply_execution_policy; None: the device's
        self.packed_qkv: torch.Tensor | None = None  # q, k, v weights packed as one (packed_weights.py)

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        kv_cache=None,
        layer_idx: int = 0,
        attn_mask: torch.Tensor | None = None,
    ):
        """x: [B, T, d]; positions: [T] or [B, T]; attn_mask: None (causal), a `PackedSegments`
        (packed rows) or a boolean [B, 1, T, T_keys] mask (run through SDPA)."""
        # shapes come from the projections' outputs: a parallel projection may change the head
        # count (tensor parallel) or the sequence length (sequence parallel gathers it)
        b, t = x.shape[0], x.shape[1]
        if self.packed_qkv is not None and not torch.is_grad_enabled() and x.dtype == self.q_proj.weight.dtype:
            # generation: q, k and v as one matmul, RoPE on q and k as one call (same numbers)
            hq, hk = self.q_proj.weight.shape[0] // self.head_dim, self.k_proj.weight.shape[0] // self.head_dim
            qkv = packed_linear(x, self.packed_qkv).view(b, t, hq + 2 * hk, self.head_dim)
            qk = apply_rope(self.rope, qkv[:, :, : hq + hk], positions)
            q, k, v = qk[:, :, :hq], qk[:, :, hq:], qkv[:, :, hq + hk :]
        else:
            q, k, v = (proj(x) for proj in (self.q_proj, self.k_proj, self.v_proj))
            q = q.view(b, q.shape[1], -1, self.head_dim)
            k = k.view(b, k.shape[1], -1, self.head_dim)
            v = v.view(b, v.shape[1], -1, self.head_dim)
            q, k = apply_rope(self.rope, q, positions), apply_rope(self.rope, k, positions)
        b, t = q.shape[0], q.shape[1]
        if kv_cache is not None:
            k, v = kv_cache.update(layer_idx, k, v)
        out = attention(q, k, v, causal=True, backend=self.backend, attn_mask=attn_mask, execution=self.execution)
        return self.o_proj(out.reshape(b, t, -1))
