"""MoE token permute (gather rows by index) and un-permute / combine (gate-weighted sum of each
token's expert outputs), matching `model/moe/token_dispatcher.py`.

The scatter-add side is computed as a *gather*: the kept copies are sorted by token (stable,
so copies are summed in their expert order, deterministically) and one program per (token,
block of columns) sums that token's copies in fp32. No atomics, so it is deterministic and
also runs in the Triton interpreter for bf16.

    permute:    fwd out[m] = x[idx[m]]                    bwd dx[t] = sum_{idx[m]=t} dy[m]
    unpermute:  fwd out[t] = sum_{idx[m]=t} g[m] * e[m]   bwd de[m] = g[m] * dout[idx[m]],
                                                              dg[m] = <e[m], dout[idx[m]]>
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import block_for


@triton.jit
def _gather_rows(X, IDX, Y, D, BLOCK_D: tl.constexpr):
    m = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = cols < D
    src = tl.load(IDX + m).to(tl.int64)
    v = tl.load(X + src * D + cols, mask=mask, other=0.0)
    tl.store(Y + m * D + cols, v.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _segment_sum_rows(SRC, ORDER, OFFSETS, GATES, OUT, D, HAS_GATES: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = cols < D
    start = tl.load(OFFSETS + t)
    end = tl.load(OFFSETS + t + 1)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for j in range(start, end):
        m = tl.load(ORDER + j).to(tl.int64)
        v = tl.load(SRC + m * D + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_GATES:
            v = v * tl.load(GATES + m).to(tl.float32)
        acc += v
    tl.store(OUT + t * D + cols, acc.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _unpermute_bwd(
    DOUT, SRC, IDX, GATES, DSRC, DGATES, D, HAS_GATES: tl.constexpr, GATE_GRAD: tl.constexpr, BLOCK_D: tl.constexpr
):
    m = tl.program_id(0).to(tl.int64)
    t = tl.load(IDX + m).to(tl.int64)
    g = 1.0
    if HAS_GATES:
        g = tl.load(GATES + m).to(tl.float32)
    dot = tl.zeros([BLOCK_D], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        mask = cols < D
        dout = tl.load(DOUT + t * D + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(DSRC + m * D + cols, (dout * g).to(DSRC.dtype.element_ty), mask=mask)
        if GATE_GRAD:
            e = tl.load(SRC + m * D + cols, mask=mask, other=0.0).to(tl.float32)
            dot += e * dout
    if GATE_GRAD:
        tl.store(DGATES + m, tl.sum(dot, axis=0))


def token_inverse(token_index: torch.Tensor, n_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(order, offsets): positions of the copies sorted by token (stable), and per-token
    offsets [n_tokens + 1] into `order`. Deterministic (sort + searchsorted, no bincount)."""
    sorted_tok, order = torch.sort(token_index, stable=True)
    bounds = torch.arange(n_tokens + 1, device=token_index.device, dtype=sorted_tok.dtype)
    offsets = torch.searchsorted(sorted_tok, bounds)
    return order, offsets


def _segment_sum(src: torch.Tensor, order, offsets, gates, n_tokens: int) -> torch.Tensor:
    D = src.shape[1]
    out = torch.empty(n_tokens, D, dtype=src.dtype, device=src.device)
    BLOCK_D = block_for(D, 1024, 256)
    if n_tokens and D:
        grid = (n_tokens, triton.cdiv(D, BLOCK_D))
        _segment_sum_rows[grid](
            src,
            order,
            offsets,
            gates if gates is not None else src,
            out,
            D,
            HAS_GATES=gates is not None,
            BLOCK_D=BLOCK_D,
            num_warps=4,
        )
    return out


def _check(rows: torch.Tensor, token_index: torch.Tensor, what: str):
    if rows.dim() != 2 or token_index.dim() != 1:
        raise ValueError(
            f"{what}: expected [rows, d] and a 1-D index, got {tuple(rows.shape)}, {tuple(token_index.shape)}"
        )


class _Permute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, token_index):
        _check(x, token_index, "moe_permute")
        x = x.contiguous()
        idx = token_index.contiguous()
        M, D = idx.shape[0], x.shape[1]
        y = torch.empty(M, D, dtype=x.dtype, device=x.device)
        BLOCK_D = block_for(D, 1024, 256)
        if M and D:
            _gather_rows[(M, triton.cdiv(D, BLOCK_D))](x, idx, y, D, BLOCK_D=BLOCK_D, num_warps=4)
        ctx.save_for_backward(idx)
        ctx.n_tokens = x.shape[0]
        return y

    @staticmethod
    def backward(ctx, dy):
        (idx,) = ctx.saved_tensors
        order, offsets = token_inverse(idx, ctx.n_tokens)
        return _segment_sum(dy.contiguous(), order, offsets, None, ctx.n_tokens), None


class _Unpermute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, expert_out, token_index, gates, n_tokens):
        _check(expert_out, token_index, "moe_unpermute")
        e = expert_out.contiguous()
        idx = token_index.contiguous()
        g = gates.contiguous() if gates is not None else None
        order, offsets = token_inverse(idx, n_tokens)
        out = _segment_sum(e, order, offsets, g, n_tokens)
        ctx.has_gates = g is not None
        ctx.save_for_backward(e, idx, g if g is not None else idx)
        return out

    @staticmethod
    def backward(ctx, dout):
        e, idx, g = ctx.saved_tensors
        if not ctx.has_gates:
            g = None
        M, D = e.shape
        gate_grad = g is not None and ctx.needs_input_grad[2]
        de = torch.empty_like(e)
        dg = torch.empty(M, dtype=torch.float32, device=e.device) if gate_grad else None
        BLOCK_D = block_for(D, 1024, 256)
        if M:
            _unpermute_bwd[(M,)](
                dout.contiguous(),
                e,
                idx,
                g if g is not None else e,
                de,
                dg if dg is not None else e,
                D,
                HAS_GATES=g is not None,
                GATE_GRAD=gate_grad,
                BLOCK_D=BLOCK_D,
                num_warps=4,
            )
        return de, None, (dg.to(g.dtype) if gate_grad else None), None


def moe_permute(x: torch.Tensor, token_index: torch.Tensor) -> torch.Tensor:
    """Triton gather x[token_index]; same contract as `reference.moe_permute`."""
    return _Permute.apply(x, token_index)


def moe_unpermute(
    expert_out: torch.Tensor, token_index: torch.Tensor, gates: torch.Tensor | None, n_tokens: int
) -> torch.Tensor:
    """Triton gate-weighted combine; same contract as `reference.moe_unpermute`."""
    return _Unpermute.apply(expert_out, token_index, gates, int(n_tokens))
