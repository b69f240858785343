"""PPO's own crash-safe checkpoints under {run_dir}/ppo/checkpoints (the pickle-free
CheckpointManager of aion_train/checkpoint/), so that a killed PPO run resumes at its
last saved iteration and never needs SFT or the reward model to run again.

Per rank: the actor's trainable tensors (its LoRA adapters, or every weight without LoRA),
the critic's weights (when there is a critic: ppo.advantage=gae), the DeepSpeed optimizer
states, RNG; rank 0 commits the manifest with
the model config, the layout and the loop state (iteration, history, MLflow run id)."""

from __future__ import annotations

import json

from aion_train.checkpoint import (
    CheckpointManager,
    capture_rng_state,
    latest_compatible,
    load_optimizer_state,
    load_rank,
    optimizer_state,
    restore_rng_state,
    save_checkpoint,
    save_rank,
)
from aion_train.config import config_to_dict

from .common import barrier, phase_dir, rank


def ppo_checkpoints(cfg) -> CheckpointManager:
    return CheckpointManager(phase_dir(cfg, "ppo") / "checkpoints", keep_last=cfg.ppo.keep_last)


def trainable_state(module) -> dict:
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


def _layout(cfg, groups) -> dict:
    return {
        "tp": groups.tp,
        "ep": groups.ep,
        "world": groups.world,
        "zero_stage": cfg.train.zero_stage,
        "lora": bool(cfg.lora.enabled),
        "critic_init": cfg.ppo.critic_init,
        "advantage": cfg.ppo.advantage,
    }


def save_ppo(mgr: CheckpointManager, iteration: int, cfg, groups, actor_engine, critic_engine, loop_state: dict):
    """Every rank calls it (collective barriers inside)."""

    def write(folder):
        save_rank(folder, groups.rank, "actor", trainable_state(actor_engine.module))
        optim = {"actor": optimizer_state(actor_engine)}
        if critic_engine is not None:
            save_rank(folder, groups.rank, "critic", critic_engine.module.state_dict())
            optim["critic"] = optimizer_state(critic_engine)
        save_rank(folder, groups.rank, "optim", optim)
        save_rank(folder, groups.rank, "rng", capture_rng_state())

    save_checkpoint(
        mgr,
        iteration,
        write,
        lambda: {
            "model_config": config_to_dict(cfg)["model"],
            "layout": _layout(cfg, groups),
            "loop_state": json.dumps(loop_state),
        },
        leader=rank() == 0,
        barrier=barrier,
    )


def load_ppo(mgr: CheckpointManager, cfg, groups, actor_engine, critic_engine) -> dict | None:
    """Restore the latest checkpoint into the engines; returns its loop state (None: fresh run)."""
    found = latest_compatible(
        mgr,
        config_to_dict(cfg)["model"],
        _layout(cfg, groups),
        "PPO layout (ranks, TP/EP, ZeRO stage, LoRA, critic init, advantage)",
    )
    if found is None:
        return None
    path, manifest = found
    actor_sd = load_rank(path, groups.rank, "actor")
    expected = set(trainable_state(actor_engine.module))
    if set(actor_sd) != expected:
        raise ValueError(
            f"{path}: the saved actor tensors do not match this actor's trainable parameters "
            f"(missing {sorted(expected - set(actor_sd))[:3]}, extra {sorted(set(actor_sd) - expected)[:3]})"
        )
    actor_engine.module.load_state_dict(actor_sd, strict=False)
    optim = load_rank(path, groups.rank, "optim")
    load_optimizer_state(actor_engine, optim["actor"], groups.dp_rank, groups.dp)
    if critic_engine is not None:
        critic_engine.module.load_state_dict(load_rank(path, groups.rank, "critic"))
        load_optimizer_state(critic_engine, optim["critic"], groups.dp_rank, groups.dp)
    restore_rng_state(load_rank(path, groups.rank, "rng"))
    return dict(json.loads(manifest["loop_state"]), checkpoint=str(path))
