"""Everything that reaches into DeepSpeed's internals, in one place.

DeepSpeed is the data-parallel engine (ZeRO 0-3) over our own TP/EP groups. Where its public
API does not reach, this module does, and nowhere else: the environment its comm start-up
needs in a one-process run, the switch that skips its shared-memory op, its expert-group
registry (filled with our EP / EDP groups), the class check that turns its MoE handling on,
its ZeRO 1/2 optimizer class (loading a saved optimizer state) and the bucket-reduce methods
the ZeRO memory benchmark watches. `INTERNALS` names each; `missing_internals()` says which a
DeepSpeed upgrade removed (tests/test_engine.py fails loudly on any)."""

from __future__ import annotations

import contextlib
import importlib
import os
from datetime import timedelta

from .groups import ParallelGroups, layout

# (module, attribute) of every DeepSpeed internal used here
INTERNALS = (
    ("deepspeed.comm.torch", "build_shm_op"),
    ("deepspeed.utils.groups", "_EXPERT_PARALLEL_GROUP"),
    ("deepspeed.utils.groups", "_EXPERT_DATA_PARALLEL_GROUP"),
    ("deepspeed.utils.groups", "_EXPERT_PARALLEL_GROUP_RANKS"),
    ("deepspeed.utils.groups", "_EXPERT_DATA_PARALLEL_GROUP_RANKS"),
    ("deepspeed.runtime.engine", "MoE"),
    ("deepspeed.moe.layer", "MoE"),
    ("deepspeed.moe.utils", "split_params_into_different_moe_groups_for_optimizer"),
    ("deepspeed.runtime.zero.stage_1_and_2", "DeepSpeedZeroOptimizer"),
    ("deepspeed.runtime.zero.stage_1_and_2.DeepSpeedZeroOptimizer", "reduce_ipg_grads"),
    (
        "deepspeed.runtime.zero.stage3.DeepSpeedZeroOptimizer_Stage3",
        "_DeepSpeedZeroOptimizer_Stage3__reduce_and_partition_ipg_grads",
    ),
)

# the methods that reduce a full gradient bucket: ZeRO 1/2, ZeRO-3 (name-mangled)
ZERO_REDUCE_METHODS = ("reduce_ipg_grads", "_DeepSpeedZeroOptimizer_Stage3__reduce_and_partition_ipg_grads")


def _resolve(dotted: str, attr: str):
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):  # the longest importable prefix, then attributes
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for name in parts[i:] + [attr]:
            obj = getattr(obj, name)
        return obj
    raise ImportError(dotted)


def missing_internals() -> list[str]:
    """The entries of INTERNALS this DeepSpeed lacks ("module:attribute (why)")."""
    missing = []
    for dotted, attr in INTERNALS:
        try:
            _resolve(dotted, attr)
        except (ImportError, AttributeError) as e:
            missing.append(f"{dotted}:{attr} ({type(e).__name__}: {e})")
    return missing


def init_comm(backend: str, timeout_s: float = 120.0, shm_op: bool = False):
    """Start deepspeed.comm on the resolved `backend` (on top of an existing torch.distributed
    group, or a new one; a no-op when already started) and return the deepspeed module.

    A one-process run gets the launcher variables DeepSpeed reads (rank 0 of 1 on loopback).
    On CPU DeepSpeed JIT-compiles a shared-memory all-reduce op with gcc at every start
    (minutes and over a GB; the results are the same without it, docs/notes.md): skipped
    unless `shm_op` (config `runtime.deepspeed_shm_op`)."""
    from aion_train.process_env import set_env

    one_process = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}
    if "MASTER_PORT" not in os.environ:
        from .spawn import free_port

        one_process["MASTER_PORT"] = str(free_port())
    set_env(defaults=one_process)
    import deepspeed

    if not shm_op:
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(seconds=timeout_s), dist_init_required=None)
    return deepspeed


def register_expert_groups(groups: ParallelGroups) -> None:
    """Put our EP / EDP groups into DeepSpeed's registry under the name our params carry."""
    from deepspeed.utils import groups as ds_groups

    name = expert_group_name(groups.ep)
    lay = layout(groups.world, groups.tp, groups.ep)
    ds_groups._EXPERT_PARALLEL_GROUP[name] = groups.ep_group
    ds_groups._EXPERT_DATA_PARALLEL_GROUP[name] = groups.edp_group
    ds_groups._EXPERT_PARALLEL_GROUP_RANKS[name] = next(r for r in lay["ep"] if groups.rank in r)
    ds_groups._EXPERT_DATA_PARALLEL_GROUP_RANKS[name] = next(r for r in lay["edp"] if groups.rank in r)


class _MoEShimMeta(type):
    def __instancecheck__(cls, obj):
        return isinstance(obj, cls.classes)


@contextlib.contextmanager
def deepspeed_sees_our_moe(model):
    """DeepSpeed turns its MoE handling on only for its own `MoE` class; for the length of
    `initialize`, make its engine recognise our MoE layers too (the model stays DeepSpeed-free)."""
    import deepspeed.runtime.engine as ds_engine
    from deepspeed.moe.layer import MoE as DSMoE

    from aion_train.model.moe import MoELayer

    for m in model.modules():
        if isinstance(m, MoELayer):
            m.num_experts = m.n_experts
    original = ds_engine.MoE
    ds_engine.MoE = _MoEShimMeta("MoE", (), {"classes": (DSMoE, MoELayer)})
    try:
        yield
    finally:
        ds_engine.MoE = original


def expert_group_name(ep: int) -> str:
    """The name DeepSpeed's MoE gives the expert group of EP size `ep` (its registry key)."""
    return f"ep_size_{ep}"


def tag_parameters(model, plan) -> None:
    """DeepSpeed's parameter tags, from the plan: expert weights are reduced over the
    expert-data-parallel group named `group_name`, not the whole DP group (`allreduce=False`,
    as its MoE layer marks them); TP-sharded weights carry Megatron's `tensor_model_parallel`,
    so its gradient norm counts them on every TP rank."""
    for name, p in model.named_parameters():
        if plan.is_expert(name):
            p.allreduce = False
            p.group_name = expert_group_name(plan.ep)
        if plan.tp_sharded(name):
            p.tensor_model_parallel = True
            p.model_parallel = True


def split_moe_param_groups(param_groups: list) -> list:
    """Expert parameters in groups of their own (reduced over EDP), as DeepSpeed's ZeRO wants."""
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    return split_params_into_different_moe_groups_for_optimizer(param_groups)


def load_optimizer_state(optimizer, state: dict, dp_rank: int, dp_size: int) -> None:
    """Load a full (gathered) optimizer state: ZeRO 1/2 takes it as this DP rank's entry of a
    per-rank list and re-partitions it from the fp32 weights; any other optimizer as it is."""
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    if isinstance(optimizer, DeepSpeedZeroOptimizer):
        states = [None] * dp_size
        states[dp_rank] = state
        optimizer.load_state_dict(states, load_optimizer_states=True, load_from_fp32_weights=True)
    else:
        optimizer.load_state_dict(state)
