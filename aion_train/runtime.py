"""The `runtime` config section applied to this process: once, at start, and logged.

These keys change how a process runs, never what it computes: the CPU allocator policy,
the MoE expert matmul, DeepSpeed's shared-memory op (passed to its comm start-up), the
progress bar. The trainer and the post-training phases call `apply_runtime` first thing."""
from __future__ import annotations

import logging
import sys

from aion_train.config.schema import RuntimeConfig

log = logging.getLogger("aion_train.runtime")


def apply_runtime(rc: RuntimeConfig) -> None:
    """Set this process's runtime choices from `rc` and log them once."""
    from aion_train.model.moe.experts import set_grouped_mm_mode
    from aion_train.parallel.device import set_cpu_allocator
    set_cpu_allocator(rc.cpu_allocator)
    set_grouped_mm_mode(rc.grouped_mm)
    log.info("runtime: progress_bar=%s (%s) cpu_allocator=%s grouped_mm=%s deepspeed_shm_op=%s",
             rc.progress_bar, "shown" if show_progress_bar(rc) else "hidden", rc.cpu_allocator,
             rc.grouped_mm, rc.deepspeed_shm_op)


def show_progress_bar(rc: RuntimeConfig) -> bool:
    """`always`, `never`, or `auto`: shown when stderr is a terminal (not in logs, CI or Slurm output)."""
    if rc.progress_bar == "auto":
        return sys.stderr.isatty()
    return rc.progress_bar == "always"
