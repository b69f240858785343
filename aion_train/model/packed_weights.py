"""bf16 weights laid out once for the CPU's matmul, for generation (`ExecutionPolicy.packed_weights`).

Three layouts, chosen once per process (`backend()`, logged):
  kernel  on a CPU with AVX512-BF16 (no AMX), the platform's own bf16 linear
          (kernels/bf16_linear.py): the weight in 16-output blocks of input pairs, streamed at
          the memory's bandwidth at decoding's row counts, where oneDNN's kernel reads it at
          half of that (docs/notes.md, bench serve); fp32 sums rounded to bf16 once, the same
          numbers as the bf16 GEMM up to the order of the sums.
  onednn  with native bf16 matmul otherwise (oneDNN reports it: AMX, or the kernel cannot be
          built): the weight reordered once into oneDNN's blocked layout
          (`torch.ops.mkldnn._reorder_linear_weight`, what PyTorch's inductor does when it
          freezes a model for CPU inference), bitwise the same outputs as F.linear without the
          reorder at every call.
  fp32    without native bf16 (AVX2 only), where a bf16 GEMM is emulated and many times slower
          than fp32: the weight in fp32, in oneDNN's layout; the product is computed in fp32
          from the same bf16 values and rounded to bf16 once (closer to the exact product than
          the bf16 kernel, not bitwise equal to it).
The copy is derived from the parameter when `pack_weights` runs and used only where no
gradient is recorded; the parameter itself stays, so `state_dict`, training and every other
path are unchanged. The copy costs the memory of the packed weights once more (twice in fp32)."""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F
from torch import nn

from aion_train.kernels import bf16_linear

log = logging.getLogger("aion_train.model")


@functools.cache
def native_bf16() -> bool:
    """oneDNN runs bf16 matmuls natively on this CPU."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


BACKENDS = ("kernel", "onednn", "fp32")


@functools.cache
def backend() -> str:
    """The packed layout of this process (see the module's docstring)."""
    if bf16_linear.available():
        return "kernel"
    return "onednn" if native_bf16() else "fp32"


@functools.cache
def packing_works(dtype: torch.dtype = torch.bfloat16) -> bool:
    """bf16 weights can be packed here: with the platform's kernel (its own probe passed);
    else always (fp32 copies) without native bf16, and with it when the build has oneDNN's
    packed linear and it matches F.linear bitwise on a probe."""
    if dtype != torch.bfloat16:
        return False
    if backend() == "kernel":
        return True
    if getattr(torch.ops, "mkldnn", None) is None:
        return False
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        g = torch.Generator().manual_seed(0)
        w = torch.randn(48, 32, generator=g).to(dtype)
        x = torch.randn(3, 32, generator=g).to(dtype)
        got = packed_linear(x, pack(w))
        if backend() == "onednn":
            return bool(torch.equal(got, F.linear(x, w)))
        return bool(torch.allclose(got.float(), F.linear(x.float(), w.float()), rtol=2**-7, atol=1e-5))
    except Exception:  # an op missing from this build
        return False


def pack(weight: torch.Tensor) -> torch.Tensor | bf16_linear.PackedBf16:
    """[out, in] bf16 weight -> the layout of `backend()` (a weight the kernel cannot take, an
    odd number of inputs, gets oneDNN's)."""
    which = backend()
    if which == "kernel" and bf16_linear.packable(weight):
        return bf16_linear.pack(weight)
    w = weight.detach() if which != "fp32" else weight.detach().float()
    return torch.ops.mkldnn._reorder_linear_weight(w, 1)


def packed_linear(
    x: torch.Tensor, packed: torch.Tensor | bf16_linear.PackedBf16, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """F.linear(x, weight, bias) for the packed copy of weight."""
    if isinstance(packed, bf16_linear.PackedBf16):
        return bf16_linear.linear(x, packed, bias)
    if packed.dtype == x.dtype:
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    b = None if bias is None else bias.to(packed.dtype)
    return torch.ops.mkldnn._linear_pointwise(x.to(packed.dtype), packed, b, "none", [], "").to(x.dtype)


class PackedLinear(nn.Module):
    """An nn.Linear's parameters (the same tensors, the same names) plus their packed copy."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self._packed = pack(linear.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() or x.dtype != self.weight.dtype:
            return F.linear(x, self.weight, self.bias)
        return packed_linear(x, self._packed, self.bias)


def pack_weights(model: nn.Module) -> int:
    """Give every bf16 CPU nn.Linear and expert stack of `model` its packed copy (in place);
    returns how many weights were packed (0 where packing does not work here)."""
    if not packing_works():
        return 0
    n = 0
    for parent in list(model.modules()):
        if hasattr(parent, "packed_qkv") and all(
            type(getattr(parent, f"{c}_proj", None)) is nn.Linear and _packable(getattr(parent, f"{c}_proj").weight)
            for c in "qkv"
        ):
            # attention: q, k, v as one [q; k; v] weight (each output the same dot product)
            parent.packed_qkv = pack(torch.cat([getattr(parent, f"{c}_proj").weight for c in "qkv"]))
            n += 1
        for name, child in list(parent.named_children()):
            if getattr(parent, "packed_qkv", None) is not None and name in ("q_proj", "k_proj", "v_proj"):
                continue  # used through packed_qkv; kept plain for grad-enabled calls
            if type(child) is nn.Linear and _packable(child.weight):
                setattr(parent, name, PackedLinear(child))
                n += 1
        if hasattr(parent, "packed_experts") and _packable(parent.w1):
            # experts keep [E, in, out] stacks; the packed copy is per expert, [out, in], with a
            # SwiGLU expert's w1 and w3 as one [w1; w3] weight (one matmul, each output the
            # same dot product): `w13`
            packed = {"w2": [pack(w.t()) for w in parent.w2]}
            if parent.w3 is not None:
                packed["w13"] = [pack(torch.cat([a.t(), b.t()])) for a, b in zip(parent.w1, parent.w3)]
            else:
                packed["w1"] = [pack(w.t()) for w in parent.w1]
            parent.packed_experts = packed
            n += sum(len(v) for v in packed.values())
    how = {
        "kernel": "the AVX512-BF16 kernel's layout (kernels/bf16_linear.py)",
        "onednn": "oneDNN's bf16 layout",
        "fp32": "fp32 copies (no native bf16 matmul on this CPU)",
    }[backend()]
    log.info("packed %d weights for generation: %s", n, how)
    return n


def _packable(w: torch.Tensor) -> bool:
    return w.device.type == "cpu" and w.dtype == torch.bfloat16
