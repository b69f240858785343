"""Data-parallel gradient averaging and the global gradient norm across TP/EP shards.

DeepSpeed does the data-parallel reduction in training; these are used where we reduce
ourselves (verify-parallel, the reference of the tests) and for the global norm."""
from __future__ import annotations

import torch
import torch.distributed as dist

from .collectives import all_reduce_, group_size
from .groups import ParallelGroups
from .parallelize import is_expert_param


def average_gradients(model, groups: ParallelGroups) -> None:
    """Dense grads: mean over the DP group. Expert grads already hold the sum over their EP
    group's local losses, so they are summed over the EDP group and divided by the full DP size."""
    for p in model.parameters():
        if p.grad is None:
            continue
        group = groups.edp_group if is_expert_param(p) else groups.dp_group
        if group_size(group) > 1:
            dist.all_reduce(p.grad, group=group)
        if groups.dp > 1:
            p.grad.div_(groups.dp)


def global_grad_norm(model, groups: ParallelGroups) -> torch.Tensor:
    """L2 norm of the full model's gradient: TP-sharded params summed over TP, replicated
    ones counted once, expert params summed over TP and EP. The sums stay on the gradients'
    device (no host sync per parameter) and are reduced on the groups' communication device;
    the norm comes back on the CPU."""
    spec = getattr(model, "shard_spec", {})
    dense = expert = None
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        sq = p.grad.detach().double().pow(2).sum()
        if is_expert_param(p):
            expert = sq if expert is None else expert + sq
        elif name in spec or groups.tp_rank == 0:
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
