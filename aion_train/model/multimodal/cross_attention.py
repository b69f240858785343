"""Optional Flamingo-style gated cross-attention: text positions (queries) attend to the
media tokens (keys/values) of their own packed sample that come before them,
x <- x + tanh(g) * Attn(LN(x), media), with g = 0 at init so the trunk starts unchanged.

The layers run as forward pre-hooks of the trunk's blocks, so the trunk's forward (and its
TP/EP sharding) is untouched; the model sets `context` before each trunk call. They stay
replicated under tensor/expert parallelism (their input is the replicated residual stream)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from aion_train.model.attention_backend import attention
from aion_train.model.execution import ExecutionPolicy


@dataclass
class MediaContext:
    """Keys/values for one trunk call. kv: [B, K, D] media tokens per row; kv_seg / kv_pos:
    [B, K] their segment and the position of their item's first placeholder (-1 = empty slot);
    q_seg: [B, Tq] query segments; q_pos: [Tq] or [B, Tq] query positions in the row."""

    kv: torch.Tensor
    kv_seg: torch.Tensor
    kv_pos: torch.Tensor
    q_seg: torch.Tensor
    q_pos: torch.Tensor
    # per layer (the GatedCrossAttention module): its key/value projection of kv, [B, K, 2D],
    # computed once (a server caches it per media item); absent: projected at every call
    projected: dict | None = None

    def for_queries(self, q_seg: torch.Tensor, q_pos: torch.Tensor, repeat: int = 1) -> MediaContext:
        """The same media for other queries (e.g. decoding steps); `repeat` copies each row
        that many times (consecutively), for scoring several continuations of one prompt."""
        rep = (lambda x: x.repeat_interleave(repeat, dim=0)) if repeat > 1 else (lambda x: x)  # noqa: E731
        proj = None if self.projected is None else {k: rep(v) for k, v in self.projected.items()}
        return MediaContext(rep(self.kv), rep(self.kv_seg), rep(self.kv_pos), q_seg, q_pos, proj)

    def mask(self) -> torch.Tensor:
        """[B, 1, Tq, K]: same segment and the media item starts before the query."""
        q_pos = self.q_pos if self.q_pos.dim() == 2 else self.q_pos.unsqueeze(0).expand_as(self.q_seg)
        same = (self.q_seg.unsqueeze(2) == self.kv_seg.unsqueeze(1)) & (self.q_seg.unsqueeze(2) > 0)
        before = self.kv_pos.unsqueeze(1) < q_pos.unsqueeze(2)
        return (same & before & (self.kv_pos >= 0).unsqueeze(1)).unsqueeze(1)


def build_context(
    items: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]],
    batch: int,
    d_model: int,
    q_seg: torch.Tensor,
    q_pos: torch.Tensor,
    device,
) -> MediaContext:
    """items: per kind (tokens [N, R, D], rows [N], segs [N], first positions [N]) -> the
    per-row padded MediaContext."""
    toks = [t for t, *_ in items if t.shape[0]]
    if not toks:
        empty = torch.full((batch, 1), -1, device=device, dtype=torch.long)
        return MediaContext(torch.zeros(batch, 1, d_model, device=device), empty, empty, q_seg, q_pos)
    tokens = torch.cat(toks)  # [M, R, D]
    rows, segs, pos = (torch.cat([x[i] for x in items if x[0].shape[0]]) for i in (1, 2, 3))
    r = tokens.shape[1]
    order = torch.argsort(rows, stable=True)
    tokens, rows, segs, pos = tokens[order], rows[order], segs[order], pos[order]
    counts = torch.bincount(rows, minlength=batch)
    slot = torch.arange(rows.numel(), device=device) - (torch.cumsum(counts, 0) - counts)[rows]
    n_max = int(counts.max())
    kv = tokens.new_zeros(batch, n_max, r, tokens.shape[-1])
    kv_seg = torch.full((batch, n_max), -1, dtype=torch.long, device=device)
    kv_pos = kv_seg.clone()
    kv[rows, slot], kv_seg[rows, slot], kv_pos[rows, slot] = tokens, segs, pos
    expand = lambda x: x.unsqueeze(-1).expand(-1, -1, r).reshape(batch, n_max * r)  # noqa: E731
    return MediaContext(kv.reshape(batch, n_max * r, -1), expand(kv_seg), expand(kv_pos), q_seg, q_pos)


class GatedCrossAttention(nn.Module):
    def __init__(self, d_model: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(d_model)
        self.q = nn.Linear(d_model, d_model, bias=False)
        self.kv = nn.Linear(d_model, 2 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)
        self.gate = nn.Parameter(torch.zeros(1))  # tanh(0) = 0: no effect at init
        self.context: MediaContext | None = None
        self.execution: ExecutionPolicy | None = None  # apply_execution_policy; None: the device's

    def forward(self, x: torch.Tensor, ctx: MediaContext) -> torch.Tensor:
        b, t, d = x.shape
        h = self.heads
        q = self.q(self.norm(x)).view(b, t, h, -1)
        pre = None if ctx.projected is None else ctx.projected.get(self)
        kv = self.kv(ctx.kv.to(x.dtype)) if pre is None else pre.to(x.dtype)
        k, v = kv.view(b, -1, 2, h, d // h).unbind(2)
        mask = ctx.mask()  # [B, 1, T, Tk]
        visible = mask.any(-1, keepdim=True)  # queries with no media: output 0, no NaN
        out = attention(q, k, v, causal=False, attn_mask=mask | ~visible, execution=self.execution)
        out = (out * visible.transpose(1, 2)).reshape(b, t, d)
        return x + torch.tanh(self.gate).to(x.dtype) * self.out(out)

    def pre_hook(self, block, args):
        """Forward pre-hook for a trunk block: rewrite its input x (args[0])."""
        if self.context is None:
            return None
        return (self(args[0], self.context),) + tuple(args[1:])
