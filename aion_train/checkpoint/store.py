"""The checkpoint store: atomic multi-rank checkpoint folders on a shared filesystem.

Layout under ``root``::

    root/
      latest                     # text file: "step_00001000\\n"
      step_00000900/             # complete checkpoints (atomic rename of a temp folder)
        manifest.json            # step, files (size + sha256), user fields
        model.rank00000.json
        model.rank00000.safetensors
        ...
      step_00001000/
      .tmp-step_00001100/        # being written (or left behind by a crash)

The save protocol (``barrier`` = ``torch.distributed.barrier``), which
:func:`aion_train.checkpoint.protocol.save_checkpoint` runs for every job::

    mgr = CheckpointManager(root, keep_last=2)
    if rank == 0:
        mgr.prepare(step)              # removes a stale temp folder of a crashed write
    barrier()
    folder = mgr.begin(step)           # every rank; idempotent
    save_rank(folder, rank, "model", model.state_dict())
    save_rank(folder, rank, "optim", optimizer.state_dict())
    save_rank(folder, rank, "rng", capture_rng_state())
    barrier()
    if rank == 0:
        mgr.commit(step, {"model_config": cfg, "world_size": world_size})
    barrier()                          # optional: lets every rank see the new checkpoint

Resuming::

    ckpt = mgr.latest()                # None for a fresh run
    if ckpt is not None:
        manifest = mgr.read_manifest(ckpt)     # or mgr.verify(ckpt) to check sha256
        check_compatible(manifest["model_config"], cfg)
        model.load_state_dict(load_rank(ckpt, rank, "model"))
        ...
        restore_rng_state(load_rank(ckpt, rank, "rng"))

A crash at any point before ``commit`` renames the temp folder leaves the
previous checkpoint and the ``latest`` pointer untouched.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Optional

from aion_train.fsutil import atomic_write_text, fsync_dir, fsync_file

from .compat import check_compatible
from .errors import CheckpointError
from .tree_format import PathLike

__all__ = ["CheckpointManager", "MANIFEST_NAME"]

MANIFEST_NAME = "manifest.json"
LATEST_NAME = "latest"
MANIFEST_FORMAT = "aion_train.checkpoint"
MANIFEST_VERSION = 1
_RESERVED_MANIFEST_KEYS = {"format", "version", "step", "created_unix", "files"}
_STEP_RE = re.compile(r"^step_(\d{8,})$")
_TMP_RE = re.compile(r"^\.tmp-step_(\d{8,})$")


def _sha256(path: Path, fsync: bool = False) -> tuple[int, str]:
    """(size, sha256 hex) of a file, optionally fsyncing it on the way."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while True:
            chunk = f.read(1 << 22)
            if not chunk:
                break
            h.update(chunk)
            size += len(chunk)
        if fsync:
            try:
                fsync_file(f)
            except OSError:
                pass
    return size, h.hexdigest()


class CheckpointManager:
    """Atomic multi-rank checkpoint folders with a ``latest`` pointer and pruning.

    Only rank 0 should call :meth:`prepare`, :meth:`commit` and :meth:`prune`;
    every rank calls :meth:`begin` (after a barrier that follows ``prepare``)
    and writes its own files into the returned folder.
    """

    def __init__(self, root: PathLike, keep_last: Optional[int] = 2) -> None:
        if keep_last is not None and (type(keep_last) is not int or keep_last < 1):
            raise ValueError(f"keep_last must be a positive int or None, got {keep_last!r}")
        self.root = Path(root)
        self.keep_last = keep_last

    # ------------------------------------------------------------------ names
    @staticmethod
    def _check_step(step: int) -> int:
        if type(step) is not int or step < 0:
            raise ValueError(f"step must be a non-negative int, got {step!r}")
        return step

    def step_dir(self, step: int) -> Path:
        """Final folder of a committed checkpoint: ``root/step_{step:08d}``."""
        return self.root / f"step_{self._check_step(step):08d}"

    def tmp_dir(self, step: int) -> Path:
        """Temporary folder a checkpoint is written into: ``root/.tmp-step_{step:08d}``."""
        return self.root / f".tmp-step_{self._check_step(step):08d}"

    @property
    def latest_file(self) -> Path:
        return self.root / LATEST_NAME

    # ------------------------------------------------------------------ writing
    def prepare(self, step: int) -> Path:
        """Rank 0, before a barrier: remove a stale temp folder left by a crashed
        write of ``step`` and create a fresh empty one.  Returns it."""
        tmp = self.tmp_dir(step)
        self.root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            self._remove_tree(tmp)
        tmp.mkdir()
        fsync_dir(self.root)
        return tmp

    def begin(self, step: int) -> Path:
        """Every rank: the temp folder to write into (created if needed; idempotent)."""
        tmp = self.tmp_dir(step)
        tmp.mkdir(parents=True, exist_ok=True)
        return tmp

    def commit(
        self, step: int, manifest: Optional[Mapping[str, Any]] = None, *, required_files: Iterable[str] = ()
    ) -> Path:
        """Rank 0, after all ranks wrote their files: seal and publish ``step``.

        Hashes and fsyncs every file, writes ``manifest.json`` (step, files with
        size + sha256, plus the JSON-serialisable ``manifest`` fields), fsyncs
        the folder, renames it to ``step_{step:08d}``, atomically repoints
        ``latest`` and prunes old checkpoints.  ``required_files`` (e.g.
        ``rank_file_names("model", world_size)``) must all be present.
        Returns the final folder.
        """
        tmp = self.tmp_dir(step)
        final = self.step_dir(step)
        if not tmp.is_dir():
            raise CheckpointError(
                f"cannot commit step {step}: {tmp} does not exist (call prepare()/begin() and write files first)"
            )
        user = dict(manifest or {})
        clash = _RESERVED_MANIFEST_KEYS & set(user)
        if clash:
            raise ValueError(f"manifest fields {sorted(clash)} are reserved")
        try:  # fail before the (possibly long) hashing pass
            json.dumps(user, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise TypeError(f"manifest fields must be plain JSON (no NaN/inf): {e}") from None

        files: dict[str, dict[str, Any]] = {}
        subdirs = []
        for p in sorted(tmp.rglob("*")):
            rel = p.relative_to(tmp).as_posix()
            if p.is_symlink():
                raise CheckpointError(f"{tmp}: symlinks are not allowed in a checkpoint ({rel})")
            if p.is_dir():
                subdirs.append(p)
                continue
            if rel == MANIFEST_NAME:
                continue
            if ".tmp-" in p.name:
                raise CheckpointError(f"{tmp}: unfinished write {rel!r}; refusing to commit")
            size, digest = _sha256(p, fsync=True)
            files[rel] = {"size": size, "sha256": digest}
        missing = [f for f in required_files if f not in files]
        if missing:
            raise CheckpointError(f"cannot commit step {step}: missing files {missing}")

        doc = {
            "format": MANIFEST_FORMAT,
            "version": MANIFEST_VERSION,
            "step": step,
            "created_unix": time.time(),
            "files": files,
        }
        doc.update(user)
        try:
            text = json.dumps(doc, indent=2, sort_keys=False, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise TypeError(f"manifest fields must be plain JSON (no NaN/inf): {e}") from None
        atomic_write_text(tmp / MANIFEST_NAME, text + "\n")
        for d in subdirs:
            fsync_dir(d)
        fsync_dir(tmp)

        trash = None
        if final.exists():  # re-saving a step: move the old one out of the way first
            trash = self._trash_name(final)
            os.rename(final, trash)
        os.rename(tmp, final)
        fsync_dir(self.root)
        atomic_write_text(self.latest_file, final.name + "\n")
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
        self.prune(current_step=step)
        return final

    # ------------------------------------------------------------------ reading
    def read_manifest(self, path: PathLike) -> dict[str, Any]:
        """Parse and sanity-check ``path/manifest.json`` (no checksums)."""
        path = Path(path)
        mpath = path / MANIFEST_NAME
        try:
            with open(mpath, encoding="utf-8") as f:
                doc = json.load(f)
        except FileNotFoundError:
            raise CheckpointError(f"{path}: no {MANIFEST_NAME} (incomplete checkpoint)") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{mpath}: unreadable manifest: {e}") from None
        if not isinstance(doc, dict) or doc.get("format") != MANIFEST_FORMAT:
            raise CheckpointError(f"{mpath}: not an {MANIFEST_FORMAT} manifest")
        if doc.get("version") != MANIFEST_VERSION:
            raise CheckpointError(f"{mpath}: unsupported manifest version {doc.get('version')!r}")
        if type(doc.get("step")) is not int or not isinstance(doc.get("files"), dict):
            raise CheckpointError(f"{mpath}: malformed manifest (step/files)")
        m = _STEP_RE.match(path.name)
        if m and int(m.group(1)) != doc["step"]:
            raise CheckpointError(f"{mpath}: manifest step {doc['step']} does not match folder name {path.name}")
        return doc

    def verify(self, path: PathLike) -> dict[str, Any]:
        """Check every file listed in the manifest (existence, size, sha256).

        Raises ``CheckpointError`` naming the first bad file; returns the manifest.
        """
        path = Path(path)
        doc = self.read_manifest(path)
        for rel, info in doc["files"].items():
            p = path / rel
            if not p.is_file():
                raise CheckpointError(f"{path}: file {rel!r} listed in the manifest is missing")
            size, digest = _sha256(p)
            if size != info.get("size"):
                raise CheckpointError(f"{path}: file {rel!r} has size {size}, manifest says {info.get('size')}")
            if digest != info.get("sha256"):
                raise CheckpointError(
                    f"{path}: file {rel!r} is corrupted (sha256 {digest} != manifest {info.get('sha256')})"
                )
        return doc

    def list_checkpoints(self) -> list[tuple[int, Path]]:
        """``(step, folder)`` of every ``step_*`` folder, oldest first (not validated)."""
        out = []
        if self.root.is_dir():
            for p in self.root.iterdir():
                m = _STEP_RE.match(p.name)
                if m and p.is_dir():
                    out.append((int(m.group(1)), p))
        return sorted(out)

    def _valid(self, path: Path, verify: bool) -> bool:
        try:
            self.verify(path) if verify else self.read_manifest(path)
            return True
        except CheckpointError:
            return False

    def _pointer_target(self) -> Optional[Path]:
        try:
            name = self.latest_file.read_text(encoding="utf-8").strip()
        except (FileNotFoundError, UnicodeDecodeError, IsADirectoryError):
            return None
        if not _STEP_RE.match(name):
            return None
        return self.root / name

    def latest(self, *, verify: bool = False) -> Optional[Path]:
        """The checkpoint ``latest`` points to, or - if the pointer is missing or
        points to a missing/broken folder - the newest ``step_*`` folder with a
        valid manifest; ``None`` if there is none.  ``verify=True`` also checks
        sha256 of every candidate (reads all data)."""
        target = self._pointer_target()
        if target is not None and target.is_dir() and self._valid(target, verify):
            return target
        for _, p in reversed(self.list_checkpoints()):
            if self._valid(p, verify):
                return p
        return None

    def latest_step(self) -> Optional[int]:
        p = self.latest()
        return None if p is None else self.read_manifest(p)["step"]

    # ------------------------------------------------------------------ cleanup
    def _trash_name(self, p: Path) -> Path:
        return self.root / f".trash-{p.name}-{uuid.uuid4().hex[:8]}"

    def _remove_tree(self, p: Path) -> None:
        # rename first so a half-deleted folder never looks like a checkpoint
        trash = self._trash_name(p)
        try:
            os.rename(p, trash)
        except OSError:
            trash = p
        shutil.rmtree(trash, ignore_errors=True)

    def prune(self, current_step: Optional[int] = None) -> list[Path]:
        """Rank 0: delete ``step_*`` folders beyond the newest ``keep_last`` (never
        the one ``latest`` points to), leftover trash, and temp folders of steps
        older than ``current_step``.  Returns the removed checkpoint folders."""
        removed: list[Path] = []
        if not self.root.is_dir():
            return removed
        for p in self.root.iterdir():
            if p.name.startswith(".trash-"):
                shutil.rmtree(p, ignore_errors=True)
            elif current_step is not None:
                m = _TMP_RE.match(p.name)
                if m and int(m.group(1)) < current_step:
                    self._remove_tree(p)
        if self.keep_last is None:
            return removed
        ckpts = self.list_checkpoints()
        keep = {p for _, p in ckpts[-self.keep_last :]}
        target = self._pointer_target()
        if target is not None:
            keep.add(target)
        for _, p in ckpts:
            if p not in keep:
                self._remove_tree(p)
                removed.append(p)
        if removed:
            fsync_dir(self.root)
        return removed

    check_compatible = staticmethod(check_compatible)
