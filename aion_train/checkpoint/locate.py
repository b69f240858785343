"""Finding a checkpoint from a path a user gives (a step folder, a checkpoints root, a run
folder) and reading its manifest."""

from __future__ import annotations

from pathlib import Path

from .errors import CheckpointError
from .store import CheckpointManager


def find_checkpoint(path) -> Path:
    """A step folder (has manifest.json), a checkpoints root (has `latest`/step_*), or a run
    folder (has checkpoints/) -> the step folder (the latest one for the last two)."""
    p = Path(path)
    if (p / "manifest.json").is_file():
        return p
    for root in (p / "checkpoints", p):
        if root.is_dir():
            latest = CheckpointManager(root, keep_last=None).latest()
            if latest is not None:
                return latest
    raise CheckpointError(
        f"{p}: no checkpoint found (expected a step_XXXXXXXX folder with manifest.json, "
        "a checkpoints folder, or a run folder holding checkpoints/)"
    )


def read_manifest(folder) -> dict:
    return CheckpointManager(Path(folder).parent, keep_last=None).read_manifest(folder)
