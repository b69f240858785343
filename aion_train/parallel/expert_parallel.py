"""Expert parallelism: experts sharded over the EP group, token copies exchanged by
all-to-all with variable split sizes; experts' hidden width optionally sharded over TP."""

from __future__ import annotations

import torch
import torch.distributed as dist

from aion_train.kernels import select
from aion_train.model.moe.experts import GroupedExperts
from aion_train.model.moe.token_dispatcher import DispatchState, combine, expert_capacity, sort_by_expert

from .collectives import all_to_all, copy_to, group_size, reduce_from


def chunk_permutation(recv: torch.Tensor) -> torch.Tensor:
    """recv[s, e] rows arrived from source s for local expert e, laid out source-major.
    Returns the index that regroups them expert-major (each expert's rows contiguous)."""
    flat = recv.reshape(-1)
    starts = (torch.cumsum(flat, 0) - flat).view_as(recv).t().reshape(-1)
    lens = recv.t().reshape(-1)
    total = int(lens.sum())
    chunk_starts_out = torch.cumsum(lens, 0) - lens
    within = torch.arange(total, device=recv.device) - torch.repeat_interleave(chunk_starts_out, lens)
    return torch.repeat_interleave(starts, lens) + within


class AllToAllDispatcher:
    """Same interface as `LocalDispatcher`, experts spread over `ep_group`: every rank must
    call it the same number of times (`exchanges_tokens`)."""

    exchanges_tokens = True

    def __init__(self, n_experts: int, capacity_factor: float | None, ep_group, kernels: str = "auto"):
        self.n_experts, self.capacity_factor, self.group = n_experts, capacity_factor, ep_group
        self.kernels = kernels
        self._permute = select("moe_permute", kernels)
        self.ep = group_size(ep_group)
        self.n_local = n_experts // self.ep

    def dispatch(self, x: torch.Tensor, indices: torch.Tensor, gates: torch.Tensor):
        cap = expert_capacity(x.shape[0], indices.shape[1], self.n_experts, self.capacity_factor)
        token_index, kept_gates, counts, dropped = sort_by_expert(indices, gates, self.n_experts, cap)
        send = self._permute(x, token_index)
        recv_counts = torch.empty_like(counts)
        dist.all_to_all_single(recv_counts, counts.contiguous(), group=self.group)
        recv = recv_counts.view(self.ep, self.n_local)
        in_splits = counts.view(self.ep, self.n_local).sum(1).tolist()
        out_splits = recv.sum(1).tolist()
        received = all_to_all(send, out_splits, in_splits, self.group)
        perm = chunk_permutation(recv)
        state = DispatchState(
            token_index, kept_gates, x.shape[0], dropped, extra=(torch.argsort(perm), in_splits, out_splits)
        )
        return received.index_select(0, perm), recv.sum(0), state

    def combine(self, expert_out: torch.Tensor, state: DispatchState) -> torch.Tensor:
        inverse, in_splits, out_splits = state.extra
        back = all_to_all(expert_out.index_select(0, inverse), in_splits, out_splits, self.group)
        return combine(back, state.token_index, state.gates, state.n_tokens, self.kernels)


class TensorParallelExperts(GroupedExperts):
    """This rank's experts (E / ep of them) with their hidden width split over the TP group:
    w1/w3 by columns, w2 by rows; the partial outputs are summed over TP."""

    def __init__(self, full: GroupedExperts, ep_group, tp_group):
        torch.nn.Module.__init__(self)
        self.activation = full.activation
        self.execution = full.execution
        self.packed_experts = None
        self._swiglu = full._swiglu
        self.tp_group = tp_group
        ep, tp = group_size(ep_group), group_size(tp_group)
        e_rank = dist.get_rank(ep_group) if ep > 1 else 0
        t_rank = dist.get_rank(tp_group) if tp > 1 else 0

        def part(w, ff_dim):
            w = w.detach().chunk(ep, dim=0)[e_rank]
            return torch.nn.Parameter(w.chunk(tp, dim=ff_dim)[t_rank].clone())

        self.w1 = part(full.w1, 2)
        self.w2 = part(full.w2, 1)
        self.w3 = part(full.w3, 2) if full.w3 is not None else None

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        return reduce_from(super().forward(copy_to(x, self.tp_group), counts), self.tp_group)
