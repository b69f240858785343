"""The device interface's CPU allocator setting: a freed large activation is reused, not
page-faulted in again (measured with the process's minor page-fault counter)."""

from __future__ import annotations

import subprocess
import sys

import pytest

PROBE = """
import resource, sys, torch
from aion_train.runtime import apply_runtime
from aion_train.config.schema import RuntimeConfig
from aion_train.parallel.device import tune_cpu_allocator
mode = sys.argv[1]                            # untouched | keep | system (runtime.cpu_allocator)
if mode != "untouched":
    apply_runtime(RuntimeConfig(cpu_allocator=mode))
applied = tune_cpu_allocator() if mode != "untouched" else False
def faults_of_one_step():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.empty(64 * 1024 * 1024 // 4)   # a 64 MB activation
    x.fill_(1.0)
    del x
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults_of_one_step()                          # the first step faults its pages in either way
print(applied, min(faults_of_one_step() for _ in range(3)))
"""


def _probe(mode: str) -> tuple[bool, int]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=120, check=True
    ).stdout.split()
    return out[0] == "True", int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning is Linux-only")
def test_tuned_allocator_reuses_freed_activations():
    applied, tuned = _probe("keep")
    _, default = _probe("untouched")
    system_applied, system = _probe("system")
    assert applied and not system_applied
    pages = 64 * 1024 * 1024 // 4096
    assert default > pages // 2, default  # glibc default: each 64 MB block is a fresh mmap
    assert tuned < pages // 20, tuned  # tuned: the freed block is reused
    assert system > pages // 2, system  # runtime.cpu_allocator=system: glibc's defaults
