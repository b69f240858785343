"""The demo data set: train/validation shards and a tokenizer built from text that ships
with the machine (:func:`aion_train.data.text_sources.demo_documents`), in about a second.

Layout of ``data_dir``::

    train-00000.tar ...   validation-free training documents, shuffled once (seeded)
    val-00000.tar ...     ~5% of the documents, held out
    tokenizer.model       SentencePiece BPE trained on the training documents only
    manifest.json         shards, counts, sha256, and a "demo" entry written last

The directory is built under a temporary name next to it and moved into place, under a
file lock, so concurrent callers (several ranks on one node) build it once and a crash
leaves either nothing or a directory that reads as incomplete; a demo directory whose
"demo" entry or checksums do not match is rebuilt, a folder that is not ours never
(:mod:`aion_train.data.build_once`).
"""

from __future__ import annotations

import logging
import math
import os
import time

import numpy as np

from .build_once import ensure_built
from .shards import MANIFEST, manifest_shards, read_manifest, verify_manifest, write_manifest, write_shards
from .text_sources import demo_documents
from .tokenizer import train_tokenizer

log = logging.getLogger(__name__)

DEMO_VERSION = 1
VAL_FRACTION = 0.05
TRAIN_SAMPLES_PER_SHARD = 48
VAL_SAMPLES_PER_SHARD = 48
TOKENIZER = "tokenizer.model"


def _paths(data_dir: str) -> dict:
    return {
        "train": manifest_shards(data_dir, "train"),
        "val": manifest_shards(data_dir, "val"),
        "tokenizer": os.path.join(data_dir, TOKENIZER),
    }


def _is_complete(data_dir: str, vocab_size: int, seed: int) -> bool:
    try:
        demo = read_manifest(data_dir).get("demo") or {}
    except (OSError, ValueError):
        return False
    if demo != {"version": DEMO_VERSION, "vocab_size": vocab_size, "seed": seed, "complete": True}:
        return False
    if not os.path.isfile(os.path.join(data_dir, TOKENIZER)):
        return False
    return not verify_manifest(data_dir, checksums=True)


def holds_demo_manifest(path) -> bool:
    """A demo folder written before ownership markers existed."""
    try:
        return "demo" in read_manifest(os.fspath(path))
    except (OSError, ValueError):
        return False


def split_documents(docs: list[str], seed: int, val_fraction: float = VAL_FRACTION):
    """(train, val): a seeded permutation; the first ceil(val_fraction * n) are held out
    (kept in corpus order), the rest form the training set in permuted order."""
    perm = np.random.default_rng(seed).permutation(len(docs))
    n_val = max(1, math.ceil(val_fraction * len(docs)))
    val_idx = sorted(int(i) for i in perm[:n_val])
    train = [docs[int(i)] for i in perm[n_val:]]
    val = [docs[i] for i in val_idx]
    return train, val


def build_demo_data(out_dir: str, vocab_size: int, seed: int = 1234) -> dict:
    """Build the demo set into ``out_dir`` (created; should be empty)."""
    t0 = time.perf_counter()
    docs = demo_documents()
    train, val = split_documents(docs, seed)
    os.makedirs(out_dir, exist_ok=True)
    write_shards(
        ({"__key__": f"doc{i:06d}", "txt": t} for i, t in enumerate(train)), out_dir, "train", TRAIN_SAMPLES_PER_SHARD
    )
    write_shards(
        ({"__key__": f"val{i:06d}", "txt": t} for i, t in enumerate(val)), out_dir, "val", VAL_SAMPLES_PER_SHARD
    )
    train_tokenizer(train, os.path.join(out_dir, TOKENIZER), vocab_size)
    manifest = read_manifest(out_dir)
    manifest["sources"] = {"documents": len(docs), "train": len(train), "val": len(val)}
    manifest["demo"] = {"version": DEMO_VERSION, "vocab_size": vocab_size, "seed": seed, "complete": True}
    write_manifest(out_dir, manifest)
    log.info(
        "demo data: %d train + %d val documents, vocab %d, built in %.1fs",
        len(train),
        len(val),
        vocab_size,
        time.perf_counter() - t0,
    )
    return _paths(out_dir)


def ensure_demo_data(data_dir: str, vocab_size: int, seed: int = 1234, overwrite: bool = False) -> dict:
    """Paths ``{"train": [...], "val": [...], "tokenizer": path}`` of the demo set in
    ``data_dir``, building it first when absent, incomplete (a checksum fails), or built with
    another vocab_size/seed. A non-empty folder that is not a demo folder is refused unless
    `overwrite` (:mod:`aion_train.ownership`). Idempotent, crash-safe and safe for concurrent
    callers."""
    data_dir = os.path.normpath(os.fspath(data_dir))
    ensure_built(
        data_dir,
        lambda d: _is_complete(d, vocab_size, seed),
        lambda tmp: build_demo_data(tmp, vocab_size, seed),
        "demo data",
        overwrite=overwrite,
        recognise=holds_demo_manifest,
        last=(MANIFEST,),
    )
    return _paths(data_dir)
