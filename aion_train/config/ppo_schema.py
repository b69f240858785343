"""Config of PPO RLHF and of the POMDP environments it can train on."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class PPOConfig:
    pass


def check(cfg, errors: list[str]) -> None:
    """Cross-field rules of this section; append one message per problem, naming its key."""
