"""MoE FFN = router -> token dispatcher -> experts -> dispatcher.combine (+ shared expert)."""

from __future__ import annotations

import torch
from torch import nn

from ..execution import ExecutionPolicy, policy_for
from ..ffn import DenseFFN
from .experts import GroupedExperts
from .router import TopKRouter
from .token_dispatcher import LocalDispatcher


class MoELayer(nn.Module):
    def __init__(
        self,
        d_model: int,
        n_experts: int,
        top_k: int,
        d_ff_expert: int,
        activation: str = "swiglu",
        capacity_factor: float | None = None,
        balance_coef: float = 0.01,
        z_loss_coef: float = 0.0,
        shared_expert_d_ff: int = 0,
        normalize_gates: bool = True,
        init_std: float = 0.02,
        kernels: str = "auto",
    ):
        super().__init__()
        self.n_experts, self.top_k = n_experts, top_k
        self.router = TopKRouter(d_model, n_experts, top_k, balance_coef, z_loss_coef, normalize_gates)
        self.experts = GroupedExperts(n_experts, d_model, d_ff_expert, activation, init_std, kernels)
        self.dispatcher = LocalDispatcher(n_experts, capacity_factor, kernels)
        self.shared_expert = DenseFFN(d_model, shared_expert_d_ff, activation, kernels) if shared_expert_d_ff else None
        self.last_stats: dict[str, torch.Tensor | int] = {}
        self.execution: ExecutionPolicy | None = None  # apply_execution_policy; None: the device's
        self.route_hook = None  # router_replay.RouterReplay: records or replaces the routing

    def forward(self, x: torch.Tensor, modality: torch.Tensor | None = None):
        """x: [B, T, d] -> (y [B, T, d], aux loss scalar)."""
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        stats = policy_for(self.execution, x.device).routing_stats
        routing = self.router(flat, None if modality is None else modality.reshape(-1), losses=stats)
        if self.route_hook is not None:
            routing = self.route_hook(routing, shape[:-1])
        tokens, counts, state = self.dispatcher.dispatch(flat, routing.indices, routing.gates)
        out = self.dispatcher.combine(self.experts(tokens, counts), state)
        if self.shared_expert is not None:
            out = out + self.shared_expert(flat)
        if not stats:
            return out.reshape(shape).to(x.dtype), routing.aux_loss
        self.last_stats = {
            "tokens_per_expert": torch.bincount(routing.indices.reshape(-1), minlength=self.n_experts).detach(),
            "dropped": state.dropped,
            "assignments": routing.indices.numel(),
            "balance_loss": routing.balance_loss.detach(),
            "z_loss": routing.z_loss.detach(),
        }
        return out.reshape(shape).to(x.dtype), routing.aux_loss
