"""Corpus -> chunks -> embeddings -> index folder (the library side of `aion-train build-index`)."""

from __future__ import annotations

import time

from .chunking import chunk_documents
from .store import write_index_dir


def iter_corpus(patterns):
    """Documents of every pattern: a glob (``**`` ok; man pages rendered, .gz read) or
    ``pydoc:`` for the Python reference topics, ``open-book`` for the open-book task's documents
    (open_book.py: every installed command's page, training and held-out alike)."""
    from .sources import iter_files, iter_pydoc_topics

    for pat in patterns:
        if pat in ("pydoc", "pydoc:", "pydoc:topics"):
            yield from iter_pydoc_topics()
        elif pat == "open-book":
            from .open_book import read_man_pages, task_documents

            yield from task_documents(read_man_pages())
        else:
            yield from iter_files(pat)


def build_index(
    patterns,
    out: str,
    embedder_spec: str = "minilm",
    embedder=None,
    factory: str = "HNSW32",
    pca: int | None = None,
    chunk_chars: int = 400,
    overlap: int = 50,
    max_chunks_per_doc: int | None = None,
    params: dict | None = None,
    use_cache: bool = True,
    cache_dir: str | None = None,
    log=None,
    overwrite: bool = False,
) -> dict:
    from ..ownership import check_writable
    from .cache import cached_embeddings
    from .embedders import make_embedder
    from .store import holds_index_manifest

    check_writable(out, "build-index", overwrite, recognise=holds_index_manifest)  # before any work
    t0 = time.time()
    docs = list(iter_corpus(patterns))
    if not docs:
        raise ValueError(f"no documents match {list(patterns)}")
    chunks = chunk_documents(docs, chunk_chars, overlap, max_chunks_per_doc)
    if not chunks:
        raise ValueError("the documents gave no chunks")
    emb = embedder or make_embedder(embedder_spec)
    texts = [c.text for c in chunks]
    if use_cache:
        X, _ = cached_embeddings(texts, emb, directory=cache_dir, log=log)
    else:
        X = emb.encode(texts)
    if pca and pca >= X.shape[1]:
        raise ValueError(f"--pca {pca} must be below the embedding dim {X.shape[1]}")
    manifest = write_index_dir(
        out,
        chunks,
        X,
        emb.name,
        factory,
        pca,
        params,
        embedder_spec=embedder_spec,
        chunking={"chunk_chars": chunk_chars, "overlap": overlap, "max_chunks_per_doc": max_chunks_per_doc},
        extra={"corpus": list(patterns), "build_s": round(time.time() - t0, 2)},
        overwrite=overwrite,
    )
    return manifest
