"""A few optimizer steps on a single-process model's trainable tensors (LoRA adapters, a head):
what the memory commands (`distill-memory`, `continual-finetune`) train, where the phases'
DeepSpeed engine and rank groups would only add a launcher. AdamW, no weight decay, a linear
warm-up over the first tenth of `steps`, then cosine decay of the learning rate to 0."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn


def adam_steps(module: nn.Module, steps: int, lr: float, loss_at: Callable[[int], torch.Tensor]) -> list[float]:
    """`steps` AdamW steps on `module`'s parameters that require grad; loss_at(step) -> loss.
    Returns the losses."""
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise ValueError("adam_steps: nothing to train (no parameter requires grad)")
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warm = max(1, steps // 10)

    def factor(s: int) -> float:
        if s < warm:
            return (s + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * min(s - warm, steps - warm) / max(1, steps - warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    losses = []
    for step in range(steps):
        loss = loss_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    return losses
