"""The output-folder rule every writing command shares: the `--overwrite` flag, and the
check of its folders before any work (:mod:`aion_train.ownership`)."""

from __future__ import annotations

import sys

from aion_train.ownership import OVERWRITE_FLAG, ForeignFolderError


def add_overwrite_argument(p) -> None:
    p.add_argument(
        OVERWRITE_FLAG,
        action="store_true",
        help="write into a non-empty folder that aion-train did not create (files of the "
        "same names as the outputs are replaced; other files are kept)",
    )


def overwrite_args(args) -> list[str]:
    """The flag again, for the ranks a command launches."""
    return [OVERWRITE_FLAG] if getattr(args, "overwrite", False) else []


def claim_training_dirs(cfg, kind: str, overwrite: bool) -> None:
    """The run folder (claimed: created and marked) and, when the config trains on the demo
    set, its data folder (checked, then built if absent). Raises ForeignFolderError before
    anything is written, RuntimeError when the demo cannot be built (a missing system package)."""
    from aion_train.ownership import check_writable, claim_run_dir

    demo = hasattr(cfg, "data") and not cfg.data.train_shards and kind == "pretrain"
    if demo:
        multimodal = bool(getattr(getattr(cfg.model, "multimodal", None), "enabled", False))
        if multimodal:
            from aion_train.data.multimodal.build import holds_multimodal_manifest as recognise
        else:
            from aion_train.data.demo import holds_demo_manifest as recognise
        check_writable(cfg.data.dir, f"aion-train {kind}: data.dir", overwrite, recognise)
    claim_run_dir(cfg.run_dir, kind, overwrite)
    if demo:  # built here (once; locked) so that a missing system package is one clear line
        if multimodal:
            from aion_train.data.multimodal.build import ensure_multimodal_demo

            ensure_multimodal_demo(cfg.data.dir, cfg.model.vocab_size, cfg.data.demo_seed, overwrite=overwrite)
        else:
            from aion_train.data.demo import ensure_demo_data

            ensure_demo_data(cfg.data.dir, cfg.model.vocab_size, cfg.data.demo_seed, overwrite=overwrite)


def report_refusal(command: str, e: ForeignFolderError) -> int:
    print(f"{command}: {e}", file=sys.stderr)
    return 2


def print_summary(summary: dict, as_json: bool, line: str) -> int:
    """A writing command's result: with --json the summary as one JSON line; else its notes
    on stderr and `line`. Returns 0."""
    import json

    if as_json:
        print(json.dumps(summary))
        return 0
    for note in summary.get("notes", []):
        print(f"note: {note}", file=sys.stderr)
    print(line)
    return 0
