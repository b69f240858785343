"""Fused RMSNorm: one program per row in the forward (saves rstd [N] fp32); the backward
recomputes x_hat from x and rstd, and accumulates the weight grad in per-program fp32
partials ([G, D], reduced by torch) instead of atomics, so it is deterministic."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import n_programs_for_reduction, next_pow2, warps_for

MAX_FUSED_BYTES = 65536  # one row must fit in one block


@triton.jit
def _rms_norm_fwd(X, W, Y, RSTD, D, eps, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    x = tl.load(X + row * D + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / D + eps)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    y = x * rstd * w
    tl.store(Y + row * D + cols, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + row, rstd)


@triton.jit
def _rms_norm_bwd(DY, X, W, RSTD, DX, DW_PART, N, D, G, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    pid64 = pid.to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_D], dtype=tl.float32)
    for r in range(pid, N, G):
        row = pid64 + (r - pid)  # int64 row (range yields python ints in the interpreter)
        x = tl.load(X + row * D + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * D + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row)
        xhat = x * rstd
        wdy = dy * w
        c = tl.sum(xhat * wdy, axis=0) / D
        dx = (wdy - xhat * c) * rstd
        tl.store(DX + row * D + cols, dx.to(DX.dtype.element_ty), mask=mask)
        dw += dy * xhat
    tl.store(DW_PART + pid * D + cols, dw, mask=mask)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        shape = x.shape
        D = shape[-1]
        if weight.shape != (D,):
            raise ValueError(f"rms_norm: weight shape {tuple(weight.shape)} != ({D},)")
        if D * x.element_size() > MAX_FUSED_BYTES:
            raise ValueError(f"rms_norm: row of {D} elements does not fit one block")
        x2 = x.reshape(-1, D).contiguous()
        w = weight.contiguous()
        N = x2.shape[0]
        y = torch.empty_like(x2)
        rstd = torch.empty(N, dtype=torch.float32, device=x.device)
        BLOCK_D = next_pow2(D)
        if N:
            _rms_norm_fwd[(N,)](x2, w, y, rstd, D, eps, BLOCK_D=BLOCK_D, num_warps=warps_for(BLOCK_D))
        ctx.save_for_backward(x2, w, rstd)
        ctx.shape = shape
        return y.reshape(shape)

    @staticmethod
    def backward(ctx, dy):
        x2, w, rstd = ctx.saved_tensors
        N, D = x2.shape
        dy2 = dy.reshape(N, D).contiguous()
        dx = torch.empty_like(x2)
        G = n_programs_for_reduction(N, x2.device)
        dw_part = torch.zeros(G, D, dtype=torch.float32, device=x2.device)
        BLOCK_D = next_pow2(D)
        if N:
            _rms_norm_bwd[(G,)](dy2, x2, w, rstd, dx, dw_part, N, D, G, BLOCK_D=BLOCK_D, num_warps=warps_for(BLOCK_D))
        dw = dw_part.sum(0).to(w.dtype) if ctx.needs_input_grad[1] else None
        return dx.reshape(ctx.shape), dw, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Triton RMSNorm; same contract as `reference.rms_norm`."""
    return _RMSNorm.apply(x, weight, float(eps))
