"""Per-rank payloads of a checkpoint folder: ``{name}.rank{rank:05d}.json/.safetensors``
(one tree each, see :mod:`.tree_format`), written and fsynced by the rank that owns them."""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Union

import torch

from .errors import CheckpointError
from .tree_format import PathLike, tree_paths
from .tree_load import load_tree
from .tree_save import save_tree

_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(f"invalid payload name {name!r}: use letters, digits, '_', '-', '.'")


def rank_prefix(folder: PathLike, rank: int, name: str) -> Path:
    """Path prefix of one rank's payload: ``folder/{name}.rank{rank:05d}``."""
    _check_name(name)
    if type(rank) is not int or rank < 0:
        raise ValueError(f"invalid rank {rank!r}")
    return Path(folder) / f"{name}.rank{rank:05d}"


def rank_file_names(name: str, ranks: Union[int, Iterable[int]]) -> list[str]:
    """File names written by ``save_rank`` for ``ranks`` (an int means ``range(ranks)``)."""
    if isinstance(ranks, int):
        ranks = range(ranks)
    out: list[str] = []
    for r in ranks:
        j, s = tree_paths(rank_prefix(".", r, name))
        out += [j.name, s.name]
    return out


def save_rank(folder: PathLike, rank: int, name: str, tree: Any, *, fsync: bool = True) -> Path:
    """Write ``tree`` as ``{name}.rank{rank:05d}.safetensors/.json`` in ``folder``.

    Each rank fsyncs its own files (``fsync=True``), which is what makes the data
    durable on network filesystems where another client's fsync would not.
    Returns the path prefix.
    """
    prefix = rank_prefix(folder, rank, name)
    save_tree(tree, prefix, fsync=fsync)
    return prefix


def load_rank(folder: PathLike, rank: int, name: str, *, device: Union[str, torch.device] = "cpu") -> Any:
    """Load what ``save_rank(folder, rank, name, ...)`` wrote."""
    prefix = rank_prefix(folder, rank, name)
    json_path, _ = tree_paths(prefix)
    if not json_path.exists():
        avail = list_ranks(folder, name)
        raise CheckpointError(
            f"{folder}: no '{name}' payload for rank {rank} "
            f"(ranks present: {avail if avail else 'none'}); was the checkpoint written "
            "with a different world size?"
        )
    return load_tree(prefix, device=device)


def list_ranks(folder: PathLike, name: str) -> list[int]:
    """Sorted ranks for which ``folder`` holds a ``name`` payload."""
    _check_name(name)
    pat = re.compile(re.escape(name) + r"\.rank(\d{5,})\.json$")
    out = []
    folder = Path(folder)
    if folder.is_dir():
        for p in folder.iterdir():
            m = pat.match(p.name)
            if m:
                out.append(int(m.group(1)))
    return sorted(out)
