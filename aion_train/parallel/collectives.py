"""Autograd-aware collectives (Megatron's mappings) on plain torch.distributed.

copy_to      fwd identity      bwd all-reduce   (input of a column-parallel layer)
reduce_from  fwd all-reduce    bwd identity     (output of a row-parallel layer)
gather_last  fwd all-gather    bwd split        (gather a column-parallel output)
scatter_seq / gather_seq / gather_seq_replicated / reduce_scatter_seq  (sequence parallelism, dim 1)
all_to_all   variable splits, bwd = the reverse exchange (expert parallelism)
Every function is the identity when the group has one rank.

all_reduce_  the plain (non-autograd) in-place all-reduce of bookkeeping tensors (losses,
             counts, metrics, norms) wherever they live: run on the group's communication
             device (`device.comm_device`), so a CPU tensor works under NCCL too."""

from __future__ import annotations

import torch
import torch.distributed as dist

from . import device as _device


def all_reduce_(t: torch.Tensor, op=dist.ReduceOp.SUM, group=None) -> torch.Tensor:
    """All-reduce `t` in place over `group` (None = the default group) and return it; a no-op
    without an initialised process group. When `t` is not on the group's communication device
    (a CPU tensor under NCCL, which rejects it) the reduction runs on a copy there and the
    result is copied back into `t`; a tensor already there (every tensor under gloo) is reduced
    as it is, exactly as a direct `dist.all_reduce` would."""
    if not (dist.is_available() and dist.is_initialized()):
        return t
    dev = _device.comm_device(group)
    if t.device == dev and t.is_contiguous():
        dist.all_reduce(t, op=op, group=group)
        return t
    work = t.to(dev).contiguous()
    dist.all_reduce(work, op=op, group=group)
    return t.copy_(work)


def group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _all_reduce(x, group):
    x = x.contiguous()
    dist.all_reduce(x, group=group)
    return x


def _all_gather(x, group, dim):
    parts = [torch.empty_like(x) for _ in range(group_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def _split(x, group, dim):
    return x.chunk(group_size(group), dim=dim)[dist.get_rank(group)].contiguous()


def _reduce_scatter(x, group, dim):
    n = group_size(group)
    parts = [p.contiguous() for p in x.chunk(n, dim=dim)]
    out = torch.empty_like(parts[0])
    dist.reduce_scatter(out, parts, group=group)
    return out


def _conjugate(name: str, forward, backward, doc: str):
    """`f(x, group)`: the autograd function whose forward is `forward(x, group)` and whose
    gradient is `backward(g, group)`, and the identity when the group has one rank."""

    def fwd(ctx, x, group):
        ctx.group = group
        return forward(x, group)

    def bwd(ctx, g):
        return backward(g, ctx.group), None

    fn = type(name, (torch.autograd.Function,), {"forward": staticmethod(fwd), "backward": staticmethod(bwd)})

    def apply(x, group):
        return x if group_size(group) == 1 else fn.apply(x, group)

    apply.__name__, apply.__doc__ = name.lstrip("_"), doc
    return apply


def _identity(x, group):
    return x


def _summed(x, group):
    return _all_reduce(x.clone(), group)


def _on_dim(op, dim: int):
    return lambda x, group: op(x, group, dim)


copy_to = _conjugate("_copy_to", _identity, _summed, "fwd identity; bwd all-reduce (input of a column-parallel layer)")
reduce_from = _conjugate(
    "_reduce_from", _summed, _identity, "fwd all-reduce; bwd identity (output of a row-parallel layer)"
)
gather_last = _conjugate(
    "_gather_last",
    _on_dim(_all_gather, -1),
    _on_dim(_split, -1),
    "fwd all-gather of the last dim; bwd this rank's slice (a column-parallel output)",
)
scatter_seq = _conjugate(
    "_scatter_seq", _on_dim(_split, 1), _on_dim(_all_gather, 1), "fwd this rank's slice of the sequence; bwd all-gather"
)
gather_seq = _conjugate(
    "_gather_seq",
    _on_dim(_all_gather, 1),
    _on_dim(_reduce_scatter, 1),
    "fwd all-gather along the sequence; bwd reduce-scatter (the consumer is column-parallel)",
)
gather_seq_replicated = _conjugate(
    "_gather_seq_replicated",
    _on_dim(_all_gather, 1),
    _on_dim(_split, 1),
    "fwd all-gather along the sequence; bwd keep this rank's slice (the consumer computes the same thing "
    "on every TP rank, so every rank already holds the full gradient)",
)
reduce_scatter_seq = _conjugate(
    "_reduce_scatter_seq",
    _on_dim(_reduce_scatter, 1),
    _on_dim(_all_gather, 1),
    "fwd reduce-scatter along the sequence; bwd all-gather",
)


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group):
        ctx.group, ctx.out_splits, ctx.in_splits = group, out_splits, in_splits
        out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, g):
        out = g.new_empty((sum(ctx.in_splits),) + tuple(g.shape[1:]))
        dist.all_to_all_single(out, g.contiguous(), ctx.in_splits, ctx.out_splits, group=ctx.group)
        return out, None, None, None


def all_to_all(x, out_splits: list[int], in_splits: list[int], group):
    if group_size(group) == 1:
        return x
    return _AllToAll.apply(x, out_splits, in_splits, group)
