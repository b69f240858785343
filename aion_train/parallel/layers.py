"""Megatron-style tensor-parallel layers on plain torch.distributed.

Each is built from the full (unsharded) layer with `from_dense`, so a model built once on
every rank with the same seed is sharded exactly like the single-process reference."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .collectives import copy_to, gather_last, gather_seq, group_size, reduce_from, reduce_scatter_seq


def _rank(group) -> int:
    return 0 if group_size(group) == 1 else dist.get_rank(group)


def shard(t: torch.Tensor, dim: int, group) -> torch.Tensor:
    n = group_size(group)
    if t.shape[dim] % n:
        raise ValueError(f"dimension {dim} of size {t.shape[dim]} is not divisible by {n} ranks")
    return t.chunk(n, dim=dim)[_rank(group)].clone()


class ColumnParallelLinear(nn.Module):
    """y = x W^T with W's output rows split over the TP group (optionally gathered)."""

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        group,
        gather_output: bool = False,
        sequence_parallel: bool = False,
    ):
        super().__init__()
        self.group, self.gather_output, self.sequence_parallel = group, gather_output, sequence_parallel
        self.weight = nn.Parameter(shard(weight.detach(), 0, group))
        self.bias = nn.Parameter(shard(bias.detach(), 0, group)) if bias is not None else None

    @classmethod
    def from_dense(cls, linear: nn.Linear, group, **kw):
        return cls(linear.weight, linear.bias, group, **kw)

    def forward(self, x):
        x = gather_seq(x, self.group) if self.sequence_parallel else copy_to(x, self.group)
        y = F.linear(x, self.weight, self.bias)
        return gather_last(y, self.group) if self.gather_output else y


class RowParallelLinear(nn.Module):
    """y = sum over ranks of x_r W_r^T, W's input columns split over the TP group."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, group, sequence_parallel: bool = False):
        super().__init__()
        self.group, self.sequence_parallel = group, sequence_parallel
        self.weight = nn.Parameter(shard(weight.detach(), 1, group))
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None

    @classmethod
    def from_dense(cls, linear: nn.Linear, group, **kw):
        return cls(linear.weight, linear.bias, group, **kw)

    def forward(self, x):
        y = F.linear(x, self.weight)
        y = reduce_scatter_seq(y, self.group) if self.sequence_parallel else reduce_from(y, self.group)
        return y + self.bias if self.bias is not None else y


class VocabParallelEmbedding(nn.Module):
    """Each rank holds a contiguous block of the vocabulary; ids outside it give zeros and
    the partial embeddings are summed over the TP group."""

    def __init__(self, weight: torch.Tensor, group, sequence_parallel: bool = False):
        super().__init__()
        self.group, self.sequence_parallel = group, sequence_parallel
        vocab = weight.shape[0]
        per = vocab // group_size(group)
        self.vocab_start, self.vocab_end = _rank(group) * per, (_rank(group) + 1) * per
        self.weight = nn.Parameter(shard(weight.detach(), 0, group))

    @classmethod
    def from_dense(cls, emb: nn.Embedding, group, **kw):
        return cls(emb.weight, group, **kw)

    def forward(self, ids):
        outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
        local = (ids - self.vocab_start).masked_fill(outside, 0)
        out = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_scatter_seq(out, self.group) if self.sequence_parallel else reduce_from(out, self.group)
