"""Real multimodal examples from packages installed on the machine (no download), as
sample dicts of :func:`.sample.make_sample`. Everything is deterministic given its arguments.

* easy-vqa (PyPI ``easy-vqa``): 64x64 PNGs of one coloured shape with questions and answers
  (4000 train / 1000 test images, 13 answers). Colour and shape, read off each image's own
  answers, give a caption ("a blue rectangle") used as the contrastive text.
* scikit-learn ``load_digits``: 1797 8x8 handwritten digits -> "a handwritten digit seven".
* photos: matplotlib's sample images (Grace Hopper, the logo, a gift box, an MRI slice) and
  scikit-learn's two sample photos, with hand-written captions, as several square crops.
* speech: ``espeak-ng -v en-us`` reading real text lines (easy-vqa questions, chatterbot
  lines), resampled to 16 kHz mono 16-bit by ``sox`` (numpy FFT resampling when sox is
  missing); transcript = the text.
* video: an easy-vqa image translated by 3 pixels per frame over 8 frames (edges
  extended), downscaled to 32x32, stored as a film strip; caption "a red circle moves left".
* text: chatterbot-corpus English dialogs (question and answers), plain text.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

from .decode import SAMPLE_RATE, encode_png, join_strip, read_wav, resample, write_wav
from .sample import make_sample

SHAPES = ("circle", "rectangle", "triangle")
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}


# ------------------------------------------------------------------ easy-vqa
def easy_vqa_records(split: str) -> list[dict]:
    """[{"id", "path", "qa": [(q, a), ...], "color", "shape"}] of an easy-vqa split, by image id."""
    import easy_vqa

    if split == "train":
        qs, answers, ids = easy_vqa.get_train_questions()
        paths = easy_vqa.get_train_image_paths()
    elif split == "test":
        qs, answers, ids = easy_vqa.get_test_questions()
        paths = easy_vqa.get_test_image_paths()
    else:
        raise ValueError(f"easy-vqa split must be 'train' or 'test', got {split!r}")
    colors = set(easy_vqa.get_answers()) - set(SHAPES) - {"yes", "no"}
    by_id: dict[int, list] = {}
    for q, a, i in zip(qs, answers, ids):
        by_id.setdefault(int(i), []).append((q, a))
    out = []
    for i in sorted(by_id):
        color = shape = None
        for q, a in by_id[i]:
            words = q.rstrip("?").split()
            negated = "not" in words or "no" in words  # "is there not a red shape?" -> yes
            named = a in SHAPES or a in colors or (a == "yes" and not negated)
            if a in SHAPES:
                shape = a
            if a in colors:
                color = a
            if named:  # "what is the blue shape?", "what color is the circle?", "is there a red shape?"
                color = next((w for w in words if w in colors), color)
                shape = next((w for w in words if w in SHAPES), shape)
        out.append({"id": i, "path": paths[i], "qa": by_id[i], "color": color, "shape": shape})
    return out


def easy_vqa_answers() -> list[str]:
    import easy_vqa

    return sorted(easy_vqa.get_answers())


def _caption(rec: dict) -> str | None:
    return f"a {rec['color']} {rec['shape']}" if rec["color"] and rec["shape"] else None


def vqa_samples(records: Sequence[dict], split: str, rng: np.random.Generator, max_questions: int = 3) -> list[dict]:
    """One sample per image with 1..max_questions of its questions (seeded choice)."""
    out = []
    for rec in records:
        k = int(rng.integers(1, max_questions + 1))
        pick = sorted(rng.choice(len(rec["qa"]), size=min(k, len(rec["qa"])), replace=False))
        with open(rec["path"], "rb") as f:
            png = f.read()
        out.append(
            make_sample(
                f"vqa-{split}-{rec['id']:05d}",
                image=png,
                caption=_caption(rec),
                qa=[rec["qa"][j] for j in pick],
                source=f"easy-vqa/{split}/{rec['id']}",
            )
        )
    return out


def video_samples(
    records: Sequence[dict], split: str, rng: np.random.Generator, frames: int = 8, step: int = 3, size: int = 32
) -> list[dict]:
    """Videos of easy-vqa images (with known colour and shape) moving in a random direction."""
    out = []
    for rec in records:
        cap = _caption(rec)
        if cap is None:
            continue
        direction = sorted(DIRECTIONS)[int(rng.integers(len(DIRECTIONS)))]
        strip = moving_strip(rec["path"], direction, frames, step, size)
        out.append(
            make_sample(
                f"video-{split}-{rec['id']:05d}",
                video=strip,
                frames=frames,
                caption=f"{cap} moves {direction}",
                source=f"easy-vqa/{split}/{rec['id']}+translate-{direction}",
            )
        )
    return out


def moving_strip(path: str, direction: str, frames: int = 8, step: int = 3, size: int = 32) -> bytes:
    """PNG film strip of the image at `path` translated `step` px per frame towards
    `direction` (edges extended), each frame downscaled to size x size."""
    dx, dy = DIRECTIONS[direction]
    img = np.asarray(Image.open(path).convert("RGB"))
    pad = step * (frames - 1)
    big = np.pad(img, ((pad, pad), (pad, pad), (0, 0)), mode="edge")
    h, w = img.shape[:2]
    clip = []
    for k in range(frames):  # the content moves by (dx, dy): the window moves the other way
        y0, x0 = pad - dy * step * k, pad - dx * step * k
        fr = Image.fromarray(big[y0 : y0 + h, x0 : x0 + w]).resize((size, size), Image.BILINEAR)
        clip.append(np.asarray(fr))
    return encode_png(join_strip(np.stack(clip)))


# ------------------------------------------------------------------ still images
def _to_square_rgb(img: Image.Image, size: int, box=None) -> bytes:
    img = img.convert("RGB")
    if box is None:
        s = min(img.size)
        box = ((img.width - s) // 2, (img.height - s) // 2, (img.width + s) // 2, (img.height + s) // 2)
    return encode_png(np.asarray(img.crop(box).resize((size, size), Image.BILINEAR)))


def digit_samples(indices: Iterable[int], split: str, size: int = 64) -> list[dict]:
    """scikit-learn digits (dark ink on white), upscaled, captioned with the digit's name."""
    from sklearn.datasets import load_digits

    d = load_digits()
    out = []
    for i in indices:
        ink = np.clip(d.images[i] / 16.0, 0, 1)
        gray = (255 * (1 - ink)).astype(np.uint8)
        img = Image.fromarray(gray).resize((size, size), Image.BILINEAR)
        out.append(
            make_sample(
                f"digit-{split}-{i:04d}",
                image=_to_square_rgb(img, size),
                caption=f"a handwritten digit {DIGIT_WORDS[int(d.target[i])]}",
                source=f"sklearn/digits/{i}",
            )
        )
    return out


def _photo_sources() -> list[tuple[str, Image.Image, str]]:
    from matplotlib import cbook
    from sklearn.datasets import load_sample_images

    photos = []
    with cbook.get_sample_data("grace_hopper.jpg") as f:
        photos.append(("grace_hopper", Image.open(f).copy(), "a portrait of grace hopper in navy uniform"))
    for name, cap in (
        ("logo2.png", "the matplotlib logo"),
        ("Minduka_Present_Blue_Pack.png", "a blue gift box with a silver ribbon"),
    ):
        with cbook.get_sample_data(name) as f:
            im = Image.open(f).convert("RGBA")
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        photos.append((name.split(".")[0], Image.alpha_composite(white, im), cap))
    with cbook.get_sample_data("s1045.ima.gz") as f:
        mri = np.frombuffer(f.read(), np.uint16).astype(np.float64).reshape(256, 256)
    photos.append(("mri", Image.fromarray((255 * mri / mri.max()).astype(np.uint8)), "a brain mri scan"))
    sk = load_sample_images()
    for name, img, cap in zip(sk.filenames, sk.images, ("a chinese temple among trees", "a pink flower")):
        photos.append((os.path.basename(name).split(".")[0], Image.fromarray(img), cap))
    return photos


def photo_samples(size: int = 64, crops: int = 3) -> list[dict]:
    """matplotlib / scikit-learn sample photos: a centre square and ``crops - 1`` zoomed crops."""
    out = []
    for name, img, cap in _photo_sources():
        s = min(img.size)
        for c in range(crops):
            z = s * (1.0 - 0.15 * c)
            cx = img.width / 2 + (c % 2 * 2 - 1) * 0.1 * s * (c > 0)
            cy = img.height / 2
            box = tuple(int(round(v)) for v in (cx - z / 2, cy - z / 2, cx + z / 2, cy + z / 2))
            box = (max(0, box[0]), max(0, box[1]), min(img.width, box[2]), min(img.height, box[3]))
            out.append(
                make_sample(
                    f"photo-{name.replace('_', '-').lower()}-{c}",
                    image=_to_square_rgb(img, size, box),
                    caption=cap,
                    source=f"sample-image/{name}/crop{c}",
                )
            )
    return out


# ------------------------------------------------------------------ speech
def speak(text: str, workdir: str, voice: str = "en-us") -> bytes:
    """16 kHz mono 16-bit WAV bytes of ``text`` read by espeak-ng."""
    if shutil.which("espeak-ng") is None:
        raise RuntimeError("espeak-ng is not installed (Debian: apt-get install espeak-ng sox)")
    fd, raw = tempfile.mkstemp(suffix=".wav", dir=workdir)
    os.close(fd)
    out = raw[:-4] + "-16k.wav"
    try:
        subprocess.run(
            ["espeak-ng", "-v", voice, "-w", raw, text], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        if shutil.which("sox"):
            subprocess.run(
                ["sox", "-D", raw, "-r", str(SAMPLE_RATE), "-c", "1", "-b", "16", out],
                check=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            with open(out, "rb") as f:
                return f.read()
        with open(raw, "rb") as f:
            x, rate = read_wav(f.read())
        return write_wav(resample(x, rate, SAMPLE_RATE), SAMPLE_RATE)
    finally:
        for p in (raw, out):
            if os.path.exists(p):
                os.remove(p)


def speech_samples(texts: Sequence[str], split: str, threads: int = 2) -> list[dict]:
    """One spoken clip per text (espeak-ng in ``threads`` parallel processes)."""
    with tempfile.TemporaryDirectory(prefix="aion-speech-") as tmp:
        with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
            wavs = list(pool.map(lambda t: speak(t, tmp), texts))
    return [
        make_sample(f"speech-{split}-{i:04d}", audio=w, transcript=t, source="espeak-ng/en-us")
        for i, (t, w) in enumerate(zip(texts, wavs))
    ]


# ------------------------------------------------------------------ text
def chatterbot_dialogs() -> list[list[str]]:
    """English chatterbot-corpus conversations (lists of lines), file by file in name order."""
    import chatterbot_corpus
    import yaml

    root = os.path.join(os.path.dirname(chatterbot_corpus.__file__), "data", "english")
    dialogs = []
    for name in sorted(os.listdir(root)):
        if not name.endswith(".yml"):
            continue
        with open(os.path.join(root, name), encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
        for conv in data.get("conversations") or []:
            lines = [str(x).strip() for x in conv if x is not None and str(x).strip()]
            if lines:
                dialogs.append(lines)
    return dialogs


def speakable_lines(dialogs: Sequence[Sequence[str]], min_words: int = 3, max_words: int = 10) -> list[str]:
    """Distinct short ASCII lines of the dialogs (1-3 s when spoken), in corpus order."""
    seen, out = set(), []
    for d in dialogs:
        for line in d:
            if line in seen or not line.isascii() or not min_words <= len(line.split()) <= max_words:
                continue
            seen.add(line)
            out.append(line)
    return out


def text_samples(dialogs: Sequence[Sequence[str]], split: str) -> list[dict]:
    return [
        make_sample(f"text-{split}-{i:05d}", text="\n".join(d), source="chatterbot-corpus/english")
        for i, d in enumerate(dialogs)
    ]
