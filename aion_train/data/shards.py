"""WebDataset tar shards: writing (atomic, checksummed manifest) and reading samples.

A sample is a dict ``{"__key__": str, field: bytes, ...}``; each field becomes the tar member
``<key>.<field>`` (WebDataset's convention), e.g. ``txt`` today and ``jpg``/``wav``/``json``
for the image and audio issues, with no change to the writer. Shards are named
``{prefix}-{i:05d}.tar``, each written under a temporary name and renamed when complete,
with fixed member metadata (mtime, owner, mode) so that the same samples give the same
bytes and the same sha256.

``manifest.json`` in the output directory describes every prefix written there::

    {"format": "aion-wds-v1",
     "splits": {"train": {"num_shards": 8, "num_samples": 478, "fields": {"txt": 478},
                          "samples_per_shard": 64,
                          "shards": [{"name": "train-00000.tar", "num_samples": 64,
                                      "bytes": 81920, "sha256": "...",
                                      "fields": {"txt": 64}}, ...]},
                "val": {...}}}

Reading uses WebDataset's own tar iteration (``tar_file_iterator`` + ``group_by_keys``);
:func:`iter_shard_samples` adds what the resumable loader needs: a stable per-shard sample
index, and a truncated or corrupt tar ending the shard with an error marker instead of an
exception.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from webdataset import TarWriter
from webdataset.tariterators import group_by_keys, tar_file_iterator

from aion_train.fsutil import AtomicOutput, atomic_write

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = "aion-wds-v1"
FIXED_MTIME = 0  # an int: a float mtime makes tarfile add a PAX header per member
_KEY_RE = re.compile(r"^[A-Za-z0-9_\-/]+$")
_FIELD_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")


def shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:05d}.tar"


def sha256_file(path: str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def _as_bytes(field: str, value: Any) -> bytes:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        return value.encode("utf-8")
    raise TypeError(
        f"field {field!r}: expected bytes or str, got {type(value).__name__} "
        "(encode images/audio/json to bytes before writing)"
    )


def _check_sample(sample: Mapping[str, Any], default_key: str) -> tuple[str, dict[str, bytes]]:
    key = str(sample.get("__key__", default_key))
    # WebDataset splits member names at the first dot of the basename: keys carry none.
    if not _KEY_RE.match(key):
        raise ValueError(f"sample key {key!r} must match {_KEY_RE.pattern} (no dots)")
    fields = {}
    for k, v in sample.items():
        if k.startswith("_"):
            continue
        if not _FIELD_RE.match(k):
            raise ValueError(f"bad field name {k!r}")
        fields[k] = _as_bytes(k, v)
    if not fields:
        raise ValueError(f"sample {key!r} has no fields")
    return key, fields


class _ShardFile:
    """One shard being written: a TarWriter on a temp file, published on commit."""

    def __init__(self, out_dir: str, name: str):
        self.name = name
        self.path = os.path.join(out_dir, name)
        self._out = AtomicOutput(self.path)
        self._f = open(self._out.tmp, "wb")
        self._w = TarWriter(self._f, encoder=False, mtime=FIXED_MTIME, user="aion", group="aion", mode=0o444)
        self.num_samples = 0
        self.fields: dict[str, int] = {}

    def write(self, key: str, fields: dict[str, bytes]) -> None:
        self._w.write({"__key__": key, **fields})
        self.num_samples += 1
        for k in fields:
            self.fields[k] = self.fields.get(k, 0) + 1

    def commit(self) -> dict:
        self._w.close()  # writes the tar end blocks; the file object is ours to close
        self._f.close()
        self._out.commit()
        return {
            "name": self.name,
            "num_samples": self.num_samples,
            "bytes": os.path.getsize(self.path),
            "sha256": sha256_file(self.path),
            "fields": dict(sorted(self.fields.items())),
        }

    def abort(self) -> None:
        try:
            self._f.close()
        finally:
            self._out.abort()


def write_shards(samples: Iterable[Mapping[str, Any]], out_dir: str, prefix: str, samples_per_shard: int) -> list[str]:
    """Write ``samples`` (dicts of field -> bytes/str, optional ``__key__``) as
    ``{prefix}-{i:05d}.tar`` shards of at most ``samples_per_shard`` samples in
    ``out_dir`` and record them under ``prefix`` in ``out_dir/manifest.json``. Samples
    without a key get ``{prefix}_{n:09d}``. Older shards of ``prefix`` that the previous
    manifest lists and this run does not rewrite are removed; nothing else is. Returns the shard paths in order."""
    if samples_per_shard < 1:
        raise ValueError("samples_per_shard must be >= 1")
    if not re.match(r"^[A-Za-z0-9_]+$", prefix):
        raise ValueError(f"prefix {prefix!r} must be alphanumeric/underscore")
    os.makedirs(out_dir, exist_ok=True)
    entries: list[dict] = []
    keys: set[str] = set()
    cur: _ShardFile | None = None
    try:
        for n, sample in enumerate(samples):
            key, fields = _check_sample(sample, f"{prefix}_{n:09d}")
            if key in keys:
                raise ValueError(f"duplicate sample key {key!r}")
            keys.add(key)
            if cur is None:
                cur = _ShardFile(out_dir, shard_name(prefix, len(entries)))
            cur.write(key, fields)
            if cur.num_samples >= samples_per_shard:
                entries.append(cur.commit())
                cur = None
        if cur is not None:
            entries.append(cur.commit())
            cur = None
    except BaseException:
        if cur is not None:
            cur.abort()
        raise
    # stale shards of an earlier, longer run under the same prefix: only those its manifest
    # lists (a file of the same name that the manifest does not list is not ours)
    manifest = read_manifest(out_dir) if os.path.exists(os.path.join(out_dir, MANIFEST)) else {}
    written = {e["name"] for e in entries}
    for e in manifest.get("splits", {}).get(prefix, {}).get("shards", []):
        if e["name"] not in written and os.path.isfile(os.path.join(out_dir, e["name"])):
            os.remove(os.path.join(out_dir, e["name"]))
    fields: dict[str, int] = {}
    for e in entries:
        for k, v in e["fields"].items():
            fields[k] = fields.get(k, 0) + v
    split = {
        "num_shards": len(entries),
        "num_samples": sum(e["num_samples"] for e in entries),
        "fields": dict(sorted(fields.items())),
        "samples_per_shard": samples_per_shard,
        "shards": entries,
    }
    manifest.setdefault("format", FORMAT)
    manifest.setdefault("splits", {})[prefix] = split
    write_manifest(out_dir, manifest)
    return [os.path.join(out_dir, e["name"]) for e in entries]


def write_manifest(out_dir: str, manifest: dict) -> str:
    """Write ``manifest`` as out_dir/manifest.json atomically."""
    path = os.path.join(out_dir, MANIFEST)
    with atomic_write(path, "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.write("\n")
    return path


def read_manifest(out_dir: str) -> dict:
    """The parsed ``manifest.json`` of a shard directory (FileNotFoundError if none)."""
    with open(os.path.join(out_dir, MANIFEST), encoding="utf-8") as f:
        manifest = json.load(f)
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{out_dir}/{MANIFEST}: unknown format {manifest.get('format')!r}")
    return manifest


def manifest_shards(out_dir: str, prefix: str) -> list[str]:
    """Paths of the shards that the manifest lists under ``prefix``."""
    split = read_manifest(out_dir)["splits"][prefix]
    return [os.path.join(out_dir, e["name"]) for e in split["shards"]]


def verify_manifest(out_dir: str, checksums: bool = True) -> list[str]:
    """Problems found comparing the manifest with the files (empty list: all good)."""
    problems = []
    try:
        manifest = read_manifest(out_dir)
    except (OSError, ValueError) as e:
        return [f"manifest: {e}"]
    for split in manifest.get("splits", {}).values():
        for e in split.get("shards", []):
            path = os.path.join(out_dir, e["name"])
            if not os.path.isfile(path):
                problems.append(f"{e['name']}: missing")
            elif os.path.getsize(path) != e["bytes"]:
                problems.append(f"{e['name']}: {os.path.getsize(path)} bytes, manifest says {e['bytes']}")
            elif checksums and sha256_file(path) != e["sha256"]:
                problems.append(f"{e['name']}: sha256 mismatch")
    return problems


def summarize_manifest(manifest: dict) -> str:
    lines = []
    for prefix, s in sorted(manifest.get("splits", {}).items()):
        nbytes = sum(e["bytes"] for e in s["shards"])
        fields = ", ".join(f"{k}={v}" for k, v in s["fields"].items())
        lines.append(
            f"{prefix}: {s['num_shards']} shards, {s['num_samples']} samples, {nbytes / 1e6:.2f} MB, fields: {fields}"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------- reading
class ShardError:
    """Marker yielded in place of the rest of a shard that could not be read."""

    __slots__ = ("url", "error")

    def __init__(self, url: str, error: BaseException):
        self.url, self.error = url, error

    def __repr__(self) -> str:
        return f"ShardError({self.url!r}, {self.error!r})"


def iter_shard_samples(path: str) -> Iterator[dict | ShardError]:
    """Samples of one tar shard in file order, each a dict ``{"__key__", "__url__", field:
    bytes}``. A read error (truncated or corrupt tar) ends the shard with one
    :class:`ShardError` item instead of raising; the samples before it are yielded
    (the one being read when the error hit carries only its complete fields)."""
    errors: list[BaseException] = []

    def first_error(exn: BaseException) -> bool:
        errors.append(exn)
        return False  # stop this tar: after a bad member the stream position is unknown

    def files(stream) -> Iterator[dict]:
        try:
            for item in tar_file_iterator(stream, handler=first_error):
                item["__url__"] = path
                yield item
        except Exception as exn:  # header-level errors escape tar_file_iterator's handler
            errors.append(exn)

    try:
        with open(path, "rb") as stream:
            yield from group_by_keys(files(stream))
    except Exception as exn:  # open() failure or a bad member name
        errors.append(exn)
    if errors:
        yield ShardError(path, errors[0])
