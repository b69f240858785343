"""Hybrid scoring, MMR diversification, LM-likelihood rerank, context builder.

Hybrid score of candidate ``i`` over the union ``U`` of the dense and the BM25 candidates:

    score_i = alpha * (b_i - min_U b) / (max_U b - min_U b) + (1 - alpha) * cos_i

with ``b`` the BM25 score and ``cos`` the cosine between query and chunk embeddings
(exact, from the stored vectors, for candidates of either list). When all BM25 scores in
``U`` are equal the normalised BM25 term is 0.

LM rerank (:func:`rerank`): among the top hybrid candidates, order purely by the model's mean
per-token log-likelihood of the query given the chunk, ``(1/|q|) sum_t log p(q_t | <CTX>
chunk </CTX>, q_<t)`` (nats per token, <= 0); the hybrid score picks the candidates and
breaks exact ties, it is not mixed with the log-likelihood."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np


def minmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.size == 0:
        return x
    lo, hi = float(x.min()), float(x.max())
    if hi - lo <= 0:
        return np.zeros_like(x)
    return (x - lo) / (hi - lo)


def hybrid_scores(bm25: np.ndarray, cosine: np.ndarray, alpha: float) -> np.ndarray:
    """``alpha * minmax(bm25) + (1 - alpha) * cosine`` over one candidate set."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    return alpha * minmax(bm25) + (1.0 - alpha) * np.asarray(cosine, dtype=np.float64)


def candidates(
    query: str, qvec: np.ndarray, X: np.ndarray, bm25, depth: int, dense_index=None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Union of the dense top-``depth`` (``dense_index`` or exact over ``X``) and the BM25
    top-``depth``: ``(ids, bm25 scores, cosines)``."""
    q = np.asarray(qvec, dtype=np.float32).reshape(1, -1)
    if dense_index is not None:
        _, I = dense_index.search(q, depth)
        dense_ids = I[0][I[0] >= 0]
    else:
        sims = X @ q[0]
        dense_ids = np.argsort(-sims, kind="stable")[:depth]
    all_bm25 = bm25.scores(query)
    k = min(depth, len(all_bm25))
    bm_ids = np.argpartition(-all_bm25, k - 1)[:k] if k > 0 else np.zeros(0, np.int64)
    bm_ids = bm_ids[all_bm25[bm_ids] > 0]  # a zero BM25 score is no match
    ids = np.unique(np.concatenate([dense_ids.astype(np.int64), bm_ids.astype(np.int64)]))
    return ids, all_bm25[ids].astype(np.float64), (X[ids] @ q[0]).astype(np.float64)


def hybrid_rank(
    query: str,
    qvec: np.ndarray,
    X: np.ndarray,
    bm25,
    alpha: float = 0.5,
    k: int = 10,
    depth: int = 100,
    dense_index=None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` chunk ids and hybrid scores (ties broken by id)."""
    ids, b, c = candidates(query, qvec, X, bm25, depth, dense_index)
    s = hybrid_scores(b, c, alpha)
    order = np.lexsort((ids, -s))[:k]
    return ids[order], s[order]


def mmr(query_vec: np.ndarray, cand_vecs: np.ndarray, relevance: np.ndarray, k: int, lam: float = 0.7) -> list[int]:
    """Maximal marginal relevance: positions (into the candidates) picked greedily by
    ``lam * relevance_i - (1 - lam) * max_{j picked} cos(v_i, v_j)``. ``relevance``
    defaults to the cosine with the query when None."""
    V = np.asarray(cand_vecs, dtype=np.float64)
    rel = (V @ np.asarray(query_vec, dtype=np.float64)) if relevance is None else np.asarray(relevance, np.float64)
    n = len(V)
    picked: list[int] = []
    if n == 0:
        return picked
    sim = V @ V.T
    max_sim = np.full(n, -np.inf)
    available = np.ones(n, dtype=bool)
    for _ in range(min(k, n)):
        red = np.where(np.isfinite(max_sim), max_sim, 0.0)
        score = lam * rel - (1.0 - lam) * red
        score[~available] = -np.inf
        i = int(np.argmax(score))
        picked.append(i)
        available[i] = False
        max_sim = np.maximum(max_sim, sim[i])
    return picked


def rerank(query: str, texts: Sequence[str], loglik: Callable[[str, str], float]) -> tuple[list[int], list[float]]:
    """LM rerank: the candidates ordered by ``loglik(query, text)`` alone (highest first; ties
    keep the incoming, hybrid, order), and the scores. ``loglik`` is a mean per-token
    log-probability of the query given the chunk (e.g. :func:`lm_loglik`), in nats/token,
    <= 0. The hybrid score (in [0, 1]) only chose the candidates: it is never added to a
    log-probability (the two scales are not comparable)."""
    ll = [float(loglik(query, t)) for t in texts]
    return sorted(range(len(texts)), key=lambda i: (-ll[i], i)), ll


def build_context(chunks: Sequence[str], query: str, max_chars: int | None = None, sep: str = "\n\n") -> str:
    """``<CTX> chunk1 ... chunkN </CTX> query``: retrieved chunks (best first) inside the
    tokenizer's context markers, then the query. With ``max_chars`` the chunks that do not
    fit in the budget are left out (whole chunks only)."""
    kept: list[str] = []
    used = 0
    for c in chunks:
        c = c.strip()
        if max_chars is not None and kept and used + len(c) + len(sep) > max_chars:
            break
        kept.append(c)
        used += len(c) + len(sep)
    return f"<CTX> {sep.join(kept)} </CTX> {query}"


def lm_loglik(model, tokenizer, max_len: int = 512) -> Callable[[str, str], float]:
    """A rerank scorer from our transformer: mean log-probability of the query tokens
    after ``<CTX> chunk </CTX>`` (the context is truncated from the left to fit)."""
    import torch

    def score(query: str, chunk: str) -> float:
        ctx = tokenizer.encode(build_context([chunk], "").rstrip())
        q = tokenizer.encode(" " + query)
        ctx = ctx[-max(1, max_len - len(q) - 1) :]
        ids = torch.tensor([[tokenizer.bos_id] + ctx + q])
        with torch.no_grad():
            logits = model(ids).logits[0].float()
        logp = torch.log_softmax(logits[:-1], -1)
        tgt = ids[0, 1:]
        lp = logp.gather(1, tgt[:, None])[:, 0][-len(q) :]
        return float(lp.mean()) if len(q) else 0.0

    return score
