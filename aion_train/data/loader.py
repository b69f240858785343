"""Packed-token batches from WebDataset text shards, split by data-parallel rank and worker,
shuffled with a seeded buffer, and exactly resumable.

Pipeline of one *split* (one data-parallel rank, or one DataLoader worker of one rank)::

    shards of the split, in a per-epoch seeded order
      -> samples in file order (WebDataset tar iteration; unreadable ones skipped, counted)
      -> seeded shuffle buffer (fill to ``shuffle_buffer`` items, emit a random one)
      -> [bos] + tokens + [eos] per document, concatenated
      -> rows of exactly seq_len + 1 tokens (packing: no padding; a document that does not
         fit continues in the next row)
      -> batches {"input_ids": row[:, :-1], "labels": row[:, 1:]}
         (+ "segment_ids", "position_ids" with ``document_mask``, see below)

Document masking (``document_mask=True``; the trainer's ``data.document_mask``, on by
default). Each batch also carries ``segment_ids`` [B, seq_len] (1, 2, ... per document piece
in the row, from the left) and ``position_ids`` [B, seq_len] (0, 1, ... restarting in every
piece), both over the input positions. A piece starts at the row's first token, at every
<bos> and after every <eos>, so they are read off the tokens of the row: nothing is added to
the loader's state, and the packed rows, labels and resume are exactly those without it. The
model then attends only within a piece (a block-diagonal causal mask). A document cut by a row
end continues in the next row as a piece of its own, positions from 0 (rows are independent
samples either way). Labels stay the next token everywhere: the only target across a
boundary is the <bos> after an <eos>, which that <eos> alone determines (the model learns
"a document ends, another begins" and needs nothing of the other document for it).

Work split. There are ``S = dp_size * max(1, num_workers)`` splits; split ``s`` of rank
``r`` and worker ``w`` is ``r * max(1, num_workers) + w``. With at least S shards, shard
``i`` belongs to split ``i % S`` (each split reads only its own files); with fewer shards
than splits, every split reads every shard and keeps sample ``j`` of shard ``i`` when
``(i + j) % S == s``. Either way the splits are disjoint and together cover the data.

Resumption. The state of a split is where its reader is (epoch, position in the epoch's
shard order, samples read from the current shard), which samples sit in the shuffle buffer
(as (shard, index) references, re-read on resume; not their text), the shuffle generator's
state, the tokens left over from packing, and counters: a few kilobytes of JSON. A fresh
loader given :meth:`TokenLoader.state_dict` continues with the very same batches. With
``num_workers > 0`` each worker's state travels with every batch it produces, and on
resume the workers are rotated so that the DataLoader's round-robin continues with the
worker whose turn it was.
"""

from __future__ import annotations

import glob
import hashlib
import logging
import os
from collections import defaultdict
from collections.abc import Iterator, Sequence
from typing import Any, Optional, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .shards import ShardError, iter_shard_samples
from .tokenizer import Tokenizer

log = logging.getLogger(__name__)

STATE_VERSION = 1


def expand_shards(spec: Union[str, Sequence[str]]) -> list[str]:
    """Sorted shard paths from a list of paths/globs or one string (glob, or a WebDataset
    brace pattern such as ``train-{00000..00007}.tar``). Missing files are an error."""
    items = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    paths: list[str] = []
    for item in items:
        item = os.fspath(item)
        try:
            from braceexpand import braceexpand  # a webdataset dependency

            expanded = list(braceexpand(item))
        except ImportError:
            expanded = [item]
        for p in expanded:
            if glob.has_magic(p):
                paths.extend(glob.glob(p))
            elif os.path.exists(p):
                paths.append(p)
            else:
                raise FileNotFoundError(f"shard {p} does not exist")
    paths = sorted(set(paths))
    if not paths:
        raise ValueError(f"no shards match {spec!r}")
    return paths


def _fingerprint(paths: Sequence[str]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(f"{os.path.basename(p)}:{os.path.getsize(p)}\n".encode())
    return h.hexdigest()[:16]


def _rng(seed: int, epoch: int, split: int, purpose: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch, split, purpose])))


def document_segments(
    input_ids: torch.Tensor, bos_id: Optional[int], eos_id: Optional[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(segment_ids, position_ids), both [B, T] long, of packed rows: a new segment starts at
    column 0, at every `bos_id` and right after every `eos_id` (either may be None or < 0:
    not used); segment ids count 1, 2, ... from the left, positions restart at 0 in each."""
    b, t = input_ids.shape
    start = torch.zeros((b, t), dtype=torch.bool)
    start[:, 0] = True
    if t > 1:
        if bos_id is not None and bos_id >= 0:
            start[:, 1:] |= input_ids[:, 1:] == bos_id
        if eos_id is not None and eos_id >= 0:
            start[:, 1:] |= input_ids[:, :-1] == eos_id
    segment_ids = start.long().cumsum(1)
    col = torch.arange(t).expand(b, t)
    first = torch.where(start, col, torch.zeros_like(col)).cummax(1).values
    return segment_ids, col - first


class _Stream:
    """One split: reader -> shuffle buffer -> packing, with an explicit, savable state."""

    def __init__(
        self,
        shards: Sequence[str],
        tokenizer,
        seq_len: int,
        split: int,
        n_splits: int,
        seed: int,
        shuffle_buffer: int,
        loop: bool,
        field: str,
        document_mask: bool = False,
    ):
        self.shards = list(shards)
        self.document_mask = bool(document_mask)
        self.tok = tokenizer
        self.row_len = seq_len + 1
        self.split, self.n_splits = split, n_splits
        self.seed, self.loop, self.field = seed, loop, field
        self.buffer_size = max(1, int(shuffle_buffer))
        self.shuffle = shuffle_buffer > 1
        self.by_shard = len(self.shards) >= n_splits
        # state
        self.skipped = 0
        self.leftover: list[int] = []
        self.done = False
        self._start_epoch(0)

    # ---- reader
    def _start_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.shard_cursor = 0
        self.sample_cursor = 0
        self.epoch_samples = 0
        self.buffer: list[tuple[int, int, str, str]] = []  # (shard id, index, key, text)
        self._it: Optional[Iterator] = None
        ids = list(range(len(self.shards)))
        if self.by_shard:
            ids = [i for i in ids if i % self.n_splits == self.split]
        if self.shuffle:
            ids = [ids[i] for i in _rng(self.seed, epoch, self.split, 0).permutation(len(ids))]
        self.order = ids
        self.rng = _rng(self.seed, epoch, self.split, 1)

    def _mine(self, sid: int, idx: int) -> bool:
        return self.by_shard or (sid + idx) % self.n_splits == self.split

    def _open(self, sid: int, skip: int) -> Iterator:
        it = iter_shard_samples(self.shards[sid])
        for _ in range(skip):
            if next(it, None) is None:
                break
        return it

    def _decode(self, item, sid: int, idx: int, quiet: bool = False) -> Optional[tuple[str, str]]:
        why = None
        if isinstance(item, ShardError):
            why = f"unreadable tar, rest of shard skipped: {item.error!r}"
        elif self.field not in item:
            why = f"no {self.field!r} field (has {sorted(k for k in item if not k.startswith('__'))})"
        else:
            try:
                return item["__key__"], item[self.field].decode("utf-8")
            except UnicodeDecodeError as e:
                why = f"undecodable {self.field!r}: {e}"
        if not quiet and self.epoch == 0:  # a bad sample is counted (and logged) once, not every epoch
            self.skipped += 1
            log.warning("data: skipping %s sample #%d: %s", self.shards[sid], idx, why)
        return None

    def _pull(self) -> Optional[tuple[int, int, str, str]]:
        while self.shard_cursor < len(self.order):
            sid = self.order[self.shard_cursor]
            if self._it is None:
                self._it = self._open(sid, self.sample_cursor)
            item = next(self._it, None)
            if item is None:
                self._it = None
                self.shard_cursor += 1
                self.sample_cursor = 0
                continue
            idx = self.sample_cursor
            self.sample_cursor += 1  # a ShardError uses an index too: counted once
            if not self._mine(sid, idx):
                continue
            dec = self._decode(item, sid, idx)
            if dec is not None:
                return sid, idx, dec[0], dec[1]
        return None

    def next_document(self) -> Optional[tuple[str, str]]:
        """(key, text) of the next document of this split; None at the end (loop=False)."""
        while not self.done:
            while len(self.buffer) < self.buffer_size:
                item = self._pull()
                if item is None:
                    break
                self.buffer.append(item)
                self.epoch_samples += 1
            if not self.buffer:  # epoch over
                if not self.loop:
                    self.done = True
                    break
                if self.epoch_samples == 0:
                    raise RuntimeError(
                        f"data split {self.split}/{self.n_splits}: an epoch over "
                        f"{len(self.order)} shards gave no readable sample"
                    )
                self._start_epoch(self.epoch + 1)
                continue
            j = int(self.rng.integers(len(self.buffer))) if self.shuffle and len(self.buffer) > 1 else 0
            if self.shuffle:
                item = self.buffer[j]
                self.buffer[j] = self.buffer[-1]
                self.buffer.pop()
            else:
                item = self.buffer.pop(0)
            return item[2], item[3]
        return None

    # ---- packing
    def next_row(self) -> Optional[list[int]]:
        while len(self.leftover) < self.row_len:
            doc = self.next_document()
            if doc is None:
                return None  # finite mode: a last partial row is dropped, never padded
            self.leftover.append(self.tok.bos_id)
            self.leftover.extend(self.tok.encode(doc[1]))
            self.leftover.append(self.tok.eos_id)
        row = self.leftover[: self.row_len]
        del self.leftover[: self.row_len]
        return row

    def next_batch(self, batch_size: int) -> Optional[dict[str, torch.Tensor]]:
        rows = []
        while len(rows) < batch_size:
            row = self.next_row()
            if row is None:
                break
            rows.append(row)
        if not rows:
            return None
        t = torch.tensor(rows, dtype=torch.long)
        batch = {"input_ids": t[:, :-1].contiguous(), "labels": t[:, 1:].contiguous()}
        if self.document_mask:
            batch["segment_ids"], batch["position_ids"] = document_segments(
                batch["input_ids"], self.tok.bos_id, self.tok.eos_id
            )
        return batch

    # ---- state
    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "shard_cursor": self.shard_cursor,
            "sample_cursor": self.sample_cursor,
            "epoch_samples": self.epoch_samples,
            "buffer": [[sid, idx] for sid, idx, _k, _t in self.buffer],
            "rng": self.rng.bit_generator.state,
            "leftover": list(self.leftover),
            "skipped": self.skipped,
            "done": self.done,
        }

    def load_state_dict(self, st: dict) -> None:
        self._start_epoch(int(st["epoch"]))
        self.shard_cursor = int(st["shard_cursor"])
        self.sample_cursor = int(st["sample_cursor"])
        self.epoch_samples = int(st["epoch_samples"])
        self.rng.bit_generator.state = st["rng"]
        self.leftover = [int(t) for t in st["leftover"]]
        self.skipped = int(st["skipped"])
        self.done = bool(st["done"])
        self.buffer = self._refetch([(int(s), int(i)) for s, i in st["buffer"]])

    def _refetch(self, refs: list[tuple[int, int]]) -> list[tuple[int, int, str, str]]:
        """Texts of buffered samples, re-read from their shards (only as far as needed)."""
        wanted: dict[int, set[int]] = defaultdict(set)
        for sid, idx in refs:
            wanted[sid].add(idx)
        found: dict[tuple[int, int], tuple[str, str]] = {}
        for sid, idxs in wanted.items():
            last = max(idxs)
            for idx, item in enumerate(iter_shard_samples(self.shards[sid])):
                if idx in idxs:
                    dec = self._decode(item, sid, idx, quiet=True)
                    if dec is not None:
                        found[(sid, idx)] = dec
                if idx >= last:
                    break
        missing = [r for r in refs if r not in found]
        if missing:
            raise ValueError(
                f"cannot resume: buffered samples {missing[:4]} are no longer "
                "readable (did the shards change since the state was saved?)"
            )
        return [(sid, idx, *found[(sid, idx)]) for sid, idx in refs]


class _WorkerStreams(IterableDataset):
    """What each DataLoader worker runs: the stream of its (rotated) logical worker id."""

    def __init__(self, loader: TokenLoader, offset: int, states: list):
        super().__init__()
        self.loader, self.offset, self.states = loader, offset, states

    def __iter__(self):
        info = get_worker_info()
        wid = 0 if info is None else info.id
        n = self.loader.num_workers
        logical = (wid + self.offset) % n
        stream = self.loader._make_stream(logical)
        if self.states[logical] is not None:
            stream.load_state_dict(self.states[logical])
        while True:
            batch = stream.next_batch(self.loader.micro_batch_size)
            if batch is None:
                return
            batch["_state"] = stream.state_dict()
            batch["_worker"] = logical
            yield batch


class TokenLoader:
    """Iterable of packed token batches for one data-parallel rank; see the module doc.

    ``loop=True`` (training) cycles epochs forever, each with a new seeded shard order and
    shuffle, and every ``iter()`` continues where the last batch left off. ``loop=False``
    (held-out evaluation) gives one pass; every ``iter()`` starts a new pass from the
    beginning (same order), unless a state was just loaded; the last batch may have fewer
    rows, the last partial row is dropped. ``shuffle_buffer <= 1`` disables shuffling.

    ``state_dict()`` is valid between batches; ``load_state_dict()`` on a fresh loader with
    the same shards and settings continues with identical batches. Unreadable samples are
    skipped, logged and counted in ``skipped``.

    ``document_mask=True`` adds ``segment_ids`` and ``position_ids`` to every batch (see the
    module doc); the rows, labels and state are the same either way.
    """

    def __init__(
        self,
        shard_paths: Union[str, Sequence[str]],
        tokenizer,
        seq_len: int,
        micro_batch_size: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        seed: int = 0,
        shuffle_buffer: int = 256,
        num_workers: int = 0,
        loop: bool = True,
        field: str = "txt",
        document_mask: bool = False,
    ):
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} not in [0, {dp_size})")
        if seq_len < 1 or micro_batch_size < 1 or num_workers < 0 or seed < 0:
            raise ValueError("seq_len, micro_batch_size >= 1; num_workers, seed >= 0")
        self.shards = expand_shards(shard_paths)
        self.tokenizer = Tokenizer(tokenizer) if isinstance(tokenizer, (str, os.PathLike)) else tokenizer
        self.seq_len, self.micro_batch_size = int(seq_len), int(micro_batch_size)
        self.dp_rank, self.dp_size = int(dp_rank), int(dp_size)
        self.seed, self.shuffle_buffer = int(seed), int(shuffle_buffer)
        self.num_workers, self.loop, self.field = int(num_workers), bool(loop), field
        self.document_mask = bool(document_mask)  # batch keys only: not part of the state
        self._n_streams = max(1, self.num_workers)
        self._fingerprint = _fingerprint(self.shards)
        self._states: list[Optional[dict]] = [None] * self._n_streams
        self._batches = 0
        self._stream: Optional[_Stream] = None  # in-process stream (num_workers == 0)
        self._resume_pending = False

    # ---- splits
    @property
    def n_splits(self) -> int:
        return self.dp_size * self._n_streams

    def _make_stream(self, logical_worker: int) -> _Stream:
        return _Stream(
            self.shards,
            self.tokenizer,
            self.seq_len,
            split=self.dp_rank * self._n_streams + logical_worker,
            n_splits=self.n_splits,
            seed=self.seed,
            shuffle_buffer=self.shuffle_buffer,
            loop=self.loop,
            field=self.field,
            document_mask=self.document_mask,
        )

    def _fresh_pass(self) -> bool:
        """Finite mode: a new iter() starts over unless a loaded state awaits."""
        if self.loop or self._resume_pending:
            self._resume_pending = False
            return False
        self._states = [None] * self._n_streams
        self._batches = 0
        self._stream = None
        return True

    # ---- iteration
    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        self._fresh_pass()
        if self.num_workers == 0:
            if self._stream is None:
                self._stream = self._make_stream(0)
                if self._states[0] is not None:
                    self._stream.load_state_dict(self._states[0])
            stream = self._stream
            while True:
                batch = stream.next_batch(self.micro_batch_size)
                if batch is None:
                    return
                self._batches += 1
                yield batch
        else:
            yield from self._iter_workers()

    def _iter_workers(self) -> Iterator[dict[str, torch.Tensor]]:
        ds = _WorkerStreams(self, offset=self._batches % self.num_workers, states=list(self._states))
        dl = DataLoader(ds, batch_size=None, num_workers=self.num_workers, persistent_workers=False, pin_memory=False)
        for batch in dl:
            w = int(batch.pop("_worker"))
            self._states[w] = batch.pop("_state")
            self._batches += 1
            yield batch

    def iter_documents(self) -> Iterator[tuple[str, str]]:
        """(key, text) of this rank's documents for one epoch (epoch 0 order, worker splits
        one after the other), without tokenising: for inspection and evaluation by document.
        Does not touch the loader's position."""
        for w in range(self._n_streams):
            s = self._make_stream(w)
            s.loop = False
            while (doc := s.next_document()) is not None:
                yield doc

    # ---- state
    @property
    def skipped(self) -> int:
        """Distinct samples (or rests of shards) skipped as unreadable by this rank (counted
        in the first epoch: a corrupt sample read again in a later epoch is not counted twice)."""
        if self.num_workers == 0 and self._stream is not None:
            return self._stream.skipped
        return sum(s["skipped"] for s in self._states if s is not None)

    @property
    def epoch(self) -> int:
        if self.num_workers == 0 and self._stream is not None:
            return self._stream.epoch
        return min((s["epoch"] for s in self._states if s is not None), default=0)

    def _settings(self) -> dict:
        return {
            "seq_len": self.seq_len,
            "micro_batch_size": self.micro_batch_size,
            "dp_rank": self.dp_rank,
            "dp_size": self.dp_size,
            "seed": self.seed,
            "shuffle_buffer": self.shuffle_buffer,
            "num_workers": self.num_workers,
            "loop": self.loop,
            "field": self.field,
            "shards": self._fingerprint,
        }

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable position of this rank's data (valid between batches)."""
        streams = list(self._states)
        if self.num_workers == 0 and self._stream is not None:
            streams = [self._stream.state_dict()]
        return {"version": STATE_VERSION, "settings": self._settings(), "batches": self._batches, "streams": streams}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data state version {state.get('version')!r} != {STATE_VERSION}")
        mine, theirs = self._settings(), state["settings"]
        diff = {k: (theirs.get(k), v) for k, v in mine.items() if theirs.get(k) != v}
        if diff:
            raise ValueError(f"data state does not match this loader (saved, now): {diff}")
        if not self.loop and self.num_workers > 0 and any(s is not None for s in state["streams"]):
            raise ValueError("resuming a finite multi-worker pass is not supported")
        self._states = [None if s is None else dict(s) for s in state["streams"]]
        self._batches = int(state["batches"])
        self._stream = None
        self._resume_pending = True
