"""The multimodal task: WebDataset shards of images, speech, video and text, the fusion model
(aion_train/model/multimodal) and its joint losses, each logged on its own."""

from __future__ import annotations

import torch

from aion_train.config import Config
from aion_train.parallel.collectives import all_reduce_
from aion_train.parallel.device import module_device, to_device

from .base import prepare_data

LOSSES = ("lm", "caption", "clip", "aux")


def prepare_multimodal_data(cfg: Config, rank: int):
    """`prepare_data` with the multimodal demo set; the tokenizer's pad id must be the model's."""
    from aion_train.data.multimodal import ensure_multimodal_demo

    train, val, tokenizer = prepare_data(cfg, rank, ensure_multimodal_demo)
    if tokenizer.pad_id != cfg.model.multimodal.pad_id:
        raise ValueError(
            f"model.multimodal.pad_id={cfg.model.multimodal.pad_id} but the tokenizer's pad id is {tokenizer.pad_id}"
        )
    return train, val, tokenizer


def batch_to(batch: dict, device) -> dict:
    """Tensors to the device; other entries (e.g. the loader's `vqa` records) as they are."""
    return to_device(batch, device, non_blocking=True)


class MultimodalTask:
    """Images, speech, video and text in one sequence; LM + caption/answer + CLIP losses."""

    headline = "val/loss_caption"

    def __init__(self, cfg: Config, rank: int, groups):
        self.cfg, self.groups = cfg, groups
        self.train_shards, self.val_shards, self.tokenizer = prepare_multimodal_data(cfg, rank)

    def build_model(self):
        from aion_train.model.multimodal import build_multimodal_model
        from aion_train.parallel import parallelize_multimodal

        model = build_multimodal_model(self.cfg, seed=self.cfg.seed)
        model.activation_checkpointing = self.cfg.train.activation_checkpointing
        return parallelize_multimodal(model, self.groups, self.cfg.parallel.sequence_parallel)

    def _loader(self, shards, loop: bool):
        from aion_train.data.multimodal import MultimodalLoader

        return MultimodalLoader.from_config(
            self.cfg, shards, self.tokenizer, dp_rank=self.groups.dp_rank, dp_size=self.groups.dp, loop=loop
        )

    def train_loader(self):
        return self._loader(self.train_shards, loop=True)

    def forward(self, engine, batch, device):
        return engine(batch_to(batch, device))

    def metrics(self, out) -> dict:
        """Each loss on its own ("loss" = the caption/answer loss when present, else LM), the
        uncertainty weights, gates and CLIP temperature."""
        m = {f"loss_{k}": float(v.detach()) for k, v in out.losses.items() if v is not None}
        m["total_loss"] = float(out.loss.detach())
        m["aux_loss"] = float(out.aux_loss.detach()) if out.aux_loss is not None else 0.0
        m["loss"] = m.get("loss_caption", m.get("loss_lm", m["total_loss"]))
        m.update({k: float(v) for k, v in out.extras.items()})
        return m

    def tokens(self, batch) -> int:
        return int((batch["segment_ids"] > 0).sum())

    @torch.no_grad()
    def evaluate(self, engine) -> dict:
        """Held-out mean of each loss over train.eval_batches batches, averaged over the DP ranks."""
        engine.eval()
        sums = torch.zeros(2 * len(LOSSES), dtype=torch.float64)
        for i, batch in enumerate(self._loader(self.val_shards, loop=False)):
            if i >= self.cfg.train.eval_batches:
                break
            out = engine(batch_to(batch, module_device(engine)))
            for j, name in enumerate(LOSSES):
                v = out.losses.get(name)
                if v is not None:
                    sums[2 * j] += float(v)
                    sums[2 * j + 1] += 1
        engine.train()
        all_reduce_(sums, group=self.groups.dp_group if self.groups.dp > 1 else None)
        return {
            f"val/loss_{name}": sums[2 * j].item() / sums[2 * j + 1].item()
            for j, name in enumerate(LOSSES)
            if sums[2 * j + 1] > 0
        }
