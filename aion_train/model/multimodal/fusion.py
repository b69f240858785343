"""Building the fused sequence: media tokens (projected into d_model, scaled by a confidence
gate sigmoid(alpha)) replace the placeholder tokens of the embedded text sequence.

The batch marks placeholders with `modality` (1 image, 2 audio, 3 video, 0 text/delimiter);
media item j of a kind fills the j-th run of R placeholders of that kind in row-major order.
`modality_from_ids` rebuilds that tensor from the delimiter tokens (for hand-made prompts).
"""

from __future__ import annotations

import math

import torch
from torch import nn

KINDS = ("image", "audio", "video")
KIND_ID = {"image": 1, "audio": 2, "video": 3}


class GatedProjection(nn.Module):
    """z~ = sigmoid(alpha) * W z: the projection W_img / W_aud / W_vid into d_model and the
    confidence gate, sigmoid(alpha) = `gate_init` at the start (small, so media do not swamp
    the text early in training)."""

    def __init__(self, in_dim: int, d_model: int, gate_init: float = 0.1):
        super().__init__()
        self.proj = nn.Linear(in_dim, d_model)
        # shape [1], not a 0-dim scalar: DeepSpeed broadcasts parameters as byte views
        self.alpha = nn.Parameter(torch.full((1,), math.log(gate_init / (1.0 - gate_init))))

    @property
    def gate(self) -> torch.Tensor:
        return torch.sigmoid(self.alpha)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gate.to(x.dtype) * self.proj(x)


def placeholder_runs(modality: torch.Tensor, kind_id: int, run_len: int) -> torch.Tensor:
    """Flat positions (b * T + t) of the placeholders of one kind, as [N_items, run_len] in
    row-major order. Raises when their count is not a multiple of run_len."""
    pos = (modality.reshape(-1) == kind_id).nonzero().squeeze(1)
    if pos.numel() % run_len:
        raise ValueError(
            f"modality id {kind_id}: {pos.numel()} placeholder tokens is not a multiple "
            f"of model.multimodal.resampler_queries={run_len}"
        )
    return pos.view(-1, run_len)


def scatter_media(embeds: torch.Tensor, modality: torch.Tensor, media: dict[str, torch.Tensor]) -> torch.Tensor:
    """embeds [B, T, D] with the rows of each kind's media tokens [N, R, D] written at that
    kind's placeholder positions (out of place, differentiable in both)."""
    b, t, d = embeds.shape
    flat = embeds.reshape(b * t, d)
    for kind, tokens in media.items():
        runs = placeholder_runs(modality, KIND_ID[kind], tokens.shape[1])
        if runs.shape[0] != tokens.shape[0]:
            raise ValueError(
                f"{kind}: the batch has {tokens.shape[0]} items but {runs.shape[0]} runs of "
                f"{tokens.shape[1]} placeholders with modality={KIND_ID[kind]}"
            )
        flat = flat.index_put((runs.reshape(-1),), tokens.reshape(-1, d).to(flat.dtype))
    for kind, kid in KIND_ID.items():
        if kind not in media and bool((modality == kid).any()):
            raise ValueError(f"the batch has {kind} placeholders (modality={kid}) but no {kind} tensor")
    return flat.view(b, t, d)


def modality_from_ids(input_ids: torch.Tensor, delimiters: dict[str, tuple[int, int]], pad_id: int) -> torch.Tensor:
    """The `modality` tensor of the batch contract from token ids: a pad-id token between
    a kind's open and close delimiter (e.g. `<I>`, `</I>`) is a placeholder of that kind."""
    out = torch.zeros_like(input_ids)
    for kind, (open_id, close_id) in delimiters.items():
        opens = (input_ids == open_id).long().cumsum(1)
        closes = (input_ids == close_id).long().cumsum(1)
        inside = (opens - closes) > 0
        out[inside & (input_ids == pad_id)] = KIND_ID[kind]
    return out


def item_locations(modality: torch.Tensor, kind: str, run_len: int, segment_ids: torch.Tensor | None):
    """For every item of `kind`: (row, segment id, position of its first placeholder)."""
    t = modality.shape[1]
    first = placeholder_runs(modality, KIND_ID[kind], run_len)[:, 0]
    rows, cols = first // t, first % t
    seg = torch.ones_like(rows) if segment_ids is None else segment_ids[rows, cols]
    return rows, seg, cols
