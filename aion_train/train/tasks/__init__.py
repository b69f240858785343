"""What the training loop trains on (see base.Task): text (text.TextTask) or multimodal
(multimodal.MultimodalTask), chosen by `model.multimodal.enabled`."""

from __future__ import annotations

from aion_train.config import Config

from .base import Task, prepare_data
from .multimodal import MultimodalTask
from .text import TextTask

__all__ = ["MultimodalTask", "Task", "TextTask", "make_task", "prepare_data"]


def make_task(cfg: Config, rank: int, groups) -> Task:
    return (MultimodalTask if cfg.model.multimodal.enabled else TextTask)(cfg, rank, groups)
