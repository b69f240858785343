"""DeepSpeed as the data-parallel engine, handed our TP/DP/EP groups.

Megatron-DeepSpeed style: an `mpu` object tells DeepSpeed the model-parallel (TP) and
data-parallel groups; our expert parameters carry DeepSpeed's MoE tags (`allreduce=False`,
`group_name`) and DeepSpeed's expert group registry is filled with *our* EP / EDP groups, so
expert gradients are reduced over the expert-data-parallel group only."""

from __future__ import annotations

import contextlib

from aion_train.config import Config
from aion_train.parallel.deepspeed_adapter import (
    deepspeed_sees_our_moe,
    init_comm,
    register_expert_groups,
    split_moe_param_groups,
    tag_parameters,
)
from aion_train.parallel.device import resolve_backend
from aion_train.parallel.groups import ParallelGroups
from aion_train.parallel.plan import ParallelPlan

from .optim import param_groups


class MPU:
    """The model-parallel-unit interface DeepSpeed expects (Megatron's names)."""

    def __init__(self, groups: ParallelGroups):
        self.g = groups

    def get_model_parallel_rank(self):
        return self.g.tp_rank

    def get_model_parallel_world_size(self):
        return self.g.tp

    def get_model_parallel_group(self):
        return self.g.tp_group

    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group

    def get_data_parallel_rank(self):
        return self.g.dp_rank

    def get_data_parallel_world_size(self):
        return self.g.dp

    def get_data_parallel_group(self):
        return self.g.dp_group


def deepspeed_config(cfg: Config, dp: int) -> dict:
    t = cfg.train
    return {
        "train_micro_batch_size_per_gpu": cfg.data.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": cfg.data.micro_batch_size * t.grad_accum * dp,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {"stage": t.zero_stage, "overlap_comm": False},
        "bf16": {"enabled": t.precision == "bf16"},
        "fp16": {"enabled": t.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def build_engine(model, cfg: Config, groups: ParallelGroups):
    """deepspeed.initialize with a torch AdamW (decoupled decay; fused where torch has it)."""
    import torch

    ds = init_comm(
        resolve_backend(cfg.parallel.backend), cfg.parallel.timeout_s, shm_op=cfg.runtime.deepspeed_shm_op
    )  # a no-op when already started
    register_expert_groups(groups)
    plan = ParallelPlan.for_model(model, cfg.model, groups.tp, groups.ep, cfg.parallel.sequence_parallel)
    tag_parameters(model, plan)
    t = cfg.train
    pg = split_moe_param_groups(param_groups(model, t.weight_decay, plan))
    optimizer = torch.optim.AdamW(
        pg, lr=t.lr, betas=tuple(t.betas), eps=t.eps, weight_decay=t.weight_decay, fused=True
    )  # one kernel per dtype group, on CPU and CUDA alike
    # ZeRO asserts an MoE param group whenever it sees MoE layers; with frozen experts
    # (LoRA on attention/dense FFNs only) there is none, so DeepSpeed must not see them.
    experts_train = any(p.requires_grad and plan.is_expert(n) for n, p in model.named_parameters())
    if t.zero_stage == 3:  # ZeRO-3 gathers a partitioned weight only around its module's own forward
        for m in model.modules():
            if hasattr(m, "use_fused_head_loss"):
                m.use_fused_head_loss(False)
    with deepspeed_sees_our_moe(model) if experts_train else contextlib.nullcontext():
        engine, optimizer, _, _ = ds.initialize(
            model=model,
            optimizer=optimizer,
            mpu=MPU(groups) if groups.world > 1 else None,
            config=deepspeed_config(cfg, groups.dp),
        )
    return engine, optimizer
