"""Triton implementations (forward + backward as torch.autograd.Function) of the kernels whose
torch references live in `aion_train.kernels.reference`.

Importing this package imports triton and decorates every kernel with `triton.jit`; whether
they are compiled for the GPU or run by the Triton interpreter (numpy, on CPU tensors) is
decided by TRITON_INTERPRET *at that moment*, so set it before the first import. Use the
registry (`aion_train.kernels.select`) rather than importing this package directly: it only
imports it when Triton can actually run.
"""

from __future__ import annotations

from ._common import INTERPRET, supports
from .cross_entropy import cross_entropy, linear_cross_entropy
from .moe_permute import moe_permute, moe_unpermute
from .rms_norm import rms_norm
from .rope import rope
from .swiglu import swiglu

__all__ = [
    "INTERPRET",
    "supports",
    "rms_norm",
    "rope",
    "swiglu",
    "moe_permute",
    "moe_unpermute",
    "cross_entropy",
    "linear_cross_entropy",
]
