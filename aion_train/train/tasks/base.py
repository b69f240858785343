"""What every task shares: the protocol the training loop drives, and one `prepare_data`.

A task owns the data (shards, tokenizer, loader), the model it builds, how a batch is fed to
the engine, which losses are logged, and the held-out evaluation. The loop in trainer.py
(engine, checkpoints, fault handling, MLflow) is shared."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch.distributed as dist

from aion_train.config import Config


class Task(Protocol):
    headline: str  # the metric evaluate() reports that the run is judged by

    def build_model(self): ...  # the model, parallelized over the task's groups
    def train_loader(self): ...  # an endless iterator of batches of this DP rank
    def forward(self, engine, batch, device): ...  # the model's output for a batch
    def metrics(self, out) -> dict: ...  # floats to average over the micro-batches ("loss" first)
    def tokens(self, batch) -> int: ...  # tokens a batch trains on (throughput)
    def evaluate(self, engine) -> dict: ...  # held-out metrics, averaged over the DP ranks


def prepare_data(cfg: Config, rank: int, build_demo: Callable[[str, int, int], dict]):
    """(train shards, val shards, tokenizer): the user's (data.train_shards / val_shards /
    tokenizer), or the demo set that `build_demo(dir, vocab_size, seed)` builds in data.dir
    (once, by rank 0, the others waiting) when none are given."""
    from aion_train.data import expand_shards
    from aion_train.data.tokenizer import load_tokenizer

    if cfg.data.train_shards:
        train, val = expand_shards(cfg.data.train_shards), expand_shards(cfg.data.val_shards or [])
        tok = cfg.data.tokenizer
    else:
        if rank == 0:
            build_demo(cfg.data.dir, cfg.model.vocab_size, cfg.data.demo_seed)
        if dist.is_initialized():
            dist.barrier()
        paths = build_demo(cfg.data.dir, cfg.model.vocab_size, cfg.data.demo_seed)
        train, val, tok = paths["train"], paths["val"], cfg.data.tokenizer or paths["tokenizer"]
    tokenizer = load_tokenizer(tok)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ValueError(
            f"data.tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size={cfg.model.vocab_size}"
        )
    return train, val, tokenizer
