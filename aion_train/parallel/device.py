"""The one small interface to the accelerator: device, distributed backend, RNG, streams,
memory. CPU (gloo) and CUDA (NCCL) share every other line of code."""
from __future__ import annotations

import contextlib
import os
import random
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


def get_device(local_rank: int | None = None, prefer: str = "auto") -> Device:
    """CUDA device `local_rank` when CUDA is present (unless prefer='cpu'), else the CPU."""
    if local_rank is None:
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if prefer != "cpu" and torch.cuda.is_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return Device(torch.device("cuda", local_rank % torch.cuda.device_count()))
    return Device(torch.device("cpu"))
