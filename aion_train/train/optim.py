"""AdamW parameter groups and the warmup + cosine learning-rate schedule (the seed's)."""

from __future__ import annotations

import math

from aion_train.config import TrainConfig
from aion_train.parallel.deepspeed_adapter import expert_group_name
from aion_train.parallel.plan import ParallelPlan


def no_decay(name: str, p) -> bool:
    """Norm weights, biases and other 1-D parameters get no weight decay."""
    return p.dim() < 2 or name.endswith(".bias") or "norm" in name.split(".")[-2:][0]


def param_groups(model, weight_decay: float, plan: ParallelPlan) -> list[dict]:
    """Dense decay / dense no-decay / expert groups (experts, by `plan`, are split out so that
    DeepSpeed reduces them over the expert-data-parallel group)."""
    groups: dict[tuple, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = not no_decay(name, p)
        expert = plan.is_expert(name)
        key = (decay, expert)
        if key not in groups:
            g = {
                "params": [],
                "weight_decay": weight_decay if decay else 0.0,
                "name": ("expert" if expert else "dense") + ("_decay" if decay else "_no_decay"),
            }
            if expert:
                g.update(moe=True, name=expert_group_name(plan.ep))
            groups[key] = g
        groups[key]["params"].append(p)
    return [groups[k] for k in sorted(groups)]


def lr_at(step: int, cfg: TrainConfig) -> float:
    """eta(t) = eta_max * t / T_warmup for t < T_warmup, then
    eta_min + 0.5 (eta_max - eta_min)(1 + cos(pi t' / T')), t' = t - T_warmup,
    T' = total - T_warmup, eta_min = min_lr_ratio * eta_max."""
    eta_max, eta_min = cfg.lr, cfg.lr * cfg.min_lr_ratio
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return eta_max * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return eta_min + 0.5 * (eta_max - eta_min) * (1 + math.cos(math.pi * progress))
