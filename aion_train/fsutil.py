"""Durable file writes: every file or folder the project publishes goes through here.

* :func:`atomic_write` / :func:`atomic_write_text` / :class:`AtomicOutput` - one file,
  written under a temp name beside it, fsynced, renamed into place, the folder fsynced; a
  crash leaves the old file or the new one, never a torn one, and an error removes the temp.
* :func:`replace_dir` - a folder built in a temp folder, fsynced and renamed into place.
* :func:`fsync_file`, :func:`fsync_path`, :func:`fsync_dir`, :func:`fsync_tree` - the fsyncs
  themselves (for append-only logs that fsync in place).

Folders that commands own (a marker, entries kept across rebuilds) are published by
:func:`aion_train.ownership.publish_dir`; checkpoints by :mod:`aion_train.checkpoint.store`."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Optional, Union

PathLike = Union[str, "os.PathLike[str]"]


def fsync_file(f: Union[IO, int]) -> None:
    """fsync an open file: a file object (flushed first) or a descriptor."""
    if isinstance(f, int):
        os.fsync(f)
        return
    f.flush()
    os.fsync(f.fileno())


def fsync_path(path: PathLike) -> None:
    """fsync a regular file."""
    fd = os.open(os.fspath(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: PathLike) -> None:
    """fsync a directory so that renames/creations inside it are durable.
    Silently ignored where the platform/filesystem does not support it."""
    try:
        fd = os.open(os.fspath(path), os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(root: PathLike) -> None:
    """fsync every file and every folder under `root` (and `root` itself)."""
    for d, _, files in os.walk(root):
        for name in files:
            fsync_path(os.path.join(d, name))
        fsync_dir(d)


class AtomicOutput:
    """A file published atomically at `path`: write `tmp` (a name beside it, not created
    yet), then :meth:`commit` (fsync it, rename it over `path`, fsync the folder) or
    :meth:`abort` (remove it). As a context manager it yields `tmp` and commits on success,
    aborts on an error. `fsync=False` skips the fsyncs (the rename stays atomic)."""

    def __init__(self, path: PathLike, *, fsync: bool = True) -> None:
        self.path = Path(path)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        self.fsync = fsync

    def commit(self) -> Path:
        try:
            if self.fsync:
                fsync_path(self.tmp)
            os.replace(self.tmp, self.path)
        except BaseException:
            self.abort()
            raise
        if self.fsync:
            fsync_dir(self.path.parent)
        return self.path

    def abort(self) -> None:
        try:
            os.unlink(self.tmp)
        except OSError:
            pass

    def __enter__(self) -> Path:
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self.commit()
        else:
            self.abort()
        return False


@contextmanager
def atomic_write(
    path: PathLike, mode: str = "wb", *, encoding: Optional[str] = None, fsync: bool = True
) -> Iterator[IO]:
    """``with atomic_write(path) as f: f.write(...)``: `f` is a temp file beside `path`; on
    leaving the block it is closed, fsynced and renamed over `path`, and the folder is
    fsynced. On an error the temp file is removed and `path` is untouched."""
    if "w" not in mode:
        raise ValueError(f"atomic_write writes a new file: mode {mode!r} has no 'w'")
    if "b" not in mode and encoding is None:
        encoding = "utf-8"
    out = AtomicOutput(path, fsync=fsync)
    try:
        with open(out.tmp, mode, encoding=encoding) as f:
            yield f
    except BaseException:
        out.abort()
        raise
    out.commit()


def atomic_write_text(path: PathLike, text: str, mode: int = 0o644) -> Path:
    """Write `text` (UTF-8) to `path` with :func:`atomic_write`, the file's permissions `mode`."""
    path = Path(path)
    with atomic_write(path, "w") as f:
        f.write(text)
        os.chmod(f.name, mode)
    return path


def replace_dir(tmp: PathLike, final: PathLike) -> Path:
    """Publish the folder built in `tmp` as `final`: fsync everything in it, remove a previous
    `final`, rename, fsync the parent folder."""
    tmp, final = Path(tmp), Path(final)
    fsync_tree(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    return final
