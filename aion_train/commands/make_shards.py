"""aion-train make-shards --out DIR [--vocab-size N]: build the demo WebDataset shards and
tokenizer from text that ships with the machine, and print the manifest summary."""
from __future__ import annotations

import os
import sys


def add_arguments(p):
    p.add_argument("--out", default="data/demo", help="output directory (default: data/demo)")
    p.add_argument("--vocab-size", type=int, default=2048, help="tokenizer vocabulary size")
    p.add_argument("--seed", type=int, default=1234, help="seed of the train/validation split")
    p.add_argument("--verify", action="store_true", help="also check every shard's sha256")


def run(args) -> int:
    from aion_train.data.demo import ensure_demo_data
    from aion_train.data.shards import read_manifest, summarize_manifest, verify_manifest

    try:
        paths = ensure_demo_data(args.out, args.vocab_size, seed=args.seed)
    except (OSError, ValueError, RuntimeError) as e:
        print(f"make-shards: {e}", file=sys.stderr)
        return 1
    out = os.path.dirname(paths["tokenizer"])
    manifest = read_manifest(out)
    print(f"{out}:")
    print(summarize_manifest(manifest))
    src = manifest.get("sources", {})
    if src:
        print(f"documents: {src.get('documents')} ({src.get('train')} train, {src.get('val')} val)")
    print(f"tokenizer: {paths['tokenizer']} (vocab {args.vocab_size})")
    if args.verify:
        problems = verify_manifest(out, checksums=True)
        for p in problems:
            print(f"  {p}", file=sys.stderr)
        print("sha256: " + ("ok" if not problems else f"{len(problems)} problem(s)"))
        return 1 if problems else 0
    return 0
