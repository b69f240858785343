"""LM head + cross-entropy in torch without storing the logits (the CPU path of the
`linear_cross_entropy` kernel; the Triton one chunks over the vocabulary on GPU).

Rows are taken in chunks of at most 32 MB of fp32 logits (docs/notes.md, issue 18: smaller
chunks run the head's GEMMs at a few dozen rows and add the [V, H] weight gradient once per
chunk; in bf16/fp16 the gradients of BLOCK_CHUNKS chunks are kept, 64 MB at most, see
`_head_grads`). When a gradient will be needed, the
forward pass also forms d(loss_row)/d(logits) = softmax - onehot for the chunk and turns it at
once into the hidden-state and weight gradients (as Liger-Kernel's fused linear cross-entropy
does): no [N, V] logits kept, no separate log-softmax backward, no [N, V] zero-filled gradient. Those gradients are exact for any upstream gradient
that is the same on every counted row (a mean or a sum over tokens, what the trainer uses);
any other upstream gradient takes a second chunked pass in backward that recomputes the
logits, so the result is exact whatever the caller does with the per-row losses.
"""

from __future__ import annotations

import torch

CHUNK_LOGITS = 1 << 23  # fp32 logits per chunk (32 MB)
MIN_CHUNK_ROWS = 64


def _chunk_rows(n_rows: int, vocab: int) -> int:
    return max(1, min(n_rows, max(MIN_CHUNK_ROWS, CHUNK_LOGITS // max(vocab, 1))))


def _chunk_loss(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor):
    """Per-row loss logsumexp(logits) - logits[label] (fp32) of one chunk; ignored rows: 0."""
    safe = labels.masked_fill(~valid, 0).unsqueeze(1)
    logits = (h @ weight.t()).float()
    return (torch.logsumexp(logits, dim=-1) - logits.gather(1, safe).squeeze(1)) * valid


# below this probability -log(p) leaves fp32's normal range; such rows are recomputed exactly
_TINY_P = 1e-30


def _chunk_grad(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor):
    """(per-row loss, d loss_row / d logits = softmax - onehot) of one chunk; ignored rows: 0, 0.

    One fp32 softmax pass gives both: loss = -log p[label] (rows whose p[label] is too small
    for that take logsumexp - logit instead), and the gradient is p with 1 taken off at the
    label. (log_softmax, exp, mask and cast took five passes over the chunk's logits.)"""
    safe = labels.masked_fill(~valid, 0).unsqueeze(1)
    logits = h @ weight.t()
    p = torch.softmax(logits, dim=-1, dtype=torch.float32)
    p_label = p.gather(1, safe).squeeze(1)
    loss = -torch.log(p_label)
    tiny = (p_label < _TINY_P) & valid
    if bool(tiny.any()):
        rows = tiny.nonzero().squeeze(1)
        exact = logits[rows].float()
        loss[rows] = torch.logsumexp(exact, dim=-1) - exact.gather(1, safe[rows]).squeeze(1)
    loss = loss * valid
    p.scatter_add_(1, safe, torch.full_like(safe, -1, dtype=p.dtype))
    if not bool(valid.all()):
        p.index_fill_(0, (~valid).nonzero().squeeze(1), 0.0)
    return loss, p


BLOCK_CHUNKS = 4  # low precision: chunks whose softmax gradients form the weight gradient in one GEMM


def _head_grads(h: torch.Tensor, weight: torch.Tensor, y: torch.Tensor, valid: torch.Tensor, row_scale=None):
    """(per-row loss fp32, dh like h, dw fp32 like weight) over row chunks; `row_scale` [N]
    (optional) multiplies each row's d loss / d logits.

    dh = p @ weight per chunk, in the hidden dtype. fp32: dw (+)= p^T @ h per chunk, in place
    (addmm_). bf16/fp16 weights: both products in the weights' dtype (fp32 accumulation inside
    the GEMM, as F.linear's backward does; 2x the fp32 GEMM rate on AVX512-BF16); the chunks'
    p are kept in one low-precision buffer of BLOCK_CHUNKS chunks and dw is formed once per
    block (a GEMM over the block's rows, summed into fp32): adding a [V, H] product into the
    fp32 gradient after every chunk cost ~20 ms per chunk at V 32000, H 512 (docs/notes.md)."""
    n = h.shape[0]
    rows = _chunk_rows(n, weight.shape[0])
    loss = h.new_empty(n, dtype=torch.float32)
    dh = torch.empty_like(h)
    dw = (torch.empty_like if n else torch.zeros_like)(weight, dtype=torch.float32)
    low = weight.dtype != torch.float32 and h.dtype == weight.dtype
    block_rows = rows * BLOCK_CHUNKS if low else rows
    buf = h.new_empty(min(n, block_rows), weight.shape[0], dtype=weight.dtype) if low and n else None
    for b0 in range(0, n, block_rows):
        b1 = min(n, b0 + block_rows)
        for s in range(b0, b1, rows):
            e = min(b1, s + rows)
            loss[s:e], p = _chunk_grad(h[s:e], weight, y[s:e], valid[s:e])
            if row_scale is not None:
                p.mul_(row_scale[s:e].unsqueeze(1))
            if low:
                pw = buf[s - b0 : e - b0]
                pw.copy_(p)
                torch.mm(pw, weight, out=dh[s:e])
            else:
                pw = p.to(weight.dtype)
                if dh.dtype == weight.dtype:
                    torch.mm(pw, weight, out=dh[s:e])
                else:
                    dh[s:e].copy_(pw @ weight)
                if s == 0:
                    torch.mm(p.t(), h[s:e].float(), out=dw)
                else:
                    dw.addmm_(p.t(), h[s:e].float())
        if low:
            block = buf[: b1 - b0].t() @ h[b0:b1]
            if b0 == 0:
                dw.copy_(block)
            else:
                dw.add_(block)
    return loss, dh, dw


def _loss_only(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int):
    h, y = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    rows = _chunk_rows(h.shape[0], weight.shape[0])
    loss = h.new_empty(h.shape[0], dtype=torch.float32)
    for s in range(0, h.shape[0], rows):
        yc = y[s : s + rows]
        loss[s : s + rows] = _chunk_loss(h[s : s + rows], weight, yc, yc != ignore_index)
    return loss.reshape(labels.shape)


class LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index: int):
        h = hidden.reshape(-1, hidden.shape[-1])
        y = labels.reshape(-1)
        loss, dh, dw = _head_grads(h, weight, y, y != ignore_index)
        ctx.save_for_backward(hidden, weight, labels, dh, dw)
        ctx.ignore_index = ignore_index
        return loss.reshape(labels.shape)

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, labels, dh, dw = ctx.saved_tensors
        g = grad.reshape(-1).float()
        y = labels.reshape(-1)
        valid = y != ctx.ignore_index
        counted = g[valid]
        if counted.numel() == 0 or bool((counted == counted[0]).all()):
            scale = counted[0] if counted.numel() else g.new_zeros(())
            grad_h = (dh * scale.to(dh.dtype)).reshape(hidden.shape)
            grad_w = (dw * scale).to(weight.dtype)
            return grad_h, grad_w, None, None
        # a per-row weighting: recompute the chunks and scale each row
        h = hidden.reshape(-1, hidden.shape[-1])
        _, grad_h, grad_w = _head_grads(h, weight, y, valid, row_scale=g)
        return grad_h.reshape(hidden.shape), grad_w.to(weight.dtype), None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Per-row cross_entropy(hidden @ weight^T, labels) in fp32 ([...] like labels; 0 where the
    label is ignore_index). hidden: [..., H]; weight: [V, H]. chunk_size (columns of V) is only
    used by the Triton implementation. Without autograd (no_grad, or no input needing a
    gradient: evaluation) only the losses are computed."""
    if not (torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)):
        return _loss_only(hidden, weight, labels, int(ignore_index))
    return LinearCrossEntropy.apply(hidden, weight, labels, int(ignore_index))
