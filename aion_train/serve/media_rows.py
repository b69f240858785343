"""The media side of an engine batch (engine.py): each row's media tokens written at its
placeholders for the prefill, and, for a model with gated cross-attention, the per-row
context the cross-attention layers read at every step (media tokens, the position of each
item's first placeholder, each layer's K/V projection; rows padded to one width, -1 = none),
merged and cut with the rows. Encoded media come from the engine's `MediaCache`."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .media import MediaCache

Context = tuple  # (kv [B, K, D], kv_pos [B, K], then each cross-attention layer's K/V [B, K, 2D])


class MediaRows:
    def __init__(self, model, device):
        self.model, self.device = model, device
        self.multimodal = hasattr(model, "encode_media")
        self.cross_attn = list(getattr(model, "cross_attn", ()))
        self.cache = MediaCache() if self.multimodal else None

    def inputs(self, rows, ids: torch.Tensor, embed):
        """(embeds [B, T, D] with each row's media tokens at its placeholders, modality [B, T],
        cross-attention context) for a left-padded prefill; (None, None, ctx) without media."""
        if not any(r.media for r in rows):
            return None, None, self._context([[] for _ in rows])
        if not self.multimodal:
            raise ValueError("media sent to a text-only model")
        t = ids.shape[1]
        embeds = embed(ids)
        modality = torch.zeros_like(ids)
        per_row = []
        for i, r in enumerate(rows):
            items = []
            if r.media:
                n = len(r.prompt_ids)
                mod = torch.tensor(r.modality, dtype=torch.long, device=self.device)
                cols = (mod != 0).nonzero().squeeze(1)
                enc = [self.cache.get(self.model, m) for m in r.media]
                flat = torch.cat([e.tokens for e in enc]).to(embeds.dtype)
                if flat.shape[0] != cols.numel():
                    raise ValueError(f"{len(r.media)} media items for {cols.numel()} placeholder tokens")
                embeds[i, t - n + cols] = flat
                modality[i, t - n :] = mod
                start = 0
                for e in enc:  # the row position of each item's first placeholder
                    items.append((e, int(cols[start])))
                    start += e.tokens.shape[0]
            per_row.append(items)
        return embeds, modality, self._context(per_row)

    def _context(self, per_row) -> Context | None:
        if not self.cross_attn:
            return None
        d = int(self.model.cfg.d_model)
        width = max([sum(e.tokens.shape[0] for e, _ in items) for items in per_row] + [1])
        b = len(per_row)
        kv = torch.zeros(b, width, d, device=self.device)
        kv_pos = torch.full((b, width), -1, dtype=torch.long, device=self.device)
        proj = [torch.zeros(b, width, 2 * d, device=self.device) for _ in self.cross_attn]
        for i, items in enumerate(per_row):
            k = 0
            for e, first in items:
                n = e.tokens.shape[0]
                kv[i, k : k + n] = e.tokens.float()
                kv_pos[i, k : k + n] = first
                for p, lkv in zip(proj, e.layer_kv):
                    p[i, k : k + n] = lkv.float()
                k += n
        return (kv, kv_pos, *proj)

    def set_context(self, ctx: Context | None, q_seg: torch.Tensor, q_pos: torch.Tensor) -> None:
        """Give the cross-attention layers (if any) each row's media for these queries."""
        if not self.cross_attn:
            return
        from aion_train.model.multimodal.cross_attention import MediaContext

        kv, kv_pos, *proj = ctx
        kv_seg = torch.where(kv_pos >= 0, 1, -1)
        c = MediaContext(kv, kv_seg, kv_pos, q_seg.clamp(max=1), q_pos, dict(zip(self.cross_attn, proj)))
        for layer in self.cross_attn:
            layer.context = c

    @staticmethod
    def merge(a: Context | None, b: Context | None) -> Context | None:
        """The rows of both (a's first), padded to the wider media width."""
        if a is None:
            return None
        k = max(a[0].shape[1], b[0].shape[1])

        def widen(c):
            extra = k - c[0].shape[1]
            kv, pos, *proj = c
            return (
                F.pad(kv, (0, 0, 0, extra)),
                F.pad(pos, (0, extra), value=-1),
                *(F.pad(x, (0, 0, 0, extra)) for x in proj),
            )

        return tuple(torch.cat([x, y]) for x, y in zip(widen(a), widen(b)))

    @staticmethod
    def select(ctx: Context | None, sel: torch.Tensor) -> Context | None:
        return None if ctx is None else tuple(x.index_select(0, sel) for x in ctx)
