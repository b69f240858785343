"""Throughput, model FLOPs utilisation and MoE load statistics."""

from __future__ import annotations

import functools
import time

import torch

from aion_train.config import ModelConfig
from aion_train.model.transformer import is_moe_layer

# dense bf16 peak FLOP/s per GPU (no sparsity), by device-name substring
GPU_PEAK_BF16 = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10": 125e12,
    "V100": 125e12,
    "L4": 121e12,
    "4090": 165e12,
    "MI300X": 1307e12,
}


def active_params(cfg: ModelConfig) -> dict:
    """Parameters a token passes through (experts counted top_k times, not n_experts)."""
    d, hd = cfg.d_model, cfg.d_model // cfg.n_heads
    kv = cfg.n_kv_heads or cfg.n_heads
    attn = d * cfg.n_heads * hd * 2 + d * kv * hd * 2
    glu = 3 if cfg.activation == "swiglu" else 2
    ffn_active = 0
    total_ffn = 0
    for layer in range(cfg.n_layers):
        if is_moe_layer(cfg, layer):
            m = cfg.moe
            per_expert = glu * d * m.d_ff_expert
            shared = glu * d * m.shared_expert_d_ff
            ffn_active += m.top_k * per_expert + shared + d * m.n_experts
            total_ffn += m.n_experts * per_expert + shared + d * m.n_experts
        else:
            ffn_active += glu * d * cfg.d_ff
            total_ffn += glu * d * cfg.d_ff
    head = d * cfg.vocab_size
    return {
        "active": cfg.n_layers * attn + ffn_active + head,
        "total": cfg.n_layers * attn + total_ffn + head + (0 if cfg.tie_embeddings else d * cfg.vocab_size),
    }


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 * active matmul params + 6 * n_layers * seq_len * d_model
    for the attention scores and values (causal: half of 12 L T d)."""
    return 6.0 * active_params(cfg)["active"] + 6.0 * cfg.n_layers * seq_len * cfg.d_model


@functools.cache
def peak_flops(device_type: str, dtype: torch.dtype = torch.float32) -> float:
    """GPU: the vendor's dense bf16 peak from the table. CPU: the measured matmul rate, the
    better of `dtype`'s and fp32's (a CPU without native bf16 emulates bf16 GEMMs several times
    slower than fp32, and a bf16 step's kernels need not be the emulated ones)."""
    if device_type == "cuda":
        name = torch.cuda.get_device_name()
        for key, val in GPU_PEAK_BF16.items():
            if key in name:
                return val if dtype in (torch.bfloat16, torch.float16) else val / 2
        return 100e12
    rate = _cpu_matmul_rate(dtype)
    return rate if dtype == torch.float32 else max(rate, _cpu_matmul_rate(torch.float32))


def _cpu_matmul_rate(dtype: torch.dtype) -> float:
    n = 1024
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < 0.3:
        a @ b
        reps += 1
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def expert_load(model) -> dict[str, float]:
    """Per MoE layer: max/mean of the tokens per expert (1.0 = perfectly balanced) and the
    number of dropped token copies, from the last forward."""
    out = {}
    for i, layer in enumerate(model.moe_layers() if hasattr(model, "moe_layers") else []):
        s = layer.last_stats
        if not s:
            continue
        counts = s["tokens_per_expert"].float()
        out[f"moe/layer{i}_load_max_over_mean"] = (counts.max() / counts.mean().clamp(min=1e-9)).item()
        out[f"moe/layer{i}_dropped"] = float(s["dropped"])
    return out
