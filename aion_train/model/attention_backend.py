"""One interface for the attention kernel: flash-attn on CUDA when installed, else torch SDPA
(which itself runs a FlashAttention-2 kernel on CUDA). Inputs are [B, T, H, D]."""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


# torch's CPU flash kernel is ~2.7x slower in bf16 than in fp32 (forward + backward, measured
# on AVX512-BF16; docs/notes.md), so on CPU bf16/fp16 inputs are attended in fp32, which is also
# the more exact result. Autograd then keeps fp32 q, k, v and output (2x the bf16 bytes).
CPU_ATTENTION_IN_FP32 = True


@functools.lru_cache(maxsize=None)
def _flash_attn_func():
    try:
        from flash_attn import flash_attn_func  # optional GPU extra
        return flash_attn_func
    except Exception:
        return None


def resolve_backend(name: str, device: torch.device, dtype: torch.dtype) -> str:
    if name == "sdpa":
        return "sdpa"
    flash_ok = (device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)
                and _flash_attn_func() is not None)
    if name == "flash" and not flash_ok:
        return "sdpa"  # automatic fallback: flash-attn needs CUDA, fp16/bf16 and the package
    return "flash" if flash_ok else "sdpa"


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
              backend: str = "auto", attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + mask) v with grouped KV heads. Returns [B, T, Hq, D].

    `causal` with Tq < Tk (decoding with a KV cache) aligns the mask to the end of the keys.
    `attn_mask` (boolean, broadcastable to [B, Hq, Tq, Tk], True = may attend) replaces the
    causal mask, e.g. the block-diagonal mask of packed rows; it runs through SDPA."""
    which = "sdpa" if attn_mask is not None else resolve_backend(backend, q.device, q.dtype)
    if which == "flash":
        return _flash_attn_func()(q, k, v, causal=causal)
    out_dtype = q.dtype
    if CPU_ATTENTION_IN_FP32 and q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16):
        q, k, v = q.float(), k.float(), v.float()
    gqa = q.shape[2] != k.shape[2]     # grouped KV heads: SDPA maps q head i to kv head i // group
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    tq, tk = q.shape[2], k.shape[2]
    if attn_mask is not None:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=gqa)
    elif causal and tq == tk:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    elif causal and tq > 1:
        mask = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(diagonal=tk - tq)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    else:
        out = F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
    return out.transpose(1, 2).to(out_dtype)
