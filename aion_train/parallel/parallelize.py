"""Apply tensor and expert parallelism to a full model (torchtitan's `parallelize` idea):
the model is built unsharded with the same seed on every rank, then this one function
swaps its layers for sharded ones and records how each parameter was split."""
from __future__ import annotations

import torch.distributed as dist
from torch import nn

from aion_train.model.ffn import DenseFFN
from aion_train.model.moe import MoELayer

from .collectives import gather_seq_replicated, group_size, scatter_seq
from .cross_entropy import VocabParallelCrossEntropy
from .expert_parallel import AllToAllDispatcher, TensorParallelExperts
from .groups import ParallelGroups
from .layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding


def _tp_dense_ffn(ffn: DenseFFN, tp, sp: bool) -> None:
    for name in ("w_gate", "w_up"):
        if getattr(ffn, name) is not None:
            setattr(ffn, name, ColumnParallelLinear.from_dense(getattr(ffn, name), tp, sequence_parallel=sp))
    ffn.w_down = RowParallelLinear.from_dense(ffn.w_down, tp, sequence_parallel=sp)


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


def mark_expert_params(module: nn.Module, ep: int) -> None:
    """Tag expert weights the way DeepSpeed's MoE does: not reduced over the whole DP group
    but over the expert-data-parallel group named `group_name`."""
    for p in module.parameters():
        p.allreduce = False
        p.group_name = f"ep_size_{ep}"


def parallelize(model, groups: ParallelGroups, sequence_parallel: bool = False):
    """Shard `model` in place for `groups` (TP inside, EP over the data-parallel ranks).

    Sets `model.shard_spec`: {parameter name: [(dim, rank, n_parts), ...]} for every
    parameter that is a slice of the full model's parameter of the same name."""
    tp = groups.tp_group if groups.tp > 1 else None
    ep = groups.ep_group if groups.ep > 1 else None
    sp = sequence_parallel and tp is not None
    spec: dict[str, list[tuple[int, int, int]]] = {}
    t = (groups.tp_rank, groups.tp)

    def col(prefix):
        spec[prefix + ".weight"] = [(0, *t)]

    def row(prefix):
        spec[prefix + ".weight"] = [(1, *t)]

    for i, block in enumerate(model.blocks):
        pre = f"blocks.{i}"
        if tp is not None:
            a = block.attn
            for name in ("q_proj", "k_proj", "v_proj"):
                setattr(a, name, ColumnParallelLinear.from_dense(getattr(a, name), tp, sequence_parallel=sp))
                col(f"{pre}.attn.{name}")
            a.o_proj = RowParallelLinear.from_dense(a.o_proj, tp, sequence_parallel=sp)
            row(f"{pre}.attn.o_proj")
        ffns = []
        if isinstance(block.ffn, MoELayer):
            moe = block.ffn
            if tp is not None or ep is not None:
                moe.experts = TensorParallelExperts(moe.experts, ep, tp)
                e = (groups.ep_rank, groups.ep)
                spec[f"{pre}.ffn.experts.w1"] = [(0, *e), (2, *t)]
                spec[f"{pre}.ffn.experts.w2"] = [(0, *e), (1, *t)]
                if moe.experts.w3 is not None:
                    spec[f"{pre}.ffn.experts.w3"] = [(0, *e), (2, *t)]
            if ep is not None:
                moe.dispatcher = AllToAllDispatcher(moe.n_experts, moe.dispatcher.capacity_factor, ep,
                                                    moe.dispatcher.kernels)
            mark_expert_params(moe.experts, groups.ep)
            if sp:
                _sequence_parallel_moe(moe, tp)
            if moe.shared_expert is not None:
                ffns.append((moe.shared_expert, f"{pre}.ffn.shared_expert"))
        else:
            ffns.append((block.ffn, f"{pre}.ffn"))
        if tp is not None:
            for ffn, fpre in ffns:
                _tp_dense_ffn(ffn, tp, sp)
                for name in ("w_gate", "w_up"):
                    if getattr(ffn, name) is not None:
                        col(f"{fpre}.{name}")
                row(f"{fpre}.w_down")

    if tp is not None:
        tied = model.lm_head.weight is model.embed.weight
        model.embed = VocabParallelEmbedding.from_dense(model.embed, tp, sequence_parallel=sp)
        spec["embed.weight"] = [(0, *t)]
        head = ColumnParallelLinear.from_dense(model.lm_head, tp, sequence_parallel=sp)
        if tied:
            head.weight = model.embed.weight
        model.lm_head = head
        spec["lm_head.weight"] = [(0, *t)]
        model.loss_fn = VocabParallelCrossEntropy(tp, model.embed.vocab_start)
        model.head_loss = None      # the fused head + loss knows no vocab shards
    if sp:
        for name, p in model.named_parameters():
            if "norm" in name:
                _sum_grad_over_tp(p, tp)
    named = dict(model.named_parameters())
    for name in spec:
        if name in named and groups.tp > 1:
            # with tp > 1 every entry of `spec` is TP-sharded (experts too: their hidden width).
            # Megatron's tag: DeepSpeed then counts the param on every TP rank in the grad norm
            named[name].tensor_model_parallel = True
            named[name].model_parallel = True
    model.shard_spec = spec
    model.parallel_groups = groups
    return model


def full_slice(full_tensor, spec):
    """The part of a full tensor that a rank holds, given its shard spec."""
    out = full_tensor
    for dim, rank, n in spec:
        out = out.chunk(n, dim=dim)[rank]
    return out


def is_expert_param(p) -> bool:
    return getattr(p, "allreduce", True) is False


def tp_size(model) -> int:
    g = getattr(model, "parallel_groups", None)
    return 1 if g is None else group_size(g.tp_group)


def parallelize_multimodal(model, groups, sequence_parallel: bool = False):
    """Shard a MultimodalModel's trunk (`model.lm`) as `parallelize` does; the rest stays replicated.
    Sets `model.shard_spec` (names prefixed "lm.") and `model.parallel_groups`."""
    if sequence_parallel:
        raise ValueError("parallel.sequence_parallel is not supported with model.multimodal.enabled")
    parallelize(model.lm, groups, False)
    model.shard_spec = {f"lm.{k}": v for k, v in model.lm.shard_spec.items()}
    model.parallel_groups = groups
    return model
