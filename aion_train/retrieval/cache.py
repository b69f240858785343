"""On-disk embedding cache: ``emb-<sha256(embedder name + texts)>.npy`` (no pickles).

Embedding a large corpus on a shared 2-core CPU takes a long while, so progress is kept in
blocks (``.part-<i>.npy``) and an interrupted run resumes where it stopped."""

from __future__ import annotations

import glob
import hashlib
import os
import sys
import time

import numpy as np

from aion_train.fsutil import atomic_write

DEFAULT_CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "aion-train", "retrieval")


def corpus_key(texts, embedder_name: str) -> str:
    h = hashlib.sha256(embedder_name.encode() + b"\0")
    for t in texts:
        b = t.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()[:24]


def _save_atomic(path: str, arr: np.ndarray) -> None:
    with atomic_write(path, "wb") as f:
        np.save(f, arr, allow_pickle=False)


def cached_embeddings(
    texts, embedder, directory: str | None = None, block: int = 1024, log=None
) -> tuple[np.ndarray, bool]:
    """Embeddings of ``texts`` with ``embedder`` (float32 [N, dim]); computed once and then
    read from the cache in ``directory`` (default DEFAULT_CACHE_DIR). Returns
    ``(embeddings, was_cached)``."""
    directory = directory or DEFAULT_CACHE_DIR
    os.makedirs(directory, exist_ok=True)
    key = corpus_key(texts, embedder.name)
    path = os.path.join(directory, f"emb-{key}.npy")
    if os.path.exists(path):
        arr = np.load(path, allow_pickle=False)
        if arr.shape[0] == len(texts):
            return arr, True
    parts = []
    t0 = time.time()
    for bi, s in enumerate(range(0, len(texts), block)):
        ppath = os.path.join(directory, f"emb-{key}.part-{bi:05d}.npy")
        want = min(block, len(texts) - s)
        if os.path.exists(ppath):
            arr = np.load(ppath, allow_pickle=False)
            if arr.shape[0] == want:
                parts.append(arr)
                continue
        arr = embedder.encode(list(texts[s : s + want])).astype(np.float32)
        _save_atomic(ppath, arr)
        parts.append(arr)
        if log is not None:
            done = s + want
            log(f"embedded {done}/{len(texts)} ({done / max(time.time() - t0, 1e-9):.1f}/s)")
    arr = np.concatenate(parts) if parts else np.zeros((0, embedder.dim), np.float32)
    _save_atomic(path, arr)
    for p in glob.glob(os.path.join(directory, f"emb-{key}.part-*.npy")):
        os.remove(p)
    return arr, False


def stderr_log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
