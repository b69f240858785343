"""Perceiver resampler (Flamingo): R learned queries cross-attend to a media item's encoder
tokens, so any number of patches / frames / tubelets becomes exactly R tokens,
r_j = Attn(Q_j, K = [Z; r], V = [Z; r]), e.g. 196 ViT patches -> 8 tokens."""

from __future__ import annotations

import torch
from torch import nn


class ResamplerLayer(nn.Module):
    """Pre-norm: queries attend to [media tokens; queries] (as in Flamingo), then an MLP."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm_media = nn.LayerNorm(dim)
        self.norm_q = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm_ff = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, q: torch.Tensor, media: torch.Tensor, pad_mask: torch.Tensor | None) -> torch.Tensor:
        qn = self.norm_q(q)
        kv = torch.cat([self.norm_media(media), qn], dim=1)
        if pad_mask is not None:
            pad_mask = torch.cat([pad_mask, pad_mask.new_zeros(q.shape[:2])], dim=1)
        q = q + self.attn(qn, kv, kv, key_padding_mask=pad_mask, need_weights=False)[0]
        return q + self.ff(self.norm_ff(q))


class PerceiverResampler(nn.Module):
    """[N, L, dim] (+ [N, L] padding mask, True = pad) -> [N, n_queries, dim]."""

    def __init__(self, dim: int, n_queries: int, layers: int = 1, heads: int = 4):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(n_queries, dim) * 0.02)
        self.layers = nn.ModuleList(ResamplerLayer(dim, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)

    def forward(self, media: torch.Tensor, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        if media.dim() != 3 or media.shape[-1] != self.queries.shape[1]:
            raise ValueError(f"resampler: expected [N, L, {self.queries.shape[1]}], got {list(media.shape)}")
        q = self.queries.to(media.dtype).unsqueeze(0).expand(media.shape[0], -1, -1)
        for layer in self.layers:
            q = layer(q, media, pad_mask)
        return self.norm(q)
