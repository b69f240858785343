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


CPU_ALLOCATORS = ("keep", "system")
_cpu_allocator = "keep"


def set_cpu_allocator(policy: str) -> None:
    """Config `runtime.cpu_allocator`: `keep` (tune_cpu_allocator applies) or `system` (glibc's
    defaults). Set before the first get_device() of the process: the tuning cannot be undone."""
    global _cpu_allocator
    if policy not in CPU_ALLOCATORS:
        raise ValueError(f"runtime.cpu_allocator={policy!r}: must be one of {', '.join(CPU_ALLOCATORS)}")
    _cpu_allocator = policy


@functools.cache
def tune_cpu_allocator() -> bool:
    """Keep freed blocks in the process heap instead of handing them back to the kernel.

    torch's CPU allocator is plain malloc, and glibc serves every block over its mmap threshold
    (at most 32 MB) with a fresh mmap that it unmaps on free: each step's large activations
    then page-fault in again, zero-filled by the kernel. With mmap off and a high trim threshold,
    freed memory is reused (Intel's PyTorch CPU guides get the same by preloading jemalloc or
    tcmalloc). Memory then stays at the process's peak. Linux/glibc only, and only under
    `runtime.cpu_allocator=keep` (the default); returns whether it applied. Called once per
    process by get_device() on CPU and by the benchmarks."""
    if not sys.platform.startswith("linux") or _cpu_allocator != "keep":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError):  # not glibc (musl, ...)
        return False


LOCAL_RANK_VARS = ("LOCAL_RANK", "SLURM_LOCALID", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID")


def local_rank_from_env(env=None) -> int:
    """This process's rank on its host: LOCAL_RANK (torchrun, deepspeed, our slurm script),
    else SLURM_LOCALID (plain srun), else Open MPI's / MPICH's variable, else 0."""
    env = os.environ if env is None else env
    for name in LOCAL_RANK_VARS:
        if env.get(name, "") != "":
            return int(env[name])
    return 0


def cuda_index(local_rank: int, n_visible: int) -> int:
    """The CUDA device index of the process with LOCAL_RANK `local_rank` on a host where it
    sees `n_visible` GPUs: GPU `local_rank`; or GPU 0 when it sees exactly one (srun
    --gpus-per-task / a per-rank CUDA_VISIBLE_DEVICES binds one GPU to each process). Never
    wraps around: two NCCL ranks on one GPU fail ("Duplicate GPU detected"), so a local rank
    without a GPU of its own is an error that says so."""
    if n_visible < 1:
        raise RuntimeError("no CUDA device is visible to this process")
    if local_rank < 0:
        raise ValueError(f"LOCAL_RANK={local_rank} must be >= 0")
    if local_rank < n_visible:
        return local_rank
    if n_visible == 1:
        return 0
    raise RuntimeError(
        f"LOCAL_RANK={local_rank} but this process sees only {n_visible} GPUs "
        f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}): more ranks per "
        f"host than GPUs would put two ranks on one GPU, which NCCL refuses. Start at most "
        f"{n_visible} ranks per host, or run on the CPU with gloo (parallel.backend=gloo)"
    )


def resolve_backend(requested: str = "auto") -> str:
    """`parallel.backend` resolved for this process: `auto` is NCCL when CUDA is present, else gloo."""
    if requested != "auto":
        return requested
    return "nccl" if torch.cuda.is_available() else "gloo"


def get_device(local_rank: int | None = None, prefer: str = "auto") -> Device:
    """CUDA device `cuda_index(LOCAL_RANK, visible GPUs)` when CUDA is present (unless
    prefer='cpu'), made the current device; else the CPU. `local_rank` defaults to
    :func:`local_rank_from_env`."""
    if local_rank is None:
        local_rank = local_rank_from_env()
    if prefer != "cpu" and torch.cuda.is_available():
        index = cuda_index(local_rank, torch.cuda.device_count())
        torch.cuda.set_device(index)
        return Device(torch.device("cuda", index))
    tune_cpu_allocator()
    return Device(torch.device("cpu"))


# -- where tensors must be for a collective / a module ---------------------------------------
def backend_device(backend: str) -> torch.device:
    """The device whose tensors a torch.distributed backend takes: NCCL (also inside a
    "cpu:gloo,cuda:nccl" mix) the current CUDA device; gloo, mpi and anything else the CPU."""
    if "nccl" in str(backend).lower():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def comm_device(group=None) -> torch.device:
    """The device of the tensors a collective on `group` (None = the default group) must be
    given: the CUDA device under NCCL, which rejects CPU tensors; the CPU under gloo or without
    an initialised process group. Reductions of CPU-side bookkeeping (losses, counts, metrics)
    go through `aion_train.parallel.collectives.all_reduce_`, which moves them here and back."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return torch.device("cpu")
    return backend_device(dist.get_backend(group))


def module_device(module) -> torch.device:
    """The device a module (or a DeepSpeed engine) computes on: the engine's `device`, else
    that of its first parameter or buffer, else the CPU. Batches are moved there."""
    dev = getattr(module, "device", None)
    if isinstance(dev, (torch.device, str)):
        return torch.device(dev)
    for tensors in (module.parameters(), module.buffers()):
        for t in tensors:
            return t.device
    return torch.device("cpu")


def to_device(obj, device, non_blocking: bool = False):
    """Tensors (alone, or in dicts, lists and tuples, nested) moved to `device`; every other
    value as it is (e.g. the multimodal loader's `vqa` records). A tensor already there is
    returned as is (no copy)."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=non_blocking)
    if isinstance(obj, dict):
        return {k: to_device(v, device, non_blocking) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(to_device(v, device, non_blocking) for v in obj)
    return obj
