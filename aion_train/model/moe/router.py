"""Softmax top-k router (k=1 is Switch routing) with the load-balancing and z losses."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Routing:
    indices: torch.Tensor  # [N, k] expert ids
    gates: torch.Tensor  # [N, k] gate weights (renormalised over the top-k if asked)
    probs: torch.Tensor  # [N, E] full softmax
    aux_loss: torch.Tensor  # balance loss + z-loss (scalar)
    balance_loss: torch.Tensor
    z_loss: torch.Tensor


def balance_loss(probs: torch.Tensor, indices: torch.Tensor, n_experts: int, coef: float) -> torch.Tensor:
    """Switch Transformer: alpha * N * sum_i f_i * P_i, f_i = share of the N*k assignments that
    went to expert i, P_i = mean router probability of expert i. A uniform router gives alpha."""
    counts = torch.bincount(indices.reshape(-1), minlength=n_experts).to(probs.dtype)
    f = counts / indices.numel()
    p = probs.mean(dim=0)
    return coef * n_experts * torch.sum(f * p)


def z_loss(logits: torch.Tensor, coef: float) -> torch.Tensor:
    """ST-MoE router z-loss: coef * mean(logsumexp(logits)^2)."""
    return coef * torch.logsumexp(logits, dim=-1).pow(2).mean()


def modality_expert_mask(reserved: dict[int, list[int]], n_experts: int, n_modalities: int = 4) -> torch.Tensor:
    """[n_modalities, E] additive router mask: row m is 0 on the experts reserved for modality m
    and -inf elsewhere; modalities without a reservation (text, id 0, always) are not masked."""
    mask = torch.zeros(n_modalities, n_experts)
    for modality, experts in reserved.items():
        if modality == 0:
            raise ValueError("text tokens (modality 0) are never restricted to reserved experts")
        mask[modality] = float("-inf")
        mask[modality, list(experts)] = 0.0
    return mask


class TopKRouter(nn.Module):
    def __init__(
        self,
        d_model: int,
        n_experts: int,
        top_k: int,
        balance_coef: float = 0.01,
        z_loss_coef: float = 0.0,
        normalize_gates: bool = True,
    ):
        super().__init__()
        self.n_experts, self.top_k = n_experts, top_k
        self.balance_coef, self.z_loss_coef = balance_coef, z_loss_coef
        self.normalize_gates = normalize_gates
        self.weight = nn.Parameter(torch.empty(n_experts, d_model))
        nn.init.normal_(self.weight, std=0.02)
        # optional [E] additive mask per modality id (set by the multimodal model); -inf blocks an expert
        self.modality_mask: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, modality: torch.Tensor | None = None, losses: bool = True) -> Routing:
        """x: [N, d]. Routing runs in fp32 whatever the activation dtype. `losses=False`
        (generation): the balance and z losses are zero, not computed."""
        logits = F.linear(x.float(), self.weight.float())
        if modality is not None and self.modality_mask is not None:
            logits = logits + self.modality_mask.to(logits.device)[modality]
        probs = torch.softmax(logits, dim=-1)
        gates, indices = torch.topk(probs, self.top_k, dim=-1)
        if self.normalize_gates and self.top_k > 1:
            gates = gates / gates.sum(dim=-1, keepdim=True)
        zero = logits.new_zeros(())
        bal = balance_loss(probs, indices, self.n_experts, self.balance_coef) if losses and self.balance_coef else zero
        zl = z_loss(logits, self.z_loss_coef) if losses and self.z_loss_coef else zero
        return Routing(indices, gates, probs, bal + zl, bal, zl)
