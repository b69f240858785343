"""RoPE apply, interleaved pairs (x_2i, x_2i+1), as in `model/rope.py`. One program per
(batch, position) row and block of heads; cos/sin are loaded once per row and broadcast over
heads. The backward is the inverse rotation (sin -> -sin) of the incoming gradient."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import next_pow2


@triton.jit
def _rope_kernel(X, COS, SIN, Y, T, H, P, SIGN: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # b * T + t
    h0 = tl.program_id(1) * BLOCK_H
    t = row % T
    h = h0 + tl.arange(0, BLOCK_H)[:, None]
    i = tl.arange(0, BLOCK_P)[None, :]
    mask = (h < H) & (i < P)
    base = row * H * 2 * P + h * 2 * P + 2 * i
    x1 = tl.load(X + base, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(X + base + 1, mask=mask, other=0.0).to(tl.float32)
    c = tl.load(COS + t * P + i, mask=i < P, other=0.0).to(tl.float32)
    s = tl.load(SIN + t * P + i, mask=i < P, other=0.0).to(tl.float32) * SIGN
    tl.store(Y + base, (x1 * c - x2 * s).to(Y.dtype.element_ty), mask=mask)
    tl.store(Y + base + 1, (x1 * s + x2 * c).to(Y.dtype.element_ty), mask=mask)


def _launch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: float) -> torch.Tensor:
    B, T, H, D = x.shape
    P = D // 2
    y = torch.empty_like(x)
    BLOCK_P = next_pow2(P)
    BLOCK_H = max(1, min(next_pow2(H), 4096 // BLOCK_P))
    grid = (B * T, triton.cdiv(H, BLOCK_H))
    if x.numel():
        _rope_kernel[grid](x, cos, sin, y, T, H, P, SIGN=sign, BLOCK_H=BLOCK_H, BLOCK_P=BLOCK_P, num_warps=4)
    return y


class _RoPE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        if x.dim() != 4 or x.shape[-1] % 2:
            raise ValueError(f"rope: x must be [B, T, H, D] with even D, got {tuple(x.shape)}")
        T, P = x.shape[1], x.shape[-1] // 2
        if cos.shape != (T, P) or sin.shape != (T, P):
            raise ValueError(f"rope: cos/sin must be [T={T}, D/2={P}], got {tuple(cos.shape)}, {tuple(sin.shape)}")
        cos, sin = cos.contiguous(), sin.contiguous()
        ctx.save_for_backward(cos, sin)
        return _launch(x.contiguous(), cos, sin, 1.0)

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        return _launch(dy.contiguous(), cos, sin, -1.0), None, None


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Triton RoPE; same contract as `reference.rope` (no grads for cos/sin: they are buffers)."""
    return _RoPE.apply(x, cos, sin)
