"""Causal language modelling on packed text shards: the MoE transformer, held-out perplexity."""

from __future__ import annotations

import math

import torch

from aion_train.config import Config
from aion_train.data import ensure_demo_data
from aion_train.parallel.collectives import all_reduce_
from aion_train.parallel.device import module_device, to_device

from .base import prepare_data


class TextTask:
    """Causal language modelling on packed WebDataset text.

    Rows pack whole documents ([bos] doc [eos], see aion_train/data/loader.py). With
    `data.document_mask` (the default) the loader also gives `segment_ids` and `position_ids`
    and the model attends only within each document (block-diagonal causal mask), RoPE
    positions restarting at 0 per document, so a packed row computes what its documents would
    alone. Labels are the next token everywhere, as without the mask: the one target that
    crosses a boundary is the <bos> after a document's <eos>, which that <eos> alone determines."""

    headline = "val/perplexity"

    def __init__(self, cfg: Config, rank: int, groups):
        self.cfg, self.groups = cfg, groups
        self.train_shards, self.val_shards, self.tokenizer = prepare_data(cfg, rank, ensure_demo_data)

    def build_model(self):
        from aion_train.model import build_model
        from aion_train.parallel import parallelize

        model = build_model(self.cfg.model, seed=self.cfg.seed)
        model.activation_checkpointing = self.cfg.train.activation_checkpointing
        return parallelize(model, self.groups, self.cfg.parallel.sequence_parallel)

    def _loader(self, shards, **kw):
        from aion_train.data import TokenLoader

        c = self.cfg
        return TokenLoader(
            shards,
            self.tokenizer,
            c.data.seq_len,
            c.data.micro_batch_size,
            dp_rank=self.groups.dp_rank,
            dp_size=self.groups.dp,
            seed=c.seed,
            document_mask=c.data.document_mask,
            **kw,
        )

    def train_loader(self):
        c = self.cfg.data
        return self._loader(self.train_shards, shuffle_buffer=c.shuffle_buffer, num_workers=c.num_workers)

    @staticmethod
    def model_inputs(batch: dict, device) -> dict:
        """The model's keyword arguments for a loader batch, on `device`: input_ids, labels and,
        when the loader gives them (data.document_mask), segment_ids and position_ids."""
        keys = ("input_ids", "labels", "segment_ids", "position_ids")
        return to_device({k: batch[k] for k in keys if k in batch}, device)

    def forward(self, engine, batch, device):
        return engine(**self.model_inputs(batch, device), return_logits=False)

    def metrics(self, out) -> dict:
        """Floats to average over the micro-batches of a step; "loss" is the headline."""
        return {
            "loss": out.lm_loss.detach().float().item(),
            "total_loss": out.loss.detach().float().item(),
            "aux_loss": out.aux_loss.detach().float().item(),
        }

    def tokens(self, batch) -> int:
        return batch["input_ids"].numel()

    @torch.no_grad()
    def evaluate(self, engine) -> dict:
        """Held-out perplexity: exp(total cross-entropy / total tokens) over the DP ranks."""
        cfg, groups = self.cfg, self.groups
        engine.eval()
        device = module_device(engine)
        total = torch.zeros(2, dtype=torch.float64)
        for i, batch in enumerate(self._loader(self.val_shards, loop=False)):
            if i >= cfg.train.eval_batches:
                break
            out = engine(**self.model_inputs(batch, device), return_logits=False)
            n = batch["labels"].numel()
            total += torch.tensor([out.lm_loss.float().item() * n, n], dtype=torch.float64)
        engine.train()
        all_reduce_(total, group=groups.dp_group if groups.dp > 1 else None)
        return {"val/perplexity": math.exp(total[0].item() / max(total[1].item(), 1.0))}
