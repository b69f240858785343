"""Append-only write-ahead log: one JSON object per line with a CRC32 of its payload.

``append`` returns only after ``fsync``, so a record that was acknowledged survives a
crash (SIGKILL, power loss of the process). A torn or corrupt tail (a record being written
when the process died) fails its CRC and is cut off on open; it was never acknowledged."""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Iterator

from aion_train.fsutil import atomic_write, fsync_dir, fsync_file


def _encode(record: dict) -> bytes:
    payload = json.dumps(record, separators=(",", ":"), sort_keys=True, ensure_ascii=False)
    crc = zlib.crc32(payload.encode("utf-8")) & 0xFFFFFFFF
    return (json.dumps({"crc": crc, "r": payload}, ensure_ascii=False) + "\n").encode("utf-8")


def _decode(line: bytes) -> dict | None:
    try:
        outer = json.loads(line.decode("utf-8"))
        payload = outer["r"]
        if zlib.crc32(payload.encode("utf-8")) & 0xFFFFFFFF != outer["crc"]:
            return None
        return json.loads(payload)
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return None


class WriteAheadLog:
    def __init__(self, path: str, fsync: bool = True):
        self.path = path
        self.fsync = fsync
        self.records: list[dict] = []
        self.truncated_bytes = 0
        good = 0
        if os.path.exists(path):
            with open(path, "rb") as f:
                data = f.read()
            pos = 0
            while pos < len(data):
                nl = data.find(b"\n", pos)
                if nl < 0:
                    break  # torn last line (no newline)
                rec = _decode(data[pos:nl])
                if rec is None:
                    break  # corrupt: stop here
                self.records.append(rec)
                pos = nl + 1
            good = pos
            if good < len(data):  # cut the unacknowledged tail
                self.truncated_bytes = len(data) - good
                with open(path, "rb+") as f:
                    f.truncate(good)
                    fsync_file(f)
        self._f = open(path, "ab")
        if good == 0 and self.fsync:
            fsync_dir(os.path.dirname(os.path.abspath(path)))

    def replay(self) -> Iterator[dict]:
        """Records read at open (valid prefix of the file), in order."""
        yield from self.records

    def append(self, records: list[dict]) -> None:
        """Write ``records`` and fsync once (group commit); durable on return."""
        self._f.write(b"".join(_encode(r) for r in records))
        self._f.flush()
        if self.fsync:
            fsync_file(self._f)

    def reset(self) -> None:
        """Start an empty log (after a snapshot covering every record): new file, renamed
        over the old one, directory fsynced."""
        with atomic_write(self.path, "wb", fsync=self.fsync):
            self._f.close()  # replaced by the new, empty file
        self._f = open(self.path, "ab")
        self.records = []

    def close(self) -> None:
        self._f.close()
