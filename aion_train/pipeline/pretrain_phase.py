"""The pipeline's `pretrain` phase: the base model the post-training phases start from, trained
by the same trainer as `aion-train pretrain` (demo data built when the config names none) in
{run_dir}/pretrain, which holds its checkpoints, config.yaml and done.json (the metrics and
`checkpoint`, the path `sft` reads when `sft.init_from` is empty). A rerun after a crash
resumes from the folder's last checkpoint (the trainer's exact resume)."""

from __future__ import annotations

import copy
import os
from pathlib import Path


def pretrain_config(cfg):
    c = copy.deepcopy(cfg)
    c.run_dir = str(Path(cfg.run_dir) / "pretrain")
    c.tracking.run_name = f"{cfg.tracking.run_name or Path(cfg.run_dir).name}-pretrain"
    return c


def run_tokenizer(cfg) -> str:
    """The tokenizer file the pretrain phase trains with (the multimodal demo's, or the text run's)."""
    if cfg.model.multimodal.enabled:
        from aion_train.eval.loading import multimodal_data

        return multimodal_data(cfg)[1].path
    from aion_train.data.tokenizer import run_tokenizer_path

    return run_tokenizer_path(cfg)


def run_pretrain(cfg) -> dict:
    """SPMD like every phase function: one call per rank; rank 0 writes done.json last."""
    from aion_train.commands.output_dirs import claim_training_dirs
    from aion_train.posttrain.common import rank, tokenizer_sha256, write_done
    from aion_train.train.trainer import pretrain

    pcfg = pretrain_config(cfg)
    if rank() == 0:
        claim_training_dirs(pcfg, "pretrain", overwrite=False)
    summary = pretrain(pcfg)
    metrics = {k: v for k, v in summary.items() if k not in ("losses", "final_val")}
    metrics.update({k.replace("/", "_"): v for k, v in (summary.get("final_val") or {}).items()})
    if not metrics.get("checkpoint"):
        raise RuntimeError(f"pretrain wrote no checkpoint under {pcfg.run_dir}/checkpoints")
    tokenizer = run_tokenizer(cfg)
    if os.path.isfile(tokenizer):  # what the post-training phases check their tokenizer against
        metrics["tokenizer_sha256"] = tokenizer_sha256(tokenizer)
    write_done(cfg, "pretrain", metrics)
    return metrics
