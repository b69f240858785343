"""Save and restore a whole pretraining job (model, optimizer, RNG, data position, counters)
through the pickle-free CheckpointManager, and start a job from a weights-only checkpoint."""

from __future__ import annotations

import torch.distributed as dist

from aion_train.config import config_to_dict

from .compat import check_compatible, latest_compatible
from .optimizer_state import load_optimizer_state, optimizer_state
from .protocol import save_checkpoint
from .rank_files import load_rank, save_rank
from .reshard import load_full_state_dict, shard_state_dict
from .rng_state import capture_rng_state, restore_rng_state
from .shard_layout import saver_rank
from .store import CheckpointManager

__all__ = ["layout_of", "load_job", "load_weights_only", "save_job"]


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def layout_of(cfg, groups) -> dict:
    return {"tp": groups.tp, "ep": groups.ep, "world": groups.world, "zero_stage": cfg.train.zero_stage}


def save_job(mgr: CheckpointManager, step: int, cfg, groups, engine, loader, trainer_state: dict) -> None:
    """Every rank calls it (collective barriers inside). Model weights are written once per
    distinct shard (by the ranks with edp_rank 0), optimizer and trainer state by every rank."""

    def write(folder):
        if groups.edp_rank == 0:
            save_rank(folder, groups.rank, "model", engine.module.state_dict())
        save_rank(folder, groups.rank, "optim", optimizer_state(engine))
        save_rank(
            folder,
            groups.rank,
            "trainer",
            {"rng": capture_rng_state(), "loader": loader.state_dict(), "state": trainer_state},
        )

    save_checkpoint(
        mgr,
        step,
        write,
        lambda: {"model_config": config_to_dict(cfg)["model"], "layout": layout_of(cfg, groups)},
        leader=groups.rank == 0,
        barrier=_barrier,
    )


def load_job(mgr: CheckpointManager, cfg, groups, engine, loader):
    """Restore the latest checkpoint; returns its trainer state, or None for a fresh run."""
    found = latest_compatible(
        mgr,
        config_to_dict(cfg)["model"],
        layout_of(cfg, groups),
        "parallel layout (reshard with export/import to change it)",
    )
    if found is None:
        return None
    path, _ = found
    engine.module.load_state_dict(load_rank(path, saver_rank(groups.tp, groups.tp_rank, groups.ep_rank), "model"))
    load_optimizer_state(engine, load_rank(path, groups.rank, "optim"), groups.dp_rank, groups.dp)
    saved = load_rank(path, groups.rank, "trainer")
    loader.load_state_dict(saved["loader"])
    restore_rng_state(saved["rng"])
    return dict(saved["state"], checkpoint=str(path))


def load_weights_only(mgr: CheckpointManager, cfg, model, groups):
    """A weights-only checkpoint (written by `import-hf`, any TP/EP layout) as the starting point:
    cut this rank's shard from the full weights into `model` (before the engine is built, so
    DeepSpeed's fp32 master copy starts from them). Returns its path, or None when the latest
    checkpoint is a full training checkpoint (or there is none)."""
    path = mgr.latest()
    if path is None or mgr.read_manifest(path).get("optimizer_state", True):
        return None
    saved_model, full = load_full_state_dict(path)
    check_compatible({"model": saved_model}, {"model": config_to_dict(cfg)["model"]})
    model.load_state_dict(shard_state_dict(full, model, groups))
    return path
