"""The audit log: one append-only JSONL record per request, hash-chained.

Each line is the canonical JSON (sorted keys, no spaces, UTF-8) of one record:

    {"v": 1, "time": "2026-12-02T10:00:00.123Z", "request_id": "...", "endpoint": "...",
     "model": "...", "status": 200, "jurisdiction": "eu-de", "policy_sha256": "...",
     "bundle_sha256": "...", "actions": {rule id: {"action", "matches"}}, "blocked": 0,
     "prompt_tokens": 12, "completion_tokens": 30, ..., "prev_sha256": "...", "sha256": "..."}

`sha256` is the hash of the record's canonical JSON without the `sha256` field, and
`prev_sha256` the `sha256` of the record before it (64 zeros for the first). Records hold
counts and hashes only: never prompt or output text. `verify(path)` checks every record's
own hash (an edited record is caught on its own line) and the chain (a removed, inserted or
reordered record is caught on the line after the gap). Cutting records off the end leaves a
valid shorter chain: compare `head` (the last record's sha256, printed by
`aion-train audit verify`) with a copy kept elsewhere to catch that.

Writes: every record is written to the OS at once (one `write` of one line, O_APPEND);
`fsync` runs every `fsync_every` records or `fsync_interval` seconds, whichever comes
first, and on close (a new file's folder is fsynced once, so the file itself survives).
A killed process loses nothing that was written; a machine crash can lose the records since
the last fsync, never the ones before it (each write only appends after them). What a crash
can leave is a torn tail: an incomplete last line (part of a record, or zeros where the file
grew but its data never reached the disk). `verify` reports it as `torn_tail` with the count
of good records before it; a new writer refuses to append after it, and `repair` (`aion-train
audit repair LOG`) moves the torn bytes to `LOG.torn-<time>` and cuts the log back to its last
good record. Any other damage (an edited, removed or reordered record) is evidence: `repair`
refuses it.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aion_train.fsutil import atomic_write, fsync_dir, fsync_file

GENESIS = "0" * 64
VERSION = 1


class AuditError(Exception):
    pass


def canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")


def record_hash(record: dict) -> str:
    return hashlib.sha256(canonical({k: v for k, v in record.items() if k != "sha256"})).hexdigest()


def utc_now() -> str:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"


@dataclass
class VerifyResult:
    ok: bool
    records: int
    head: str  # sha256 of the last good record
    bad_line: int | None = None  # 1-based
    reason: str = ""
    torn_tail: bool = False  # the only damage: an incomplete last line (a crash mid-write)
    good_bytes: int = 0  # bytes up to the end of the last good record


def verify(path: str | os.PathLike) -> VerifyResult:
    prev, n, good = GENESIS, 0, 0
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, start=1):

            def bad(msg: str, torn: bool = False) -> VerifyResult:
                return VerifyResult(False, n, prev, lineno, msg, torn_tail=torn, good_bytes=good)

            if not line.endswith(b"\n"):
                return bad(
                    f"the last {len(line)} bytes are an incomplete record (a write torn by a crash); "
                    f"the {n} records before it verify (`aion-train audit repair` cuts the torn tail off)",
                    torn=True,
                )
            try:
                rec = json.loads(line)
            except ValueError as e:
                return bad(f"not JSON ({e})")
            if not isinstance(rec, dict) or not isinstance(rec.get("sha256"), str):
                return bad("not an audit record (no sha256)")
            if record_hash(rec) != rec["sha256"]:
                return bad("the record does not match its sha256 (edited)")
            if rec.get("prev_sha256") != prev:
                return bad(
                    "prev_sha256 does not match the record before it (a record was removed, inserted or reordered)"
                )
            prev, n, good = rec["sha256"], n + 1, good + len(line)
    return VerifyResult(True, n, prev, good_bytes=good)


@dataclass
class RepairResult:
    records: int  # good records kept
    head: str
    torn_bytes: int  # bytes cut off (0: nothing to repair)
    saved_to: Path | None  # where the cut bytes were kept


def repair(path: str | os.PathLike) -> RepairResult:
    """Cut a torn tail (see the module docstring) off the log, keeping the cut bytes in
    `LOG.torn-<time>`; AuditError for any other damage, which is never repaired."""
    path = Path(path)
    res = verify(path)
    if res.ok:
        return RepairResult(res.records, res.head, 0, None)
    if not res.torn_tail:
        raise AuditError(f"{path}: line {res.bad_line}: {res.reason}; not a torn tail, so not repaired")
    with open(path, "r+b") as f:
        f.seek(res.good_bytes)
        torn = f.read()
        saved = path.with_name(f"{path.name}.torn-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}")
        with atomic_write(saved) as out:
            out.write(torn)
        f.truncate(res.good_bytes)
        fsync_file(f)
    return RepairResult(res.records, res.head, len(torn), saved)


def _last_line(path: Path) -> bytes | None:
    size = path.stat().st_size
    if size == 0:
        return None
    with open(path, "rb") as f:
        block = 1 << 16
        pos, buf = size, b""
        while pos > 0:
            step = min(block, pos)
            pos -= step
            f.seek(pos)
            buf = f.read(step) + buf
            body = buf[:-1] if buf.endswith(b"\n") else buf
            i = body.rfind(b"\n")
            if i >= 0:
                return buf[i + 1 :]
        return buf


class AuditLog:
    def __init__(self, path: str | os.PathLike, fsync_every: int = 64, fsync_interval: float = 1.0):
        self.path = Path(path)
        self.fsync_every = max(1, int(fsync_every))
        self.fsync_interval = float(fsync_interval)
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.head = GENESIS
        if self.path.exists():
            last = _last_line(self.path)
            if last is not None:
                try:
                    rec = json.loads(last)
                    ok = last.endswith(b"\n") and record_hash(rec) == rec.get("sha256")
                except ValueError:
                    ok = False
                if not ok:
                    raise AuditError(
                        f"{self.path}: the last record is damaged; refusing to append "
                        f"(`aion-train audit verify {self.path}` says what it is; a torn tail from a crash "
                        f"is cut off by `aion-train audit repair {self.path}`)"
                    )
                self.head = rec["sha256"]
        created = not self.path.exists()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        if created:
            fsync_dir(self.path.parent)
        self._unsynced = 0
        self._last_sync = time.monotonic()
        self._closed = False
        self._stop = threading.Event()
        self._timer = threading.Thread(target=self._sync_loop, name="aion-audit-fsync", daemon=True)
        self._timer.start()

    def append(self, fields: dict) -> dict:
        """Write one record (adds v, time unless given, prev_sha256, sha256); returns it."""
        with self._lock:
            if self._closed:
                raise AuditError(f"{self.path}: the audit log is closed")
            rec = {"v": VERSION, "time": utc_now(), **fields, "prev_sha256": self.head}
            rec.pop("sha256", None)
            rec["sha256"] = record_hash(rec)
            line = canonical(rec) + b"\n"
            written = os.write(self._fd, line)
            if written != len(line):
                raise AuditError(f"{self.path}: short write ({written} of {len(line)} bytes)")
            self.head = rec["sha256"]
            self._unsynced += 1
            if self._unsynced >= self.fsync_every:
                self._sync_locked()
            return rec

    def _sync_locked(self) -> None:
        if self._unsynced:
            fsync_file(self._fd)
            self._unsynced = 0
        self._last_sync = time.monotonic()

    def _sync_loop(self) -> None:
        while not self._stop.wait(self.fsync_interval):
            with self._lock:
                if self._closed:
                    return
                self._sync_locked()

    def flush(self) -> None:
        with self._lock:
            if not self._closed:
                self._sync_locked()

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            if self._closed:
                return
            self._sync_locked()
            os.close(self._fd)
            self._closed = True
        self._timer.join(timeout=2)
