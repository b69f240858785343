"""`train.compile`: the model's transformer blocks through `torch.compile` (inductor).

`blocks` compiles every module whose class says `compile_role = "block"` (the transformer's
`Block`) in place (`nn.Module.compile`: parameter names, state dicts and checkpoints are
unchanged). A module with `compile_role = "eager"` (the MoE's `GroupedExperts`) runs eagerly
inside its compiled block: it reads the group sizes on the host (`counts.tolist()`), which
breaks the graph anyway, its work is GEMMs and the fused SwiGLU kernel already, and torch's
grouped GEMM has no fake-tensor kernel for fp32 (dynamo cannot trace it). So a MoE block
compiles into the graphs around its experts (attention, norms, router, dispatch), a dense
block into one. Only `ExecutionPolicy` (model/execution.py) decides it; the compiled code is
cached on disk between runs (`cache_dir`), so a second run with the same model and shapes
skips most of the compilation.

`fullgraph`/`mode` stay torch's defaults: `max-autotune` benchmarks GEMM templates at start-up,
minutes on a 2-core CPU."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

from aion_train.process_env import set_env

log = logging.getLogger("aion_train.model")

COMPILE_MODES = ("eager", "blocks")
CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"


def cache_dir() -> Path:
    """Where inductor keeps compiled graphs between processes: $TORCHINDUCTOR_CACHE_DIR when set,
    else ~/.cache/aion-train/inductor (torch's own default is under /tmp, often wiped)."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "aion-train" / "inductor")


def compile_blocks(model: nn.Module) -> int:
    """Compile every block of `model` in place (see the module's docstring); blocks compiled
    already are left alone. Returns how many were compiled now."""
    path = cache_dir()
    path.mkdir(parents=True, exist_ok=True)
    set_env(defaults={CACHE_ENV: str(path)})  # read by inductor when it first compiles
    n = 0
    for m in model.modules():
        role = getattr(type(m), "compile_role", None)
        if role == "eager" and not hasattr(m.forward, "_torchdynamo_disable"):
            m.forward = torch.compiler.disable(m.forward)  # the instance's: the class stays as it is
        elif role == "block" and getattr(m, "_compiled_call_impl", None) is None:
            m.compile()
            n += 1
    log.info("train.compile=blocks: %d blocks through torch.compile (inductor), cache %s", n, path)
    return n
