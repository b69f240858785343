"""Apply tensor and expert parallelism to a full model (torchtitan's `parallelize` idea):
the model is built unsharded with the same seed on every rank, then this one function
applies its `ParallelPlan` (plan.py): swaps the layers the plan names for sharded ones and
tags the parameters."""

from __future__ import annotations

import torch.distributed as dist
from torch import nn

from aion_train.model.moe import MoELayer

from .collectives import gather_seq_replicated, scatter_seq
from .cross_entropy import VocabParallelCrossEntropy
from .expert_parallel import AllToAllDispatcher, TensorParallelExperts
from .groups import ParallelGroups
from .layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from .plan import ALL_TO_ALL_DISPATCH, COLUMN, EXPERTS, LM_HEAD, ROW, TIED_LM_HEAD, VOCAB_EMBEDDING, ParallelPlan


def _sequence_parallel_moe(moe: MoELayer, tp) -> None:
    """Under sequence parallelism the residual stream is split along the sequence; an MoE layer
    routes the whole sequence (identically on every TP rank, experts split by width), so its
    input is gathered and its output split back: torchtitan-style module hooks."""
    moe.register_forward_pre_hook(lambda mod, args: (gather_seq_replicated(args[0], tp),) + tuple(args[1:]))
    moe.register_forward_hook(lambda mod, args, out: (scatter_seq(out[0], tp),) + tuple(out[1:]))


def _sum_grad_over_tp(p, tp) -> None:
    """A parameter applied to this rank's sequence slice only (norm weights under SP) gets a
    partial gradient: sum it over the TP group as soon as it is computed."""

    def hook(grad):
        grad = grad.clone()
        dist.all_reduce(grad, group=tp)
        return grad

    p.register_hook(hook)
    p.sequence_parallel = True


def _replace(model: nn.Module, path: str, style: str, groups: ParallelGroups, sp: bool) -> None:
    """Swap the module at `path` for the parallel module the plan names."""
    tp = groups.tp_group if groups.tp > 1 else None
    ep = groups.ep_group if groups.ep > 1 else None
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    old = getattr(parent, name)
    if style == COLUMN:
        new = ColumnParallelLinear.from_dense(old, tp, sequence_parallel=sp)
    elif style == ROW:
        new = RowParallelLinear.from_dense(old, tp, sequence_parallel=sp)
    elif style == VOCAB_EMBEDDING:
        new = VocabParallelEmbedding.from_dense(old, tp, sequence_parallel=sp)
    elif style in (LM_HEAD, TIED_LM_HEAD):
        new = ColumnParallelLinear.from_dense(old, tp, sequence_parallel=sp)
        if style == TIED_LM_HEAD:  # the embedding is replaced first (the plan's order)
            new.weight = model.embed.weight
        model.use_sharded_vocab_loss(VocabParallelCrossEntropy(tp, model.embed.vocab_start))
    elif style == EXPERTS:
        new = TensorParallelExperts(old, ep, tp)
    elif style == ALL_TO_ALL_DISPATCH:  # the MoE layer stays; its dispatcher exchanges tokens
        old.dispatcher = AllToAllDispatcher(old.n_experts, old.dispatcher.capacity_factor, ep, old.dispatcher.kernels)
        return
    else:
        raise ValueError(f"parallel plan: unknown module style {style!r} for {path}")
    setattr(parent, name, new)


def parallelize(model, groups: ParallelGroups, sequence_parallel: bool = False):
    """Shard `model` in place for `groups` (TP inside, EP over the data-parallel ranks) by
    its `ParallelPlan` (`ParallelPlan.from_config` gives the same plan from the config: what
    each rank holds, `plan.shard_spec(tp_rank, ep_rank)`)."""
    plan = ParallelPlan.from_model(model, groups.tp, groups.ep, sequence_parallel)
    for path, style in plan.modules.items():
        _replace(model, path, style, groups, plan.sequence_parallel)
    if plan.sequence_parallel:
        for moe in (m for m in model.modules() if isinstance(m, MoELayer)):
            _sequence_parallel_moe(moe, groups.tp_group)
    named = dict(model.named_parameters())
    for name, p in plan.params.items():
        if p.grad_sum_over_tp and name in named:
            _sum_grad_over_tp(named[name], groups.tp_group)
    return model


def full_slice(full_tensor, spec):
    """The part of a full tensor that a rank holds, given its shard spec."""
    out = full_tensor
    for dim, rank, n in spec:
        out = out.chunk(n, dim=dim)[rank]
    return out


def parallelize_multimodal(model, groups, sequence_parallel: bool = False):
    """Shard a MultimodalModel's trunk (`model.lm`) as `parallelize` does; the rest stays
    replicated (its plan: `ParallelPlan.from_config(model.cfg, ...)`, names under "lm.")."""
    if sequence_parallel:
        raise ValueError("parallel.sequence_parallel is not supported with model.multimodal.enabled")
    parallelize(model.lm, groups, False)
    return model
