"""aion-train pretrain [--config F] [overrides] [--nproc N]

With no arguments: the embedded default configs/tiny_cpu.yaml (demo data and tokenizer are
built if absent). Under torchrun / deepspeed / srun (WORLD_SIZE set) it runs as one rank;
with --nproc N it starts N local ranks through torchrun."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from aion_train.config import ConfigError, load_config

from .local_ranks import add_training_arguments, launch_local_ranks, wants_local_ranks
from .output_dirs import claim_training_dirs, report_refusal

DEFAULT_CONFIG = "configs/tiny_cpu.yaml"


def add_arguments(p):
    add_training_arguments(p, "print the summary as one JSON line")


def default_config_path() -> str:
    here = Path(DEFAULT_CONFIG)
    if here.is_file():
        return str(here)
    return str(Path(__file__).resolve().parents[2] / DEFAULT_CONFIG)


def run(args) -> int:
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args.config = args.config or default_config_path()
    try:
        world = int(os.environ.get("WORLD_SIZE", args.nproc))
        cfg = load_config(args.config, args.overrides, world_size=world)
        from aion_train.config import validate_config
        from aion_train.interop.hf_init import apply_hf_init

        validate_config(apply_hf_init(cfg, "pretrain"))  # train.init_from: refused now if not expressible
    except (ConfigError, ValueError) as e:
        print(str(e), file=sys.stderr)
        return 2
    from aion_train.ownership import ForeignFolderError

    try:
        claim_training_dirs(cfg, "pretrain", args.overwrite)
    except ForeignFolderError as e:
        return report_refusal("pretrain", e)
    except (RuntimeError, OSError) as e:  # the demo data could not be built
        print(f"pretrain: {e}", file=sys.stderr)
        return 1
    if wants_local_ranks(args):
        return launch_local_ranks(args, "pretrain")
    from aion_train.train.trainer import TrainingError, pretrain

    try:
        summary = pretrain(cfg)
    except TrainingError:
        return 1  # the trainer has logged the one-line reason (rank 0)
    if int(os.environ.get("RANK", 0)) == 0:
        if args.json:
            print(json.dumps({k: v for k, v in summary.items() if k != "losses"}))
        else:
            print(f"\ncheckpoint: {summary['checkpoint']}")
            if summary.get("initial_val_ppl") is not None:
                print(f"held-out perplexity: {summary['initial_val_ppl']:.1f} -> {summary['final_val_ppl']:.1f}")
            for key, val in sorted(summary.get("final_val", {}).items()):
                if key != "val/perplexity":
                    print(f"{key}: {val:.4g}")
            print(f"MLflow run: {summary['mlflow_run_id']} at {summary['tracking_uri']}")
            print(f"view it:    aion-train ui --run-dir {summary['run_dir']}")
    return 0
