"""The on-disk multimodal sample and its decoding: one WebDataset sample per example.

Tar members of a sample ``KEY`` (any subset of the media, in WebDataset's sorted order)::

    KEY.json        metadata (always), UTF-8 JSON, see below
    KEY.png         an image (any size; PNG or any format PIL reads)
    KEY.video.png   a video as a horizontal film strip of ``meta["frames"]`` equal frames
    KEY.wav         16-bit PCM WAV speech (any rate; resampled to 16 kHz)

``KEY.json``::

    {"media": ["image" | "video" | "audio", ...],   # which media members the sample has
     "caption": "a red circle moves left",          # describes the image/video (optional)
     "transcript": "what color is the shape?",      # the words spoken in the audio (optional)
     "qa": [["what color is the shape?", "red"]],   # questions about the media (optional)
     "text": "...",                                 # plain text (optional)
     "frames": 8,                                   # video only
     "source": "easy-vqa/train/2375"}               # provenance

What becomes tokens (see :mod:`.collate`): the media blocks, then the questions with their
answers when there are any (loss on the answers only), else the caption, else the
transcript (loss on them), then the plain text (language-model loss). The caption of a VQA
sample is never rendered (it would give the answers away); it is the text side of the
image's contrastive pair, like captions and transcripts everywhere.

Large corpora of one's own are written the same way: build samples with
:func:`make_sample` and pass them to :func:`aion_train.data.shards.write_shards`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from .decode import DecodeError, decode_audio, decode_video, load_rgb, patchify

MEDIA_FIELDS = {"image": "png", "video": "video.png", "audio": "wav"}
MEDIA_ORDER = ("image", "video", "audio")


@dataclass(frozen=True)
class MediaSpec:
    """Shapes the decoders produce and the packer lays out (one per loader)."""

    resampler_queries: int = 8  # R placeholder tokens per media item
    image_size: int = 64
    patch_size: int = 8
    video_frames: int = 8
    video_size: int = 32
    tubelet_frames: int = 2
    max_audio_frames: int = 300  # 3 s at 10 ms per frame; longer clips are cut
    caption_len: int = 32  # tokens per entry of *_caption_ids

    @property
    def image_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def video_tubelets(self) -> int:
        return (self.video_frames // self.tubelet_frames) * (self.video_size // self.patch_size) ** 2

    def validate(self) -> None:
        if self.resampler_queries < 1 or self.caption_len < 1 or self.max_audio_frames < 1:
            raise ValueError("resampler_queries, caption_len and max_audio_frames must be >= 1")
        if self.image_size % self.patch_size or self.video_size % self.patch_size:
            raise ValueError(
                f"image_size {self.image_size} and video_size {self.video_size} must be "
                f"multiples of patch_size {self.patch_size}"
            )
        if self.video_frames % self.tubelet_frames:
            raise ValueError(
                f"video_frames {self.video_frames} must be a multiple of tubelet_frames {self.tubelet_frames}"
            )


@dataclass
class Sample:
    """A decoded sample: metadata plus media arrays (what the shuffle buffer holds)."""

    key: str
    ref: tuple[int, int]  # (shard id, index in shard), for resumption
    meta: dict
    image: Optional[np.ndarray] = None  # [P, 3 p p]
    video: Optional[np.ndarray] = None  # [N_tub, 3 t p p]
    audio: Optional[np.ndarray] = None  # [frames, 80]
    extra: dict = field(default_factory=dict)


def make_sample(
    key: str,
    *,
    image: bytes | None = None,
    video: bytes | None = None,
    frames: int | None = None,
    audio: bytes | None = None,
    caption: str | None = None,
    transcript: str | None = None,
    qa: Iterable[tuple[str, str]] | None = None,
    text: str | None = None,
    source: str = "",
) -> dict:
    """A sample dict for :func:`write_shards` (encoded media bytes in, JSON metadata built)."""
    meta: dict = {
        "media": [m for m, v in (("image", image), ("video", video), ("audio", audio)) if v is not None],
        "source": source,
    }
    if video is not None:
        if not frames:
            raise ValueError(f"sample {key!r}: a video needs its number of frames")
        meta["frames"] = int(frames)
    for name, value in (("caption", caption), ("transcript", transcript), ("text", text)):
        if value is not None:
            meta[name] = value
    if qa:
        meta["qa"] = [[str(q), str(a)] for q, a in qa]
    if not meta["media"] and not text:
        raise ValueError(f"sample {key!r} has neither media nor text")
    out = {"__key__": key, "json": json.dumps(meta, sort_keys=True, ensure_ascii=False)}
    for name, value in (("image", image), ("video", video), ("audio", audio)):
        if value is not None:
            out[MEDIA_FIELDS[name]] = value
    return out


def read_meta(item: dict) -> dict:
    """The parsed ``json`` member of a raw sample; DecodeError when absent or invalid."""
    if "json" not in item:
        raise DecodeError("no 'json' member")
    try:
        meta = json.loads(item["json"].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DecodeError(f"undecodable json: {e}") from e
    if not isinstance(meta, dict) or not isinstance(meta.get("media", []), list):
        raise DecodeError("json metadata must be an object with a 'media' list")
    unknown = set(meta.get("media", [])) - set(MEDIA_FIELDS)
    if unknown:
        raise DecodeError(f"unknown media {sorted(unknown)}")
    return meta


def is_complete(item: dict) -> bool:
    """Whether a raw sample has its json and every media member the json names."""
    try:
        meta = read_meta(item)
    except DecodeError:
        return False
    return all(MEDIA_FIELDS[m] in item for m in meta.get("media", []))


def decode_sample(item: dict, spec: MediaSpec, ref: tuple[int, int] = (0, 0)) -> Sample:
    """Decode a raw sample (``{"__key__", "json", "png", ...}`` of bytes) into a :class:`Sample`;
    DecodeError naming the problem when a member is missing or undecodable."""
    meta = read_meta(item)
    s = Sample(key=item.get("__key__", "?"), ref=ref, meta=meta)
    for m in meta.get("media", []):
        if MEDIA_FIELDS[m] not in item:
            raise DecodeError(f"json names {m!r} but member {MEDIA_FIELDS[m]!r} is missing")
    if "image" in meta["media"]:
        s.image = patchify(load_rgb(item["png"], spec.image_size), spec.patch_size)
    if "video" in meta["media"]:
        s.video = decode_video(
            item["video.png"],
            int(meta.get("frames", spec.video_frames)),
            spec.video_size,
            spec.tubelet_frames,
            spec.patch_size,
        )
        if s.video.shape[0] != spec.video_tubelets:
            raise DecodeError(
                f"video has {s.video.shape[0]} tubelets, {spec.video_tubelets} expected ({spec.video_frames} frames)"
            )
    if "audio" in meta["media"]:
        s.audio = decode_audio(item["wav"], spec.max_audio_frames)
    if not meta["media"] and not meta.get("text"):
        raise DecodeError("sample has neither media nor text")
    return s


def drop_partial_before_error(items: Iterator) -> Iterator:
    """Pass raw samples through, except an incomplete sample right before a shard error
    marker (the member being read when a tar was cut): it is part of that one error."""
    from ..shards import ShardError

    held = None
    for item in items:
        if held is not None:
            if not (isinstance(item, ShardError) and not is_complete(held)):
                yield held
        held = item
    if held is not None:
        yield held
