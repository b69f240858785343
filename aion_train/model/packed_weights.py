"""Weights laid out once for oneDNN's CPU matmul, for generation (`ExecutionPolicy.packed_weights`).

A bf16 linear on the CPU reorders its weight into oneDNN's blocked layout at every call; a
weight reordered once (`torch.ops.mkldnn._reorder_linear_weight`, what PyTorch's own inductor
does when it freezes a model for CPU inference) runs the same kernel without that work: the
outputs are bitwise the same, the decode step faster (docs/notes.md, bench serve). The packed
copy is derived from the parameter when `pack_weights` runs and used only where no gradient is
recorded; the parameter itself stays, so `state_dict`, training and every other path are
unchanged. The copy costs the memory of the packed weights once more."""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger("aion_train.model")


@functools.cache
def packing_works(dtype: torch.dtype = torch.bfloat16) -> bool:
    """The CPU build has oneDNN's packed linear and it matches F.linear bitwise on a probe."""
    ops = getattr(torch.ops, "mkldnn", None)
    if dtype != torch.bfloat16 or ops is None or not torch.backends.mkldnn.is_available():
        return False
    try:
        g = torch.Generator().manual_seed(0)
        w = torch.randn(48, 32, generator=g).to(dtype)
        x = torch.randn(3, 32, generator=g).to(dtype)
        return bool(torch.equal(packed_linear(x, pack(w)), F.linear(x, w)))
    except Exception:  # an op missing from this build
        return False


def pack(weight: torch.Tensor) -> torch.Tensor:
    """[out, in] weight -> oneDNN's layout for F.linear-like products."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1)


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


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
            continue  # its projections keep their plain weights (training, grad-enabled calls)
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and _packable(child.weight):
                setattr(parent, name, PackedLinear(child))
                n += 1
        if hasattr(parent, "packed_experts") and _packable(parent.w1):
            # experts keep [E, in, out] stacks; the packed copy is per expert, [out, in]
            parent.packed_experts = {
                p: [pack(w.t()) for w in getattr(parent, p)]
                for p in ("w1", "w2", "w3")
                if getattr(parent, p) is not None
            }
            n += sum(len(v) for v in parent.packed_experts.values())
    log.info("packed %d weights for oneDNN's CPU matmul", n)
    return n


def _packable(w: torch.Tensor) -> bool:
    return w.device.type == "cpu" and w.dtype == torch.bfloat16
