"""The multimodal demo set: train/val shards of real image, speech, video and text samples
(:mod:`.sources`) and a tokenizer trained on all of their text, in well under a minute.

Layout of ``data_dir`` (``make-shards`` puts it in ``DIR/multimodal``)::

    mm_train-00000.tar ...  training samples of every kind, shuffled once (seeded)
    mm_val-00000.tar ...    held out: easy-vqa *test* images with 1-3 of their questions,
                            captioned digits (retrieval), speech clips, videos, text
    tokenizer.model         SentencePiece BPE on every text of the set (questions, answers,
                            captions, transcripts, dialogs), special tokens reserved
    manifest.json           shards with sha256 (by write_shards) and a "multimodal" entry:
                            sizes, sample counts per kind and per modality, the VQA answer
                            set; written last, so its presence means the set is complete

(The shard writer allows only ``[A-Za-z0-9_]`` in prefixes, hence ``mm_train``/``mm_val``.)
Same arguments, same bytes. Built in a temporary directory next to ``data_dir`` and renamed
into place under a file lock (as :mod:`aion_train.data.demo`), so concurrent ranks build once.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections import Counter

import numpy as np

from ..build_once import ensure_built
from ..shards import MANIFEST, manifest_shards, read_manifest, verify_manifest, write_manifest, write_shards
from ..tokenizer import train_tokenizer
from . import sources
from .sample import MEDIA_ORDER

log = logging.getLogger(__name__)

MM_VERSION = 1
TRAIN, VAL = "mm_train", "mm_val"
TOKENIZER = "tokenizer.model"
SAMPLES_PER_SHARD = 128
DEFAULT_SIZES = {
    "vqa_train": 3000,
    "vqa_val": 400,  # easy-vqa images (train split / test split)
    "digits_train": 1000,
    "digits_val": 200,  # of 1797
    "photo_crops": 3,  # per sample photo (train only)
    "speech_train": 300,
    "speech_val": 40,
    "video_train": 300,
    "video_val": 40,  # easy-vqa train images not used for VQA / test images
    "text_train": 1200,
    "text_val": 60,  # chatterbot dialogs
}


def _rng(seed: int, purpose: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, 7071, purpose])))


def _texts_of(samples) -> list[str]:
    import json

    out = []
    for s in samples:
        meta = json.loads(s["json"])
        for k in ("caption", "transcript", "text"):
            if meta.get(k):
                out.append(meta[k])
        out.extend(f"{q} {a}" for q, a in meta.get("qa", []))
    return out


def collect_samples(seed: int, sizes: dict) -> dict[str, list[dict]]:
    """{"train": [...], "val": [...]} sample dicts of the demo (train shuffled, val by kind)."""
    n = {**DEFAULT_SIZES, **sizes}
    unknown = set(sizes) - set(DEFAULT_SIZES)
    if unknown:
        raise ValueError(f"unknown demo sizes {sorted(unknown)}; valid: {sorted(DEFAULT_SIZES)}")
    vqa_train = sources.easy_vqa_records("train")
    vqa_test = sources.easy_vqa_records("test")
    perm_train = [vqa_train[int(i)] for i in _rng(seed, 0).permutation(len(vqa_train))]
    perm_test = [vqa_test[int(i)] for i in _rng(seed, 1).permutation(len(vqa_test))]
    if n["vqa_train"] + n["video_train"] > len(perm_train) or n["vqa_val"] + n["video_val"] > len(perm_test):
        raise ValueError("demo sizes ask for more easy-vqa images than the package has")
    digits = [int(i) for i in _rng(seed, 2).permutation(1797)]
    if n["digits_train"] + n["digits_val"] > len(digits):
        raise ValueError("demo sizes ask for more than the 1797 digits")
    dialogs = sources.chatterbot_dialogs()
    dialogs = [dialogs[int(i)] for i in _rng(seed, 3).permutation(len(dialogs))]
    lines = sources.speakable_lines(dialogs)
    questions = sorted({q for rec in vqa_train for q, _ in rec["qa"]})
    spoken_q = [questions[int(i)] for i in _rng(seed, 5).permutation(len(questions))]
    spoken_l = [lines[int(i)] for i in _rng(seed, 4).permutation(len(lines))]
    # questions and dialog lines alternately, then the remaining dialog lines
    spoken = [t for pair in zip(spoken_q, spoken_l) for t in pair] + spoken_l[len(spoken_q) :]
    speech_train = spoken[: n["speech_train"]]
    speech_val = spoken[n["speech_train"] : n["speech_train"] + n["speech_val"]]
    vid_t = perm_train[n["vqa_train"] :]
    vid_v = perm_test[n["vqa_val"] :]
    train = (
        sources.vqa_samples(perm_train[: n["vqa_train"]], "train", _rng(seed, 6))
        + sources.digit_samples(digits[: n["digits_train"]], "train")
        + (sources.photo_samples(crops=n["photo_crops"]) if n["photo_crops"] else [])
        + sources.speech_samples(speech_train, "train")
        + sources.video_samples(
            [r for r in vid_t if r["color"] and r["shape"]][: n["video_train"]], "train", _rng(seed, 7)
        )
        + sources.text_samples(dialogs[: n["text_train"]], "train")
    )
    val = (
        sources.vqa_samples(perm_test[: n["vqa_val"]], "val", _rng(seed, 8))
        + sources.digit_samples(digits[n["digits_train"] : n["digits_train"] + n["digits_val"]], "val")
        + sources.speech_samples(speech_val, "val")
        + sources.video_samples([r for r in vid_v if r["color"] and r["shape"]][: n["video_val"]], "val", _rng(seed, 9))
        + sources.text_samples(dialogs[n["text_train"] : n["text_train"] + n["text_val"]], "val")
    )
    train = [train[int(i)] for i in _rng(seed, 10).permutation(len(train))]
    return {"train": train, "val": val}


def summarize_counts(samples) -> dict:
    """Counts per kind (key prefix) and per modality (media present; "text" = rendered text)."""
    import json

    kinds, modalities = Counter(), Counter()
    for s in samples:
        kinds[s["__key__"].split("-")[0]] += 1
        meta = json.loads(s["json"])
        for m in meta["media"]:
            modalities[m] += 1
        if meta.get("text"):
            modalities["text"] += 1
    return {
        "kinds": dict(sorted(kinds.items())),
        "modalities": {m: modalities.get(m, 0) for m in (*MEDIA_ORDER, "text")},
    }


def _paths(data_dir: str) -> dict:
    return {
        "train": manifest_shards(data_dir, TRAIN),
        "val": manifest_shards(data_dir, VAL),
        "tokenizer": os.path.join(data_dir, TOKENIZER),
    }


def _stamp(vocab_size: int, seed: int, sizes: dict) -> dict:
    return {
        "version": MM_VERSION,
        "vocab_size": vocab_size,
        "seed": seed,
        "sizes": {**DEFAULT_SIZES, **sizes},
        "complete": True,
    }


def build_multimodal_demo(
    out_dir: str,
    vocab_size: int,
    seed: int = 1234,
    sizes: dict | None = None,
    samples_per_shard: int = SAMPLES_PER_SHARD,
) -> dict:
    """Build the demo set into ``out_dir`` (created; should be empty). ``sizes`` overrides
    entries of :data:`DEFAULT_SIZES` (tests build a small set). Returns the paths dict."""
    sizes = dict(sizes or {})
    full = {**DEFAULT_SIZES, **sizes}
    if (full["speech_train"] or full["speech_val"]) and shutil.which("espeak-ng") is None:
        raise RuntimeError(
            "the multimodal demo's speech clips need the system package espeak-ng, which is "
            "not installed (Debian: apt-get install espeak-ng sox; or `make install` as root)"
        )
    t0 = time.perf_counter()
    splits = collect_samples(seed, sizes)
    os.makedirs(out_dir, exist_ok=True)
    write_shards(splits["train"], out_dir, TRAIN, samples_per_shard)
    write_shards(splits["val"], out_dir, VAL, samples_per_shard)
    texts = _texts_of(splits["train"]) + _texts_of(splits["val"])
    train_tokenizer(texts, os.path.join(out_dir, TOKENIZER), vocab_size)
    manifest = read_manifest(out_dir)
    manifest["multimodal"] = {
        **_stamp(vocab_size, seed, sizes),
        "counts": {"train": summarize_counts(splits["train"]), "val": summarize_counts(splits["val"])},
        "vqa_answers": sources.easy_vqa_answers(),
        "tokenizer_texts": len(texts),
    }
    write_manifest(out_dir, manifest)
    log.info(
        "multimodal demo: %d train + %d val samples, vocab %d, built in %.1fs",
        len(splits["train"]),
        len(splits["val"]),
        vocab_size,
        time.perf_counter() - t0,
    )
    return _paths(out_dir)


def multimodal_demo_paths(data_dir: str) -> dict:
    """Paths of an already built multimodal set in ``data_dir`` (any sizes/vocab/seed);
    ValueError when it is absent or incomplete."""
    try:
        entry = read_manifest(data_dir).get("multimodal") or {}
    except (OSError, ValueError) as e:
        raise ValueError(f"{data_dir}: no multimodal demo manifest ({e})") from e
    problems = verify_manifest(data_dir, checksums=False)
    if not entry.get("complete") or problems or not os.path.isfile(os.path.join(data_dir, TOKENIZER)):
        raise ValueError(f"{data_dir}: incomplete multimodal demo {problems[:3]}")
    return _paths(data_dir)


def _is_complete(data_dir: str, vocab_size: int, seed: int, sizes: dict) -> bool:
    try:
        entry = dict(read_manifest(data_dir).get("multimodal") or {})
    except (OSError, ValueError):
        return False
    if {k: entry.get(k) for k in ("version", "vocab_size", "seed", "sizes", "complete")} != _stamp(
        vocab_size, seed, sizes
    ):
        return False
    if not os.path.isfile(os.path.join(data_dir, TOKENIZER)):
        return False
    return not verify_manifest(data_dir, checksums=True)


def holds_multimodal_manifest(path) -> bool:
    """A multimodal demo folder written before ownership markers existed."""
    try:
        return "multimodal" in read_manifest(os.fspath(path))
    except (OSError, ValueError):
        return False


def ensure_multimodal_demo(
    data_dir: str, vocab_size: int, seed: int = 1234, sizes: dict | None = None, overwrite: bool = False
) -> dict:
    """Paths ``{"train": [...], "val": [...], "tokenizer": path}`` of the multimodal demo in
    ``data_dir``, building it first when absent, incomplete or built with other arguments.
    A non-empty folder that is not ours is refused unless `overwrite`. Idempotent, crash-safe
    and safe for concurrent callers (file lock + temp dir + move)."""
    sizes = dict(sizes or {})
    data_dir = os.path.normpath(os.fspath(data_dir))
    ensure_built(
        data_dir,
        lambda d: _is_complete(d, vocab_size, seed, sizes),
        lambda tmp: build_multimodal_demo(tmp, vocab_size, seed, sizes),
        "multimodal demo",
        overwrite=overwrite,
        recognise=holds_multimodal_manifest,
        last=(MANIFEST,),
    )
    return _paths(data_dir)
