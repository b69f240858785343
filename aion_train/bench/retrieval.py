"""bench retrieval: MiniLM + FAISS HNSW + BM25 hybrid search on >= 20k chunks of real text
from this machine (man pages, /usr/share/doc, pydoc topics).

* ``recall_at_10``: HNSW top-10 vs exact (IndexFlatIP over the float vectors) top-10 on the
  held-out test queries. The graph is ``HNSW32_SQ8`` (HNSW over 8-bit scalar-quantised
  vectors, efConstruction 400): on ~21k x 384 MiniLM vectors plain float ``HNSW32`` is only
  ~3x faster than BLAS brute force at recall 0.95 on this CPU; SQ8 storage roughly doubles
  that. ``efSearch`` is the smallest value of EF_GRID reaching ``tune_recall`` on the
  TUNING queries, never chosen on the test queries.
* ``qps`` / ``exact_qps``: the whole batch of test queries, single thread for both
  (``faiss.omp_set_num_threads(1)``), best of ``rounds`` interleaved rounds; ``speedup``;
  the two batch times they come from are ``hnsw_search_s`` / ``exact_search_s``.
* ``mrr_*``: MRR@10 on queries with known answers from the corpus itself: a man page's
  NAME line description ("list directory contents") is the query and any chunk of that
  page is a right answer; the NAME section itself is not indexed. Candidates are the union
  of the exact dense top-100 and the BM25 top-100; ``mrr_dense`` is alpha 0, ``mrr_bm25``
  alpha 1, and the hybrid's alpha is tuned on a separate tuning split of pages.
* ``mrr_rerank``: the first ``n_rerank`` test queries, their hybrid top-``rerank_depth``
  reordered by an LM's mean per-token log-likelihood of the query given the chunk
  (:func:`aion_train.retrieval.hybrid.rerank`: LM score alone, no mixing with the hybrid
  score), MRR@10; ``mrr_hybrid_rerank_queries`` is the hybrid MRR@10 on the same queries.
  The model is ``rerank_model`` (``--config``: a run/checkpoint folder, or a config .yaml
  for a fresh seed-0 model). The default is ``configs/tiny_cpu.yaml`` UNTRAINED (seed 0,
  demo tokenizer): no trained checkpoint ships with the repository, so by default the number
  measures the path (and an untrained model's ranking), not what a trained reranker gains.

Embeddings are cached on disk (``~/.cache/aion-train/retrieval``, the cache `build-index`
uses by default) keyed by the corpus hash: the first run embeds ~21.7k chunks with
MiniLM (~30 min on two shared cores), later runs take about a minute.
"""

from __future__ import annotations

import hashlib
import time

import numpy as np

CHUNK_CHARS = 400
OVERLAP = 50
MAN_CHUNKS_PER_PAGE = 6
DOC_CHUNKS_PER_FILE = 4
QUICK = {"quick": True, "n_rerank": 30}
DEFAULT_RERANK_MODEL = "configs/tiny_cpu.yaml"
EF_GRID = (8, 12, 14, 16, 18, 20, 24, 32, 48, 64, 96, 128, 192, 256)


def _split_of(source: str, tune_percent: int = 30) -> str:
    h = int(hashlib.sha256(source.encode()).hexdigest()[:8], 16)
    return "tune" if h % 100 < tune_percent else "test"


def build_corpus(quick: bool = False):
    """``(chunks, queries)``: chunks of man pages (NAME section left out), doc files and
    pydoc topics; queries ``[(split, description, page source)]`` for man pages with a
    distinctive (>= 3 words, unique) one-line description."""
    from aion_train.retrieval.chunking import chunk_documents
    from aion_train.retrieval.sources import iter_doc_files, iter_man_pages, iter_pydoc_topics

    pages = list(iter_man_pages(sections="178" if quick else "12345678"))
    if quick:
        pages = pages[:400]
    docs = [] if quick else list(iter_doc_files())
    chunks = chunk_documents(
        [(p.source, p.body) for p in pages], CHUNK_CHARS, OVERLAP, max_chunks_per_doc=MAN_CHUNKS_PER_PAGE
    )
    chunks += chunk_documents(docs, CHUNK_CHARS, OVERLAP, max_chunks_per_doc=DOC_CHUNKS_PER_FILE)
    chunks += chunk_documents(list(iter_pydoc_topics()), CHUNK_CHARS, OVERLAP)
    with_chunks = {c.source for c in chunks}
    counts: dict[str, int] = {}
    for p in pages:
        counts[p.description.lower()] = counts.get(p.description.lower(), 0) + 1
    queries = []
    for p in pages:
        d = p.description.strip()
        if len(d.split()) >= 3 and counts[d.lower()] == 1 and p.source in with_chunks:
            queries.append((_split_of(p.source), d, p.source))
    queries.sort(key=lambda q: hashlib.sha256(q[2].encode()).hexdigest())
    return chunks, queries


def mrr_at_k(ranked_sources: list[list[str]], answers: list[str], k: int = 10) -> float:
    total = 0.0
    for ranked, ans in zip(ranked_sources, answers):
        for r, s in enumerate(ranked[:k]):
            if s == ans:
                total += 1.0 / (r + 1)
                break
    return total / max(len(answers), 1)


def rerank_scorer(spec: str | None = None):
    """``(loglik(query, chunk), name)`` from a run/checkpoint folder or a config .yaml (a fresh
    seed-0 model; the tokenizer is the demo one, built in the user cache when absent)."""
    import os

    from aion_train.retrieval.embedders import make_embedder
    from aion_train.retrieval.hybrid import lm_loglik

    spec = spec or DEFAULT_RERANK_MODEL
    if "@" not in spec and spec.endswith((".yaml", ".yml")):
        from aion_train.config import load_config
        from aion_train.data.demo import ensure_demo_data

        cfg = load_config(spec)
        tok = os.path.join(cfg.data.dir, "tokenizer.model")
        if not os.path.isfile(tok):
            cache = os.path.expanduser(f"~/.cache/aion-train/demo-{cfg.model.vocab_size}")
            tok = ensure_demo_data(cache, cfg.model.vocab_size)["tokenizer"]
        spec = f"{spec}@{tok}"
    emb = make_embedder(f"model:{spec}")
    return lm_loglik(emb.model, emb.tokenizer, max_len=int(emb.model.cfg.max_seq_len)), emb.name


def rerank_mrr(cands, qs, texts, sources, alpha: float, scorer, depth: int = 10, k: int = 10) -> tuple[float, float]:
    """``(MRR@k after LM rerank of the hybrid top-depth, hybrid MRR@k)`` on the same queries."""
    from aion_train.retrieval.hybrid import hybrid_scores, rerank

    ranked, plain = [], []
    for (ids, b, c), (_, qtext, _) in zip(cands, qs):
        s = hybrid_scores(b, c, alpha)
        top = ids[np.lexsort((ids, -s))[:depth]]
        order, _ = rerank(qtext, [texts[i] for i in top], scorer)
        ranked.append([sources[top[i]] for i in order])
        plain.append([sources[i] for i in top])
    answers = [q[2] for q in qs]
    return mrr_at_k(ranked, answers, k), mrr_at_k(plain, answers, k)


def _time_search(index, q: np.ndarray, k: int, rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        index.search(q, k)
        best = min(best, time.perf_counter() - t)
    return best


def run_bench(
    quick: bool = False,
    n_test: int = 1000,
    n_tune: int = 400,
    alpha_grid=None,
    factory: str = "HNSW32_SQ8",
    ef_construction: int = 400,
    ef_search: int | None = None,
    tune_recall: float = 0.955,
    rounds: int = 15,
    n_rerank: int = 100,
    rerank_depth: int = 10,
    config: str | None = None,
    **_ignored,
) -> dict:
    import faiss

    from aion_train.retrieval.bm25 import BM25Index
    from aion_train.retrieval.cache import cached_embeddings, stderr_log
    from aion_train.retrieval.dense import build_dense_index
    from aion_train.retrieval.embedders import make_embedder
    from aion_train.retrieval.hybrid import candidates, hybrid_scores

    t0 = time.time()
    chunks, queries = build_corpus(quick)
    texts = [c.text for c in chunks]
    sources = np.array([c.source for c in chunks], dtype=object)
    emb = make_embedder("minilm")
    X, cached = cached_embeddings(texts, emb, log=stderr_log)
    tune = [q for q in queries if q[0] == "tune"][:n_tune]
    test = [q for q in queries if q[0] == "test"][:n_test]
    Q_tune, _ = cached_embeddings([q[1] for q in tune], emb)
    Q_test, _ = cached_embeddings([q[1] for q in test], emb)
    stderr_log(
        f"corpus: {len(texts)} chunks, {len(tune)} tuning / {len(test)} test queries "
        f"(embeddings {'cached' if cached else 'computed'}, {time.time() - t0:.0f} s)"
    )

    # ---- ANN vs exact, single thread, same batch of held-out queries
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    d = X.shape[1]
    exact = faiss.IndexFlatIP(d)
    exact.add(X)
    t = time.time()
    hnsw = build_dense_index(X, factory, params={}, ef_construction=ef_construction)
    build_s = time.time() - t
    graph = faiss.downcast_index(hnsw)
    k = 10
    if ef_search is None:  # smallest efSearch reaching the recall target on the TUNING queries
        _, I_tune_exact = exact.search(Q_tune, k)
        ef_search = EF_GRID[-1]
        for ef in EF_GRID:
            graph.hnsw.efSearch = ef
            _, I_tune = hnsw.search(Q_tune, k)
            r = np.mean([len(set(a) & set(b)) / k for a, b in zip(I_tune_exact, I_tune)])
            if r >= tune_recall:
                ef_search = ef
                break
    graph.hnsw.efSearch = ef_search
    _, I_exact = exact.search(Q_test, k)
    _, I_hnsw = hnsw.search(Q_test, k)
    recall = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(I_exact, I_hnsw)]))
    t_exact = t_hnsw = float("inf")
    for _ in range(rounds):  # interleaved: both see the same machine load
        t_exact = min(t_exact, _time_search(exact, Q_test, k, 1))
        t_hnsw = min(t_hnsw, _time_search(hnsw, Q_test, k, 1))
    faiss.omp_set_num_threads(threads)
    t_exact, t_hnsw = round(t_exact, 6), round(t_hnsw, 6)  # the reported timings the ratios use

    # ---- MRR@10: dense (exact), BM25, hybrid (alpha tuned on the tuning split)
    bm25 = BM25Index.build(texts)
    depth = 100

    def cands(Q, qs):  # candidate sets do not depend on alpha: compute them once
        return [candidates(qtext, qv, X, bm25, depth, exact) for qv, (_, qtext, _) in zip(Q, qs)]

    def mrr(cs, qs, alpha):
        ranked = []
        for ids, b, c in cs:
            s = hybrid_scores(b, c, alpha)
            ranked.append(list(sources[ids[np.lexsort((ids, -s))[:k]]]))
        return mrr_at_k(ranked, [q[2] for q in qs])

    c_tune, c_test = cands(Q_tune, tune), cands(Q_test, test)
    grid = alpha_grid or [round(a, 2) for a in np.linspace(0.0, 1.0, 21)]
    tune_scores = {a: mrr(c_tune, tune, a) for a in grid}
    best_alpha = max(grid, key=lambda a: (tune_scores[a], -abs(a - 0.5)))
    mrr_dense = mrr(c_test, test, 0.0)
    mrr_bm25 = mrr(c_test, test, 1.0)
    mrr_hybrid = mrr(c_test, test, best_alpha)
    t_rr = time.time()
    scorer, rerank_model = rerank_scorer(config)
    mrr_rerank, mrr_hybrid_rr = rerank_mrr(
        c_test[:n_rerank], test[:n_rerank], texts, sources, best_alpha, scorer, rerank_depth, k
    )
    rerank_s = time.time() - t_rr
    n = len(Q_test)
    return {
        "recall_at_10": round(recall, 4),
        "qps": round(n / t_hnsw, 1),
        "exact_qps": round(n / t_exact, 1),
        "speedup": round(t_exact / t_hnsw, 2),
        "hnsw_search_s": t_hnsw,
        "exact_search_s": t_exact,  # best of `rounds`, the whole batch
        "mrr_hybrid": round(mrr_hybrid, 4),
        "mrr_rerank": round(mrr_rerank, 4),
        "mrr_hybrid_rerank_queries": round(mrr_hybrid_rr, 4),
        "n_rerank_queries": min(n_rerank, len(test)),
        "rerank_depth": rerank_depth,
        "rerank_model": rerank_model,
        "rerank_s": round(rerank_s, 1),
        "mrr_dense": round(mrr_dense, 4),
        "mrr_bm25": round(mrr_bm25, 4),
        "n_chunks": len(texts),
        "alpha": best_alpha,
        "mrr_hybrid_tune": round(tune_scores[best_alpha], 4),
        "n_test_queries": n,
        "n_tune_queries": len(tune),
        "dim": int(d),
        "index": factory,
        "ef_search": ef_search,
        "ef_construction": ef_construction,
        "hnsw_build_s": round(build_s, 2),
        "embeddings_cached": bool(cached),
        "wall_s": round(time.time() - t0, 1),
    }
