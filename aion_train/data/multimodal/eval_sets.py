"""Held-out evaluation sets read from the multimodal shards, for the VQA and retrieval evals.

* :func:`load_vqa_eval`: every (image, question, answer) of the held-out easy-vqa images
  (the easy-vqa *test* split) and the closed answer set (13 answers), so that a model can
  score each candidate answer and the majority baseline is known.
* :func:`load_caption_eval`: held-out (image, caption) pairs: the validation digits ("a
  handwritten digit seven") and the easy-vqa test images ("a blue rectangle", read off
  their answers). Captions repeat (10 digit captions, <= 24 shape captions): score an
  image->caption retrieval over the distinct captions, where chance is 1 / their number.
"""

from __future__ import annotations

import os

import torch

from ..shards import iter_shard_samples, manifest_shards, read_manifest
from .build import TRAIN, VAL
from .decode import load_rgb, patchify
from .sample import read_meta


def _split_prefix(split: str) -> str:
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    return TRAIN if split == "train" else VAL


def _image_samples(data_dir: str, split: str):
    for path in manifest_shards(data_dir, _split_prefix(split)):
        for item in iter_shard_samples(path):
            if isinstance(item, dict) and "png" in item and "json" in item:
                yield item, read_meta(item)


def _patches(item: dict, image_size: int, patch_size: int) -> torch.Tensor:
    return torch.from_numpy(patchify(load_rgb(item["png"], image_size), patch_size))


def load_vqa_eval(
    data_dir: str, split: str = "val", image_size: int = 64, patch_size: int = 8, limit: int | None = None
) -> tuple[list[dict], list[str]]:
    """([{"image": [P, 3pp] patches, "question", "answer", "key"}, ...], answer vocabulary)."""
    items = []
    for item, meta in _image_samples(data_dir, split):
        if not meta.get("qa"):
            continue
        patches = _patches(item, image_size, patch_size)
        for q, a in meta["qa"]:
            items.append({"image": patches, "question": q, "answer": a, "key": item["__key__"]})
        if limit is not None and len(items) >= limit:
            items = items[:limit]
            break
    answers = read_manifest(data_dir).get("multimodal", {}).get("vqa_answers")
    if not answers:
        answers = sorted({it["answer"] for it in items})
    return items, list(answers)


def load_caption_eval(
    data_dir: str, split: str = "val", image_size: int = 64, patch_size: int = 8, limit: int | None = None
) -> list[dict]:
    """[{"image": [P, 3pp] patches, "caption": str, "key"}] of the split's captioned images."""
    out = []
    for item, meta in _image_samples(data_dir, split):
        if meta.get("caption"):
            out.append(
                {"image": _patches(item, image_size, patch_size), "caption": meta["caption"], "key": item["__key__"]}
            )
            if limit is not None and len(out) >= limit:
                break
    return out


def default_data_dir() -> str:
    """Where ``make-shards`` puts the multimodal demo by default."""
    return os.path.join("data", "demo", "multimodal")
