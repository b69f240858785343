"""An index folder on disk and the hybrid retriever that serves it.

Folder layout (no pickles anywhere; every file's sha256 is in the manifest)::

    manifest.json     embedder, dims, factory string, search params, counts, checksums
    chunks.jsonl      {"id", "source", "start", "text"} per chunk, id = row
    embeddings.npy    float32 [N, dim] L2-normalised chunk embeddings (allow_pickle=False)
    dense.faiss       faiss.write_index of the ANN index (ids = rows)
    bm25/             bm25s arrays (.npy) + vocab/params (.json)
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass, field

import numpy as np

from ..fsutil import fsync_tree
from ..ownership import MARKER, check_writable, publish_dir
from .bm25 import BM25Index
from .chunking import Chunk
from .dense import build_dense_index, default_params, full_factory, set_search_params, to_cpu, to_gpu_if_available
from .hybrid import candidates, hybrid_scores, mmr

FORMAT = "aion-retrieval-index"
VERSION = 1
DEFAULT_ALPHA = 0.2  # tuned by `aion-train bench retrieval` on its tuning split (MRR@10)
PICKLE_SUFFIXES = (".pkl", ".pickle", ".joblib", ".pt", ".pth")


class IndexIntegrityError(RuntimeError):
    pass


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _all_files(root: str) -> list[str]:
    out = []
    for d, _, files in os.walk(root):
        for f in files:
            out.append(os.path.relpath(os.path.join(d, f), root))
    return sorted(out)


def write_index_dir(
    out: str,
    chunks: list[Chunk],
    X: np.ndarray,
    embedder_name: str,
    factory: str = "HNSW32",
    pca: int | None = None,
    params: dict | None = None,
    embedder_spec: str | None = None,
    chunking: dict | None = None,
    extra: dict | None = None,
    overwrite: bool = False,
) -> dict:
    """Build the ANN + BM25 indexes for ``chunks``/``X`` and write the folder (built beside
    ``out``, then moved into place, the manifest last). A non-empty ``out`` that is not an
    index of ours is refused unless `overwrite` (:mod:`aion_train.ownership`); files in it
    that the index does not write are kept. Returns the manifest."""
    import faiss

    X = np.ascontiguousarray(X, dtype=np.float32)
    if len(chunks) != len(X):
        raise ValueError(f"{len(chunks)} chunks but {len(X)} embeddings")
    out = os.path.abspath(out)
    check_writable(out, "build-index", overwrite, recognise=holds_index_manifest)
    tmp = os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    params = params or default_params(factory)
    dense = build_dense_index(X, factory, pca, params)
    faiss.write_index(to_cpu(dense), os.path.join(tmp, "dense.faiss"))
    np.save(os.path.join(tmp, "embeddings.npy"), X, allow_pickle=False)
    with open(os.path.join(tmp, "chunks.jsonl"), "w", encoding="utf-8") as f:
        for i, c in enumerate(chunks):
            f.write(
                json.dumps({"id": i, "source": c.source, "start": c.start, "text": c.text}, ensure_ascii=False) + "\n"
            )
    BM25Index.build([c.text for c in chunks]).save(os.path.join(tmp, "bm25"))
    files = {
        p: {"sha256": sha256_file(os.path.join(tmp, p)), "bytes": os.path.getsize(os.path.join(tmp, p))}
        for p in _all_files(tmp)
    }
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "embedder": embedder_name,
        "embedder_spec": embedder_spec or embedder_name,
        "dim": int(X.shape[1]),
        "index_dim": int(pca or X.shape[1]),
        "factory": full_factory(factory, pca),
        "base_factory": factory,
        "pca": pca,
        "metric": "inner_product",
        "search_params": params,
        "counts": {"chunks": len(chunks), "documents": len({c.source for c in chunks}), "vectors": int(dense.ntotal)},
        "chunking": chunking or {},
        "default_alpha": DEFAULT_ALPHA,
        "files": files,
    }
    if extra:
        manifest.update(extra)
    with open(os.path.join(tmp, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
    fsync_tree(tmp)
    publish_dir(tmp, out, "build-index", overwrite=overwrite, recognise=holds_index_manifest, last=("manifest.json",))
    return manifest


def holds_index_manifest(path) -> bool:
    """An index folder written before ownership markers existed."""
    try:
        with open(os.path.join(path, "manifest.json"), encoding="utf-8") as f:
            return json.load(f).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def verify_index_dir(path: str) -> list[str]:
    """Problems with the folder: missing/extra/changed files, pickle files. [] if fine."""
    with open(os.path.join(path, "manifest.json")) as f:
        manifest = json.load(f)
    problems = []
    listed = manifest.get("files", {})
    present = [p for p in _all_files(path) if p not in ("manifest.json", MARKER)]
    for p in present:
        if p.endswith(PICKLE_SUFFIXES):
            problems.append(f"{p}: pickle file")
        if p not in listed:
            problems.append(f"{p}: not in manifest")
    for p, info in listed.items():
        full = os.path.join(path, p)
        if not os.path.exists(full):
            problems.append(f"{p}: missing")
        elif os.path.getsize(full) != info["bytes"] or sha256_file(full) != info["sha256"]:
            problems.append(f"{p}: checksum mismatch")
    return problems


@dataclass
class Hit:
    id: int
    score: float
    text: str
    source: str
    bm25: float = 0.0
    cosine: float = 0.0
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


class Retriever:
    """Hybrid (BM25 + dense) search over an index folder."""

    def __init__(self, path: str, embedder=None, verify: bool = True, use_gpu: bool = True):
        import faiss

        self.path = path
        if verify:
            problems = verify_index_dir(path)
            if problems:
                raise IndexIntegrityError(f"{path}: " + "; ".join(problems))
        with open(os.path.join(path, "manifest.json")) as f:
            self.manifest = json.load(f)
        if self.manifest.get("format") != FORMAT:
            raise IndexIntegrityError(f"{path}: not an {FORMAT} folder")
        self.X = np.load(os.path.join(path, "embeddings.npy"), allow_pickle=False)
        self.dense = faiss.read_index(os.path.join(path, "dense.faiss"))
        set_search_params(self.dense, self.manifest.get("search_params") or {})
        if use_gpu:
            self.dense = to_gpu_if_available(self.dense)
        self.bm25 = BM25Index.load(os.path.join(path, "bm25"))
        with open(os.path.join(path, "chunks.jsonl"), encoding="utf-8") as f:
            rows = [json.loads(line) for line in f]
        self.texts = [r["text"] for r in rows]
        self.sources = [r["source"] for r in rows]
        self._embedder = embedder

    @property
    def embedder(self):
        if self._embedder is None:
            from .embedders import make_embedder

            spec = self.manifest.get("embedder_spec", "minilm")
            self._embedder = make_embedder(spec)
            if self._embedder.name != self.manifest["embedder"]:
                raise IndexIntegrityError(
                    f"index built with {self.manifest['embedder']!r}, embedder is {self._embedder.name!r}"
                )
        return self._embedder

    def embed_query(self, query: str) -> np.ndarray:
        return self.embedder.encode([query])[0]

    def search(
        self,
        query: str,
        k: int = 5,
        alpha: float | None = None,
        depth: int = 50,
        mmr_lambda: float | None = 0.7,
        mmr_pool: int | None = None,
        rerank=None,
        rerank_depth: int | None = None,
        qvec: np.ndarray | None = None,
    ) -> list[Hit]:
        """Hybrid top-``k``: union of dense and BM25 top-``depth``, hybrid score, then MMR
        (``mmr_lambda``; None to skip) over the best ``mmr_pool`` (default 4k). With
        ``rerank(query, text) -> mean log-likelihood`` the best ``rerank_depth`` (default 2k)
        of that order are reordered by the LM score alone (:func:`~.hybrid.rerank`) and the
        top ``k`` kept; each hit's ``extra["lm_loglik"]`` holds its score (nats/token) and
        ``score`` stays the hybrid score."""
        alpha = self.manifest.get("default_alpha", DEFAULT_ALPHA) if alpha is None else alpha
        qvec = self.embed_query(query) if qvec is None else qvec
        n = k if rerank is None else max(k, rerank_depth or 2 * k)
        ids, b, c = candidates(query, qvec, self.X, self.bm25, max(depth, n), self.dense)
        s = hybrid_scores(b, c, alpha)
        order = np.lexsort((ids, -s))
        pool = order[: (mmr_pool or 4 * n)] if mmr_lambda is not None else order[:n]
        if mmr_lambda is not None and len(pool) > 1:
            pick = mmr(qvec, self.X[ids[pool]], s[pool], n, mmr_lambda)
            sel = pool[pick]
        else:
            sel = pool[:n]
        hits = [
            Hit(int(ids[i]), float(s[i]), self.texts[ids[i]], self.sources[ids[i]], float(b[i]), float(c[i]))
            for i in sel
        ]
        if rerank is not None:
            from .hybrid import rerank as _rerank

            new, ll = _rerank(query, [h.text for h in hits], rerank)
            for h, v in zip(hits, ll):
                h.extra["lm_loglik"] = v
            hits = [hits[i] for i in new]
        return hits[:k]
