"""MultimodalLoader: packed multimodal batches (the contract in :mod:`.collate`) from
WebDataset shards of :mod:`.sample` samples, split by rank and worker, shuffled, resumable.

Built on the text :class:`~aion_train.data.loader.TokenLoader`: the same work split (shards,
or samples of shards, over ``dp_size * max(1, num_workers)`` splits), the same seeded
per-epoch shard order and shuffle buffer, the same DataLoader workers with their state
travelling with every batch, the same ``state_dict()`` / ``load_state_dict()``. What
differs is per sample: decoding media in the reader (so the shuffle buffer holds decoded
samples, re-read by reference on resume) and packing whole samples into rows instead of a
token stream. The one sample that did not fit in the last row of a batch waits for the next
batch; the state keeps it as a (shard, index) reference too.

Skipping: a sample whose json or a media member cannot be decoded, and a tar that cannot be
read further (truncated, corrupt), each count once in ``.skipped`` and log a warning naming
the shard and key; the incomplete sample a truncation cuts in half is part of that shard's
error, not counted again. Training goes on with the next sample.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, fields
from typing import Optional, Union

from ..loader import TokenLoader, _Stream
from ..shards import ShardError, iter_shard_samples
from .collate import SegmentRenderer, collate_rows, min_seq_len
from .decode import DecodeError
from .sample import MediaSpec, decode_sample, drop_partial_before_error

log = logging.getLogger(__name__)


class _MultimodalStream(_Stream):
    """One split of the multimodal loader: TokenLoader's reader and shuffle buffer with
    decoding in ``_decode`` and sample packing in ``next_batch``."""

    def __init__(self, shards, tokenizer, seq_len, split, n_splits, seed, shuffle_buffer, loop, spec: MediaSpec):
        super().__init__(shards, tokenizer, seq_len, split, n_splits, seed, shuffle_buffer, loop, field="json")
        self.seq_len = int(seq_len)
        self.spec = spec
        self.renderer = SegmentRenderer(tokenizer, spec, self.seq_len)
        self.pending = None  # (Sample, Segment) that did not fit in the previous batch's last row

    def _open(self, sid: int, skip: int):
        it = drop_partial_before_error(iter_shard_samples(self.shards[sid]))
        for _ in range(skip):
            if next(it, None) is None:
                break
        return it

    def _decode(self, item, sid: int, idx: int, quiet: bool = False):
        key = "?"
        if isinstance(item, ShardError):
            why = f"unreadable tar, rest of shard skipped: {item.error!r}"
        else:
            key = item.get("__key__", "?")
            try:
                return key, decode_sample(item, self.spec, ref=(sid, idx))
            except (DecodeError, ValueError, KeyError, TypeError) as e:
                why = str(e)
        if not quiet and self.epoch == 0:  # a bad sample is counted (and logged) once, not every epoch
            self.skipped += 1
            log.warning("data: skipping %s sample %s (#%d): %s", self.shards[sid], key, idx, why)
        return None

    def _next_segment(self):
        doc = self.next_document()
        if doc is None:
            return None
        sample = doc[1]
        return sample, self.renderer.render(sample)

    def next_batch(self, batch_size: int) -> Optional[dict]:
        rows, cur, used = [], [], 0
        while len(rows) < batch_size:
            item = self.pending if self.pending is not None else self._next_segment()
            self.pending = None
            if item is None:  # finite pass over: keep the partial row
                if cur:
                    rows.append(cur)
                break
            seg = item[1]
            if used + len(seg) <= self.seq_len:
                cur.append(seg)
                used += len(seg)
                continue
            rows.append(cur)
            cur, used = [], 0
            self.pending = item
        if not rows:
            return None
        return collate_rows(rows, self.seq_len, self.tok.pad_id, self.spec)

    def state_dict(self) -> dict:
        st = super().state_dict()
        st["pending"] = None if self.pending is None else list(self.pending[0].ref)
        return st

    def load_state_dict(self, st: dict) -> None:
        super().load_state_dict(st)
        self.pending = None
        if st.get("pending") is not None:
            sid, idx = (int(v) for v in st["pending"])
            ((_, _, _key, sample),) = self._refetch([(sid, idx)])
            self.pending = (sample, self.renderer.render(sample))


class MultimodalLoader(TokenLoader):
    """Iterable of multimodal batches for one data-parallel rank (see the module doc and
    :mod:`.collate` for the batch). ``loop``/``num_workers``/``shuffle_buffer``/state
    behave as in :class:`TokenLoader`; ``skipped`` counts undecodable samples and shards."""

    def __init__(
        self,
        shard_paths: Union[str, Sequence[str]],
        tokenizer,
        seq_len: int,
        micro_batch_size: int,
        *,
        resampler_queries: int = 8,
        image_size: int = 64,
        patch_size: int = 8,
        video_frames: int = 8,
        video_size: int = 32,
        tubelet_frames: int = 2,
        max_audio_frames: int = 300,
        caption_len: int = 32,
        dp_rank: int = 0,
        dp_size: int = 1,
        seed: int = 0,
        num_workers: int = 0,
        shuffle_buffer: int = 256,
        loop: bool = True,
    ):
        super().__init__(
            shard_paths,
            tokenizer,
            seq_len,
            micro_batch_size,
            dp_rank=dp_rank,
            dp_size=dp_size,
            seed=seed,
            shuffle_buffer=shuffle_buffer,
            num_workers=num_workers,
            loop=loop,
            field="json",
        )
        self.spec = MediaSpec(
            resampler_queries,
            image_size,
            patch_size,
            video_frames,
            video_size,
            tubelet_frames,
            max_audio_frames,
            caption_len,
        )
        self.spec.validate()
        if self.seq_len < min_seq_len(self.spec):
            raise ValueError(
                f"data.seq_len {self.seq_len} is too short for {resampler_queries} "
                f"placeholders per media item: at least {min_seq_len(self.spec)}"
            )
        for name in ("<I>", "</I>", "<A>", "</A>", "<V>", "</V>", "<T>", "</T>"):
            self.tokenizer.special_id(name)  # KeyError naming the token when the model lacks it

    @classmethod
    def from_config(
        cls, cfg, shard_paths, tokenizer, dp_rank: int = 0, dp_size: int = 1, loop: bool = True, **overrides
    ) -> MultimodalLoader:
        """A loader with ``cfg.data`` sizes and the media sizes of ``cfg.model.multimodal``
        (fields named like :class:`MediaSpec`'s; missing ones keep their defaults)."""
        mm = getattr(cfg.model, "multimodal", None)
        media = {f.name: getattr(mm, f.name) for f in fields(MediaSpec) if hasattr(mm, f.name)}
        kw = dict(
            seq_len=cfg.data.seq_len,
            micro_batch_size=cfg.data.micro_batch_size,
            seed=cfg.seed,
            num_workers=cfg.data.num_workers,
            shuffle_buffer=cfg.data.shuffle_buffer,
            dp_rank=dp_rank,
            dp_size=dp_size,
            loop=loop,
        )
        kw.update(media)
        kw.update(overrides)
        return cls(shard_paths, tokenizer, **kw)

    def _make_stream(self, logical_worker: int) -> _MultimodalStream:
        return _MultimodalStream(
            self.shards,
            self.tokenizer,
            self.seq_len,
            split=self.dp_rank * self._n_streams + logical_worker,
            n_splits=self.n_splits,
            seed=self.seed,
            shuffle_buffer=self.shuffle_buffer,
            loop=self.loop,
            spec=self.spec,
        )

    def _settings(self) -> dict:
        return {**super()._settings(), "media": asdict(self.spec)}

    def iter_samples(self):
        """Decoded :class:`~.sample.Sample` objects of this rank for one epoch (no packing);
        does not move the loader."""
        for _key, sample in self.iter_documents():
            yield sample
