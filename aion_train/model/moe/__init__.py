from .experts import GroupedExperts, grouped_linear
from .moe_layer import MoELayer
from .router import Routing, TopKRouter, balance_loss, z_loss
from .token_dispatcher import DispatchState, LocalDispatcher, combine, expert_capacity, sort_by_expert

__all__ = [
    "DispatchState",
    "GroupedExperts",
    "LocalDispatcher",
    "MoELayer",
    "Routing",
    "TopKRouter",
    "balance_loss",
    "combine",
    "expert_capacity",
    "grouped_linear",
    "sort_by_expert",
    "z_loss",
]
