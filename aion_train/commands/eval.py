"""aion-train eval --task easy-vqa|retrieval --checkpoint C [--config F] [--limit N] [--json]:
held-out evaluation of a trained multimodal checkpoint (a run folder, its checkpoints folder,
or one step folder).

aion-train eval --task perplexity --checkpoint C --data DIR_OR_FILES [--tokenizer T] --json:
perplexity of any text checkpoint on a shard folder (its --split, default val), .tar shards,
or text/JSONL/Parquet/CSV/HF files (:mod:`aion_train.eval.perplexity`)."""

from __future__ import annotations

import json
import sys

TASKS = ("easy-vqa", "retrieval", "perplexity")


def add_arguments(p):
    p.add_argument("--task", required=True, choices=TASKS)
    p.add_argument("--checkpoint", required=True, help="run folder, checkpoints folder or step folder")
    p.add_argument("--config", default=None, help="the run's config (default: config.yaml in the run folder)")
    p.add_argument("--split", default="val", choices=("val", "train"), help="held-out split (default val)")
    p.add_argument("--limit", type=int, default=None, help="evaluate at most N items")
    p.add_argument("--json", action="store_true", help="print one JSON line")
    p.add_argument("--data", nargs="+", default=None, help="perplexity: shard folder, .tar shards or text files")
    p.add_argument("--tokenizer", default=None, help="perplexity: tokenizer (default: the run's data.tokenizer)")
    p.add_argument("--text-field", default="text", help="perplexity: the text field of JSONL/CSV/Parquet/HF data")
    p.add_argument("--seq-len", type=int, default=None, help="perplexity: window (default model.max_seq_len)")
    p.add_argument("--batch-size", type=int, default=8)


def evaluate_perplexity(args) -> dict:
    from aion_train.data.corpus_texts import iter_texts
    from aion_train.data.tokenizer import load_tokenizer, run_tokenizer_path
    from aion_train.eval.loading import load_trained_model
    from aion_train.eval.perplexity import perplexity

    if not args.data:
        raise ValueError("--task perplexity needs --data DIR_OR_FILES")
    model, cfg = load_trained_model(args.checkpoint, args.config)
    if cfg.model.multimodal.enabled:
        raise ValueError("--task perplexity takes a text checkpoint (model.multimodal.enabled is true)")
    tok = load_tokenizer(args.tokenizer or run_tokenizer_path(cfg))
    if tok.vocab_size > cfg.model.vocab_size:
        raise ValueError(f"the tokenizer has {tok.vocab_size} ids, more than model.vocab_size={cfg.model.vocab_size}")
    seq_len = args.seq_len or cfg.model.max_seq_len
    if not 1 <= seq_len <= cfg.model.max_seq_len:
        raise ValueError(f"--seq-len {seq_len}: must be in [1, model.max_seq_len={cfg.model.max_seq_len}]")
    texts = iter_texts(args.data, args.split, text_field=args.text_field)
    return {"task": "perplexity", **perplexity(model, tok, texts, seq_len, args.batch_size, args.limit)}


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
        if args.task == "perplexity":
            result = evaluate_perplexity(args)
        else:
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
