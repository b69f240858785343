"""Fused kernels with automatic fallback.

    from aion_train.kernels import select
    rms_norm = select("rms_norm", cfg.model.kernels)   # "auto" | "torch" | "triton"
    y = rms_norm(x, weight, eps)

Every kernel has a torch reference (`aion_train.kernels.reference`) and a Triton
implementation (`aion_train.kernels.triton_ops`) with the same signature and autograd
(forward + backward). Backends:

  torch   the reference, always.
  triton  the Triton kernel; raises RuntimeError if Triton cannot run here.
  auto    Triton when it can run (triton importable and CUDA present, or TRITON_INTERPRET=1
          set before the kernels are first imported), else the reference.

A Triton kernel selected on a CUDA machine but called with CPU tensors (e.g. a CPU smoke run on
a GPU box) falls back to the reference for that call. Every resolution is logged once per
(kernel, backend) on the "aion_train.kernels" logger.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
from collections.abc import Callable

import torch

from . import reference

log = logging.getLogger("aion_train.kernels")

KERNELS: tuple[str, ...] = (
    "rms_norm",
    "rope",
    "swiglu",
    "moe_permute",
    "moe_unpermute",
    "cross_entropy",
    "linear_cross_entropy",
)
BACKENDS: tuple[str, ...] = ("auto", "torch", "triton")

_logged: set[tuple] = set()


def _log_once(key: tuple, msg: str, *args) -> None:
    if key not in _logged:
        _logged.add(key)
        log.info(msg, *args)


def _env_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def triton_status() -> tuple[bool, str]:
    """(can Triton kernels run in this process, why / why not)."""
    try:
        importlib.import_module("triton")
    except Exception as e:  # ImportError, or a broken install
        return False, f"triton not importable ({type(e).__name__}: {e})"
    import sys

    ops = sys.modules.get(__name__ + ".triton_ops")
    interpret = ops.INTERPRET if ops is not None else _env_interpret()
    if interpret:
        return True, "Triton interpreter (TRITON_INTERPRET=1)"
    if torch.cuda.is_available():
        return True, f"Triton compiled for {torch.cuda.get_device_name(0)}"
    return False, "no CUDA device and TRITON_INTERPRET is not set"


def _reference(name: str) -> Callable:
    return getattr(reference, name)


def _triton(name: str) -> Callable:
    from . import triton_ops

    impl, ref = getattr(triton_ops, name), _reference(name)

    @functools.wraps(impl)
    def call(*args, **kwargs):
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if triton_ops.supports(*tensors):
            return impl(*args, **kwargs)
        _log_once(
            (name, "cpu-fallback"),
            "kernel %s: triton selected but called on %s tensors; using the torch reference for such calls",
            name,
            tensors[0].device.type,
        )
        return ref(*args, **kwargs)

    call.backend = "triton"
    return call


def select(name: str, preference: str = "auto") -> Callable:
    """The implementation of kernel `name` for `preference` (the config's model.kernels)."""
    if name not in KERNELS:
        raise KeyError(f"unknown kernel {name!r}; known: {', '.join(KERNELS)}")
    preference = (preference or "auto").lower()
    if preference not in BACKENDS:
        raise ValueError(f"model.kernels={preference!r}: must be one of {', '.join(BACKENDS)}")
    if preference == "torch":
        _log_once((name, "torch"), "kernel %s: torch reference (requested)", name)
        return _reference(name)
    ok, why = triton_status()
    if ok:
        _log_once((name, "triton"), "kernel %s: triton (%s)", name, why)
        return _triton(name)
    if preference == "triton":
        raise RuntimeError(f"kernel {name}: model.kernels=triton but Triton cannot run: {why}")
    _log_once((name, "auto-torch"), "kernel %s: torch reference (auto: %s)", name, why)
    return _reference(name)


def get_kernel(name: str, backend: str = "auto") -> Callable:
    """Alias of `select(name, backend)`."""
    return select(name, backend)


def backend_of(fn: Callable) -> str:
    """'triton' or 'torch' for a callable returned by select()."""
    return getattr(fn, "backend", "torch")


__all__ = ["KERNELS", "BACKENDS", "select", "get_kernel", "triton_status", "backend_of", "reference"]
