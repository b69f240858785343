"""QLoRA: the frozen base weights of the adapted layers stored in 4-bit NF4 (torchao),
dequantised in the forward, with the LoRA adapters (bf16/fp32) trained on top.

torchao's NF4 (Dettmers et al. 2023): blocks of `block_size` values scaled by their absmax,
each value the nearest of 16 normal-quantile levels (4 bits, two per byte), the per-block
scales themselves int8-quantised in blocks of `scaler_block_size` (double quantisation).
The NF4 tensor is kept outside the module's parameters and buffers: DeepSpeed and
`module.to(dtype)` would otherwise dequantise it (a dtype cast of an NF4Tensor dequantises)."""

from __future__ import annotations

import torch
from torch import nn

from .lora import LoRAError, LoRALinear, lora_modules

NF4_LEVELS = (
    -1.0,
    -0.6962,
    -0.5251,
    -0.3949,
    -0.2844,
    -0.1848,
    -0.0911,
    0.0,
    0.0796,
    0.1609,
    0.2461,
    0.3379,
    0.4407,
    0.5626,
    0.7230,
    1.0,
)


def to_nf4(weight: torch.Tensor, block_size: int = 64, scaler_block_size: int = 256):
    """torchao's NF4Tensor of `weight` (2-D, contiguous). The scaler block is shrunk to fit
    small tensors (torchao needs it to divide the number of blocks)."""
    try:
        from torchao.dtypes.nf4tensor import to_nf4 as _to_nf4
    except ImportError:  # torchao >= 0.15 moved it
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4 as _to_nf4
    n = weight.numel()
    if n % block_size:
        raise LoRAError(
            f"lora.nf4_block_size={block_size} does not divide a weight of {n} values (shape {tuple(weight.shape)})"
        )
    n_blocks = n // block_size
    scaler = min(scaler_block_size, n_blocks)
    while n_blocks % scaler:
        scaler -= 1
    return _to_nf4(weight.detach().contiguous(), block_size, scaler)


def nf4_nbytes(t) -> int:
    """Bytes an NF4Tensor really holds: packed 4-bit codes, int8 block scales, their
    scale factors and mean, and the 16-entry level table."""
    parts = (t.quantized_data, t.quantized_scalers, t.quantization_factor, t.scaler_mean, t.nf4)
    return sum(p.numel() * p.element_size() for p in parts)


@torch.no_grad()
def quantize_base_nf4(model: nn.Module, block_size: int = 64) -> dict:
    """Replace the frozen base weight of every LoRALinear by its NF4 form (in place). Returns
    the measured base-weight memory: {"nf4_bytes", "bf16_bytes", "ratio", "layers"}."""
    mods = lora_modules(model)
    if not mods:
        raise LoRAError("quantize_base_nf4: apply_lora first (QLoRA quantises the adapted layers' bases)")
    nf4_total = bf16_total = 0
    for m in mods.values():
        if m.nf4 is not None:
            raise LoRAError(f"{m.name}: the base weight is already NF4")
        if m.merged:
            raise LoRAError(f"{m.name}: unmerge the adapters before quantising the base")
        w = m.weight.detach().to(torch.bfloat16)
        m.nf4 = to_nf4(w, block_size)
        del m._parameters["weight"]
        m.register_parameter("weight", None)
        nf4_total += nf4_nbytes(m.nf4)
        bf16_total += w.numel() * 2
    return {"nf4_bytes": nf4_total, "bf16_bytes": bf16_total, "ratio": nf4_total / bf16_total, "layers": len(mods)}


def base_weight_bytes(model: nn.Module) -> dict:
    """Memory of the adapted layers' base weights as stored now, against bf16."""
    stored = bf16 = 0
    for m in lora_modules(model).values():
        if m.nf4 is not None:
            stored += nf4_nbytes(m.nf4)
            bf16 += m.nf4.numel() * 2
        else:
            stored += m.weight.numel() * m.weight.element_size()
            bf16 += m.weight.numel() * 2
    return {"stored_bytes": stored, "bf16_bytes": bf16, "ratio": stored / max(bf16, 1)}


def reference_nf4_roundtrip(weight: torch.Tensor, block_size: int = 64) -> torch.Tensor:
    """Brute-force NF4 without double quantisation: each block scaled by its absmax and each
    value snapped to the nearest level. A reference for torchao's result (which differs only
    by its int8-quantised block scales)."""
    levels = torch.tensor(NF4_LEVELS, dtype=torch.float32)
    blocks = weight.detach().float().reshape(-1, block_size)
    scale = blocks.abs().amax(dim=1, keepdim=True).clamp_min(1e-12)
    idx = ((blocks / scale).unsqueeze(-1) - levels).abs().argmin(dim=-1)
    return (levels[idx] * scale).reshape(weight.shape)


__all__ = [
    "LoRALinear",
    "NF4_LEVELS",
    "base_weight_bytes",
    "nf4_nbytes",
    "quantize_base_nf4",
    "reference_nf4_roundtrip",
    "to_nf4",
]
