"""FAISS dense index from a factory string, with optional PCA (faiss PCAMatrix) and GPU.

Vectors are L2-normalised embeddings and the metric is inner product (= cosine). With
``pca=P`` the index is ``PCA{P},L2norm,{factory}`` (an IndexPreTransform: PCAMatrix, then
re-normalisation so that inner product stays a cosine). Search-time knobs (``efSearch``
for HNSW, ``nprobe`` for IVF) go through faiss.ParameterSpace, which reaches through the
pre-transform."""

from __future__ import annotations

import numpy as np


def full_factory(factory: str, pca: int | None) -> str:
    return f"PCA{pca},L2norm,{factory}" if pca else factory


def gpu_count() -> int:
    """GPUs faiss can use: 0 for a faiss-cpu build (no StandardGpuResources)."""
    import faiss

    return int(faiss.get_num_gpus()) if hasattr(faiss, "StandardGpuResources") else 0


def build_dense_index(
    X: np.ndarray,
    factory: str = "HNSW32",
    pca: int | None = None,
    params: dict | None = None,
    ef_construction: int = 200,
    seed: int = 1234,
):
    """Train (if needed) and fill a FAISS index with the rows of ``X`` (ids 0..N-1)."""
    import faiss

    X = np.ascontiguousarray(X, dtype=np.float32)
    d = X.shape[1]
    index = faiss.index_factory(d, full_factory(factory, pca), faiss.METRIC_INNER_PRODUCT)
    hnsw = _find_hnsw(index)
    if hnsw is not None:
        hnsw.hnsw.efConstruction = ef_construction
    if not index.is_trained:
        n_train = min(len(X), 100_000)
        rng = np.random.default_rng(seed)
        sample = X if n_train == len(X) else X[rng.choice(len(X), n_train, replace=False)]
        index.train(sample)
    index.add(X)
    set_search_params(index, params or default_params(factory))
    return index


def default_params(factory: str) -> dict:
    f = factory.upper()
    out = {}
    if "HNSW" in f:
        out["efSearch"] = 64
    if "IVF" in f:
        out["nprobe"] = 16
    return out


def _find_hnsw(index):
    import faiss

    idx = index
    if isinstance(idx, faiss.IndexPreTransform):
        idx = faiss.downcast_index(idx.index)
    idx = faiss.downcast_index(idx)
    return idx if hasattr(idx, "hnsw") else None


def set_search_params(index, params: dict) -> None:
    import faiss

    ps = faiss.ParameterSpace()
    for k, v in (params or {}).items():
        try:
            ps.set_index_parameter(index, k, v)
        except RuntimeError:
            if k == "efSearch" and _find_hnsw(index) is not None:
                _find_hnsw(index).hnsw.efSearch = int(v)
            else:
                raise


# faiss's error for an index type without a GPU version (faiss/gpu/GpuCloner.cpp)
NO_GPU_VERSION = "not implemented on GPU"


def to_gpu_if_available(index):
    """``faiss.index_cpu_to_all_gpus`` when faiss-gpu finds a GPU, else the index itself
    (also when the index type has no GPU version, e.g. HNSW). Any other error (out of GPU
    memory, a broken CUDA install) propagates."""
    if gpu_count() <= 0:
        return index
    import faiss

    try:
        return faiss.index_cpu_to_all_gpus(index)
    except RuntimeError as e:
        if NO_GPU_VERSION in str(e):
            return index
        raise


def to_cpu(index):
    import faiss

    if hasattr(faiss, "index_gpu_to_cpu") and "Gpu" in type(index).__name__:
        return faiss.index_gpu_to_cpu(index)
    return index
