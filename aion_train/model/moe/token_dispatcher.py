"""Sort-based token dispatch: permute token copies so each expert's tokens are contiguous,
drop past capacity, and scatter the weighted expert outputs back. No Python loop over
experts, no dense one-hot einsum.

`LocalDispatcher` keeps all experts on this rank; the expert-parallel dispatcher in
`aion_train.parallel.expert_parallel` has the same interface and adds the all-to-all."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from aion_train.kernels import select

from ..execution import ExecutionPolicy, policy_for


@dataclass
class DispatchState:
    token_index: torch.Tensor  # [M] source token of each kept copy, in expert order
    gates: torch.Tensor  # [M] gate weight of each kept copy
    n_tokens: int
    dropped: int
    extra: object = None  # what an expert-parallel dispatcher needs to undo its exchange


def expert_capacity(n_tokens: int, top_k: int, n_experts: int, capacity_factor: float | None) -> int | None:
    """Switch capacity: ceil(factor * tokens * k / experts); None = dropless."""
    if capacity_factor is None:
        return None
    return max(1, math.ceil(capacity_factor * n_tokens * top_k / n_experts))


def sort_by_expert(indices: torch.Tensor, gates: torch.Tensor, n_experts: int, capacity: int | None):
    """Order the N*k (token, expert) pairs by expert (stable: earlier tokens first) and drop
    the pairs past each expert's capacity. Returns token_index, gates, counts[E], dropped."""
    top_k = indices.shape[1]
    flat = indices.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=n_experts)
    dropped = 0
    if capacity is not None:
        starts = torch.cumsum(counts, 0) - counts
        rank_in_expert = torch.arange(flat.numel(), device=flat.device) - starts[flat[order]]
        keep = rank_in_expert < capacity
        dropped = int((~keep).sum())
        order = order[keep]
        counts = counts.clamp(max=capacity)
    return order // top_k, gates.reshape(-1)[order], counts, dropped


def pad_to_equal_groups(
    token_index: torch.Tensor, gates: torch.Tensor, counts: torch.Tensor, max_waste: float, max_rows: int
):
    """Lay the expert-ordered copies out as E equal groups of C = max(counts) rows, for one
    batched expert GEMM. Padding rows repeat token 0 with gate 0: the combine scales their
    outputs by 0, so they add nothing and get zero gradients. Returns (token_index, gates,
    counts) of the padded layout, or None when the padding rows would exceed `max_waste` of the
    real rows or C would exceed `max_rows`."""
    n_experts, real = counts.numel(), token_index.numel()
    group = int(counts.max()) if real else 0
    if real == 0 or group > max_rows or n_experts * group > (1 + max_waste) * real:
        return None
    if n_experts * group == real:
        return token_index, gates, counts
    starts = torch.cumsum(counts, 0) - counts
    expert = torch.repeat_interleave(torch.arange(n_experts, device=counts.device), counts)
    slot = expert * group + torch.arange(real, device=counts.device) - starts[expert]
    padded_index = token_index.new_zeros(n_experts * group).index_copy(0, slot, token_index)
    padded_gates = gates.new_zeros(n_experts * group).index_copy(0, slot, gates)
    return padded_index, padded_gates, torch.full_like(counts, group)


def combine(
    expert_out: torch.Tensor, token_index: torch.Tensor, gates: torch.Tensor, n_tokens: int, kernels: str = "auto"
) -> torch.Tensor:
    """sum_k gate_k * expert_k(x) per token (tokens with every copy dropped get zeros)."""
    return select("moe_unpermute", kernels)(expert_out, token_index, gates, n_tokens)


class LocalDispatcher:
    """All experts live on this rank (no token leaves it: `exchanges_tokens` is False). Expert groups are padded to equal size when the
    execution policy says so (`ExecutionPolicy.pad_expert_groups`: on the CPU, where equal
    groups run as one batched GEMM)."""

    def __init__(self, n_experts: int, capacity_factor: float | None, kernels: str = "auto"):
        self.n_experts = n_experts
        self.capacity_factor = capacity_factor
        self.kernels = kernels
        self.execution: ExecutionPolicy | None = None  # apply_execution_policy; None: the device's
        self._permute = select("moe_permute", kernels)

    exchanges_tokens = False

    def dispatch(self, x: torch.Tensor, indices: torch.Tensor, gates: torch.Tensor):
        """x: [N, d] -> (tokens grouped by expert [M, d], counts per local expert [E], state).
        Padded groups count their padding rows (M = E * max count)."""
        cap = expert_capacity(x.shape[0], indices.shape[1], self.n_experts, self.capacity_factor)
        token_index, kept_gates, counts, dropped = sort_by_expert(indices, gates, self.n_experts, cap)
        policy = policy_for(self.execution, x.device)
        padded = (
            pad_to_equal_groups(token_index, kept_gates, counts, policy.pad_max_waste, policy.pad_max_rows)
            if policy.pad_expert_groups and token_index.numel() > policy.sparse_expert_rows
            else None
        )
        if padded is not None:
            token_index, kept_gates, counts = padded
        state = DispatchState(token_index, kept_gates, x.shape[0], dropped)
        return self._permute(x, token_index), counts, state

    def combine(self, expert_out: torch.Tensor, state: DispatchState) -> torch.Tensor:
        return combine(expert_out, state.token_index, state.gates, state.n_tokens, self.kernels)
