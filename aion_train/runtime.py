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
    """Set this process's runtime choices from `rc` and log them once (`grouped_mm` reaches
    the model through its execution policy: `apply_model_execution`)."""
    from aion_train.parallel.device import set_cpu_allocator

    set_cpu_allocator(rc.cpu_allocator)
    log.info(
        "runtime: progress_bar=%s (%s) cpu_allocator=%s grouped_mm=%s deepspeed_shm_op=%s",
        rc.progress_bar,
        "shown" if show_progress_bar(rc) else "hidden",
        rc.cpu_allocator,
        rc.grouped_mm,
        rc.deepspeed_shm_op,
    )


def apply_model_execution(model, device, rc: RuntimeConfig, compile: str = "eager"):
    """The model's execution policy for `device` (a torch.device) with `rc.grouped_mm` and
    `compile` (`train.compile`, pretraining only), applied."""
    from aion_train.model.execution import ExecutionPolicy, apply_execution_policy

    return apply_execution_policy(model, ExecutionPolicy.for_device(device.type, rc.grouped_mm, compile))


def show_progress_bar(rc: RuntimeConfig) -> bool:
    """`always`, `never`, or `auto`: shown when stderr is a terminal (not in logs, CI or Slurm output)."""
    if rc.progress_bar == "auto":
        return sys.stderr.isatty()
    return rc.progress_bar == "always"
