"""LM head + cross-entropy in torch without storing the logits (the CPU path of the
`linear_cross_entropy` kernel; the Triton one chunks over the vocabulary on GPU).

Rows are taken in chunks of at most 32 MB of fp32 logits (docs/notes.md, issue 18: smaller
chunks run the head's GEMMs at a few dozen rows and add the [V, H] weight gradient once per
chunk). When a gradient will be needed, the
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


def _add_chunk_grads(
    p: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, dh_out: torch.Tensor, dw_acc: torch.Tensor, first: bool
) -> None:
    """dh_out = p @ weight (in the hidden dtype); dw_acc (+)= p^T @ h (fp32; `first` writes it).

    With bf16/fp16 weights both products run in the weights' dtype (fp32 accumulation inside
    the GEMM, as F.linear's backward does; 2x the fp32 GEMM rate on AVX512-BF16), and the
    chunks' weight gradients are summed in fp32."""
    pw = p.to(weight.dtype)
    if dh_out.dtype == weight.dtype:
        torch.mm(pw, weight, out=dh_out)
    else:
        dh_out.copy_(pw @ weight)
    if weight.dtype != torch.float32 and h.dtype == weight.dtype:
        chunk = pw.t() @ h
        if first:
            dw_acc.copy_(chunk)
        else:
            dw_acc.add_(chunk)
    elif first:
        torch.mm(p.t(), h.float(), out=dw_acc)
    else:
        dw_acc.addmm_(p.t(), h.float())


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
        n, vocab = h.shape[0], weight.shape[0]
        rows = _chunk_rows(n, vocab)
        loss = h.new_empty(n, dtype=torch.float32)
        dh = torch.empty_like(h)
        dw = (torch.empty_like if n else torch.zeros_like)(weight, dtype=torch.float32)
        for s in range(0, n, rows):
            hc, yc = h[s : s + rows], y[s : s + rows]
            loss[s : s + rows], p = _chunk_grad(hc, weight, yc, yc != ignore_index)
            _add_chunk_grads(p, hc, weight, dh[s : s + rows], dw, first=s == 0)
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
        grad_h = torch.empty_like(h)
        grad_w = (torch.empty_like if h.shape[0] else torch.zeros_like)(weight, dtype=torch.float32)
        rows = _chunk_rows(h.shape[0], weight.shape[0])
        for s in range(0, h.shape[0], rows):
            hc = h[s : s + rows]
            _, p = _chunk_grad(hc, weight, y[s : s + rows], valid[s : s + rows])
            _add_chunk_grads(
                p.mul_(g[s : s + rows].unsqueeze(1)), hc, weight, grad_h[s : s + rows], grad_w, first=s == 0
            )
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
