"""`aion-train SUBCOMMAND ...`: each subcommand lives in aion_train/commands/<name>.py
with `add_arguments(parser)` and `run(args) -> int`; modules are imported lazily so that
`aion-train check-config` does not pay for importing DeepSpeed or MLflow."""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "pretrain": ("pretrain", "train the MoE transformer (default: configs/tiny_cpu.yaml)"),
    "check-config": ("check_config", "print the resolved config or its errors"),
    "verify-parallel": ("verify_parallel", "compare TP/EP ranks with the single-process model"),
    "bench": ("bench", "benchmarks that print one JSON line (moe, train, ...)"),
    "ui": ("ui", "start the MLflow UI on 127.0.0.1"),
    "eval": ("eval", "held-out evaluation of a checkpoint (perplexity, easy-vqa accuracy, image-caption retrieval)"),
    "make-shards": ("make_shards", "build WebDataset shards: the demo sets, or your corpus (--from)"),
    "train-tokenizer": (
        "train_tokenizer",
        "train a SentencePiece tokenizer on your corpus (delimiter and chat tokens reserved)",
    ),
    "export-hf": ("export_hf", "export the text backbone as a Hugging Face Mixtral checkpoint"),
    "import-hf": ("import_hf", "load a Hugging Face Mixtral checkpoint into our layout"),
    "plan": ("plan", "compute-optimal size and per-GPU memory plan"),
    "build-index": ("build_index", "chunk, embed and index a corpus (FAISS + BM25)"),
    "query": ("query", "hybrid search an index"),
    "open-book-data": ("open_book_data", "the open-book task's SFT / PPO / held-out files from an index"),
    "distill-memory": (
        "distill_memory",
        "L_mem: distil the model's own embedder (LoRA + head) towards the memory's vectors; MRR@10",
    ),
    "continual-finetune": (
        "continual_finetune",
        "fine-tune on newly ingested documents with and without reservoir replay; forgetting",
    ),
    "build-policy": ("build_policy", "validate, resolve and bundle per-jurisdiction policy JSON"),
    "sft": ("sft", "supervised fine-tuning (LoRA / QLoRA) on the chat task; prints sft_accuracy"),
    "rm": ("rm", "train the reward model on preference pairs; prints rm_pair_accuracy"),
    "ppo": ("ppo", "PPO RLHF against the reward model (or on a POMDP: ppo.env=tiger); prints ppo_accuracy"),
    "pipeline": ("pipeline", "SFT -> RM -> PPO -> artifacts as a Ray job (private loopback cluster or --address)"),
    "generate": ("generate", "generate from a checkpoint (same engine and policies as serve)"),
    "admin": ("admin", "the admin dashboard for a policy bundle folder (edit, try, publish, audit)"),
    "serve": ("serve", "OpenAI-compatible HTTP server for a checkpoint, per-jurisdiction policies"),
    "audit": (
        "audit",
        "check a serve audit log's hash chain (audit verify LOG) or cut a torn tail off (audit repair LOG)",
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aion-train", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        mod = importlib.import_module(f"aion_train.commands.{module}")
        mod.add_arguments(p)
        p.set_defaults(_module=mod)
    return parser


def main(argv: list[str] | None = None) -> int:
    from aion_train.process_env import start_process

    start_process()
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # dotted overrides may come after options too: `pretrain --nproc 2 train.steps=8`
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = list(args.overrides) + extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return int(args._module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
