"""Shared helpers: interpreter detection and block sizes."""

from __future__ import annotations

import os

import torch
import triton

# Frozen at import: triton.jit decorates with the interpreter iff this was set at that time.
try:
    from triton import knobs

    INTERPRET: bool = bool(knobs.runtime.interpret)
except ImportError:  # triton < 3.4 has no knobs
    INTERPRET = os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def supports(*tensors: torch.Tensor) -> bool:
    """Can the (already decorated) kernels run on these tensors? The interpreter runs on any
    device; compiled kernels need CUDA tensors."""
    if INTERPRET:
        return True
    return all(t.is_cuda for t in tensors)


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def block_for(n: int, cap_gpu: int, cap_interp: int) -> int:
    """Power-of-2 block covering n, capped (smaller cap in the interpreter so the looped
    code paths are exercised by small test sizes and numpy blocks stay cheap)."""
    return min(next_pow2(n), cap_interp if INTERPRET else cap_gpu)


def warps_for(block: int) -> int:
    return max(1, min(16, block // 256))


def n_programs_for_reduction(n_rows: int, device: torch.device) -> int:
    """How many programs share the rows of a row-wise reduction with a per-column partial
    (RMSNorm weight grad): a few per SM on GPU, a handful in the interpreter."""
    if INTERPRET or device.type != "cuda":
        return max(1, min(n_rows, 4))
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(n_rows, 4 * sms))
