"""Media decoders of the multimodal loader: image -> patches, WAV -> Whisper-style log-mel,
video (a PNG film strip) -> spatio-temporal tubelets. Pure numpy/PIL/stdlib plus torch.stft
(imported only when audio is decoded).

Layouts (they match a Conv2d / Conv3d patch embedding, so ``Linear(flat) == Conv(x)``):

* image ``[H, W, 3]`` uint8 -> ``[(H/p) * (W/p), 3 * p * p]`` float32: patches in row-major
  order (patch row, then patch column), each vector in (channel, y, x) order;
* video ``[F, H, W, 3]`` uint8 -> ``[(F/t) * (H/p) * (W/p), 3 * t * p * p]``: tubelets in
  (time, row, column) order, each vector in (channel, frame, y, x) order.

Pixels are normalised to [-1, 1]: ``(x / 255 - 0.5) / 0.5``.

Audio follows Whisper (Radford et al., 2022): 16 kHz mono, periodic Hann window of 400
samples (25 ms), hop 160 (10 ms), centred frames with reflect padding, power spectrum, 80
Slaney-scale mel filters with Slaney area normalisation (what ``librosa.filters.mel``
computes by default), ``log10(max(mel, 1e-10))``, floored at 8 below the clip's maximum,
then ``(x + 4) / 4``. The last STFT frame is dropped, so a clip of N samples has N // 160
frames.
"""

from __future__ import annotations

import contextlib
import io
import wave

import numpy as np
from PIL import Image

SAMPLE_RATE = 16000
N_FFT = 400
HOP = 160
N_MELS = 80
PIXEL_MEAN, PIXEL_STD = 0.5, 0.5


class DecodeError(ValueError):
    """A media field that cannot be decoded (corrupt bytes, wrong shape or format)."""


# ------------------------------------------------------------------ images and video
def load_rgb(data: bytes, size: int | tuple[int, int] | None = None) -> np.ndarray:
    """``[H, W, 3]`` uint8 RGB of encoded image bytes (PNG/JPEG/...), resized (bilinear) to
    ``size`` (an int for a square, or (width, height)) when given and different."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            im = im.convert("RGB")
            if size is not None:
                wh = (size, size) if isinstance(size, int) else tuple(size)
                if im.size != wh:
                    im = im.resize(wh, Image.BILINEAR)
            return np.asarray(im, dtype=np.uint8).copy()
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
        raise DecodeError(f"undecodable image ({len(data)} bytes): {e}") from e


def encode_png(rgb: np.ndarray) -> bytes:
    """PNG bytes of a uint8 ``[H, W, 3]`` (or ``[H, W]``) array; deterministic."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8)).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def normalize_pixels(x: np.ndarray) -> np.ndarray:
    return ((x.astype(np.float32) / 255.0) - PIXEL_MEAN) / PIXEL_STD


def patchify(rgb: np.ndarray, patch: int) -> np.ndarray:
    """``[H, W, 3]`` uint8 -> normalised ``[(H/p)(W/p), 3 p p]`` float32 (see module doc)."""
    h, w, c = rgb.shape
    if h % patch or w % patch:
        raise DecodeError(f"image {h}x{w} is not divisible by patch {patch}")
    x = normalize_pixels(rgb).reshape(h // patch, patch, w // patch, patch, c)
    return np.ascontiguousarray(x.transpose(0, 2, 4, 1, 3).reshape(-1, c * patch * patch))


def unpatchify(patches: np.ndarray, height: int, width: int, patch: int) -> np.ndarray:
    """Inverse of :func:`patchify` up to the normalisation: ``[H, W, 3]`` float pixels in [0, 1]."""
    gh, gw = height // patch, width // patch
    x = np.asarray(patches).reshape(gh, gw, 3, patch, patch).transpose(0, 3, 1, 4, 2)
    return x.reshape(height, width, 3) * PIXEL_STD + PIXEL_MEAN


def split_strip(rgb: np.ndarray, frames: int) -> np.ndarray:
    """A horizontal film strip ``[H, F*W, 3]`` -> ``[F, H, W, 3]``."""
    h, fw, c = rgb.shape
    if frames < 1 or fw % frames:
        raise DecodeError(f"film strip of width {fw} does not hold {frames} equal frames")
    return np.ascontiguousarray(rgb.reshape(h, frames, fw // frames, c).transpose(1, 0, 2, 3))


def join_strip(frames: np.ndarray) -> np.ndarray:
    """``[F, H, W, 3]`` -> the horizontal film strip ``[H, F*W, 3]`` (for writing)."""
    f, h, w, c = frames.shape
    return np.ascontiguousarray(frames.transpose(1, 0, 2, 3).reshape(h, f * w, c))


def tubeletize(frames: np.ndarray, t: int, patch: int) -> np.ndarray:
    """``[F, H, W, 3]`` uint8 -> normalised ``[(F/t)(H/p)(W/p), 3 t p p]`` float32."""
    f, h, w, c = frames.shape
    if f % t or h % patch or w % patch:
        raise DecodeError(f"video {f}x{h}x{w} is not divisible by tubelet {t}x{patch}x{patch}")
    x = normalize_pixels(frames).reshape(f // t, t, h // patch, patch, w // patch, patch, c)
    return np.ascontiguousarray(x.transpose(0, 2, 4, 6, 1, 3, 5).reshape(-1, c * t * patch * patch))


def untubeletize(tubes: np.ndarray, frames: int, height: int, width: int, t: int, patch: int) -> np.ndarray:
    """Inverse of :func:`tubeletize` up to the normalisation: ``[F, H, W, 3]`` in [0, 1]."""
    x = np.asarray(tubes).reshape(frames // t, height // patch, width // patch, 3, t, patch, patch)
    x = x.transpose(0, 4, 1, 5, 2, 6, 3).reshape(frames, height, width, 3)
    return x * PIXEL_STD + PIXEL_MEAN


def decode_video(data: bytes, frames: int, size: int, t: int, patch: int) -> np.ndarray:
    """Tubelets of a PNG film strip of ``frames`` frames, each resized to ``size`` x ``size``."""
    strip = load_rgb(data)
    clip = split_strip(strip, frames)
    if clip.shape[1:3] != (size, size):
        clip = np.stack([np.asarray(Image.fromarray(fr).resize((size, size), Image.BILINEAR)) for fr in clip])
    return tubeletize(clip, t, patch)


# ------------------------------------------------------------------ audio
def read_wav(data: bytes) -> tuple[np.ndarray, int]:
    """(mono float32 samples in [-1, 1], sample rate) of 16-bit PCM WAV bytes (stdlib wave)."""
    try:
        with wave.open(io.BytesIO(data), "rb") as w:
            if w.getsampwidth() != 2:
                raise DecodeError(f"WAV has {8 * w.getsampwidth()}-bit samples; 16-bit PCM expected")
            rate, channels, n = w.getframerate(), w.getnchannels(), w.getnframes()
            raw = w.readframes(n)
    except (wave.Error, EOFError) as e:
        raise DecodeError(f"undecodable WAV ({len(data)} bytes): {e}") from e
    x = np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0
    if channels > 1:
        x = x[: len(x) // channels * channels].reshape(-1, channels).mean(axis=1)
    if x.size == 0:
        raise DecodeError("WAV has no samples")
    return x, rate


def write_wav(samples: np.ndarray, rate: int) -> bytes:
    """16-bit mono PCM WAV bytes of float samples in [-1, 1]."""
    pcm = np.clip(np.round(np.asarray(samples, dtype=np.float64) * 32767.0), -32768, 32767).astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(int(rate))
        w.writeframes(pcm.tobytes())
    return buf.getvalue()


def resample(x: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
    """Band-limited resampling by zero-padding / truncating the real FFT (periodic sinc
    interpolation); the clip is short, so the wrap-around at its ends is negligible."""
    if rate_in == rate_out:
        return x.astype(np.float32)
    n_out = int(round(len(x) * rate_out / rate_in))
    spec = np.fft.rfft(x.astype(np.float64))
    k = n_out // 2 + 1
    out = np.zeros(k, dtype=np.complex128)
    m = min(k, len(spec))
    out[:m] = spec[:m]
    return (np.fft.irfft(out, n_out) * (n_out / len(x))).astype(np.float32)


def hz_to_mel(f):
    """Slaney's mel scale (linear below 1 kHz, logarithmic above), as librosa's default."""
    f = np.asarray(f, dtype=np.float64)
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, np.log(6.4) / 27.0
    return np.where(f >= min_log_hz, min_log_mel + np.log(np.maximum(f, 1e-10) / min_log_hz) / logstep, f / f_sp)


def mel_to_hz(m):
    m = np.asarray(m, dtype=np.float64)
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, np.log(6.4) / 27.0
    return np.where(m >= min_log_mel, min_log_hz * np.exp(logstep * (m - min_log_mel)), f_sp * m)


def mel_filterbank(
    sr: int = SAMPLE_RATE,
    n_fft: int = N_FFT,
    n_mels: int = N_MELS,
    fmin: float = 0.0,
    fmax: float | None = None,
    norm: bool = True,
) -> np.ndarray:
    """``[n_mels, n_fft // 2 + 1]`` triangular filters: filter m rises linearly from the mel
    point m to m+1 and falls to m+2 (n_mels + 2 points equally spaced on the mel scale);
    ``norm`` scales each to unit area in Hz (``2 / (f[m+2] - f[m])``, Slaney)."""
    fmax = sr / 2 if fmax is None else fmax
    fft_freqs = np.linspace(0.0, sr / 2, n_fft // 2 + 1)
    pts = mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels + 2))
    lower, center, upper = pts[:-2, None], pts[1:-1, None], pts[2:, None]
    rise = (fft_freqs[None] - lower) / (center - lower)
    fall = (upper - fft_freqs[None]) / (upper - center)
    w = np.maximum(0.0, np.minimum(rise, fall))
    if norm:
        w *= 2.0 / (upper - lower)
    return w.astype(np.float32)


_MEL_CACHE: dict = {}


def _mel_tensor(sr: int):
    import torch

    key = (sr, N_FFT, N_MELS)
    if key not in _MEL_CACHE:
        _MEL_CACHE[key] = torch.from_numpy(mel_filterbank(sr, N_FFT, N_MELS))
    return _MEL_CACHE[key]


@contextlib.contextmanager
def _one_intra_op_thread():
    """Run a few small torch ops on one thread: on a small machine shared with training,
    intra-op threads oversubscribe the cores and make a clip's log-mel much slower (docs/notes.md)."""
    import torch

    n = torch.get_num_threads()
    if n > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if n > 1:
            torch.set_num_threads(n)


def log_mel(samples: np.ndarray, max_frames: int | None = None) -> np.ndarray:
    """Whisper's normalised log-mel ``[frames, 80]`` float32 of 16 kHz samples (module doc);
    clips longer than ``max_frames`` frames are cut first."""
    with _one_intra_op_thread():
        return _log_mel(np.asarray(samples, dtype=np.float32), max_frames)


def _log_mel(x: np.ndarray, max_frames: int | None) -> np.ndarray:
    import torch  # imported here: building shards (make-shards) does not need torch

    if max_frames is not None:
        x = x[: max_frames * HOP]
    if x.size < N_FFT // 2 + 1:  # reflect padding needs more samples than half a window
        x = np.pad(x, (0, N_FFT // 2 + 1 - x.size))
    audio = torch.from_numpy(x)
    spec = torch.stft(
        audio, N_FFT, HOP, window=torch.hann_window(N_FFT), center=True, pad_mode="reflect", return_complex=True
    )
    power = spec[:, :-1].abs() ** 2  # [freq, frames], last frame dropped
    mel = _mel_tensor(SAMPLE_RATE) @ power  # [80, frames]
    logm = torch.clamp(mel, min=1e-10).log10()
    logm = torch.maximum(logm, logm.max() - 8.0)
    return ((logm + 4.0) / 4.0).T.contiguous().numpy()


def decode_audio(data: bytes, max_frames: int | None = None) -> np.ndarray:
    """Log-mel ``[frames, 80]`` of WAV bytes, resampled to 16 kHz when needed."""
    x, rate = read_wav(data)
    if rate != SAMPLE_RATE:
        x = resample(x, rate, SAMPLE_RATE)
    feats = log_mel(x, max_frames)
    if feats.shape[0] == 0:
        raise DecodeError("audio clip shorter than one frame")
    return feats
