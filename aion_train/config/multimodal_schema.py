"""Config of the multimodal model (model.multimodal): encoders, projection, gates,
resampler, cross-attention, modality-aware routing, joint losses."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class MultimodalConfig:
    enabled: bool = False              # false = the text-only transformer


def check(cfg, errors: list[str]) -> None:
    """Cross-field rules of this section; append one message per problem, naming its key."""
