"""Run a function on N local ranks (real processes, gloo or NCCL), each with a free port,
a short collective timeout, and rank 0's return value handed back to the caller."""

from __future__ import annotations

import logging
import os
import socket
import traceback
from datetime import timedelta

import torch.distributed as dist
import torch.multiprocessing as mp

from aion_train.process_env import set_env, start_process

from .device import get_device, local_rank_from_env

log = logging.getLogger("aion_train.parallel")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_backend(nproc: int, requested: str = "auto", n_gpus: int | None = None) -> str:
    """The backend for `nproc` ranks on this one host: NCCL needs a GPU per rank (it refuses
    two ranks on one GPU), so `auto` is NCCL when there are at least `nproc` GPUs and gloo on
    the CPU otherwise (said once in the log when GPUs are there but too few); `nccl` asked for
    with too few GPUs is an error that says so; `gloo` is gloo."""
    if n_gpus is None:
        import torch

        n_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if requested == "gloo":
        return "gloo"
    if requested not in ("auto", "nccl"):
        raise ValueError(f"backend {requested!r}: must be auto, gloo or nccl")
    if n_gpus >= nproc:
        return "nccl" if n_gpus > 0 else "gloo"
    if requested == "nccl":
        raise RuntimeError(
            f"{nproc} local ranks on NCCL need {nproc} GPUs, but this host has {n_gpus}: "
            f"NCCL refuses two ranks on one GPU. Run at most {n_gpus} ranks, or use gloo"
        )
    if n_gpus > 0:
        log.warning(
            "%d local ranks but %d GPUs: running them on the CPU with gloo (NCCL needs a GPU per rank)", nproc, n_gpus
        )
    return "gloo"


def init_distributed(backend: str = "auto", timeout_s: float = 120.0):
    """Initialise torch.distributed from the launcher's environment (torchrun, deepspeed,
    srun with our slurm script, or `run_ranks`). Returns (rank, world, device). The device
    follows LOCAL_RANK (`get_device`); backend `gloo` keeps the ranks on the CPU."""
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0)))
    world = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", 1)))
    local = local_rank_from_env()
    set_env(defaults={"LOCAL_RANK": str(local)})
    device = get_device(local, prefer="cpu" if backend == "gloo" else "auto")
    if world > 1 and not dist.is_initialized():
        set_env(defaults={"MASTER_ADDR": "127.0.0.1"})
        dist.init_process_group(
            device.dist_backend(backend), rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s)
        )
    return rank, world, device


def _plain(obj):
    """Tensors -> Python numbers/lists (a tensor sent through the queue would point into the
    dead child's shared memory)."""
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_plain(v) for v in obj)
    return obj


def rank_env(rank: int, world: int, port: int, backend: str, host_gpus: int) -> dict:
    """The launcher variables of local rank `rank`. Gloo ranks on a host with GPUs see none
    (CUDA_VISIBLE_DEVICES empty): the model, DeepSpeed's accelerator and every collective then
    agree on the CPU, instead of several ranks picking GPUs that NCCL could not share."""
    env = dict(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
    )
    if backend == "gloo" and host_gpus > 0:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def _entry(rank, fn, world, port, timeout_s, queue, args, backend="auto", host_gpus=0):
    start_process(rank_env(rank, world, port, backend, host_gpus))  # before anything touches CUDA
    import torch

    torch.set_num_threads(1)
    try:
        init_distributed(backend, timeout_s)
        result = fn(*args)
        if rank == 0:
            queue.put(("ok", _plain(result)))
        if dist.is_initialized():
            dist.barrier()  # no rank tears its groups down while a peer still talks to it
    except BaseException:
        queue.put(("error", f"rank {rank}:\n{traceback.format_exc()}"))
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    # Done and reported: leave without interpreter finalisation. Gloo worker threads may still
    # hold finished async work (e.g. ZeRO-3 prefetches) whose tensors need the GIL when freed;
    # at finalisation that aborts the process ("terminate called without an active exception",
    # pytorch/pytorch#190489, #179291) although everything succeeded.
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_ranks(fn, nproc: int, *args, timeout_s: float = 60.0, backend: str = "auto"):
    """Spawn `nproc` ranks running fn(*args); return rank 0's result or raise with the
    failing rank's traceback. A dead or hung rank fails the whole group within timeout_s.
    Rank r is LOCAL_RANK r; the backend is `local_backend(nproc, backend)`: NCCL with a GPU
    per rank, else gloo on the CPU with the GPUs hidden from the ranks (`rank_env`); an
    explicit `nccl` with too few GPUs raises here."""
    import torch

    host_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    backend = local_backend(nproc, backend, host_gpus)
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = free_port()
    try:
        mp.start_processes(
            _entry,
            args=(fn, nproc, port, timeout_s, queue, args, backend, host_gpus),
            nprocs=nproc,
            join=True,
            start_method="spawn",
        )
    except Exception as e:
        errors = []
        while not queue.empty():
            kind, payload = queue.get()
            if kind == "error":
                errors.append(payload)
        raise RuntimeError("\n".join(errors) or str(e)) from None
    while not queue.empty():
        kind, payload = queue.get()
        if kind == "ok":
            return payload
    raise RuntimeError("rank 0 returned no result")
