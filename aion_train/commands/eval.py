"""aion-train eval --task easy-vqa|retrieval --checkpoint C [--config F] [--limit N] [--json]:
held-out evaluation of a trained multimodal checkpoint (a run folder, its checkpoints folder,
or one step folder)."""

from __future__ import annotations

import json
import sys

TASKS = ("easy-vqa", "retrieval")


def add_arguments(p):
    p.add_argument("--task", required=True, choices=TASKS)
    p.add_argument("--checkpoint", required=True, help="run folder, checkpoints folder or step folder")
    p.add_argument("--config", default=None, help="the run's config (default: config.yaml in the run folder)")
    p.add_argument("--split", default="val", choices=("val", "train"), help="held-out split (default val)")
    p.add_argument("--limit", type=int, default=None, help="evaluate at most N items")
    p.add_argument("--json", action="store_true", help="print one JSON line")


def evaluate(
    task: str, checkpoint: str, config: str | None = None, split: str = "val", limit: int | None = None
) -> dict:
    import torch

    from aion_train.data.multimodal import load_caption_eval, load_vqa_eval
    from aion_train.eval.loading import load_trained_model, multimodal_data
    from aion_train.eval.multimodal import caption_retrieval, vqa_accuracy

    model, cfg = load_trained_model(checkpoint, config)
    if not cfg.model.multimodal.enabled:
        raise ValueError(f"--task {task} needs a multimodal checkpoint (model.multimodal.enabled is false)")
    data_dir, tok = multimodal_data(cfg)
    mm = cfg.model.multimodal
    torch.manual_seed(cfg.seed)
    if task == "easy-vqa":
        items, answers = load_vqa_eval(data_dir, split, mm.image_size, mm.patch_size, limit)
        result = vqa_accuracy(model, tok, items, answers)
    else:
        pairs = load_caption_eval(data_dir, split, mm.image_size, mm.patch_size, limit)
        result = caption_retrieval(model, tok, pairs)
    return {"task": task, **result}


def run(args) -> int:
    try:
        result = evaluate(args.task, args.checkpoint, args.config, args.split, args.limit)
    except (OSError, ValueError, KeyError) as e:
        print(f"eval: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}")
    return 0
