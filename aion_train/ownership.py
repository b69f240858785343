"""Which folders a command may write into, and which of their files it may replace.

Every folder a command writes (a run, a shard set, an index, a bundle, an export) holds a
marker, ``.aion-train.json``, naming the commands that wrote there and the top-level entries
they produced. A command:

* writes into a folder that is absent, empty, or holds the marker (or is recognised as one of
  ours written before markers existed);
* refuses any other non-empty folder before touching anything, naming the folder and the
  flag (``--overwrite``) that lets the user write there on purpose;
* when it replaces a folder it built, replaces only the entries it wrote itself: anything
  else found in the folder (a user's notes, a sibling data set) is carried over.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Optional, Union

from .fsutil import atomic_write_text, fsync_dir

log = logging.getLogger(__name__)

MARKER = ".aion-train.json"
OVERWRITE_FLAG = "--overwrite"
PathLike = Union[str, "os.PathLike[str]"]


class ForeignFolderError(ValueError):
    """A non-empty folder that aion-train did not write, refused before anything is touched."""


def _transient(name: str) -> bool:
    """Our own locks and temp files, which may appear in a folder while it is being claimed."""
    return name.startswith(f"{MARKER}.") or (
        name.startswith(".") and (name.endswith(".lock") or ".tmp-" in name or ".old-" in name or name.endswith(".tmp"))
    )


def _entries(path: Path) -> list[str]:
    return sorted(n for n in os.listdir(path) if not _transient(n))


def read_marker(path: PathLike) -> Optional[dict]:
    """The marker of `path`, or None where there is none (or it is not ours)."""
    try:
        with open(Path(path) / MARKER, encoding="utf-8") as f:
            marker = json.load(f)
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and marker.get("written_by") == "aion-train" else None


def is_ours(path: PathLike, recognise: Optional[Callable[[Path], bool]] = None) -> bool:
    """True for a folder aion-train wrote: it holds the marker, `recognise` accepts it (a
    folder written before markers existed), or everything in it is one of our folders."""
    path = Path(path)
    if read_marker(path) is not None or (recognise is not None and recognise(path)):
        return True
    entries = _entries(path)
    return bool(entries) and all((path / n).is_dir() and read_marker(path / n) is not None for n in entries)


def _write_marker(path: Path, kind: str, files: Optional[Iterable[str]] = None) -> None:
    """Record `kind` among the folder's writers and, when given, `files` as the entries ours."""
    marker = read_marker(path) or {"written_by": "aion-train", "kinds": [], "files": []}
    if kind not in marker["kinds"]:
        marker["kinds"] = sorted([*marker["kinds"], kind])
    if files is not None:
        marker["files"] = sorted(set(files))
    atomic_write_text(path / MARKER, json.dumps(marker, indent=1, sort_keys=True) + "\n")


def record_outputs(path: PathLike, kind: str, files: Iterable[str]) -> None:
    """Record `files` (top-level entries of `path`) as written by the command `kind`, for a
    command that builds in place (a resumable build) instead of publishing a temp folder."""
    _write_marker(Path(path), kind, files)


def refusal(path: PathLike, what: str, entries: list[str]) -> ForeignFolderError:
    shown = ", ".join(repr(n) for n in entries[:3]) + (", ..." if len(entries) > 3 else "")
    return ForeignFolderError(
        f"{what}: {os.fspath(path)} is not empty ({len(entries)} entries: {shown}) and was not written by "
        f"aion-train; refusing to write there. Choose a new or empty folder, or pass {OVERWRITE_FLAG} to "
        f"write into it on purpose (files of the same names as the outputs are replaced, others are kept)"
    )


def check_writable(
    path: PathLike, what: str, overwrite: bool = False, recognise: Optional[Callable[[Path], bool]] = None
) -> None:
    """Raise ForeignFolderError unless `path` is absent, empty, ours, or `overwrite` is set."""
    path = Path(path)
    if not os.path.lexists(path):
        return
    if not path.is_dir():
        raise ForeignFolderError(f"{what}: {os.fspath(path)} exists and is not a folder")
    entries = _entries(path)
    if not entries or overwrite or is_ours(path, recognise):
        return
    raise refusal(path, what, entries)


def claim_dir(
    path: PathLike, kind: str, overwrite: bool = False, recognise: Optional[Callable[[Path], bool]] = None
) -> Path:
    """Check `path` (see :func:`check_writable`), create it if needed and mark it as written
    by the command `kind`. Returns the path."""
    path = Path(path)
    check_writable(path, f"aion-train {kind}", overwrite, recognise)
    if overwrite and path.is_dir() and _entries(path) and not is_ours(path, recognise):
        log.warning("%s: writing into %s, which aion-train did not create (%s)", kind, path, OVERWRITE_FLAG)
    path.mkdir(parents=True, exist_ok=True)
    _write_marker(path, kind)
    return path


def publish_dir(
    tmp: PathLike,
    final: PathLike,
    kind: str,
    overwrite: bool = False,
    recognise: Optional[Callable[[Path], bool]] = None,
    last: Iterable[str] = (),
) -> Path:
    """Move the complete build in `tmp` to `final`.

    `final` absent: `tmp` is renamed into place. `final` present: it must be ours (or
    `overwrite`); the entries `tmp` holds replace those of the same names, entries a
    previous build of ours listed in the marker and this one does not produce are removed,
    and everything else is kept. Entries named in `last` (e.g. the manifest that says the
    folder is complete) are moved in last, after being removed first, so a crash midway
    leaves a folder that reads as incomplete."""
    tmp, final = Path(tmp), Path(final)
    produced = _entries(tmp)
    if not os.path.lexists(final):
        _write_marker(tmp, kind, produced)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, final)
        fsync_dir(final.parent)
        return final
    check_writable(final, f"aion-train {kind}", overwrite, recognise)
    marker = read_marker(final) or {}
    stale = set(marker.get("files", [])) - set(produced)
    last = [n for n in last if n in produced]
    for name in last:  # the folder reads as incomplete from here on
        _remove(final / name)
    trash = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
    trash.mkdir()
    try:
        for name in [n for n in produced if n not in last] + last:
            if os.path.lexists(final / name):
                os.replace(final / name, trash / name)
            os.replace(tmp / name, final / name)
        for name in sorted(stale):
            if os.path.lexists(final / name):
                os.replace(final / name, trash / f"stale-{name}")
        marker_files = set(marker.get("files", [])) - stale
        _write_marker(final, kind, marker_files | set(produced))
        fsync_dir(final)
    finally:
        shutil.rmtree(trash, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


def looks_like_run_dir(path: Path) -> bool:
    """A run folder written before ownership markers existed: a checkpoint pointer, an MLflow
    run record, or a finished post-training phase."""
    return (
        (path / "checkpoints" / "latest").is_file()
        or (path / "mlflow_run.json").is_file()
        or any(p.is_file() for p in path.glob("*/done.json"))
    )


def claim_run_dir(path: PathLike, kind: str, overwrite: bool = False) -> Path:
    """The run folder of a training command: absent, empty, or a run of ours (it resumes)."""
    return claim_dir(path, kind, overwrite, recognise=looks_like_run_dir)
