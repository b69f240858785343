"""aion-train make-shards --out DIR [--modality text|multimodal|all] [--vocab-size N]: build
the demo WebDataset shards and tokenizers from data that ships with the machine, and print
the manifest summaries.

* text: ``DIR`` (train/val text shards + tokenizer, :mod:`aion_train.data.demo`);
* multimodal: ``DIR/multimodal`` (easy-vqa, digits, sample photos, espeak-ng speech, moving
  shape videos, dialogs + their own tokenizer, :mod:`aion_train.data.multimodal.build`).
"""

from __future__ import annotations

import os
import sys

from .output_dirs import add_overwrite_argument


def add_arguments(p):
    p.add_argument("--out", default="data/demo", help="output directory (default: data/demo)")
    p.add_argument(
        "--modality",
        choices=("text", "multimodal", "all"),
        default="all",
        help="which demo set to build (multimodal goes to OUT/multimodal)",
    )
    p.add_argument("--vocab-size", type=int, default=2048, help="tokenizer vocabulary size")
    p.add_argument("--seed", type=int, default=1234, help="seed of the train/validation split")
    p.add_argument("--verify", action="store_true", help="also check every shard's sha256")
    add_overwrite_argument(p)


def _report(out: str, tokenizer: str, vocab_size: int, verify: bool) -> int:
    from aion_train.data.shards import read_manifest, summarize_manifest, verify_manifest

    manifest = read_manifest(out)
    print(f"{out}:")
    print(summarize_manifest(manifest))
    src = manifest.get("sources", {})
    if src:
        print(f"documents: {src.get('documents')} ({src.get('train')} train, {src.get('val')} val)")
    for split, counts in manifest.get("multimodal", {}).get("counts", {}).items():
        mods = ", ".join(f"{k}={v}" for k, v in counts["modalities"].items())
        kinds = ", ".join(f"{k}={v}" for k, v in counts["kinds"].items())
        print(f"{split}: {mods} ({kinds})")
    print(f"tokenizer: {tokenizer} (vocab {vocab_size})")
    if not verify:
        return 0
    problems = verify_manifest(out, checksums=True)
    for p in problems:
        print(f"  {p}", file=sys.stderr)
    print("sha256: " + ("ok" if not problems else f"{len(problems)} problem(s)"))
    return 1 if problems else 0


def run(args) -> int:
    from aion_train.data.demo import ensure_demo_data
    from aion_train.data.multimodal.build import ensure_multimodal_demo
    from aion_train.ownership import ForeignFolderError

    rc = 0
    try:
        if args.modality in ("text", "all"):
            paths = ensure_demo_data(args.out, args.vocab_size, seed=args.seed, overwrite=args.overwrite)
            rc |= _report(os.path.dirname(paths["tokenizer"]), paths["tokenizer"], args.vocab_size, args.verify)
        if args.modality in ("multimodal", "all"):
            if args.modality == "multimodal":  # OUT/multimodal: refuse a foreign OUT too
                from aion_train.ownership import check_writable

                if not os.path.isdir(os.path.join(args.out, "multimodal")):
                    check_writable(args.out, "make-shards", args.overwrite)
            paths = ensure_multimodal_demo(
                os.path.join(args.out, "multimodal"), args.vocab_size, seed=args.seed, overwrite=args.overwrite
            )
            rc |= _report(os.path.dirname(paths["tokenizer"]), paths["tokenizer"], args.vocab_size, args.verify)
    except ForeignFolderError as e:
        print(f"make-shards: {e}", file=sys.stderr)
        return 2
    except (OSError, ValueError, RuntimeError) as e:
        print(f"make-shards: {e}", file=sys.stderr)
        return 1
    return rc
