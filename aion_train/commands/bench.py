"""aion-train bench NAME [--json]: benchmarks that print one JSON line."""

from __future__ import annotations

import importlib
import json

from .json_output import stdout_to_stderr

BENCHES = {
    "moe": "aion_train.bench.moe",
    "train": "aion_train.bench.train",
    "retrieval": "aion_train.bench.retrieval",
    "data": "aion_train.bench.data",
    "serve": "aion_train.bench.serve",
    "linear": "aion_train.bench.linear",
    "gpu": "aion_train.bench.gpu",  # CUDA only: exits 2 without a GPU
}


def add_arguments(p):
    p.add_argument("name", choices=sorted(BENCHES))
    p.add_argument("--json", action="store_true", help="print one JSON line")
    p.add_argument("--tokens", type=int, default=None)
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="smaller sizes (smoke test)")
    p.add_argument("--config", default=None)
    p.add_argument(
        "--write-docs", action="store_true", help="gpu: put the result into docs/benchmarks.md (a section per device)"
    )


def run(args) -> int:
    mod = importlib.import_module(BENCHES[args.name])
    if hasattr(mod, "run_command"):  # bench gpu: its own exit code (2 without CUDA), --write-docs
        return mod.run_command(args)
    kwargs = {k: v for k, v in (("tokens", args.tokens), ("rounds", args.rounds)) if v is not None}
    if args.quick:
        kwargs.update(getattr(mod, "QUICK", {}))
    if args.config:
        kwargs["config"] = args.config
    with stdout_to_stderr(args.json):  # DeepSpeed and MLflow print on stdout
        result = mod.run_bench(**kwargs)
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:>20}: {v}")
    return 0
