"""Data-parallel gradient averaging and the global gradient norm across TP/EP shards.

DeepSpeed does the data-parallel reduction in training; these are used where we reduce
ourselves (verify-parallel, the reference of the tests) and for the global norm."""

from __future__ import annotations

import torch
import torch.distributed as dist

from .collectives import all_reduce_, group_size
from .groups import ParallelGroups
from .plan import ParallelPlan


def average_gradients(model, groups: ParallelGroups, plan: ParallelPlan) -> None:
    """Dense grads: mean over the DP group. Expert grads already hold the sum over their EP
    group's local losses, so they are summed over the EDP group and divided by the full DP size."""
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        group = groups.edp_group if plan.is_expert(name) else groups.dp_group
        if group_size(group) > 1:
            dist.all_reduce(p.grad, group=group)
        if groups.dp > 1:
            p.grad.div_(groups.dp)


def global_grad_norm(model, groups: ParallelGroups, plan: ParallelPlan) -> torch.Tensor:
    """L2 norm of the full model's gradient: TP-sharded params summed over TP, replicated
    ones counted once, expert params summed over TP and EP (by `plan`; parameters it does not
    know, such as LoRA adapters, count as replicated). The sums stay on the gradients' device
    (no host sync per parameter) and are reduced on the groups' communication device; the norm
    comes back on the CPU."""
    dense = expert = None
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        sq = p.grad.detach().double().pow(2).sum()
        if plan.is_expert(name):
            expert = sq if expert is None else expert + sq
        elif plan.tp_sharded(name) or groups.tp_rank == 0:
            dense = sq if dense is None else dense + sq
    zero = torch.zeros((), dtype=torch.float64)
    dense = zero.clone() if dense is None else dense.cpu()
    expert = zero.clone() if expert is None else expert.cpu()
    if group_size(groups.tp_group) > 1:
        all_reduce_(dense, group=groups.tp_group)
        all_reduce_(expert, group=groups.tp_group)
    if group_size(groups.ep_group) > 1:
        all_reduce_(expert, group=groups.ep_group)
    return (dense + expert).sqrt()
