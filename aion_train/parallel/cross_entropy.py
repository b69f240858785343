"""Vocab-parallel cross-entropy (Megatron): the loss from vocab-sharded logits without ever
gathering the full [N, V] logits. Three all-reduces of [N]-sized tensors: max, target logit,
sum of exponentials."""

from __future__ import annotations

import torch
import torch.distributed as dist

from .collectives import group_size


class _VocabParallelCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, vocab_start, group):
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()
        logits_max = logits.max(dim=-1).values
        dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - logits_max.unsqueeze(-1)
        vocab_local = logits.shape[-1]
        outside = (labels < vocab_start) | (labels >= vocab_start + vocab_local)
        local = (labels - vocab_start).masked_fill(outside, 0)
        target = shifted.gather(-1, local.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)
        dist.all_reduce(target, group=group)
        exp = shifted.exp()
        sum_exp = exp.sum(dim=-1)
        dist.all_reduce(sum_exp, group=group)
        loss = sum_exp.log() - target
        softmax = exp / sum_exp.unsqueeze(-1)
        ctx.save_for_backward(softmax, local, outside)
        return loss

    @staticmethod
    def backward(ctx, g):
        softmax, local, outside = ctx.saved_tensors
        grad = softmax
        onehot = torch.zeros_like(grad).scatter_(-1, local.unsqueeze(-1), 1.0)
        grad = grad - onehot * (~outside).unsqueeze(-1).to(grad.dtype)
        return grad * g.unsqueeze(-1), None, None, None


class VocabParallelCrossEntropy:
    """Callable loss: mean over tokens whose label is not -100."""

    def __init__(self, group, vocab_start: int):
        self.group, self.vocab_start = group, vocab_start

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        flat_logits = logits.reshape(-1, logits.shape[-1])
        flat_labels = labels.reshape(-1)
        valid = flat_labels != -100
        if group_size(self.group) == 1:
            return torch.nn.functional.cross_entropy(flat_logits.float(), flat_labels, ignore_index=-100)
        losses = _VocabParallelCE.apply(flat_logits, flat_labels.masked_fill(~valid, 0), self.vocab_start, self.group)
        return (losses * valid).sum() / valid.sum().clamp(min=1)
