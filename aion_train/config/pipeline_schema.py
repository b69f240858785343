"""Config of the Ray job pipeline (SFT -> RM -> PPO -> artifacts)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class PipelineConfig:
    pass


def check(cfg, errors: list[str]) -> None:
    """Cross-field rules of this section; append one message per problem, naming its key."""
