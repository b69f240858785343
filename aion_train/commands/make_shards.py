"""aion-train make-shards --out DIR [--modality text|multimodal|all] [--vocab-size N]: build
the demo WebDataset shards and tokenizers from data that ships with the machine, and print
the manifest summaries.

aion-train make-shards --from PATH... --out DIR [--text-field F] [--format auto|text|jsonl|
parquet|csv|hf] [--val-fraction X] [--workers N]: the user's corpus instead
(:mod:`aion_train.data.user_shards`: streaming, exact-duplicate removal, seeded split,
resumable); train a tokenizer on it with `aion-train train-tokenizer`.

* text: ``DIR`` (train/val text shards + tokenizer, :mod:`aion_train.data.demo`);
* multimodal: ``DIR/multimodal`` (easy-vqa, digits, sample photos, espeak-ng speech, moving
  shape videos, dialogs + their own tokenizer, :mod:`aion_train.data.multimodal.build`).
"""

from __future__ import annotations

import os
import sys

from .output_dirs import add_overwrite_argument


def add_arguments(p):
    p.add_argument("--out", default=None, help="output directory (default for the demo: data/demo)")
    p.add_argument(
        "--from",
        dest="sources",
        nargs="+",
        default=None,
        metavar="PATH",
        help="your corpus: text files/folders, JSONL, Parquet, CSV, datasets save_to_disk folders",
    )
    p.add_argument("--text-field", default="text", help="field holding the text (JSONL/CSV/Parquet/HF; default text)")
    p.add_argument("--format", default="auto", help="auto|text|jsonl|parquet|csv|hf (auto: by file name)")
    p.add_argument("--val-fraction", type=float, default=0.05, help="held-out share of the documents (default 0.05)")
    p.add_argument("--samples-per-shard", type=int, default=1024, help="documents per shard (default 1024)")
    p.add_argument("--workers", type=int, default=1, help="processes that parse and hash records (default 1)")
    p.add_argument(
        "--progress-bar",
        default="auto",
        choices=("auto", "always", "never"),
        help="runtime.progress_bar: auto shows it when stderr is a terminal",
    )
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
    if tokenizer:
        print(f"tokenizer: {tokenizer} (vocab {vocab_size})")
    if not verify:
        return 0
    problems = verify_manifest(out, checksums=True)
    for p in problems:
        print(f"  {p}", file=sys.stderr)
    print("sha256: " + ("ok" if not problems else f"{len(problems)} problem(s)"))
    return 1 if problems else 0


def _run_user(args) -> int:
    from aion_train.config.schema import RuntimeConfig
    from aion_train.data.user_shards import BuildArgs, build_user_shards
    from aion_train.runtime import show_progress_bar

    if not args.out:
        print("make-shards: --from needs --out DIR", file=sys.stderr)
        return 2
    spec = BuildArgs(
        sources=args.sources,
        out=args.out,
        text_field=args.text_field,
        format=args.format,
        val_fraction=args.val_fraction,
        samples_per_shard=args.samples_per_shard,
        seed=args.seed,
        workers=args.workers,
    )
    build = build_user_shards(spec, args.overwrite, show_progress_bar(RuntimeConfig(progress_bar=args.progress_bar)))
    rc = _report(args.out, None, None, args.verify)
    c = build["counts"]
    state = "up to date" if build.get("up_to_date") else ("resumed" if build.get("resumed") else "built")
    print(
        f"{state}: {c['records']} records from {len(build['inputs'])} inputs -> {c['documents']} documents "
        f"({c['duplicates']} duplicates, {c['empty']} empty, "
        f"{c['bad_json'] + c['missing_field'] + c['not_text'] + c['binary']} without text) in {build['seconds']} s"
    )
    return rc


def run(args) -> int:
    from aion_train.ownership import ForeignFolderError

    if args.sources:
        from aion_train.data.user_sources import SourceError

        try:
            return _run_user(args)
        except ForeignFolderError as e:
            print(f"make-shards: {e}", file=sys.stderr)
            return 2
        except SourceError as e:
            print(f"make-shards: {e}", file=sys.stderr)
            return 2
        except (OSError, ValueError, RuntimeError) as e:
            print(f"make-shards: {e}", file=sys.stderr)
            return 1
    args.out = args.out or "data/demo"
    return _run_demo(args)


def _run_demo(args) -> int:
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
