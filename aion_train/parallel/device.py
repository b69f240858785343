"""The one small interface to the accelerator: device, distributed backend, RNG, streams,
memory. CPU (gloo) and CUDA (NCCL) share every other line of code."""
from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import random
import sys
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Device:
    torch_device: torch.device

    @property
    def type(self) -> str:
        return self.torch_device.type

    @property
    def is_cuda(self) -> bool:
        return self.type == "cuda"

    def dist_backend(self, requested: str = "auto") -> str:
        if requested != "auto":
            return requested
        return "nccl" if self.is_cuda else "gloo"

    def manual_seed(self, seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
        if self.is_cuda:
            torch.cuda.manual_seed_all(seed)

    def generator(self, seed: int) -> torch.Generator:
        g = torch.Generator(device=self.torch_device)
        g.manual_seed(seed)
        return g

    def synchronize(self) -> None:
        if self.is_cuda:
            torch.cuda.synchronize(self.torch_device)

    def stream(self):
        """A side stream on CUDA (for overlapping communication); a no-op context on CPU."""
        if self.is_cuda:
            return torch.cuda.stream(torch.cuda.Stream(self.torch_device))
        return contextlib.nullcontext()

    def memory_allocated(self) -> int:
        if self.is_cuda:
            return torch.cuda.max_memory_allocated(self.torch_device)
        try:
            import psutil
            return psutil.Process().memory_info().rss
        except Exception:
            return 0

    def supports_bf16(self) -> bool:
        return (not self.is_cuda) or torch.cuda.is_bf16_supported()


# glibc mallopt parameters
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


@functools.lru_cache(maxsize=None)
def tune_cpu_allocator() -> bool:
    """Keep freed blocks in the process heap instead of handing them back to the kernel.

    torch's CPU allocator is plain malloc, and glibc serves every block over its mmap threshold
    (at most 32 MB) with a fresh mmap that it unmaps on free: each step's large activations
    then page-fault in again, zero-filled by the kernel. With mmap off and a high trim threshold,
    freed memory is reused (Intel's PyTorch CPU guides get the same by preloading jemalloc or
    tcmalloc). Memory then stays at the process's peak. Linux/glibc only; returns whether it
    applied. Called once per process by the trainer and the benchmarks on CPU."""
    if not sys.platform.startswith("linux") or os.environ.get("AION_TRAIN_KEEP_MALLOC") == "1":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError):   # not glibc (musl, ...)
        return False


def get_device(local_rank: int | None = None, prefer: str = "auto") -> Device:
    """CUDA device `local_rank` when CUDA is present (unless prefer='cpu'), else the CPU."""
    if local_rank is None:
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if prefer != "cpu" and torch.cuda.is_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return Device(torch.device("cuda", local_rank % torch.cuda.device_count()))
    tune_cpu_allocator()
    return Device(torch.device("cpu"))
