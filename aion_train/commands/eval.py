"""aion-train eval --task easy-vqa|retrieval --checkpoint C [--config F] [--limit N] [--json]:
held-out evaluation of a trained multimodal checkpoint (a run folder, its checkpoints folder,
or one step folder).

aion-train eval --task perplexity --checkpoint C --data DIR_OR_FILES [--tokenizer T] --json:
perplexity of any text checkpoint on a shard folder (its --split, default val), .tar shards,
or text/JSONL/Parquet/CSV/HF files (:mod:`aion_train.eval.perplexity`).

aion-train eval --task open-book --checkpoint C --index DIR [--k K] [--limit N] --json:
held-out man-page questions closed-book, open-book (DIR: `build-index --corpus open-book`) and
after the held-out documents are ingested into a continual memory (:mod:`aion_train.eval.open_book`)."""

from __future__ import annotations

import json
import sys

TASKS = ("easy-vqa", "retrieval", "perplexity", "open-book")


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
    p.add_argument("--index", default=None, help="open-book: the index folder of the task's documents")
    p.add_argument("--k", type=int, default=3, help="open-book: retrieved chunks per question")
    p.add_argument("--held-out-fraction", type=float, default=0.2, help="open-book: documents held out of training")
    p.add_argument("--split-seed", type=int, default=0, help="open-book: the seed of the split by document")


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


def evaluate_open_book_task(args) -> dict:
    import tempfile

    from aion_train.eval.open_book import evaluate_open_book, index_chunking, index_search, ingested_memory_search
    from aion_train.retrieval.open_book import iter_examples, read_man_pages, split_pages
    from aion_train.serve.loading import load_for_serving

    if not args.index:
        raise ValueError("--task open-book needs --index DIR (aion-train build-index --corpus open-book --out DIR)")
    loaded = load_for_serving(args.checkpoint)
    trained, held = split_pages(read_man_pages(), args.held_out_fraction, args.split_seed)
    examples = list(iter_examples(held))[: args.limit]
    open_search, embedder = index_search(args.index, args.k)
    with tempfile.TemporaryDirectory(prefix="aion-open-book-memory-") as tmp:
        memory_search = ingested_memory_search(tmp, embedder, trained, held, args.k, index_chunking(args.index))
        result = evaluate_open_book(
            loaded.model, loaded.tokenizer, loaded.chat, loaded.eos_ids, examples, open_search, memory_search
        )
    return {"task": "open-book", **result}


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
        elif args.task == "open-book":
            result = evaluate_open_book_task(args)
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
