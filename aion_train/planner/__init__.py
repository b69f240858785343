"""Planning before a run: compute-optimal size from scaling laws and the per-GPU memory plan."""

from .memory import (
    Layout,
    activation_bytes,
    estimate,
    layer_activation_bytes,
    layout_errors,
    model_state_bytes,
    plan_memory,
    search,
)
from .params import ParamCounts, count_params
from .scaling import (
    chinchilla_loss,
    chinchilla_optimal,
    kaplan_loss_compute,
    kaplan_loss_params,
    plan_compute,
    rule_of_20,
    table3_frontier,
)

__all__ = [
    "Layout",
    "ParamCounts",
    "activation_bytes",
    "chinchilla_loss",
    "chinchilla_optimal",
    "count_params",
    "estimate",
    "kaplan_loss_compute",
    "kaplan_loss_params",
    "layer_activation_bytes",
    "layout_errors",
    "model_state_bytes",
    "plan_compute",
    "plan_memory",
    "rule_of_20",
    "search",
    "table3_frontier",
]
