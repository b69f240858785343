"""aion-train pipeline [--config F] [k=v ...] [--json] [--address URL | --connect ADDR]

SFT -> reward model -> PPO -> retrieval index -> policy bundle, each phase a Ray task or actor
group with its resource request. Without an address it starts a private Ray cluster on
127.0.0.1 and stops it (by PID) afterwards; `--address http://HEAD:8265` submits the same
pipeline as a Ray job; `--connect HOST:PORT` runs the driver here on an existing cluster.
Finished phases (those with a done.json) are skipped, so a rerun resumes. Exit codes: 0 every
phase finished, 1 a phase failed (reported with its log tail), 2 bad config.
"""

from __future__ import annotations

import json
import os
import signal
import sys

from aion_train.config import ConfigError, load_config

from .check_config import add_config_arguments
from .output_dirs import add_overwrite_argument, claim_training_dirs, overwrite_args, report_refusal

DEFAULT_CONFIG = "configs/pipeline_tiny.yaml"


def add_arguments(p):
    add_config_arguments(p)
    p.add_argument("--json", action="store_true", help="one JSON line per phase, then the metrics")
    where = p.add_mutually_exclusive_group()
    where.add_argument(
        "--address",
        default=None,
        metavar="URL",
        help="submit as a Ray job to this cluster's dashboard, e.g. http://127.0.0.1:8265",
    )
    where.add_argument(
        "--connect",
        default=None,
        metavar="HOST:PORT",
        help="run the driver here on an existing cluster (its GCS address)",
    )
    p.add_argument(
        "--working-dir",
        default=None,
        metavar="DIR",
        help="with --address: upload DIR as the job's working directory (default: the job "
        "cd's into this directory, which the cluster must see)",
    )
    p.add_argument("--no-wait", action="store_true", help="with --address: print the job id and return")
    add_overwrite_argument(p)


def _human(rec: dict) -> None:
    if "phase" in rec:
        line = (
            f"{rec['phase']:>13}: {rec['status']:7} {rec.get('seconds', 0):7.1f} s  "
            f"({rec['world_size']} x {rec['num_cpus']:g} CPU)"
        )
        if rec["status"] == "failed":
            line += f"\n  error: {rec['error']}\n  log: {rec['log']}\n" + "\n".join(
                "  | " + x for x in (rec.get("log_tail") or "").splitlines()
            )
        else:
            shown = {k: v for k, v in rec["metrics"].items() if isinstance(v, (int, float))}
            line += "  " + " ".join(f"{k}={v:.4g}" for k, v in list(shown.items())[:6])
        print(line, flush=True)
    elif "warning" in rec:
        print(f"warning: {rec['warning']}", file=sys.stderr, flush=True)
    else:
        keys = ("sft_accuracy", "sft_eval_loss", "rm_pair_accuracy", "ppo_accuracy", "ppo_eval_reward", "ppo_kl")
        keys = [k for k in keys if isinstance(rec.get(k), (int, float))]
        print(
            f"pipeline {rec['status']} in {rec['pipeline_seconds']:.0f} s: "
            + " ".join(f"{k}={rec[k]:.4g}" for k in keys)
            + f"  ({rec['run_dir']})",
            flush=True,
        )


def _emit_json(rec: dict) -> None:
    print(json.dumps(rec, sort_keys=False), flush=True)


def _terminate(signum, frame):
    raise SystemExit(128 + signum)


def run(args) -> int:
    config = args.config or (DEFAULT_CONFIG if os.path.isfile(DEFAULT_CONFIG) else None)
    from aion_train.posttrain.user_data import check_phase_files, checkable_now

    try:
        cfg = load_config(config, args.overrides)  # bad config fails here, before any job or cluster
        from aion_train.config import validate_config
        from aion_train.interop.hf_init import apply_hf_init

        validate_config(apply_hf_init(cfg, "posttrain"))  # sft.init_from: an HF folder's architecture
        check_phase_files(cfg, checkable_now(cfg, tuple(p for p in cfg.pipeline.phases if p in ("sft", "rm", "ppo"))))
    except (ConfigError, ValueError) as e:
        print(str(e), file=sys.stderr)
        return 2
    if args.address:
        from aion_train.pipeline.submit import submit_pipeline

        return submit_pipeline(
            args.address,
            config,
            list(args.overrides) + overwrite_args(args),
            json_out=args.json,
            working_dir=args.working_dir,
            wait=not args.no_wait,
        )
    if args.working_dir or args.no_wait:
        print("pipeline: --working-dir and --no-wait need --address", file=sys.stderr)
        return 2
    from aion_train.pipeline.runner import run_pipeline

    cfg = load_config(config, args.overrides)
    from aion_train.ownership import ForeignFolderError

    try:
        claim_training_dirs(cfg, "pipeline", args.overwrite)  # before any cluster starts
    except ForeignFolderError as e:
        return report_refusal("pipeline", e)
    # SIGTERM (ray job stop, kill, Slurm) unwinds like Ctrl-C so the private cluster is stopped
    signal.signal(signal.SIGTERM, _terminate)
    return run_pipeline(cfg, connect_address=args.connect, emit=_emit_json if args.json else _human)
