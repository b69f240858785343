"""DeepSpeed's communication start-up, without its shared-memory op.

DeepSpeed's torch backend JIT-compiles a shared-memory all-reduce op with gcc at every
`init_distributed` on CPU (~100 s, 1.5 GB). We measured identical results without it, so we
skip the build unless AION_DS_SHM=1 asks for it."""
from __future__ import annotations

import importlib
import os
from datetime import timedelta


def init_deepspeed_comm(backend: str = "gloo", timeout_s: float = 120.0):
    """Initialise deepspeed.comm on top of an existing (or new) torch.distributed group."""
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        from aion_train.parallel.spawn import free_port
        os.environ["MASTER_PORT"] = str(free_port())
    import deepspeed
    if os.environ.get("AION_DS_SHM") != "1":
        ds_torch = importlib.import_module("deepspeed.comm.torch")
        ds_torch.build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(seconds=timeout_s),
                               dist_init_required=None)
    return deepspeed
