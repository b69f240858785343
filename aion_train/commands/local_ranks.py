"""`--nproc N` for the training commands: the same command again as N local ranks.

`pretrain`, `sft`, `rm` and `ppo` run as one rank under a launcher (torchrun, deepspeed, srun:
WORLD_SIZE set); without one, `--nproc N` starts N ranks on this host through torchrun on
loopback, each with its share of the CPU threads unless OMP_NUM_THREADS says otherwise."""

from __future__ import annotations

import os
import subprocess
import sys

from .check_config import add_config_arguments
from .output_dirs import add_overwrite_argument, overwrite_args


def add_training_arguments(p, json_help: str) -> None:
    """--config and overrides, --nproc, --json, --overwrite, and the --local_rank that
    `deepspeed` passes to each rank (accepted, unused: LOCAL_RANK is in the environment)."""
    import argparse

    add_config_arguments(p)
    p.add_argument("--nproc", type=int, default=1, help="local ranks (started through torchrun)")
    p.add_argument("--json", action="store_true", help=json_help)
    add_overwrite_argument(p)
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)


def wants_local_ranks(args) -> bool:
    """--nproc N > 1 asked for, and no launcher started this process as one of its ranks."""
    return args.nproc > 1 and "WORLD_SIZE" not in os.environ


def launch_local_ranks(args, command: str, *flags: str) -> int:
    """Run `aion-train COMMAND --config ... [flags] [overrides] [--json] [--overwrite]` as
    args.nproc local ranks through torchrun; its exit status."""
    from aion_train.parallel.spawn import free_port

    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(args.nproc),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        "-m",
        "aion_train.cli",
        command,
        "--config",
        args.config,
        *flags,
        *args.overrides,
    ]
    cmd += (["--json"] if args.json else []) + overwrite_args(args)
    threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 2) // args.nproc))
    return subprocess.call(cmd, env=dict(os.environ, OMP_NUM_THREADS=threads))
