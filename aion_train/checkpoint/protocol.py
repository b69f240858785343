"""The save protocol of a multi-rank checkpoint, written once for every job that saves one
(pretraining, post-training weights, PPO, a single-process reshard)::

    leader: prepare(step)     remove a stale temp folder of a crashed write, make a new one
    barrier
    every rank: begin(step), write its own payloads into the temp folder
    barrier
    leader: commit(step, manifest)   hash + fsync, manifest, rename, repoint `latest`, prune
    barrier                   every rank sees the new checkpoint

A crash anywhere before the leader's rename leaves the previous checkpoint and `latest`
untouched."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Union

from .store import CheckpointManager

Manifest = Union[Mapping[str, Any], Callable[[], Mapping[str, Any]]]


def no_barrier() -> None:
    """The barrier of a single process writing every rank's payloads itself."""


def save_checkpoint(
    mgr: CheckpointManager,
    step: int,
    write: Callable[[Path], None],
    manifest: Manifest,
    *,
    leader: bool = True,
    barrier: Callable[[], None] = no_barrier,
) -> Path:
    """Run the save protocol for `step`: `write(folder)` writes this rank's payloads into the
    temp folder; `manifest` (or the function that makes it, called on the leader only) is what
    the leader commits beside the files. Every rank calls it; `barrier` synchronises them.
    Returns the committed folder."""
    if leader:
        mgr.prepare(step)
    barrier()
    write(mgr.begin(step))
    barrier()
    if leader:
        mgr.commit(step, manifest() if callable(manifest) else manifest)
    barrier()
    return mgr.step_dir(step)
