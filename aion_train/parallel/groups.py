"""Process groups for tensor (TP), data (DP), expert (EP) and expert-data (EDP) parallelism.

Layout (Megatron's): rank = dp_rank * tp + tp_rank, TP innermost so a TP group sits on one
node. Inside each data-parallel group, EP groups are blocks of `ep` consecutive DP ranks and
EDP groups join the ranks holding the same experts: ep_rank = dp_rank % ep,
edp_rank = dp_rank // ep."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch.distributed as dist


@dataclass
class ParallelGroups:
    world: int = 1
    rank: int = 0
    tp: int = 1
    dp: int = 1
    ep: int = 1
    tp_group: object = None
    dp_group: object = None
    ep_group: object = None
    edp_group: object = None

    @property
    def edp(self) -> int:
        return self.dp // self.ep

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def dp_rank(self) -> int:
        return self.rank // self.tp

    @property
    def ep_rank(self) -> int:
        return self.dp_rank % self.ep

    @property
    def edp_rank(self) -> int:
        return self.dp_rank // self.ep


def layout(world: int, tp: int, ep: int) -> dict[str, list[list[int]]]:
    """The rank lists of every group, computed without touching torch.distributed."""
    if world % tp:
        raise ValueError(f"world size {world} is not divisible by parallel.tp={tp}")
    dp = world // tp
    if dp % ep:
        raise ValueError(f"parallel.ep={ep} does not divide the data-parallel size {dp}")
    tp_groups = [list(range(d * tp, (d + 1) * tp)) for d in range(dp)]
    dp_groups = [list(range(t, world, tp)) for t in range(tp)]
    ep_groups, edp_groups = [], []
    for t in range(tp):
        dp_ranks = dp_groups[t]
        ep_groups += [dp_ranks[b * ep : (b + 1) * ep] for b in range(dp // ep)]
        edp_groups += [dp_ranks[e::ep] for e in range(ep)]
    return {"tp": tp_groups, "dp": dp_groups, "ep": ep_groups, "edp": edp_groups}


def build_groups(tp: int = 1, ep: int = 1, timeout_s: float = 120.0) -> ParallelGroups:
    """Create every group (all ranks must call this, in the same order)."""
    if not dist.is_initialized():
        return ParallelGroups(tp=tp, ep=ep) if tp == ep == 1 else _fail(tp, ep)
    world, rank = dist.get_world_size(), dist.get_rank()
    lay = layout(world, tp, ep)
    mine = {}
    timeout = timedelta(seconds=timeout_s)
    for kind in ("tp", "dp", "ep", "edp"):
        for ranks in lay[kind]:
            group = dist.new_group(ranks, timeout=timeout)
            if rank in ranks:
                mine[kind] = group
    return ParallelGroups(
        world=world,
        rank=rank,
        tp=tp,
        dp=world // tp,
        ep=ep,
        tp_group=mine["tp"],
        dp_group=mine["dp"],
        ep_group=mine["ep"],
        edp_group=mine["edp"],
    )


def _fail(tp, ep):
    raise RuntimeError(f"parallel.tp={tp}, parallel.ep={ep} need torch.distributed to be initialised")
