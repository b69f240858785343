"""Config of LoRA / QLoRA adapters, supervised fine-tuning and the reward model."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class LoRAConfig:
    enabled: bool = False


@dataclass
class SFTConfig:
    pass


@dataclass
class RewardConfig:
    pass


def check(cfg, errors: list[str]) -> None:
    """Cross-field rules of this section; append one message per problem, naming its key."""
