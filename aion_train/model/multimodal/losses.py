"""Joint losses of the multimodal model.

- `clip_loss`: symmetric InfoNCE (CLIP) with a learned temperature,
  L = 1/2 [CE(s * I T^T, targets) + CE(s * T I^T, targets)], s = exp(logit_scale) = 1/tau;
  items whose captions are identical count as positives of each other (the target spreads
  over them), which is plain InfoNCE when all captions differ.
- `UncertaintyWeighting`: Kendall, Gal & Cipolla (2018): L = sum_i L_i / (2 sigma_i^2) + log sigma_i,
  with s_i = log sigma_i learned.
- `masked_token_loss`: the trunk's (possibly vocab-parallel) cross-entropy on one loss kind.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def same_caption_targets(caption_ids: torch.Tensor) -> torch.Tensor:
    """[N, N] row-stochastic targets: uniform over the items whose caption tokens are equal."""
    same = (caption_ids.unsqueeze(1) == caption_ids.unsqueeze(0)).all(-1).float()
    return same / same.sum(1, keepdim=True)


def clip_loss(
    media: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor, targets: torch.Tensor | None = None
) -> torch.Tensor:
    """media, text: [N, C] L2-normalised embeddings of matching pairs; logit_scale = log(1/tau)."""
    if media.shape != text.shape or media.shape[0] < 2:
        raise ValueError(f"clip_loss needs >= 2 matching pairs, got {list(media.shape)} and {list(text.shape)}")
    logits = logit_scale.exp() * media.float() @ text.float().t()
    if targets is None:
        targets = torch.eye(media.shape[0], device=media.device)
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets.t()))


class LogitScale(nn.Module):
    """Learned log(1/tau), initialised at log(1/tau0) and clamped at log(max_scale) (as CLIP)."""

    def __init__(self, tau0: float = 0.07, max_scale: float = 100.0):
        super().__init__()
        self.value = nn.Parameter(torch.full((1,), math.log(1.0 / tau0)))  # [1]: see GatedProjection.alpha
        self.max_log = math.log(max_scale)

    def forward(self) -> torch.Tensor:
        return self.value.clamp(max=self.max_log)


class UncertaintyWeighting(nn.Module):
    """Combine named losses. With `learned`: sum_i w_i L_i / (2 sigma_i^2) + log sigma_i (w_i the
    fixed config weights, log sigma_i = 0 at init, so each starts at weight w_i / 2); without:
    sum_i w_i L_i. A loss missing from this batch (None) contributes 0 * log sigma_i, so its
    parameter still gets a (zero) gradient on every rank."""

    def __init__(self, weights: dict[str, float], learned: bool = True):
        super().__init__()
        self.names = [n for n, w in weights.items() if w > 0]
        self.weights = {n: float(weights[n]) for n in self.names}
        self.learned = learned
        self.log_sigma = nn.Parameter(torch.zeros(len(self.names))) if learned else None

    def forward(self, losses: dict[str, torch.Tensor | None]):
        """-> (total, {"sigma_<name>": float, "weight_<name>": float} for logging)."""
        total = None
        extras: dict[str, float] = {}
        for i, name in enumerate(self.names):
            loss = losses.get(name)
            if self.learned:
                s = self.log_sigma[i]
                factor = 0.5 * torch.exp(-2.0 * s)
                term = (self.weights[name] * loss.float() * factor + s) if loss is not None else 0.0 * s
                extras[f"sigma_{name}"] = float(torch.exp(s.detach()))
                extras[f"weight_{name}"] = float(self.weights[name] * factor.detach())
            else:
                if loss is None:
                    continue
                term = self.weights[name] * loss.float()
                extras[f"weight_{name}"] = self.weights[name]
            total = term if total is None else total + term
        if total is None:
            raise ValueError("no loss in this batch: it has no labelled tokens and no captioned media")
        return total, extras


def masked_token_loss(
    loss_fn, logits: torch.Tensor, labels: torch.Tensor, loss_kind: torch.Tensor, kind: int
) -> torch.Tensor | None:
    """Mean cross-entropy over the tokens of `loss_kind == kind` (None when there are none)."""
    keep = (loss_kind == kind) & (labels != -100)
    if not bool(keep.any()):
        return None
    return loss_fn(logits, labels.masked_fill(~keep, -100))
