"""Cross-entropy over [N, V] logits in blocks over V, never materialising fp32 logits or
softmax: the forward streams each row once with an online logsumexp (running max m and
rescaled sum s) and picks the target logit on the way; it saves only lse [N] fp32. The
backward recomputes softmax block by block, (exp(x - lse) - onehot) * dloss, written in the
logits' dtype, with one program per (row, block of V).

`linear_cross_entropy` fuses the LM head: hidden @ W^T is computed in chunks of V columns, each
chunk reduced to (m, s, target) partials by the same kernel and merged online; the backward
recomputes each chunk's logits, turns them into the gradient in place and feeds two matmuls
(dhidden += dlogits_c @ W_c, dW_c = dlogits_c^T @ hidden). Peak extra memory is one [N, chunk]
block instead of the [N, V] logits plus their fp32 copy and softmax.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import block_for


@triton.jit
def _ce_fwd_partial(LOGITS, LABELS, M_OUT, S_OUT, TGT_OUT, V, stride_row, label_offset, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    local = tl.load(LABELS + row).to(tl.int64) - label_offset
    base = LOGITS + row * stride_row
    m = float("-inf")
    s = 0.0
    tgt = 0.0
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        mask = cols < V
        x = tl.load(base + cols, mask=mask, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
        tgt += tl.sum(tl.where(mask & (cols == local), x, 0.0), axis=0)
    tl.store(M_OUT + row, m)
    tl.store(S_OUT + row, s)
    tl.store(TGT_OUT + row, tgt)


@triton.jit
def _ce_bwd(LOGITS, LABELS, LSE, GSCALE, DLOGITS, V, stride_row, stride_drow, label_offset, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    mask = cols < V
    x = tl.load(LOGITS + row * stride_row + cols, mask=mask, other=0.0).to(tl.float32)
    lse = tl.load(LSE + row)
    g = tl.load(GSCALE + row)
    local = tl.load(LABELS + row).to(tl.int64) - label_offset
    p = tl.exp(x - lse)
    p = tl.where(cols == local, p - 1.0, p)
    tl.store(DLOGITS + row * stride_drow + cols, (p * g).to(DLOGITS.dtype.element_ty), mask=mask)


def _block_v(V: int) -> int:
    return block_for(V, 4096, 256)


def _partials(logits2: torch.Tensor, labels: torch.Tensor, label_offset: int):
    N, V = logits2.shape
    m = torch.empty(N, dtype=torch.float32, device=logits2.device)
    s = torch.empty_like(m)
    tgt = torch.empty_like(m)
    if N:
        BLOCK_V = _block_v(V)
        _ce_fwd_partial[(N,)](
            logits2,
            labels,
            m,
            s,
            tgt,
            V,
            logits2.stride(0),
            label_offset,
            BLOCK_V=BLOCK_V,
            num_warps=8 if BLOCK_V >= 2048 else 4,
        )
    return m, s, tgt


def _grad_into(out: torch.Tensor, logits2: torch.Tensor, labels, lse, gscale, label_offset: int):
    """out <- (softmax(logits2) - onehot(labels - label_offset)) * gscale[:, None]; out may be logits2."""
    N, V = logits2.shape
    if N and V:
        BLOCK_V = _block_v(V)
        _ce_bwd[(N, triton.cdiv(V, BLOCK_V))](
            logits2,
            labels,
            lse,
            gscale,
            out,
            V,
            logits2.stride(0),
            out.stride(0),
            label_offset,
            BLOCK_V=BLOCK_V,
            num_warps=8 if BLOCK_V >= 2048 else 4,
        )
    return out


def _rows(t: torch.Tensor) -> torch.Tensor:
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, ignore_index):
        logits2 = _rows(logits)
        lab = labels.reshape(-1).contiguous()
        if lab.shape[0] != logits2.shape[0]:
            raise ValueError(f"cross_entropy: {lab.shape[0]} labels for {logits2.shape[0]} rows")
        m, s, tgt = _partials(logits2, lab, 0)
        lse = m + torch.log(s)
        valid = lab != ignore_index
        loss = torch.where(valid, lse - tgt, torch.zeros_like(lse))
        ctx.save_for_backward(logits2, lab, lse, valid)
        ctx.logits_shape = logits.shape
        return loss.reshape(labels.shape)

    @staticmethod
    def backward(ctx, dloss):
        logits2, lab, lse, valid = ctx.saved_tensors
        g = torch.where(valid, dloss.reshape(-1).float(), torch.zeros_like(lse)).contiguous()
        dlogits = torch.empty(logits2.shape, dtype=logits2.dtype, device=logits2.device)
        _grad_into(dlogits, logits2, lab, lse, g, 0)
        return dlogits.reshape(ctx.logits_shape), None, None


def default_chunk(n_rows: int, vocab: int) -> int:
    """Columns per chunk: about 2^26 logits per chunk, at least 1024 (matmul efficiency)."""
    c = max(1024, (1 << 26) // max(n_rows, 1))
    return min(vocab, ((c + 127) // 128) * 128)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, chunk_size):
        h2 = _rows(hidden).contiguous()
        lab = labels.reshape(-1).contiguous()
        N, V = h2.shape[0], weight.shape[0]
        if weight.dim() != 2 or weight.shape[1] != h2.shape[1]:
            raise ValueError(f"linear_cross_entropy: weight {tuple(weight.shape)} vs hidden {tuple(hidden.shape)}")
        C = int(chunk_size) if chunk_size else default_chunk(N, V)
        m = torch.full((N,), float("-inf"), dtype=torch.float32, device=h2.device)
        s = torch.zeros(N, dtype=torch.float32, device=h2.device)
        tgt = torch.zeros_like(s)
        for c0 in range(0, V, C):
            logits_c = h2 @ weight[c0 : c0 + C].t()
            m_c, s_c, t_c = _partials(logits_c, lab, c0)
            m_new = torch.maximum(m, m_c)
            s = s * torch.exp(m - m_new) + s_c * torch.exp(m_c - m_new)
            m = m_new
            tgt += t_c
            del logits_c
        lse = m + torch.log(s)
        valid = lab != ignore_index
        loss = torch.where(valid, lse - tgt, torch.zeros_like(lse))
        ctx.save_for_backward(h2, weight, lab, lse, valid)
        ctx.chunk, ctx.hidden_shape = C, hidden.shape
        return loss.reshape(labels.shape)

    @staticmethod
    def backward(ctx, dloss):
        h2, weight, lab, lse, valid = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        g = torch.where(valid, dloss.reshape(-1).float(), torch.zeros_like(lse)).contiguous()
        V, C = weight.shape[0], ctx.chunk
        dh = torch.zeros(h2.shape, dtype=torch.float32, device=h2.device) if need_h else None
        dw = torch.empty_like(weight) if need_w else None
        for c0 in range(0, V, C):
            w_c = weight[c0 : c0 + C]
            logits_c = h2 @ w_c.t()
            _grad_into(logits_c, logits_c, lab, lse, g, c0)  # in place: logits_c is now dlogits_c
            if need_h:
                dh += (logits_c @ w_c).float()
            if need_w:
                dw[c0 : c0 + C] = logits_c.t() @ h2
            del logits_c
        dh = dh.to(h2.dtype).reshape(ctx.hidden_shape) if need_h else None
        return dh, dw, None, None, None


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Triton blocked cross-entropy; same contract as `reference.cross_entropy` (fp32 per-row loss)."""
    return _CrossEntropy.apply(logits, labels, int(ignore_index))


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """LM head + cross-entropy chunked over V; same contract as `reference.linear_cross_entropy`."""
    return _LinearCrossEntropy.apply(hidden, weight, labels, int(ignore_index), chunk_size)
