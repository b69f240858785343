"""Reassemble the unsharded model from any TP/EP checkpoint layout, and cut it for another.

A checkpoint folder holds one `model.rankNNNNN` payload per distinct shard, written by
the rank with edp_rank 0 for each (tp_rank, ep_rank): rank = ep_rank * tp + tp_rank (see
`.shard_layout.saver_rank`). How each of those tensors is a slice of the full one is the
model's `ParallelPlan` (`shard_spec_for`), the plan `parallelize` applies (a multi-rank test
checks every shard's shape against it).
Tensors keep their saved dtype (a bf16 run saves bf16 parameters)."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from aion_train.config import ModelConfig, config_from_dict, config_to_dict
from aion_train.parallel.parallelize import full_slice
from aion_train.parallel.plan import ParallelPlan

from .errors import CheckpointError
from .locate import find_checkpoint, read_manifest
from .protocol import save_checkpoint
from .rank_files import load_rank, save_rank
from .shard_layout import Spec, check_divisible, saver_rank, shard_spec_for
from .store import CheckpointManager


def model_config_from_dict(d: dict) -> ModelConfig:
    """The `model_config` field of a manifest -> `ModelConfig` (unknown keys are an error)."""
    return config_from_dict({"model": d}).model


def model_config_to_dict(cfg: ModelConfig) -> dict:
    from aion_train.config import Config

    return config_to_dict(Config(model=cfg))["model"]


def load_full_state_dict(checkpoint_dir) -> tuple[dict, dict[str, torch.Tensor]]:
    """(model_config dict, full unsharded state dict) from a checkpoint of any TP/EP layout.

    Tied embeddings come back as one tensor under both `embed.weight` and `lm_head.weight`."""
    folder = find_checkpoint(checkpoint_dir)
    manifest = read_manifest(folder)
    if "model_config" not in manifest or "layout" not in manifest:
        raise CheckpointError(f"{folder}: manifest has no model_config/layout (not a training checkpoint)")
    cfg_dict = manifest["model_config"]
    cfg = model_config_from_dict(cfg_dict)
    tp, ep = int(manifest["layout"]["tp"]), int(manifest["layout"]["ep"])
    shards = {}
    for ep_rank in range(ep):
        for tp_rank in range(tp):
            shards[(tp_rank, ep_rank)] = load_rank(folder, saver_rank(tp, tp_rank, ep_rank), "model")
    full: dict[str, torch.Tensor] = {}
    first = shards[(0, 0)]
    all_specs = {k: shard_spec_for(cfg, tp, ep, *k) for k in shards}
    for name in first:
        specs = {k: all_specs[k].get(name) for k in shards}
        if specs[(0, 0)] is None:
            full[name] = first[name]
            continue
        piece = first[name]
        shape = list(piece.shape)
        for dim, _, n in specs[(0, 0)]:
            shape[dim] *= n
        out = torch.empty(shape, dtype=piece.dtype)
        filled = torch.zeros(shape, dtype=torch.bool)
        for key, sd in shards.items():
            if name not in sd:
                raise CheckpointError(f"{folder}: rank {saver_rank(tp, *key)} has no {name!r}")
            view = full_slice(out, specs[key])
            if tuple(view.shape) != tuple(sd[name].shape):
                raise CheckpointError(
                    f"{folder}: {name!r} of rank {saver_rank(tp, *key)} has shape "
                    f"{tuple(sd[name].shape)}, expected {tuple(view.shape)} for a "
                    f"tp={tp}, ep={ep} layout of this model config"
                )
            view.copy_(sd[name])
            full_slice(filled, specs[key]).fill_(True)
        if not bool(filled.all()):
            raise CheckpointError(f"{folder}: the shards do not cover {name!r}")
        full[name] = out
    if cfg.tie_embeddings and "embed.weight" in full:
        full["lm_head.weight"] = full["embed.weight"]
    return cfg_dict, full


def shard_state_dict(
    full_sd: dict[str, torch.Tensor],
    model=None,
    groups=None,
    *,
    cfg: ModelConfig | None = None,
    spec: Spec | None = None,
) -> dict[str, torch.Tensor]:
    """The part of a full state dict that one rank holds: by `spec`, else by the plan of
    `cfg` (default `model.cfg`) on this rank of `groups` (`shard_spec_for`), else all of it.
    The result loads with `model.load_state_dict` (tied weights stay one tensor)."""
    if spec is None:
        if groups is None:
            spec = {}
        elif model is not None:  # named as the trunk sits in the model (lm., backbone.)
            spec = ParallelPlan.for_model(model, cfg or model.cfg, groups.tp, groups.ep).shard_spec(
                groups.tp_rank, groups.ep_rank
            )
        else:
            spec = shard_spec_for(cfg, groups.tp, groups.ep, groups.tp_rank, groups.ep_rank)
    out: dict[str, torch.Tensor] = {}
    done: dict[int, torch.Tensor] = {}
    for name, t in full_sd.items():
        if name in spec:
            key = id(t)  # tied weights: cut once, share the piece
            if key not in done:
                done[key] = full_slice(t, spec[name]).clone()
            out[name] = done[key]
        else:
            out[name] = t
    return out


def save_sharded_checkpoint(
    run_dir,
    model_cfg,
    full_sd: dict[str, torch.Tensor],
    tp: int = 1,
    ep: int = 1,
    *,
    step: int = 0,
    world: int | None = None,
    zero_stage: int = 1,
    extra_manifest: dict | None = None,
    allow_existing: bool = False,
) -> Path:
    """Write `full_sd` as a committed checkpoint `run_dir/checkpoints/step_XXXXXXXX` in the
    (tp, ep) layout: the model payloads of ranks ep_rank * tp + tp_rank and a manifest with
    model_config and layout. No optimizer or trainer payloads (see the manifest field
    `optimizer_state: false`). `world` defaults to tp * ep (data-parallel size = ep)."""
    cfg = model_config_from_dict(model_cfg) if isinstance(model_cfg, dict) else model_cfg
    cfg_dict = model_config_to_dict(cfg)
    check_divisible(cfg, tp, ep)
    world = tp * ep if world is None else world
    if world % tp or (world // tp) % ep:
        raise ValueError(f"world={world} is not tp x dp with ep dividing dp (tp={tp}, ep={ep})")
    root = Path(run_dir) / "checkpoints"
    mgr = CheckpointManager(root, keep_last=None)
    if not allow_existing and mgr.list_checkpoints():
        raise CheckpointError(f"{root} already holds checkpoints; choose an empty run folder")

    def write(folder):  # one process writes the model payload of every saver rank
        for ep_rank in range(ep):
            for tp_rank in range(tp):
                spec = shard_spec_for(cfg, tp, ep, tp_rank, ep_rank)
                save_rank(folder, saver_rank(tp, tp_rank, ep_rank), "model", shard_state_dict(full_sd, spec=spec))

    manifest = {
        "model_config": cfg_dict,
        "layout": {"tp": tp, "ep": ep, "world": world, "zero_stage": zero_stage},
        "optimizer_state": False,
    }
    manifest.update(extra_manifest or {})
    return save_checkpoint(mgr, step, write, manifest)


def numel(sd: dict[str, torch.Tensor]) -> int:
    seen, n = set(), 0
    for t in sd.values():
        if id(t) not in seen:
            seen.add(id(t))
            n += math.prod(t.shape)
    return n
