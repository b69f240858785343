"""aion-train sft [--config F] [overrides] [--nproc N] [--json]

Supervised fine-tuning on the chat task (default config: configs/sft_tiny.yaml). Prints the
metrics; with --json one JSON line holding `sft_accuracy` (held-out exact-answer accuracy).
Under torchrun / deepspeed (WORLD_SIZE set) it runs as one rank; --nproc N starts N local
ranks through torchrun."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from .json_output import stdout_to_stderr
from .local_ranks import add_training_arguments, launch_local_ranks, wants_local_ranks
from .output_dirs import claim_training_dirs, report_refusal

DEFAULT_CONFIG = "configs/sft_tiny.yaml"


def add_phase_arguments(p):
    add_training_arguments(p, "print the metrics as one JSON line")


add_arguments = add_phase_arguments


def default_config() -> str:
    here = Path(DEFAULT_CONFIG)
    return str(here if here.is_file() else Path(__file__).resolve().parents[2] / DEFAULT_CONFIG)


def run_phase(args, command: str, fn_path: str, headline, phases=None) -> int:
    """Load the config and check the files of `phases` (default: the command's), launch N
    ranks or run this rank, print rank 0's metrics (`headline`: the first of its names present)."""
    from aion_train.config import ConfigError, load_config
    from aion_train.posttrain.user_data import check_phase_files

    args.config = args.config or default_config()
    world = int(os.environ.get("WORLD_SIZE", args.nproc))
    try:
        cfg = load_config(args.config, args.overrides, world_size=world)
        from aion_train.config import validate_config
        from aion_train.interop.hf_init import apply_hf_init

        validate_config(apply_hf_init(cfg, "posttrain"))  # sft.init_from: an HF folder's architecture
        if phases != ():
            check_phase_files(cfg, phases or (command,))  # every bad record named, before any rank starts
    except (ConfigError, ValueError) as e:
        print(str(e), file=sys.stderr)
        return 2
    from aion_train.ownership import ForeignFolderError

    try:
        claim_training_dirs(cfg, command, args.overwrite)
    except ForeignFolderError as e:
        return report_refusal(command, e)
    if wants_local_ranks(args):
        return launch_local_ranks(args, command)
    from aion_train.pipeline.phases import resolve_callable

    try:
        with stdout_to_stderr(args.json):
            metrics = resolve_callable(fn_path)(cfg)
    except (ValueError, FileNotFoundError) as e:
        print(f"{command}: {e}", file=sys.stderr)
        return 1
    if int(os.environ.get("RANK", 0)) == 0:
        if args.json:
            print(json.dumps(metrics, sort_keys=True))
        else:
            for k, v in sorted(metrics.items()):
                print(f"{k}: {v}")
            names = (headline,) if isinstance(headline, str) else headline
            shown = next((h for h in names if isinstance(metrics.get(h), (int, float))), None)
            if shown:
                print(f"\n{shown}: {metrics[shown]:.3f}")
    return 0


def run(args) -> int:
    return run_phase(args, "sft", "aion_train.posttrain.phases:run_sft", ("sft_accuracy", "sft_eval_loss", "sft_loss"))
