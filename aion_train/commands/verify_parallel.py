"""aion-train verify-parallel --config F --tp T --ep E --nproc N [--json] [overrides]"""

from __future__ import annotations

import json
import sys

from aion_train.config import ConfigError, load_config

from .check_config import add_config_arguments


def add_arguments(p):
    add_config_arguments(p)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--ep", type=int, default=1)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--tolerance", type=float, default=1e-4)
    p.add_argument("--timeout", type=float, default=120.0, help="seconds before a hung rank fails the run")
    p.add_argument("--json", action="store_true")


def run(args) -> int:
    from aion_train.parallel import run_ranks
    from aion_train.parallel.verify import verify_worker

    try:
        cfg = load_config(
            args.config or "configs/tiny_cpu.yaml",
            list(args.overrides) + [f"parallel.tp={args.tp}", f"parallel.ep={args.ep}"],
            world_size=args.nproc,
        )
    except ConfigError as e:
        print(str(e), file=sys.stderr)
        return 2
    cfg.parallel.timeout_s = args.timeout
    result = run_ranks(verify_worker, args.nproc, cfg, args.tp, args.ep, timeout_s=args.timeout)
    ok = result["max_logit_diff"] < args.tolerance and result["max_grad_diff"] < args.tolerance
    result["ok"] = ok
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:>20}: {v}")
    return 0 if ok else 1
