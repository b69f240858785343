"""Continual memory: a mutable vector index of documents (add / update / delete without a
rebuild), a reservoir replay buffer, background ingestion while queries are served, and
crash safety through a write-ahead log.

Durability protocol
    A write is embedded first (no lock held), then, under the writer mutex, it gets its
    sequence number and vector id, is appended to ``wal.jsonl`` and fsynced (one fsync per
    batch), and only then applied to the in-memory index under the write side of an RW lock
    and acknowledged. Anything acknowledged is in the fsynced log, so it survives SIGKILL.
On open
    the newest complete snapshot (``CURRENT`` -> ``snapshots/snap-<seq>/``, checksummed) is
    loaded and every log record with a larger ``seq`` is re-applied in order. Records are
    idempotent by document id (a put replaces the document's previous vector, a delete of
    an absent id is a no-op), so a record applied twice never duplicates a document.
Checkpoint
    writes a snapshot into a temporary folder, fsyncs, renames it into place, atomically
    points ``CURRENT`` at it, then starts an empty log. A crash at any point leaves either
    the old snapshot + full log or the new snapshot + a log whose records it already holds.
Index tiers
    ``kind="flat"``: ``IndexIDMap2(IndexFlatIP)``, deletes are ``remove_ids``.
    ``kind="hnsw"``: ``IndexIDMap2(IndexHNSWFlat)``; HNSW cannot remove ids, so deletes and
    replaced vectors become tombstones filtered out of results, and ``compact()`` (run by
    ``checkpoint`` when tombstones pass ``tombstone_ratio``) rebuilds the graph.
Update rule (``update_rule``)
    ``"replace"`` (default): a put of a known document stores the new embedding ``E(d)``.
    ``"ema"``: a put of a known document stores ``e + eta * (E(d) - e)`` (``e`` its stored
    vector; a new document stores ``E(d)``). The blended vector is computed under the writer
    mutex and is what the log record holds, so replay reproduces it exactly. Under
    re-observations ``E(d) + noise`` (zero-mean) the stored vector's expectation moves to
    the mean embedding with error ``(1 - eta)^t (e_0 - mean)`` after ``t`` updates. It is
    not renormalised (the score is then the inner product, not exactly the cosine).
Folder
    ``memory.json`` (written once) names the format, the embedder (a spec ``make_embedder``
    takes where there is one), dim, kind and update rule, so that a server can open it.
RAM cache
    the durable state is the snapshot + log on disk; the index, document texts and the
    replay buffer are held in RAM and served from there (reads never touch disk).
"""

from __future__ import annotations

import base64
import json
import os
import queue
import shutil
import threading
from dataclasses import dataclass, field

import numpy as np

from aion_train.fsutil import atomic_write_text, replace_dir

from .reservoir import ReservoirBuffer
from .rwlock import RWLock
from .store import sha256_file
from .wal import WriteAheadLog


def _enc_vec(v: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(v, dtype="<f4").tobytes()).decode("ascii")


def _dec_vec(s: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(s), dtype="<f4").astype(np.float32)


@dataclass
class MemoryHit:
    doc_id: str
    score: float
    text: str
    meta: dict = field(default_factory=dict)
    seq: int = 0  # the log record that wrote this version


MEMORY_FORMAT = "aion-continual-memory"
MEMORY_INFO = "memory.json"


def is_memory_dir(path: str) -> bool:
    """A continual-memory folder (its ``memory.json``)."""
    try:
        with open(os.path.join(path, MEMORY_INFO), encoding="utf-8") as f:
            return json.load(f).get("format") == MEMORY_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


class ContinualIndex:
    def __init__(
        self,
        path: str,
        embedder=None,
        dim: int | None = None,
        kind: str = "flat",
        reservoir_k: int = 1024,
        seed: int = 0,
        fsync: bool = True,
        checkpoint_every: int | None = None,
        tombstone_ratio: float = 0.25,
        hnsw_m: int = 32,
        ef_search: int = 64,
        update_rule: str = "replace",
        eta: float = 0.1,
    ):
        if kind not in ("flat", "hnsw"):
            raise ValueError(f"kind must be 'flat' or 'hnsw', got {kind!r}")
        if update_rule not in ("replace", "ema") or not 0.0 < eta <= 1.0:
            raise ValueError(f"update_rule must be 'replace' or 'ema' and eta in (0, 1], got {update_rule!r}, {eta}")
        self.update_rule, self.eta = update_rule, float(eta)
        self.path = os.path.abspath(path)
        os.makedirs(os.path.join(self.path, "snapshots"), exist_ok=True)
        self.embedder = embedder
        self.kind = kind
        self.fsync = fsync
        self.checkpoint_every = checkpoint_every
        self.tombstone_ratio = tombstone_ratio
        self.hnsw_m, self.ef_search = hnsw_m, ef_search
        self.lock = RWLock()  # readers: queries; writer: apply
        self._mutex = threading.RLock()  # serialises log order + apply + checkpoint
        self.docs: dict[str, dict] = {}  # doc id -> {"vid", "text", "meta"}
        self.vid2doc: dict[int, str] = {}
        self.tombstones: set[int] = set()
        self.next_vid = 0
        self.seq = 0
        self.snapshot_seq = 0
        self.dim = dim or getattr(embedder, "dim", None)
        self.reservoir = ReservoirBuffer(reservoir_k, seed)
        self.index = None
        self.replayed = 0
        self._load_snapshot()
        if self.dim is None:
            raise ValueError("dim unknown: pass an embedder or dim=")
        if self.index is None:
            self.index = self._new_index()
        self.wal = WriteAheadLog(os.path.join(self.path, "wal.jsonl"), fsync=fsync)
        for rec in self.wal.replay():
            if rec["seq"] > self.seq:
                self._apply(rec)
                self.replayed += 1
        self.wal.records = []
        self._write_info()

    def _write_info(self) -> None:
        p = os.path.join(self.path, MEMORY_INFO)
        if os.path.exists(p):
            return
        name = getattr(self.embedder, "name", None)
        spec = "minilm" if name and name.startswith("minilm") else name
        info = {"format": MEMORY_FORMAT, "embedder": name, "embedder_spec": spec, "dim": self.dim, "kind": self.kind}
        info.update(update_rule=self.update_rule, eta=self.eta)
        atomic_write_text(p, json.dumps(info, sort_keys=True) + "\n")

    # ------------------------------------------------------------------ index plumbing
    def _new_index(self):
        import faiss

        if self.kind == "flat":
            base = faiss.IndexFlatIP(self.dim)
        else:
            base = faiss.IndexHNSWFlat(self.dim, self.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            base.hnsw.efSearch = self.ef_search
        return faiss.IndexIDMap2(base)

    def _remove_vid(self, vid: int) -> None:
        self.vid2doc.pop(vid, None)
        if self.kind == "flat":
            self.index.remove_ids(np.array([vid], dtype=np.int64))
        else:
            self.tombstones.add(vid)

    def _apply(self, rec: dict) -> None:
        """Apply one log record (idempotent by document id)."""
        op, doc_id = rec["op"], rec["id"]
        old = self.docs.get(doc_id)
        if op == "put":
            vid = int(rec["vid"])
            if old is not None:
                if old["vid"] == vid:  # the very same record again: nothing to do
                    self.seq = max(self.seq, rec["seq"])
                    return
                self._remove_vid(old["vid"])
            else:
                self.reservoir.offer(doc_id)
            vec = _dec_vec(rec["vec"]).reshape(1, -1)
            self.index.add_with_ids(vec, np.array([vid], dtype=np.int64))
            self.docs[doc_id] = {"vid": vid, "text": rec["text"], "meta": rec.get("meta") or {}, "seq": rec["seq"]}
            self.vid2doc[vid] = doc_id
            self.next_vid = max(self.next_vid, vid + 1)
        elif op == "del":
            if old is not None:
                self._remove_vid(old["vid"])
                del self.docs[doc_id]
        else:
            raise ValueError(f"unknown log op {op!r}")
        self.seq = max(self.seq, rec["seq"])

    # ------------------------------------------------------------------ writes
    def _embed(self, texts: list[str]) -> np.ndarray:
        if self.embedder is None:
            raise ValueError("no embedder: pass vectors explicitly")
        return self.embedder.encode(texts)

    def commit(self, ops: list[tuple]) -> list[int]:
        """Log (fsync) and apply a batch of ops: ``("put", id, text, meta, vec)`` or
        ``("del", id)``. Returns their sequence numbers once durable and visible."""
        with self._mutex:
            recs = []
            seq, vid = self.seq, self.next_vid  # the previous commit is fully applied
            pending: dict[str, np.ndarray] = {}  # ema: a document put twice in this batch
            for op in ops:
                seq += 1
                if op[0] == "put":
                    _, doc_id, text, meta, vec = op
                    if self.update_rule == "ema":
                        prev = pending.get(str(doc_id))
                        if prev is None and str(doc_id) in self.docs:
                            prev = self.index.reconstruct(int(self.docs[str(doc_id)]["vid"]))
                        vec = np.asarray(vec, np.float32)
                        if prev is not None:
                            vec = (prev + self.eta * (vec - prev)).astype(np.float32)
                        pending[str(doc_id)] = vec
                    recs.append(
                        {
                            "seq": seq,
                            "op": "put",
                            "id": str(doc_id),
                            "vid": vid,
                            "text": text,
                            "meta": meta or {},
                            "vec": _enc_vec(vec),
                        }
                    )
                    vid += 1
                elif op[0] == "del":
                    recs.append({"seq": seq, "op": "del", "id": str(op[1])})
                    pending.pop(str(op[1]), None)
                else:
                    raise ValueError(f"unknown op {op[0]!r}")
            self.wal.append(recs)  # durable from here on
            with self.lock.write():
                for r in recs:
                    self._apply(r)
            seqs = [r["seq"] for r in recs]
            if self.checkpoint_every and self.seq - self.snapshot_seq >= self.checkpoint_every:
                self.checkpoint()
        return seqs

    def put_many(self, items: list[tuple[str, str, dict | None]], vecs: np.ndarray | None = None) -> list[int]:
        """Add or replace documents ``(id, text, meta)``; embedded in one batch."""
        if not items:
            return []
        vecs = self._embed([t for _, t, _ in items]) if vecs is None else np.asarray(vecs, np.float32)
        return self.commit([("put", i, t, m, v) for (i, t, m), v in zip(items, vecs)])

    def add(self, doc_id: str, text: str, meta: dict | None = None, vec=None) -> int:
        """Add (or replace: ids are unique) a document; returns its log sequence number
        once it is durable and visible to queries."""
        return self.put_many([(doc_id, text, meta)], None if vec is None else np.asarray(vec)[None])[0]

    def update(self, doc_id: str, text: str, meta: dict | None = None, vec=None) -> int:
        with self.lock.read():
            if doc_id not in self.docs:
                raise KeyError(doc_id)
        return self.add(doc_id, text, meta, vec)

    def delete(self, doc_id: str) -> int:
        return self.commit([("del", doc_id)])[0]

    # ------------------------------------------------------------------ reads
    def __contains__(self, doc_id: str) -> bool:
        with self.lock.read():
            return doc_id in self.docs

    def __len__(self) -> int:
        with self.lock.read():
            return len(self.docs)

    def get(self, doc_id: str) -> dict | None:
        with self.lock.read():
            d = self.docs.get(doc_id)
            return None if d is None else dict(d)

    def vector(self, doc_id: str) -> np.ndarray:
        """The stored embedding of a live document."""
        with self.lock.read():
            return self.index.reconstruct(int(self.docs[doc_id]["vid"]))

    def search(self, query: str | np.ndarray, k: int = 5) -> list[MemoryHit]:
        """Top-``k`` live documents by cosine; a consistent view (never half an update)."""
        return self.search_at(query, k)[1]

    def search_at(self, query: str | np.ndarray, k: int = 5) -> tuple[int, list[MemoryHit]]:
        """``(seq, hits)``: the top-``k`` of the state after log record ``seq``, read under
        the read lock (a committed batch is applied under one write lock: all or none of it
        is seen). Each hit's ``seq`` is the log record that wrote the version it shows."""
        q = self._embed([query])[0] if isinstance(query, str) else np.asarray(query, np.float32)
        q = q.reshape(1, -1)
        with self.lock.read():
            seen = self.seq
            n_live = len(self.docs)
            if n_live == 0:
                return seen, []
            kk = min(k + len(self.tombstones), int(self.index.ntotal))
            D, I = self.index.search(q, kk)
            hits = []
            for s, vid in zip(D[0], I[0]):
                if vid < 0 or vid in self.tombstones:
                    continue
                doc_id = self.vid2doc.get(int(vid))
                if doc_id is None:
                    continue
                d = self.docs[doc_id]
                hits.append(MemoryHit(doc_id, float(s), d["text"], d["meta"], int(d.get("seq", 0))))
                if len(hits) == k:
                    break
            return seen, hits

    def replay_sample(self, m: int) -> list[tuple[str, str]]:
        """``m`` (id, text) pairs from the reservoir replay buffer (live documents only)."""
        with self.lock.read():
            ids = [i for i in self.reservoir.items if i in self.docs]
            if not ids:
                return []
            pick = self.reservoir.rng.choice(len(ids), size=min(m, len(ids)), replace=False)
            return [(ids[i], self.docs[ids[i]]["text"]) for i in pick]

    def stats(self) -> dict:
        with self.lock.read():
            return {
                "documents": len(self.docs),
                "vectors": int(self.index.ntotal),
                "tombstones": len(self.tombstones),
                "seq": self.seq,
                "snapshot_seq": self.snapshot_seq,
                "replay_buffer": len(self.reservoir),
                "stream_seen": self.reservoir.n_seen,
                "kind": self.kind,
            }

    # ------------------------------------------------------------------ snapshots
    def compact(self) -> None:
        """Rebuild the HNSW tier without its tombstones (flat: nothing to do)."""
        if self.kind == "flat" or not self.tombstones:
            return
        with self._mutex, self.lock.write():
            live = np.array(sorted(self.vid2doc), dtype=np.int64)
            vecs = np.stack([self.index.reconstruct(int(v)) for v in live]) if len(live) else None
            new = self._new_index()
            if vecs is not None:
                new.add_with_ids(vecs, live)
            self.index = new
            self.tombstones.clear()

    def checkpoint(self) -> str:
        """Write a snapshot of everything applied so far and start an empty log."""
        import faiss

        with self._mutex:
            if (
                self.kind == "hnsw"
                and self.tombstones
                and len(self.tombstones) > self.tombstone_ratio * max(int(self.index.ntotal), 1)
            ):
                self.compact()
            snaps = os.path.join(self.path, "snapshots")
            name = f"snap-{self.seq:012d}"
            tmp = os.path.join(snaps, name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
            with self.lock.read():  # writers are excluded by the mutex
                faiss.write_index(self.index, os.path.join(tmp, "index.faiss"))
                with open(os.path.join(tmp, "docs.jsonl"), "w", encoding="utf-8") as f:
                    for doc_id, d in self.docs.items():
                        f.write(json.dumps({"id": doc_id, **d}, ensure_ascii=False) + "\n")
                state = {
                    "seq": self.seq,
                    "next_vid": self.next_vid,
                    "kind": self.kind,
                    "dim": self.dim,
                    "tombstones": sorted(self.tombstones),
                    "embedder": getattr(self.embedder, "name", None),
                    "reservoir": self.reservoir.state_dict(),
                }
            state["files"] = {p: sha256_file(os.path.join(tmp, p)) for p in ("index.faiss", "docs.jsonl")}
            with open(os.path.join(tmp, "state.json"), "w") as f:
                json.dump(state, f)
            final = os.path.join(snaps, name)
            replace_dir(tmp, final)
            atomic_write_text(os.path.join(self.path, "CURRENT"), name + "\n")
            self.wal.reset()
            self.snapshot_seq = self.seq
            for old in os.listdir(snaps):
                if old != name:
                    shutil.rmtree(os.path.join(snaps, old), ignore_errors=True)
            return final

    def _load_snapshot(self) -> None:
        import faiss

        cur = os.path.join(self.path, "CURRENT")
        if not os.path.exists(cur):
            return
        with open(cur) as f:
            name = f.read().strip()
        snap = os.path.join(self.path, "snapshots", name)
        with open(os.path.join(snap, "state.json")) as f:
            state = json.load(f)
        for p, digest in state["files"].items():
            if sha256_file(os.path.join(snap, p)) != digest:
                raise RuntimeError(f"snapshot {snap}: {p} checksum mismatch")
        if self.dim is not None and state["dim"] != self.dim:
            raise ValueError(f"snapshot dim {state['dim']} != embedder dim {self.dim}")
        self.kind = state["kind"]
        self.dim = state["dim"]
        self.index = faiss.read_index(os.path.join(snap, "index.faiss"))
        if self.kind == "hnsw":
            faiss.downcast_index(self.index.index).hnsw.efSearch = self.ef_search
        self.docs = {}
        with open(os.path.join(snap, "docs.jsonl"), encoding="utf-8") as f:
            for line in f:
                d = json.loads(line)
                self.docs[d.pop("id")] = d
        self.vid2doc = {d["vid"]: doc_id for doc_id, d in self.docs.items()}
        self.tombstones = set(state["tombstones"])
        self.next_vid = state["next_vid"]
        self.seq = self.snapshot_seq = state["seq"]
        self.reservoir = ReservoirBuffer.from_state(state["reservoir"])

    # ------------------------------------------------------------------ ingestion
    def start_ingestion(self, batch_size: int = 32, on_ack=None) -> Ingestor:
        ing = Ingestor(self, batch_size, on_ack)
        ing.start()
        return ing

    def close(self) -> None:
        self.wal.close()


class Ticket:
    """Acknowledgement of a submitted write: ``wait()`` returns its sequence number once
    the write is durable (fsynced) and visible to queries."""

    def __init__(self, doc_id: str):
        self.doc_id = doc_id
        self.seq: int | None = None
        self.error: BaseException | None = None
        self._event = threading.Event()

    def wait(self, timeout: float | None = None) -> int:
        if not self._event.wait(timeout):
            raise TimeoutError(f"{self.doc_id} not acknowledged after {timeout} s")
        if self.error is not None:
            raise self.error
        return self.seq  # type: ignore[return-value]

    @property
    def done(self) -> bool:
        return self._event.is_set()


class Ingestor(threading.Thread):
    """Background ingestion: drains a queue in batches, embeds each batch, commits it with
    one fsync (group commit), then acknowledges its tickets and calls ``on_ack(ticket)``."""

    _STOP = object()

    def __init__(self, memory: ContinualIndex, batch_size: int = 32, on_ack=None):
        super().__init__(daemon=True, name="aion-ingest")
        self.memory = memory
        self.batch_size = batch_size
        self.on_ack = on_ack
        self.q: queue.Queue = queue.Queue()

    def submit(self, doc_id: str, text: str | None = None, meta: dict | None = None, delete: bool = False) -> Ticket:
        t = Ticket(doc_id)
        self.q.put((t, doc_id, text, meta, delete))
        return t

    def stop(self, timeout: float | None = None) -> None:
        self.q.put(self._STOP)
        self.join(timeout)

    def run(self) -> None:
        stopping = False
        while not stopping:
            item = self.q.get()
            if item is self._STOP:
                break
            batch = [item]
            while len(batch) < self.batch_size:
                try:
                    nxt = self.q.get_nowait()
                except queue.Empty:
                    break
                if nxt is self._STOP:
                    stopping = True
                    break
                batch.append(nxt)
            tickets = [b[0] for b in batch]
            try:
                puts = [b for b in batch if not b[4]]
                vecs = self.memory._embed([b[2] for b in puts]) if puts else []
                vec_of = {id(b): v for b, v in zip(puts, vecs)}
                ops = [("del", b[1]) if b[4] else ("put", b[1], b[2], b[3], vec_of[id(b)]) for b in batch]
                seqs = self.memory.commit(ops)
                for t, s in zip(tickets, seqs):
                    t.seq = s
            except BaseException as e:  # noqa: BLE001 - handed to the waiting callers
                for t in tickets:
                    t.error = e
            for t in tickets:
                t._event.set()
                if self.on_ack is not None and t.error is None:
                    self.on_ack(t)
