"""Save and restore a whole training job (model, optimizer, RNG, data position, counters)
through the pickle-free CheckpointManager."""
from __future__ import annotations

import torch.distributed as dist

from aion_train.config import config_to_dict

from .checkpoint import (CheckpointError, CheckpointManager, capture_rng_state, check_compatible, load_rank,
                         restore_rng_state, save_rank)
from .engine_state import load_optimizer_state, optimizer_state


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def model_saver_rank(groups) -> int:
    """Model weights are written once per distinct shard: by the rank with edp_rank 0 that
    holds the same TP and EP shard (dp_rank = ep_rank)."""
    return groups.ep_rank * groups.tp + groups.tp_rank


def layout_of(cfg, groups) -> dict:
    return {"tp": groups.tp, "ep": groups.ep, "world": groups.world, "zero_stage": cfg.train.zero_stage}


def save_job(mgr: CheckpointManager, step: int, cfg, groups, engine, loader, trainer_state: dict) -> None:
    if groups.rank == 0:
        mgr.prepare(step)
    _barrier()
    folder = mgr.begin(step)
    if groups.edp_rank == 0:
        save_rank(folder, groups.rank, "model", engine.module.state_dict())
    save_rank(folder, groups.rank, "optim", optimizer_state(engine))
    save_rank(folder, groups.rank, "trainer", {"rng": capture_rng_state(), "loader": loader.state_dict(),
                                                "state": trainer_state})
    _barrier()
    if groups.rank == 0:
        mgr.commit(step, {"model_config": config_to_dict(cfg)["model"], "layout": layout_of(cfg, groups)})
    _barrier()


def load_job(mgr: CheckpointManager, cfg, groups, engine, loader):
    """Restore the latest checkpoint; returns its trainer state, or None for a fresh run."""
    path = mgr.latest()
    if path is None:
        return None
    manifest = mgr.read_manifest(path)
    check_compatible({"model": manifest["model_config"]}, {"model": config_to_dict(cfg)["model"]})
    check_compatible({"layout": manifest["layout"]}, {"layout": layout_of(cfg, groups)},
                     what="parallel layout (reshard with export/import to change it)")
    engine.module.load_state_dict(load_rank(path, model_saver_rank(groups), "model"))
    load_optimizer_state(engine, load_rank(path, groups.rank, "optim"), groups.dp_rank, groups.dp)
    saved = load_rank(path, groups.rank, "trainer")
    loader.load_state_dict(saved["loader"])
    restore_rng_state(saved["rng"])
    return dict(saved["state"], checkpoint=str(path))


__all__ = ["CheckpointError", "CheckpointManager", "load_job", "save_job"]


def load_weights_only(mgr: CheckpointManager, cfg, model, groups):
    """A weights-only checkpoint (written by `import-hf`, any TP/EP layout) as the starting point:
    cut this rank's shard from the full weights into `model` (before the engine is built, so
    DeepSpeed's fp32 master copy starts from them). Returns its path, or None when the latest
    checkpoint is a full training checkpoint (or there is none)."""
    path = mgr.latest()
    if path is None or mgr.read_manifest(path).get("optimizer_state", True):
        return None
    from aion_train.interop.reshard import load_full_state_dict, shard_state_dict
    saved_model, full = load_full_state_dict(path)
    check_compatible({"model": saved_model}, {"model": config_to_dict(cfg)["model"]})
    model.load_state_dict(shard_state_dict(full, model, groups))
    return path
