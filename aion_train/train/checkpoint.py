"""Crash-safe, pickle-free checkpoints for multi-rank jobs on a shared filesystem.

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

Training-loop protocol (``barrier`` = ``torch.distributed.barrier``)::

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
import math
import os
import random
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple, Union

import numpy as np
import torch

from aion_train.config.load import flatten
from aion_train.fsutil import atomic_write_text

from .tree_io import (
    CheckpointError,
    TreeFormatError,
    fsync_dir,
    load_tree,
    save_tree,
    tree_paths,
)

__all__ = [
    "CheckpointError",
    "TreeFormatError",
    "CheckpointManager",
    "save_tree",
    "load_tree",
    "save_rank",
    "load_rank",
    "rank_prefix",
    "rank_file_names",
    "list_ranks",
    "capture_rng_state",
    "restore_rng_state",
    "check_compatible",
    "flatten_config",
]

PathLike = Union[str, "os.PathLike[str]"]

MANIFEST_NAME = "manifest.json"
LATEST_NAME = "latest"
MANIFEST_FORMAT = "aion_train.checkpoint"
MANIFEST_VERSION = 1
_RESERVED_MANIFEST_KEYS = {"format", "version", "step", "created_unix", "files"}
_STEP_RE = re.compile(r"^step_(\d{8,})$")
_TMP_RE = re.compile(r"^\.tmp-step_(\d{8,})$")
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


# =========================================================================== per-rank payloads

def _check_name(name: str) -> None:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(f"invalid payload name {name!r}: use letters, digits, '_', '-', '.'")


def rank_prefix(folder: PathLike, rank: int, name: str) -> Path:
    """Path prefix of one rank's payload: ``folder/{name}.rank{rank:05d}``."""
    _check_name(name)
    if type(rank) is not int or rank < 0:
        raise ValueError(f"invalid rank {rank!r}")
    return Path(folder) / f"{name}.rank{rank:05d}"


def rank_file_names(name: str, ranks: Union[int, Iterable[int]]) -> List[str]:
    """File names written by ``save_rank`` for ``ranks`` (an int means ``range(ranks)``)."""
    if isinstance(ranks, int):
        ranks = range(ranks)
    out: List[str] = []
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


def load_rank(folder: PathLike, rank: int, name: str, *,
              device: Union[str, torch.device] = "cpu") -> Any:
    """Load what ``save_rank(folder, rank, name, ...)`` wrote."""
    prefix = rank_prefix(folder, rank, name)
    json_path, _ = tree_paths(prefix)
    if not json_path.exists():
        avail = list_ranks(folder, name)
        raise CheckpointError(
            f"{folder}: no '{name}' payload for rank {rank} "
            f"(ranks present: {avail if avail else 'none'}); was the checkpoint written "
            "with a different world size?")
    return load_tree(prefix, device=device)


def list_ranks(folder: PathLike, name: str) -> List[int]:
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


# =========================================================================== RNG state

def capture_rng_state() -> Dict[str, Any]:
    """RNG state of python ``random``, numpy's global RNG, torch CPU and (if
    available) the current CUDA device, as a structure ``save_tree`` accepts."""
    version, internal, gauss_next = random.getstate()
    np_state = np.random.get_state(legacy=False)
    if np_state.get("bit_generator") != "MT19937":  # pragma: no cover - numpy's legacy global RNG
        raise CheckpointError(f"unsupported numpy bit generator {np_state.get('bit_generator')!r}")
    state: Dict[str, Any] = {
        "python": {"version": int(version), "internal": [int(x) for x in internal],
                   "gauss_next": gauss_next},
        "numpy": {
            "bit_generator": "MT19937",
            "key": np.asarray(np_state["state"]["key"], dtype=np.uint32).copy(),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        dev = torch.cuda.current_device()
        state["cuda"] = {"device": int(dev), "state": torch.cuda.get_rng_state(dev)}
    return state


def restore_rng_state(state: Mapping[str, Any], *, strict_cuda: bool = False) -> List[str]:
    """Restore what :func:`capture_rng_state` captured; returns the parts restored.

    The CUDA state is applied to the *current* device (ranks may map to other
    device indices after a restart).  If the checkpoint has a CUDA state but
    CUDA is unavailable it is skipped, or ``CheckpointError`` is raised with
    ``strict_cuda=True``.
    """
    done: List[str] = []
    if "python" in state:
        p = state["python"]
        random.setstate((int(p["version"]), tuple(int(x) for x in p["internal"]), p["gauss_next"]))
        done.append("python")
    if "numpy" in state:
        n = state["numpy"]
        np.random.set_state({
            "bit_generator": n["bit_generator"],
            "state": {"key": np.asarray(n["key"], dtype=np.uint32), "pos": int(n["pos"])},
            "has_gauss": int(n["has_gauss"]),
            "gauss": float(n["gauss"]),
        })
        done.append("numpy")
    if "torch" in state:
        torch.set_rng_state(state["torch"].to("cpu", torch.uint8))
        done.append("torch")
    if "cuda" in state:
        if torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"]["state"].to("cpu", torch.uint8),
                                     torch.cuda.current_device())
            done.append("cuda")
        elif strict_cuda:
            raise CheckpointError("checkpoint holds a CUDA RNG state but CUDA is not available")
    return done


# =========================================================================== config compatibility

def flatten_config(cfg: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
    """Flatten nested mappings into ``{"a.b.c": value}`` (tuples become lists)."""
    return {k: _normalise(v) for k, v in flatten(cfg, prefix).items()}


def _normalise(v: Any) -> Any:
    if isinstance(v, (list, tuple)):
        return [_normalise(x) for x in v]
    if isinstance(v, Mapping):
        return {str(k): _normalise(x) for k, x in v.items()}
    return v


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    try:
        return bool(a == b)
    except Exception:  # pragma: no cover - exotic values
        return False


_MISSING = object()


def check_compatible(saved: Mapping[str, Any], current: Mapping[str, Any],
                     what: str = "model config", *, ignore: Iterable[str] = ()) -> None:
    """Raise ``CheckpointError`` listing every key whose value differs.

    Both configs may be nested or already flattened (dotted keys).  Keys equal
    to an entry of ``ignore`` or below it (``ignore=["train"]`` skips
    ``train.lr``) are not compared.  Message lines look like
    ``model.d_model: checkpoint 128 != config 256``.
    """
    a, b = flatten_config(saved), flatten_config(current)
    ignore = tuple(ignore)

    def ignored(key: str) -> bool:
        return any(key == i or key.startswith(i + ".") for i in ignore)

    lines = []
    for key in sorted(set(a) | set(b)):
        if ignored(key):
            continue
        va, vb = a.get(key, _MISSING), b.get(key, _MISSING)
        if va is not _MISSING and vb is not _MISSING and _same(va, vb):
            continue
        sa = "<missing>" if va is _MISSING else repr(va)
        sb = "<missing>" if vb is _MISSING else repr(vb)
        lines.append(f"  {key}: checkpoint {sa} != config {sb}")
    if lines:
        raise CheckpointError(
            f"{what} of the checkpoint is incompatible with the current run "
            f"({len(lines)} {'key differs' if len(lines) == 1 else 'keys differ'}):\n" + "\n".join(lines))


# =========================================================================== manager

def _sha256(path: Path, fsync: bool = False) -> Tuple[int, str]:
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
                os.fsync(f.fileno())
            except OSError:
                pass
    return size, h.hexdigest()


def _atomic_write_text(path: Path, text: str) -> None:
    atomic_write_text(path, text)


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

    def commit(self, step: int, manifest: Optional[Mapping[str, Any]] = None, *,
               required_files: Iterable[str] = ()) -> Path:
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
            raise CheckpointError(f"cannot commit step {step}: {tmp} does not exist "
                                  "(call prepare()/begin() and write files first)")
        user = dict(manifest or {})
        clash = _RESERVED_MANIFEST_KEYS & set(user)
        if clash:
            raise ValueError(f"manifest fields {sorted(clash)} are reserved")
        try:  # fail before the (possibly long) hashing pass
            json.dumps(user, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise TypeError(f"manifest fields must be plain JSON (no NaN/inf): {e}") from None

        files: Dict[str, Dict[str, Any]] = {}
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

        doc = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "step": step,
               "created_unix": time.time(), "files": files}
        doc.update(user)
        try:
            text = json.dumps(doc, indent=2, sort_keys=False, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise TypeError(f"manifest fields must be plain JSON (no NaN/inf): {e}") from None
        _atomic_write_text(tmp / MANIFEST_NAME, text + "\n")
        for d in subdirs:
            fsync_dir(d)
        fsync_dir(tmp)

        trash = None
        if final.exists():  # re-saving a step: move the old one out of the way first
            trash = self._trash_name(final)
            os.rename(final, trash)
        os.rename(tmp, final)
        fsync_dir(self.root)
        _atomic_write_text(self.latest_file, final.name + "\n")
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
        self.prune(current_step=step)
        return final

    # ------------------------------------------------------------------ reading
    def read_manifest(self, path: PathLike) -> Dict[str, Any]:
        """Parse and sanity-check ``path/manifest.json`` (no checksums)."""
        path = Path(path)
        mpath = path / MANIFEST_NAME
        try:
            with open(mpath, "r", encoding="utf-8") as f:
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
            raise CheckpointError(f"{mpath}: manifest step {doc['step']} does not match "
                                  f"folder name {path.name}")
        return doc

    def verify(self, path: PathLike) -> Dict[str, Any]:
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
                raise CheckpointError(f"{path}: file {rel!r} has size {size}, "
                                      f"manifest says {info.get('size')}")
            if digest != info.get("sha256"):
                raise CheckpointError(f"{path}: file {rel!r} is corrupted "
                                      f"(sha256 {digest} != manifest {info.get('sha256')})")
        return doc

    def list_checkpoints(self) -> List[Tuple[int, Path]]:
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

    def prune(self, current_step: Optional[int] = None) -> List[Path]:
        """Rank 0: delete ``step_*`` folders beyond the newest ``keep_last`` (never
        the one ``latest`` points to), leftover trash, and temp folders of steps
        older than ``current_step``.  Returns the removed checkpoint folders."""
        removed: List[Path] = []
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
        keep = {p for _, p in ckpts[-self.keep_last:]}
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

