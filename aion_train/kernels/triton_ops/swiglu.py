"""SwiGLU activation silu(a) * b, elementwise in fp32 registers. The backward recomputes
sigmoid(a) rather than saving the activation:
    da = dy * b * s * (1 + a * (1 - s)),  db = dy * a * s,  s = sigmoid(a)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import block_for


@triton.jit
def _swiglu_fwd(A, B, Y, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    a = tl.load(A + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + offs, mask=mask, other=0.0).to(tl.float32)
    y = a * tl.sigmoid(a) * b
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd(DY, A, B, DA, DB, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    a = tl.load(A + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(a)
    da = dy * b * s * (1.0 + a * (1.0 - s))
    db = dy * a * s
    tl.store(DA + offs, da.to(DA.dtype.element_ty), mask=mask)
    tl.store(DB + offs, db.to(DB.dtype.element_ty), mask=mask)


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b):
        if a.shape != b.shape:
            raise ValueError(f"swiglu: gate {tuple(a.shape)} and up {tuple(b.shape)} differ")
        out_dtype = torch.result_type(a, b)
        a, b = a.contiguous(), b.contiguous()
        y = torch.empty(a.shape, dtype=out_dtype, device=a.device)
        n = a.numel()
        BLOCK = block_for(n, 1024, 1024)
        if n:
            _swiglu_fwd[(triton.cdiv(n, BLOCK),)](a, b, y, n, BLOCK=BLOCK, num_warps=4)
        ctx.save_for_backward(a, b)
        return y

    @staticmethod
    def backward(ctx, dy):
        a, b = ctx.saved_tensors
        dy = dy.contiguous()
        da, db = torch.empty_like(a), torch.empty_like(b)
        n = a.numel()
        BLOCK = block_for(n, 1024, 1024)
        if n:
            _swiglu_bwd[(triton.cdiv(n, BLOCK),)](dy, a, b, da, db, n, BLOCK=BLOCK, num_warps=4)
        return da, db


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Triton silu(gate) * up; same contract as `reference.swiglu`."""
    return _SwiGLU.apply(gate, up)
