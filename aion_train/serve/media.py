"""Media of a request -> model inputs, and the per-modality cache of encoded media.

Decoding: an image is a `data:` URL (base64; no network fetches) holding PNG/JPEG/... bytes,
resized to the model's `image_size` and cut into patches exactly as the training loader does
(`aion_train.data.multimodal.decode`); audio is base64 16-bit PCM WAV, turned into the
Whisper-style log-mel of training (cut at `max_audio_frames`); a video is a list of image
frames (data URLs), `video_frames` of them picked evenly, each resized, as tubelets.

`MediaCache`: what the encoder + resampler + gated projection make of one item (the R tokens
that enter the sequence) and, for a model with gated cross-attention, each such layer's
key/value projection of them, keyed by (kind, sha256 of the decoded bytes), least recently
used first out when over `max_entries` or `max_bytes`. A second turn about the same image
reuses them: `encodes` counts the encoder runs, `hits` the reuses.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

MAX_MEDIA_PER_REQUEST = 8
MAX_IMAGE_PIXELS = 4096 * 4096  # refused before decoding: a small PNG can hold a huge image
MAX_VIDEO_FRAMES = 64
_DATA_URL = re.compile(r"data:([\w.+-]+/[\w.+-]+)?((?:;[\w.+-]+=[\w.+-]+)*);base64,(.*)", re.S)


class MediaError(ValueError):
    """A media part that cannot be used (message says why); `param` names the field."""

    def __init__(self, message: str, param: str | None = None, code: str = "invalid_media"):
        super().__init__(message)
        self.param, self.code = param, code


@dataclass
class Encoded:
    tokens: torch.Tensor  # [R, d_model]
    layer_kv: list  # per cross-attention layer (model.cross_attn order): [R, 2 d_model]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in [self.tokens, *self.layer_kv])


@dataclass
class MediaInput:
    kind: str  # "image" | "audio" | "video"
    sha256: str  # of the decoded bytes (a video: of its frames' bytes in order)
    data: torch.Tensor  # one item: patches [P, 3pp], log-mel [F, n_mels] or tubelets [N, 3tpp]


def b64decode(text: str, param: str) -> bytes:
    try:
        return base64.b64decode(re.sub(r"\s+", "", text), validate=True)
    except (binascii.Error, ValueError):
        raise MediaError(f"{param}: not valid base64", param) from None


def data_url_bytes(url: str, param: str) -> bytes:
    """The bytes of a base64 `data:` URL; anything else (http/https/file ...) is refused."""
    if not isinstance(url, str) or not url.startswith("data:"):
        shown = str(url)[:40]
        raise MediaError(
            f"{param}: only data: URLs (data:image/png;base64,...) are accepted; this server fetches "
            f"nothing from the network (got {shown!r})",
            param,
        )
    m = _DATA_URL.fullmatch(url)
    if m is None:
        raise MediaError(f"{param}: a data: URL must be base64 (data:<type>;base64,<data>)", param)
    return b64decode(m.group(3), param)


def _sha(*parts: bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(len(p).to_bytes(8, "little"))
        h.update(p)
    return h.hexdigest()


def _check_pixels(raw: bytes, param: str) -> None:
    """Refuse an image over MAX_IMAGE_PIXELS from its header (before anything is decoded)."""
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(raw)) as im:
            w, h = im.size
    except Exception:  # noqa: BLE001 - not an image: load_rgb says so
        return
    if w * h > MAX_IMAGE_PIXELS:
        raise MediaError(f"{param}: a {w}x{h} image is over the limit of {MAX_IMAGE_PIXELS} pixels", param)


def decode_image(raw: bytes, mm, param: str = "image") -> MediaInput:
    from aion_train.data.multimodal.decode import DecodeError, load_rgb, patchify

    _check_pixels(raw, param)
    try:
        patches = patchify(load_rgb(raw, mm.image_size), mm.patch_size)
    except DecodeError as e:
        raise MediaError(f"{param}: {e}", param) from None
    return MediaInput("image", hashlib.sha256(raw).hexdigest(), torch.from_numpy(patches))


def decode_wav(raw: bytes, mm, param: str = "audio") -> MediaInput:
    from aion_train.data.multimodal.decode import DecodeError, decode_audio

    try:
        mel = decode_audio(raw, mm.max_audio_frames)
    except DecodeError as e:
        raise MediaError(f"{param}: {e}", param) from None
    if mel.shape[1] != mm.n_mels:
        raise MediaError(f"{param}: the model takes {mm.n_mels} mel bands, the decoder gives {mel.shape[1]}", param)
    return MediaInput("audio", hashlib.sha256(raw).hexdigest(), torch.from_numpy(np.ascontiguousarray(mel)))


def decode_frames(frames: list[bytes], mm, param: str = "video") -> MediaInput:
    from aion_train.data.multimodal.decode import DecodeError, load_rgb, tubeletize

    if not frames or len(frames) > MAX_VIDEO_FRAMES:
        raise MediaError(f"{param}: a video needs 1 to {MAX_VIDEO_FRAMES} frames, got {len(frames)}", param)
    for i, f in enumerate(frames):
        _check_pixels(f, f"{param}.{i}")
    pick = np.linspace(0, len(frames) - 1, mm.video_frames).round().astype(int)
    try:
        rgb = {i: load_rgb(frames[i], mm.image_size) for i in set(pick.tolist())}
        tubes = tubeletize(np.stack([rgb[i] for i in pick]), mm.tubelet_frames, mm.patch_size)
    except DecodeError as e:
        raise MediaError(f"{param}: {e}", param) from None
    return MediaInput("video", _sha(*frames), torch.from_numpy(tubes))


class MediaCache:
    """LRU of encoded media tokens [R, d_model] by (kind, sha256); thread-safe."""

    def __init__(self, max_entries: int = 256, max_bytes: int = 256 << 20):
        self.max_entries, self.max_bytes = int(max_entries), int(max_bytes)
        self._d: OrderedDict[tuple[str, str], Encoded] = OrderedDict()
        self._lock = threading.Lock()
        self.bytes = 0
        self.hits = 0
        self.encodes = 0  # encoder (+ resampler + projection) runs
        self.listeners: list = []  # called (kind, hit: bool) on every lookup (metrics)

    def __len__(self) -> int:
        return len(self._d)

    def get(self, model, item: MediaInput) -> Encoded:
        """The item's media tokens [R, D] (and cross-attention K/V), from the cache or encoded now (and kept)."""
        key = (item.kind, item.sha256)
        with self._lock:
            hit = self._d.get(key)
            if hit is not None:
                self._d.move_to_end(key)
                self.hits += 1
        if hit is not None:
            self._tell(item.kind, True)
            return hit
        out = encode_one(model, item)
        with self._lock:
            self.encodes += 1
            if key not in self._d:
                self._d[key] = out
                self.bytes += out.nbytes
            while self._d and (len(self._d) > self.max_entries or self.bytes > self.max_bytes):
                _, old = self._d.popitem(last=False)
                self.bytes -= old.nbytes
        self._tell(item.kind, False)
        return out

    def _tell(self, kind: str, hit: bool) -> None:
        for f in self.listeners:
            f(kind, hit)


@torch.no_grad()
def encode_one(model, item: MediaInput) -> Encoded:
    """encoder -> resampler -> gated projection of one item ([R, d_model]), and each
    cross-attention layer's key/value projection of that."""
    dev = next(model.parameters()).device
    x = item.data.to(dev).unsqueeze(0)
    batch = {item.kind: x}
    if item.kind == "audio":
        batch["audio_frames"] = torch.tensor([x.shape[1]], device=dev)
    tokens = model.encode_media(batch)[item.kind].tokens[0]
    return Encoded(tokens, [layer.kv(tokens) for layer in getattr(model, "cross_attn", ())])
