"""``make-shards --from``: a user's corpus -> train/val WebDataset text shards + manifest.

* Streaming, bounded memory: records are read one at a time (:mod:`.user_sources`); the
  documents of the shards being filled, the set of document hashes seen so far and the build's
  position all live in one SQLite file in the output folder (``.make-shards.tmp-state.sqlite``),
  not in memory. Peak memory is that of one record plus SQLite's page cache.
* Exact duplicates: a document whose text (stripped) has the blake2b-128 digest of one already
  kept is dropped and counted.
* Split: a document goes to ``val`` when a seeded hash of its digest falls below
  ``val_fraction``; it depends only on the text and the seed (not on order, workers or resume).
* Shards hold exactly ``samples_per_shard`` documents (the last of each split fewer); keys are
  ``train000000042`` / ``val000000007`` in input order.
* Resume: every full shard (and every ``CHECKPOINT_RECORDS`` records) the state file is
  committed in one transaction with the input position reached; a build interrupted at any
  point resumes from its last commit when run again with the same inputs and arguments, and
  writes the same shards, byte for byte, as an uninterrupted one. Other inputs or arguments
  restart it.
* The manifest (``manifest.json``, written last: its ``build.complete`` says the folder is done)
  has the shards with their sha256 (aion-wds-v1, read by the loader and ``verify_manifest``),
  every input's size and sha256, and the counts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing as mp
import os
import sqlite3
import time
from collections import deque
from dataclasses import asdict, dataclass

from ..ownership import check_writable, claim_dir, record_outputs
from .shards import FORMAT, MANIFEST, _ShardFile, read_manifest, shard_name, write_manifest
from .user_sources import Source, check_sources, fingerprint, iter_raw, record_text, resolve_sources

log = logging.getLogger(__name__)

STATE_FILE = ".make-shards.tmp-state.sqlite"
BUILD_VERSION = 1
CHECKPOINT_RECORDS = 5000
BATCH = 256  # records a batch, at most
BATCH_CHARS = 1 << 22  # and about this many characters (a batch is the memory bound)
KIND = "make-shards"


@dataclass
class BuildArgs:
    sources: list[str]
    out: str
    text_field: str = "text"
    format: str = "auto"
    val_fraction: float = 0.05
    samples_per_shard: int = 1024
    seed: int = 1234
    workers: int = 1

    def problems(self) -> list[str]:
        errs = []
        if not 0.0 <= self.val_fraction < 1.0:
            errs.append(f"--val-fraction {self.val_fraction}: must be in [0, 1)")
        if self.samples_per_shard < 1:
            errs.append(f"--samples-per-shard {self.samples_per_shard}: must be >= 1")
        if self.workers < 1:
            errs.append(f"--workers {self.workers}: must be >= 1")
        if not self.text_field:
            errs.append("--text-field: must not be empty")
        return errs

    def identity(self) -> dict:
        """What the shards depend on (not --workers, not --out)."""
        d = asdict(self)
        for k in ("out", "workers", "sources"):
            d.pop(k)
        return d


def _split_of(digest: bytes, seed: int, val_fraction: float) -> str:
    h = hashlib.blake2b(digest, digest_size=8, key=str(seed).encode()).digest()
    return "val" if int.from_bytes(h, "big") / 2.0**64 < val_fraction else "train"


def prepare_batch(item: tuple[str, str, list]) -> list[tuple[str | None, str, bytes | None]]:
    """(text, why-not, digest) of every raw record of a batch (runs in a worker with --workers)."""
    fmt, field, raws = item
    out = []
    for raw in raws:
        text, why = record_text(fmt, field, raw)
        out.append((text, why, hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest() if text else None))
    return out


class _State:
    """The SQLite file: seen digests, documents of the open shards, and the position/counts."""

    def __init__(self, path: str):
        self.db = sqlite3.connect(path, isolation_level="DEFERRED")
        self.db.execute("PRAGMA cache_size=-4096")  # 4 MiB page cache: the memory bound
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(
            "CREATE TABLE IF NOT EXISTS seen (d BLOB PRIMARY KEY) WITHOUT ROWID;"
            "CREATE TABLE IF NOT EXISTS pending (split TEXT, seq INTEGER, text TEXT, PRIMARY KEY (split, seq));"
            "CREATE TABLE IF NOT EXISTS kv (k TEXT PRIMARY KEY, v TEXT);"
        )
        self.db.commit()

    def get(self) -> dict | None:
        row = self.db.execute("SELECT v FROM kv WHERE k='state'").fetchone()
        return json.loads(row[0]) if row else None

    def put(self, state: dict) -> None:
        self.db.execute("INSERT OR REPLACE INTO kv VALUES ('state', ?)", (json.dumps(state),))

    def add_if_new(self, digest: bytes) -> bool:
        return self.db.execute("INSERT OR IGNORE INTO seen VALUES (?)", (digest,)).rowcount == 1

    def close(self) -> None:
        self.db.close()


def _new_state(identity: dict, inputs: list[dict]) -> dict:
    counts = dict.fromkeys(
        ("records", "documents", "duplicates", "empty", "bad_json", "missing_field", "not_text", "binary"), 0
    )
    return {
        "version": BUILD_VERSION,
        "identity": identity,
        "inputs": inputs,
        "source": 0,
        "record": 0,
        "counts": counts,
        "splits": {"train": {"seq": 0, "pending": 0, "shards": []}, "val": {"seq": 0, "pending": 0, "shards": []}},
    }


def _write_shard(out: str, st: _State, state: dict, split: str) -> None:
    s = state["splits"][split]
    shard = _ShardFile(out, shard_name(split, len(s["shards"])))
    try:
        rows = st.db.execute("SELECT seq, text FROM pending WHERE split=? ORDER BY seq", (split,))
        for seq, text in rows:
            shard.write(f"{split}{seq:09d}", {"txt": text.encode("utf-8")})
        entry = shard.commit()
    except BaseException:
        shard.abort()
        raise
    st.db.execute("DELETE FROM pending WHERE split=?", (split,))
    s["shards"].append(entry)
    s["pending"] = 0


def _listed_shards(out: str) -> list[str]:
    try:
        return [e["name"] for s in read_manifest(out).get("splits", {}).values() for e in s.get("shards", [])]
    except (OSError, ValueError):
        return []


def _state_shards(state: dict) -> list[str]:
    return [e["name"] for s in state.get("splits", {}).values() for e in s.get("shards", [])] + state.get("stale", [])


def _completed(out: str, identity: dict, inputs: list[dict]) -> bool:
    try:
        b = read_manifest(out).get("build") or {}
    except (OSError, ValueError):
        return False
    return b.get("complete") is True and b.get("identity") == identity and b.get("inputs") == inputs


def _prepared(batches, workers: int):
    """prepare_batch over `batches` in order; with workers > 1 in a process pool, at most
    2 * workers batches in flight (bounded memory)."""
    if workers <= 1:
        for b in batches:
            yield b, prepare_batch(b[1])
        return
    with mp.get_context("fork").Pool(workers) as pool:
        window: deque = deque()
        for b in batches:
            window.append((b, pool.apply_async(prepare_batch, (b[1],))))
            if len(window) >= 2 * workers:
                head, res = window.popleft()
                yield head, res.get()
        while window:
            head, res = window.popleft()
            yield head, res.get()


def _batches(sources: list[Source], args: BuildArgs, start_source: int, start_record: int):
    """((source index, first record index), (format, field, raws)) in input order from the position."""
    for si in range(start_source, len(sources)):
        src = sources[si]
        skip = start_record if si == start_source else 0
        raws, first, size = [], skip, 0
        for ri, raw in enumerate(iter_raw(src, args.text_field)):
            if ri < skip:
                continue
            raws.append(raw)
            size += len(raw) if isinstance(raw, (str, bytes)) else 0
            if len(raws) == BATCH or size >= BATCH_CHARS:
                yield (si, first), (src.format, args.text_field, raws)
                raws, first, size = [], ri + 1, 0
        if raws:
            yield (si, first), (src.format, args.text_field, raws)
        yield (si, -1), (src.format, args.text_field, [])  # end of this source


def build_user_shards(args: BuildArgs, overwrite: bool = False, progress: bool = False) -> dict:
    """Build (or resume, or find complete) the shard set of `args` in `args.out`; returns the
    manifest's ``build`` entry plus the shard counts."""
    errs = args.problems()
    if errs:
        raise ValueError("make-shards: " + "; ".join(errs))
    sources = resolve_sources(args.sources, args.format)
    check_sources(sources, args.text_field)
    check_writable(args.out, f"aion-train {KIND}", overwrite)
    t0 = time.perf_counter()
    inputs = [fingerprint(s) for s in sources]
    identity = args.identity()
    out = args.out
    if _completed(out, identity, inputs):
        log.info("make-shards: %s is complete and up to date", out)
        return {**read_manifest(out)["build"], "resumed": False, "up_to_date": True}
    claim_dir(out, KIND, overwrite)
    st = _State(os.path.join(out, STATE_FILE))
    try:
        state = st.get()
        resumed = state is not None and state["identity"] == identity and state["inputs"] == inputs
        if not resumed:
            stale = _listed_shards(out) + (_state_shards(state) if state else [])
            if os.path.exists(os.path.join(out, MANIFEST)):  # an earlier build: the folder reads as incomplete
                os.remove(os.path.join(out, MANIFEST))
            if state is not None:
                log.warning("make-shards: %s holds an interrupted build of other inputs/arguments: restarting", out)
            st.db.executescript("DELETE FROM seen; DELETE FROM pending; DELETE FROM kv;")
            state = _new_state(identity, inputs)
            state["stale"] = sorted(set(stale))
            st.put(state)
            st.db.commit()
        elif state["source"] or state["record"]:
            log.info("make-shards: resuming at input %d record %d", state["source"], state["record"])
        _run(out, sources, args, st, state, progress)
        for split in ("train", "val"):
            if state["splits"][split]["pending"]:
                _write_shard(out, st, state, split)
        st.put(state)
        st.db.commit()
        result = _finish(out, state, args, time.perf_counter() - t0)
    finally:
        st.close()
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(os.path.join(out, STATE_FILE + suffix)):
            os.remove(os.path.join(out, STATE_FILE + suffix))
    return {**result, "resumed": resumed, "up_to_date": False}


def _run(out: str, sources: list[Source], args: BuildArgs, st: _State, state: dict, progress: bool) -> None:
    from tqdm import tqdm

    counts, splits = state["counts"], state["splits"]
    bar = tqdm(total=None, unit=" rec", desc="make-shards", disable=not progress, initial=counts["records"])
    since = 0
    try:
        for ((si, first), (_, _, raws)), prepared in _prepared(
            _batches(sources, args, state["source"], state["record"]), args.workers
        ):
            if first == -1:  # a source ended
                state["source"], state["record"] = si + 1, 0
                continue
            for k, (text, why, digest) in enumerate(prepared):
                counts["records"] += 1
                since += 1
                if text is None:
                    counts[why] += 1
                elif not st.add_if_new(digest):
                    counts["duplicates"] += 1
                else:
                    counts["documents"] += 1
                    split = _split_of(digest, args.seed, args.val_fraction)
                    s = splits[split]
                    st.db.execute("INSERT INTO pending VALUES (?, ?, ?)", (split, s["seq"], text))
                    s["seq"] += 1
                    s["pending"] += 1
                    if s["pending"] >= args.samples_per_shard:
                        _write_shard(out, st, state, split)
                        state["source"], state["record"] = si, first + k + 1
                        st.put(state)
                        st.db.commit()
                        since = 0
            state["source"], state["record"] = si, first + len(raws)
            if since >= CHECKPOINT_RECORDS:
                st.put(state)
                st.db.commit()
                since = 0
            bar.update(len(raws))
    finally:
        bar.close()


def _finish(out: str, state: dict, args: BuildArgs, seconds: float) -> dict:
    splits = {}
    for split, s in state["splits"].items():
        entries = s["shards"]
        splits[split] = {
            "num_shards": len(entries),
            "num_samples": sum(e["num_samples"] for e in entries),
            "fields": {"txt": sum(e["num_samples"] for e in entries)} if entries else {},
            "samples_per_shard": args.samples_per_shard,
            "shards": entries,
        }
    build = {
        "version": BUILD_VERSION,
        "identity": state["identity"],
        "inputs": state["inputs"],
        "counts": state["counts"],
        "complete": True,
        "seconds": round(seconds, 3),
    }
    written = {e["name"] for s in splits.values() for e in s["shards"]}
    for name in state.get("stale", []):  # shards of an earlier, larger build here
        if name not in written and os.path.isfile(os.path.join(out, name)):
            os.remove(os.path.join(out, name))
    write_manifest(out, {"format": FORMAT, "splits": splits, "build": build})
    record_outputs(out, KIND, sorted(written) + [MANIFEST])
    return build
