"""Decoded samples -> token segments -> packed batch tensors (the batch contract).

A *segment* is one sample laid out as tokens (see :mod:`.sample` for what is rendered)::

    <I> pad*R </I>  <V> pad*R </V>  <A> pad*R </A>        media blocks, in this order
    <T> question answer </T> ...                           VQA: loss on answer and </T>
    <T> caption </T>   or   <T> transcript </T>            loss kind 2 on the text and </T>
    <T> plain text </T>                                    loss kind 1 on the text and </T>

Each token carries the loss kind it has *as a target* (0 = none); labels are then
``labels[t] = ids[t+1]`` where the kind of token t+1 is non-zero (and ``loss_kind[t]`` is
that kind), -100 elsewhere, so nothing is predicted across a segment boundary. A segment
longer than the row is cut at the row length (media blocks come first and always fit, the
loader checks seq_len).

Rows pack whole segments greedily in stream order; a segment that does not fit in what is
left of a row starts the next row (the rest of the row is padding). Batch tensors:
``input_ids, labels, loss_kind, modality, segment_ids, position_ids`` [B, T]; ``image``
[Ni, P, 3pp], ``video`` [Nv, N_tub, 3tpp], ``audio`` [Na, F, 80] with ``audio_frames`` [Na];
``image_caption_ids``/``video_caption_ids``/``audio_caption_ids`` [N*, caption_len]; ``vqa``
a list of {"row", "answer_start", "answer", "question"} (answer_start: the position of the
first answer token in the row, so the answer is predicted from position answer_start - 1).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .sample import MEDIA_ORDER, MediaSpec, Sample

IGNORE = -100
LOSS_NONE, LOSS_LM, LOSS_COND = 0, 1, 2
MODALITY_ID = {"text": 0, "image": 1, "audio": 2, "video": 3}
DELIMITERS = {"image": ("<I>", "</I>"), "audio": ("<A>", "</A>"), "video": ("<V>", "</V>"), "text": ("<T>", "</T>")}


def min_seq_len(spec: MediaSpec) -> int:
    """The shortest row that holds all three media blocks and a short text."""
    return 3 * (spec.resampler_queries + 2) + 8


@dataclass
class Segment:
    ids: list[int] = field(default_factory=list)
    kinds: list[int] = field(default_factory=list)  # loss kind of each token as a target
    modality: list[int] = field(default_factory=list)
    media: dict = field(default_factory=lambda: {m: [] for m in MEDIA_ORDER})
    captions: dict = field(default_factory=lambda: {m: [] for m in MEDIA_ORDER})
    vqa: list = field(default_factory=list)  # (answer_start, answer, question)

    def __len__(self) -> int:
        return len(self.ids)

    def add(self, ids, kind: int, modality: int = 0) -> None:
        self.ids.extend(ids)
        self.kinds.extend([kind] * len(ids))
        self.modality.extend([modality] * len(ids))


class SegmentRenderer:
    """Turns :class:`Sample` objects into :class:`Segment` token layouts for one tokenizer."""

    def __init__(self, tokenizer, spec: MediaSpec, max_len: int):
        self.tok, self.spec, self.max_len = tokenizer, spec, int(max_len)
        self.pad = tokenizer.pad_id
        self.delim = {m: (tokenizer.special_id(o), tokenizer.special_id(c)) for m, (o, c) in DELIMITERS.items()}

    def caption_ids(self, text: str | None) -> list[int]:
        return self.tok.encode(text)[: self.spec.caption_len] if text else []

    def _text_block(self, seg: Segment, prompt: list[int], target: list[int], kind: int) -> None:
        o, c = self.delim["text"]
        seg.add([o], LOSS_NONE)
        seg.add(prompt, LOSS_NONE)
        seg.add(target, kind)
        seg.add([c], kind)

    def render(self, s: Sample) -> Segment:
        seg = Segment()
        meta = s.meta
        r = self.spec.resampler_queries
        for m in MEDIA_ORDER:
            arr = getattr(s, m)
            if arr is None:
                continue
            o, c = self.delim[m]
            seg.add([o], LOSS_NONE)
            seg.add([self.pad] * r, LOSS_NONE, MODALITY_ID[m])
            seg.add([c], LOSS_NONE)
            seg.media[m].append(arr)
            text = meta.get("transcript") if m == "audio" else meta.get("caption")
            seg.captions[m].append(self.caption_ids(text))
        if meta.get("qa"):
            for q, a in meta["qa"]:
                start = len(seg) + 1
                q_ids = self.tok.encode(q)
                seg.vqa.append((start + len(q_ids), a, q))
                self._text_block(seg, q_ids, self.tok.encode(a), LOSS_COND)
        elif meta.get("caption") and (s.image is not None or s.video is not None):
            self._text_block(seg, [], self.tok.encode(meta["caption"]), LOSS_COND)
        elif meta.get("transcript") and s.audio is not None:
            self._text_block(seg, [], self.tok.encode(meta["transcript"]), LOSS_COND)
        if meta.get("text"):
            self._text_block(seg, [], self.tok.encode(meta["text"]), LOSS_LM)
        if len(seg) > self.max_len:
            for name in ("ids", "kinds", "modality"):
                del getattr(seg, name)[self.max_len :]
            seg.vqa = [v for v in seg.vqa if v[0] < self.max_len]
        return seg


def _stack(arrays: list[np.ndarray], tail: tuple[int, ...]) -> torch.Tensor:
    if not arrays:
        return torch.zeros((0, *tail), dtype=torch.float32)
    return torch.from_numpy(np.stack(arrays).astype(np.float32, copy=False))


def _caption_tensor(captions: list[list[int]], length: int, pad: int) -> torch.Tensor:
    out = torch.full((len(captions), length), pad, dtype=torch.long)
    for i, c in enumerate(captions):
        out[i, : len(c)] = torch.tensor(c, dtype=torch.long)
    return out


def collate_rows(rows: list[list[Segment]], seq_len: int, pad_id: int, spec: MediaSpec) -> dict:
    """The batch dict of packed rows (each a list of segments whose lengths sum to <= seq_len)."""
    b, t = len(rows), int(seq_len)
    ids = np.full((b, t), pad_id, dtype=np.int64)
    labels = np.full((b, t), IGNORE, dtype=np.int64)
    loss_kind = np.zeros((b, t), dtype=np.int64)
    modality = np.zeros((b, t), dtype=np.int64)
    segment_ids = np.zeros((b, t), dtype=np.int64)
    position_ids = np.zeros((b, t), dtype=np.int64)
    media = {m: [] for m in MEDIA_ORDER}
    captions = {m: [] for m in MEDIA_ORDER}
    vqa = []
    for row_i, row in enumerate(rows):
        off = 0
        for k, seg in enumerate(row, start=1):
            n = len(seg)
            if off + n > t:
                raise ValueError(f"row {row_i}: segments of {off + n} tokens exceed seq_len {t}")
            sl = slice(off, off + n)
            seg_ids = np.asarray(seg.ids, dtype=np.int64)
            kinds = np.asarray(seg.kinds, dtype=np.int64)
            ids[row_i, sl] = seg_ids
            modality[row_i, sl] = seg.modality
            segment_ids[row_i, sl] = k
            position_ids[row_i, sl] = np.arange(n)
            target = kinds[1:] > 0  # token t+1 is a target of position t
            lab = np.where(target, seg_ids[1:], IGNORE)
            labels[row_i, off : off + n - 1] = lab
            loss_kind[row_i, off : off + n - 1] = np.where(target, kinds[1:], 0)
            for m in MEDIA_ORDER:
                media[m].extend(seg.media[m])
                captions[m].extend(seg.captions[m])
            vqa.extend({"row": row_i, "answer_start": off + s, "answer": a, "question": q} for s, a, q in seg.vqa)
            off += n
    audio_frames = [a.shape[0] for a in media["audio"]]
    f_max = max(audio_frames, default=0)
    audio = [np.pad(a, ((0, f_max - a.shape[0]), (0, 0))) for a in media["audio"]]
    c = 3 * spec.patch_size**2
    return {
        "input_ids": torch.from_numpy(ids),
        "labels": torch.from_numpy(labels),
        "loss_kind": torch.from_numpy(loss_kind),
        "modality": torch.from_numpy(modality),
        "segment_ids": torch.from_numpy(segment_ids),
        "position_ids": torch.from_numpy(position_ids),
        "image": _stack(media["image"], (spec.image_patches, c)),
        "video": _stack(media["video"], (spec.video_tubelets, c * spec.tubelet_frames)),
        "audio": _stack(audio, (0, 80)),
        "audio_frames": torch.tensor(audio_frames, dtype=torch.long),
        "image_caption_ids": _caption_tensor(captions["image"], spec.caption_len, pad_id),
        "video_caption_ids": _caption_tensor(captions["video"], spec.caption_len, pad_id),
        "audio_caption_ids": _caption_tensor(captions["audio"], spec.caption_len, pad_id),
        "vqa": vqa,
    }


def count_samples(batch: dict) -> int:
    """Number of samples packed in a batch (segments over all rows)."""
    return int(batch["segment_ids"].max(dim=1).values.sum())
