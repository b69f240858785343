"""What runs inside a Ray worker for one rank of one phase.

`run_phase_rank` sets the torch.distributed environment (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT; none for a single-rank phase), the thread count of the CPUs Ray
granted, the driver's working directory (so relative paths in the config mean the same thing
as on the command line), sends the process's stdout/stderr (file descriptors, so C++ and
subprocess output too) to the phase's log file, rebuilds the config and calls the phase
function. A single-rank phase runs as a Ray task (`phase_task`, one call per worker process so
that a phase's memory is returned when it ends); a distributed phase runs as an actor group of
`PhaseRank` actors, one per rank.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import time
import traceback
from pathlib import Path

import ray

DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def phase_log_path(run_dir: str | Path, phase: str, rank: int = 0) -> Path:
    """{run_dir}/logs/{phase}.log for rank 0, {phase}.rank{r}.log for the others."""
    suffix = "" if rank == 0 else f".rank{rank}"
    return Path(run_dir) / "logs" / f"{phase}{suffix}.log"


@contextlib.contextmanager
def redirect_output(path: Path):
    """Append this process's stdout and stderr (fd 1 and 2) to `path` for the duration."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(path, "ab", buffering=0) as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def _json_safe(result) -> dict:
    if not isinstance(result, dict):
        raise TypeError(f"a phase function must return a dict of metrics, got {type(result).__name__}")
    return json.loads(json.dumps(result, default=str))


def run_phase_rank(phase: dict, cfg_dict: dict, cwd: str, dist_env: dict | None = None) -> dict:
    """Run one rank of `phase` (a Phase.to_dict()) on the config `cfg_dict`; returns its metrics."""
    from aion_train.config import config_from_dict
    from aion_train.pipeline.phases import resolve_callable
    from aion_train.process_env import start_process

    os.chdir(cwd)
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    rank = int((dist_env or {}).get("RANK", 0))
    world = int((dist_env or {}).get("WORLD_SIZE", 1))
    threads = max(1, int(phase["num_cpus"]))
    start_process(
        {
            **dict.fromkeys(DIST_VARS),
            **{k: str(v) for k, v in (dist_env or {}).items()},
            "AION_PIPELINE_PHASE": phase["name"],
            "OMP_NUM_THREADS": str(threads),
        }
    )
    log = phase_log_path(cfg_dict["run_dir"], phase["name"], rank)
    with redirect_output(log):
        t0 = time.time()
        print(
            f"=== phase {phase['name']} rank {rank}/{world} pid {os.getpid()} "
            f"host {socket.gethostname()} cpus {phase['num_cpus']} at {time.ctime()} ===",
            flush=True,
        )
        # the libraries' progress (aion_train.train, aion_train.ppo, ...) goes to this log too
        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr, force=True
        )
        try:
            import torch

            torch.set_num_threads(threads)
            fn = resolve_callable(phase["fn"])
            result = _json_safe(fn(config_from_dict(cfg_dict)))
        except BaseException:
            traceback.print_exc()
            sys.stderr.flush()
            raise
        print(f"=== phase {phase['name']} rank {rank} finished in {time.time() - t0:.1f} s ===", flush=True)
        return result


@ray.remote(max_calls=1)
def phase_task(phase: dict, cfg_dict: dict, cwd: str) -> dict:
    """A single-rank phase as a Ray task (its worker process exits afterwards)."""
    return run_phase_rank(phase, cfg_dict, cwd, None)


@ray.remote
class PhaseRank:
    """One rank of a distributed phase. The driver asks rank 0 for an address and a free port,
    then calls `run` on every rank with the same MASTER_ADDR/MASTER_PORT."""

    def address(self) -> tuple[str, int, str]:
        ip = ray.util.get_node_ip_address()
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((ip, 0))
            port = s.getsockname()[1]
        return ip, port, ray.get_runtime_context().get_node_id()

    def run(self, phase: dict, cfg_dict: dict, cwd: str, dist_env: dict) -> dict:
        return run_phase_rank(phase, cfg_dict, cwd, dist_env)
