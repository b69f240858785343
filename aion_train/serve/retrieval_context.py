"""Retrieved context for a request: the top-k chunks of an index folder, best first, put in
front of the prompt as the ``<CTX> ... </CTX>`` block the model was trained to read.

Only whole chunks go in, and only as many as leave room in the model's context for the prompt
and the tokens to generate; the hits that went in are reported (index, chunk ids, sources,
scores) so that an answer can be traced to what it was shown.

The folder is an index folder (build-index) or a continual-memory folder
(:class:`~aion_train.retrieval.continual.ContinualIndex`, its ``memory.json``). A memory is
searched by cosine and can take writes while requests are served (:meth:`RetrievalContext.ingest`,
``POST /admin/ingest``); each request reads one state under the memory's read lock (a batch
is all in or all out), reported as ``seq`` on each hit.

Rerank (``retrieval: {"rerank": true}``): the best ``2k`` candidates are reordered purely by
the served model's mean per-token log-likelihood of the prompt given the chunk (nats/token,
``lm_loglik`` on each hit); the retrieval score only picked the candidates.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


class RetrievalError(ValueError):
    """The index folder cannot be used (missing, damaged, other embedder)."""


@dataclass
class Augmented:
    text: str  # the prompt with its context block (the prompt alone if none fit)
    hits: list[dict]  # what went in: {"id", "source", "score"}, best first


@dataclass(frozen=True)
class RetrievalOptions:
    """Per-request search settings (the request's `retrieval` field); None: the index's own."""

    k: int | None = None
    alpha: float | None = None  # hybrid weight of BM25 against the dense score
    mmr_lambda: float | None = None  # MMR relevance weight (1.0: no diversity term)
    rerank: bool | None = None  # reorder by the served model's log-likelihood of the prompt


class RetrievalContext:
    def __init__(self, index_dir: str, k: int = 3, scorer: Callable[[str, str], float] | None = None):
        """`scorer(query, chunk) -> mean log-likelihood`: what `rerank` requests use."""
        if k < 1:
            raise RetrievalError("--k must be >= 1")
        from aion_train.retrieval.continual import is_memory_dir

        self.memory = None
        self.retriever = None
        try:
            if is_memory_dir(index_dir):
                self.memory = _open_memory(index_dir)
            else:
                from aion_train.retrieval.store import Retriever

                self.retriever = Retriever(index_dir)
                _ = self.retriever.embedder  # load (and check) the index's embedder now
        except (OSError, ValueError, ImportError, RuntimeError) as e:
            raise RetrievalError(f"cannot use the index {index_dir}: {e}") from e
        self.index_dir = index_dir
        self.k = k
        self.scorer = scorer

    def describe(self) -> dict:
        if self.memory is not None:
            st = self.memory.stats()
            name = getattr(self.memory.embedder, "name", None)
            return {"index": self.index_dir, "embedder": name, "k": self.k, "documents": st["documents"]}
        m = self.retriever.manifest
        return {
            "index": self.index_dir,
            "embedder": m.get("embedder"),
            "k": self.k,
            "chunks": m.get("counts", {}).get("chunks"),
        }

    def ingest(self, documents: list[dict], delete: list[str] = ()) -> list[int]:
        """Put ``documents`` ({"id", "text", "meta"?}) and delete ``delete`` ids in one batch
        (one log record each, one fsync, applied under one write lock); their sequence
        numbers once durable and visible."""
        if self.memory is None:
            raise RetrievalError("the served index is not a continual memory (build-index folders are read-only)")
        vecs = self.memory._embed([d["text"] for d in documents]) if documents else []
        ops = [("put", d["id"], d["text"], d.get("meta"), v) for d, v in zip(documents, vecs)]
        return self.memory.commit(ops + [("del", i) for i in delete])

    def search(self, prompt: str, o: RetrievalOptions) -> list[dict]:
        """The hits for `prompt`, best first: {"id", "source", "score", "text", ...}."""
        k = o.k or self.k
        scorer = None
        if o.rerank:
            if self.scorer is None:
                raise RetrievalError("this server cannot rerank (no scorer)")
            scorer = self.scorer
        if self.memory is not None:
            seq, found = self.memory.search_at(prompt, max(k, 2 * k) if scorer else k)
            hits = [
                {"id": h.doc_id, "source": h.meta.get("source", h.doc_id), "score": h.score, "text": h.text}
                | {"seq": h.seq, "read_seq": seq}
                for h in found
            ]
            if scorer is not None:
                from aion_train.retrieval.hybrid import rerank

                order, ll = rerank(prompt, [h["text"] for h in hits], scorer)
                for h, v in zip(hits, ll):
                    h["lm_loglik"] = v
                hits = [hits[i] for i in order]
            return hits[:k]
        search = {"k": k}
        if o.alpha is not None:
            search["alpha"] = o.alpha
        if o.mmr_lambda is not None:
            search["mmr_lambda"] = o.mmr_lambda
        found = self.retriever.search(prompt, rerank=scorer, **search)
        return [{"id": h.id, "source": h.source, "score": h.score, "text": h.text, **h.extra} for h in found]

    def augment(
        self, prompt: str, n_tokens: Callable[[str], int], budget: int, options: RetrievalOptions | None = None
    ) -> Augmented:
        """`prompt` after a context block of its best chunks with `n_tokens(text) <= budget`:
        all k hits when they fit; else the longest chunks are cut (from their end, at a word
        where one is near) until the block fits, a chunk cut to nothing is left out; the prompt
        itself is never cut (no block when not even the markers fit)."""
        from aion_train.retrieval.hybrid import build_context

        hits = self.search(prompt, options or RetrievalOptions())
        texts = fit_chunks([h["text"].strip() for h in hits], lambda cs: n_tokens(build_context(cs, prompt)), budget)
        if texts is None or not any(texts):
            return Augmented(prompt, [])
        kept = [
            {
                **{key: v for key, v in h.items() if key != "text"},
                "score": round(h["score"], 6),
                **({"lm_loglik": round(h["lm_loglik"], 6)} if "lm_loglik" in h else {}),
                **({"cut_to_chars": len(t)} if t != h["text"].strip() else {}),
            }
            for h, t in zip(hits, texts)
            if t
        ]
        return Augmented(build_context([t for t in texts if t], prompt), kept)


def fit_chunks(chunks: list[str], cost: Callable[[list[str]], int], budget: int) -> list[str] | None:
    """`chunks` with the longest cut down (a common cap on their length, lowered until
    `cost(non-empty chunks) <= budget`); None when even no chunk at all is over budget."""
    if cost(chunks) <= budget:
        return chunks
    if not chunks or cost([]) > budget:
        return None
    lo, hi = 0, max(len(c) for c in chunks)  # the largest cap that fits, by bisection
    while lo < hi:
        cap = (lo + hi + 1) // 2
        if cost([c for c in (_cut(x, cap) for x in chunks) if c]) <= budget:
            lo = cap
        else:
            hi = cap - 1
    return [_cut(c, lo) for c in chunks]


def _cut(text: str, cap: int) -> str:
    """`text` cut to at most `cap` characters, at the last space in the cut's last fifth."""
    if len(text) <= cap:
        return text
    head = text[:cap]
    space = head.rfind(" ")
    return head[:space].rstrip() if space >= cap * 4 // 5 else head


def _open_memory(path: str):
    """A continual memory as its ``memory.json`` describes it (embedder, update rule)."""
    import json
    import os

    from aion_train.retrieval.continual import MEMORY_INFO, ContinualIndex
    from aion_train.retrieval.embedders import make_embedder

    with open(os.path.join(path, MEMORY_INFO), encoding="utf-8") as f:
        info = json.load(f)
    spec = info.get("embedder_spec")
    if not spec:
        raise RetrievalError(f"{path}: {MEMORY_INFO} names no embedder to embed queries with")
    emb = make_embedder(spec)
    return ContinualIndex(
        path,
        emb,
        kind=info.get("kind", "flat"),
        update_rule=info.get("update_rule", "replace"),
        eta=info.get("eta", 0.1),
    )
