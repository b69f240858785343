"""Per-modality encoders: each turns one kind of media into a sequence of `dim`-wide tokens
plus a padding mask, ready for the resampler and for contrastive pooling.

- `ImageEncoder`: a ViT over flattened patches (linear patch embedding, learned positions).
- `AudioEncoder`: Whisper-style: two 1-D convolutions over the log-mel frames (the second with
  stride 2), fixed sinusoidal positions, attention layers; padded frames are masked.
- `VideoEncoder`: a spatio-temporal transformer over tubelets (ViViT's joint space-time
  attention): linear tubelet embedding, learned temporal + sinusoidal 2-D spatial positions.

All use pre-norm `nn.TransformerEncoderLayer`s. Encoders stay replicated under tensor/expert
parallelism: every rank runs them in full on its own batch (they are small next to the trunk).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def sinusoidal_positions(n: int, dim: int, device=None) -> torch.Tensor:
    """[n, dim] Transformer sinusoids: sin(p / 10000^(2i/dim)) in the first half, cos in the second."""
    half = dim // 2
    inv = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=device) / max(half - 1, 1))
    ang = torch.arange(n, dtype=torch.float32, device=device)[:, None] * inv[None, :]
    out = torch.cat([ang.sin(), ang.cos()], dim=1)
    return F.pad(out, (0, dim - 2 * half))


class TransformerStack(nn.Module):
    """`layers` pre-norm attention blocks and a final LayerNorm."""

    def __init__(self, dim: int, layers: int, heads: int):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(
                dim, heads, 4 * dim, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
            )
            for _ in range(layers)
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: [N, L, dim]; pad_mask: [N, L] True where padding (never attended to)."""
        for layer in self.layers:
            x = layer(x, src_key_padding_mask=pad_mask)
        return self.norm(x)


def _check_items(x: torch.Tensor, name: str, width: int) -> None:
    if x.dim() != 3 or x.shape[-1] != width:
        raise ValueError(f"{name}: expected [N, L, {width}], got {list(x.shape)}")


class ImageEncoder(nn.Module):
    """ViT: patches [N, P, 3*p*p] -> (tokens [N, P, dim], pad mask None)."""

    def __init__(self, patch_dim: int, n_patches: int, dim: int, layers: int, heads: int):
        super().__init__()
        self.patch_dim, self.n_patches = patch_dim, n_patches
        self.embed = nn.Linear(patch_dim, dim)
        self.pos = nn.Parameter(torch.randn(n_patches, dim) * 0.02)
        self.stack = TransformerStack(dim, layers, heads)

    def forward(self, patches: torch.Tensor):
        _check_items(patches, "image patches", self.patch_dim)
        if patches.shape[1] != self.n_patches:
            raise ValueError(
                f"image patches: expected {self.n_patches} patches per image "
                f"(model.multimodal.image_size / patch_size squared), got {patches.shape[1]}"
            )
        x = self.embed(patches.to(self.embed.weight.dtype)) + self.pos
        return self.stack(x), None


class AudioEncoder(nn.Module):
    """Whisper-style: log-mel [N, F, n_mels] (+ real frame counts) -> (tokens [N, ceil(F/2), dim],
    pad mask). Padded frames are zeroed before each convolution, so an item's output does not
    depend on how much padding the batch gave it."""

    def __init__(self, n_mels: int, dim: int, layers: int, heads: int, max_frames: int):
        super().__init__()
        self.n_mels, self.max_frames = n_mels, max_frames
        self.conv1 = nn.Conv1d(n_mels, dim, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(dim, dim, kernel_size=3, stride=2, padding=1)
        self.stack = TransformerStack(dim, layers, heads)

    def forward(self, mel: torch.Tensor, frames: torch.Tensor | None = None):
        _check_items(mel, "audio log-mel", self.n_mels)
        n, f = mel.shape[0], mel.shape[1]
        if f > self.max_frames:
            raise ValueError(f"audio: {f} frames exceed model.multimodal.max_audio_frames={self.max_frames}")
        frames = torch.full((n,), f, device=mel.device) if frames is None else frames.to(mel.device)
        if frames.shape != (n,) or bool((frames < 1).any()) or bool((frames > f).any()):
            raise ValueError(f"audio_frames must be [N]={n} counts in 1..{f}, got {frames.tolist()}")
        valid = torch.arange(f, device=mel.device)[None, :] < frames[:, None]  # [N, F]
        x = mel.to(self.conv1.weight.dtype) * valid[..., None]
        h = F.gelu(self.conv1(x.transpose(1, 2))) * valid[:, None, :]
        h = F.gelu(self.conv2(h)).transpose(1, 2)  # [N, ceil(F/2), dim]
        out_len = (frames + 1) // 2
        pad = torch.arange(h.shape[1], device=mel.device)[None, :] >= out_len[:, None]
        h = h + sinusoidal_positions(h.shape[1], h.shape[2], mel.device).to(h.dtype)
        return self.stack(h, pad), pad


class VideoEncoder(nn.Module):
    """Tubelets [N, n_t * s * s, 3*t*p*p] in (time, row, column) order -> (tokens, pad mask None).
    The spatial side s is inferred, so 32x32 and 64x64 clips both work."""

    def __init__(self, tubelet_dim: int, n_time: int, dim: int, layers: int, heads: int):
        super().__init__()
        self.tubelet_dim, self.n_time = tubelet_dim, n_time
        self.embed = nn.Linear(tubelet_dim, dim)
        self.time_pos = nn.Parameter(torch.randn(n_time, dim) * 0.02)
        self.stack = TransformerStack(dim, layers, heads)

    def positions(self, n_tubelets: int, device) -> torch.Tensor:
        per_frame = n_tubelets // self.n_time
        side = math.isqrt(per_frame)
        if per_frame * self.n_time != n_tubelets or side * side != per_frame:
            raise ValueError(
                f"video: {n_tubelets} tubelets is not {self.n_time} time steps "
                "(model.multimodal.video_frames / tubelet_frames) x a square grid"
            )
        dim = self.time_pos.shape[1]
        axis = sinusoidal_positions(side, dim // 2, device)
        spatial = torch.cat([axis[:, None, :].expand(side, side, -1), axis[None, :, :].expand(side, side, -1)], -1)
        spatial = F.pad(spatial.reshape(per_frame, -1), (0, dim - 2 * (dim // 2)))
        return (self.time_pos[:, None, :] + spatial[None].to(self.time_pos.dtype)).reshape(n_tubelets, dim)

    def forward(self, tubelets: torch.Tensor):
        _check_items(tubelets, "video tubelets", self.tubelet_dim)
        x = self.embed(tubelets.to(self.embed.weight.dtype)) + self.positions(tubelets.shape[1], tubelets.device)
        return self.stack(x), None


def masked_mean(tokens: torch.Tensor, pad_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over the non-padding tokens: [N, L, D] -> [N, D]."""
    if pad_mask is None:
        return tokens.mean(dim=1)
    keep = (~pad_mask).to(tokens.dtype)[..., None]
    return (tokens * keep).sum(1) / keep.sum(1).clamp(min=1)
