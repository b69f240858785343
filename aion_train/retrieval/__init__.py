"""Retrieval: chunking, embeddings (MiniLM or our own model), FAISS ANN + BM25 hybrid search
with MMR, index folders with checksummed manifests (no pickles), and a crash-safe continual
memory (add/update/delete, replay buffer, write-ahead log).

Names are imported lazily so that importing the package does not pull in torch or faiss."""

from __future__ import annotations

from aion_train.lazy_exports import lazy_exports

_EXPORTS = {
    "Chunk": "chunking",
    "chunk_text": "chunking",
    "chunk_documents": "chunking",
    "MiniLMEmbedder": "embedders",
    "ModelEmbedder": "embedders",
    "HashEmbedder": "embedders",
    "make_embedder": "embedders",
    "register_model_loader": "embedders",
    "BM25Index": "bm25",
    "build_dense_index": "dense",
    "hybrid_scores": "hybrid",
    "hybrid_rank": "hybrid",
    "mmr": "hybrid",
    "rerank": "hybrid",
    "build_context": "hybrid",
    "lm_loglik": "hybrid",
    "minmax": "hybrid",
    "Retriever": "store",
    "Hit": "store",
    "write_index_dir": "store",
    "verify_index_dir": "store",
    "IndexIntegrityError": "store",
    "build_index": "build",
    "ContinualIndex": "continual",
    "Ingestor": "continual",
    "Ticket": "continual",
    "ReservoirBuffer": "reservoir",
    "RWLock": "rwlock",
    "WriteAheadLog": "wal",
    "cached_embeddings": "cache",
}
__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
