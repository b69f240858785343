"""Retrieved context for a request: the top-k chunks of an index folder, best first, put in
front of the prompt as the ``<CTX> ... </CTX>`` block the model was trained to read.

Only whole chunks go in, and only as many as leave room in the model's context for the prompt
and the tokens to generate; the hits that went in are reported (index, chunk ids, sources,
scores) so that an answer can be traced to what it was shown.
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


class RetrievalContext:
    def __init__(self, index_dir: str, k: int = 3):
        if k < 1:
            raise RetrievalError("--k must be >= 1")
        try:
            from aion_train.retrieval.store import Retriever

            self.retriever = Retriever(index_dir)
            _ = self.retriever.embedder  # load (and check) the index's embedder now
        except (OSError, ValueError, ImportError) as e:
            raise RetrievalError(f"cannot use the index {index_dir}: {e}") from e
        self.index_dir = index_dir
        self.k = k

    def describe(self) -> dict:
        m = self.retriever.manifest
        return {
            "index": self.index_dir,
            "embedder": m.get("embedder"),
            "k": self.k,
            "chunks": m.get("counts", {}).get("chunks"),
        }

    def augment(
        self, prompt: str, n_tokens: Callable[[str], int], budget: int, options: RetrievalOptions | None = None
    ) -> Augmented:
        """`prompt` after a context block of its best chunks with `n_tokens(text) <= budget`:
        all k hits when they fit; else the longest chunks are cut (from their end, at a word
        where one is near) until the block fits, a chunk cut to nothing is left out; the prompt
        itself is never cut (no block when not even the markers fit)."""
        from aion_train.retrieval.hybrid import build_context

        o = options or RetrievalOptions()
        search = {"k": o.k or self.k}
        if o.alpha is not None:
            search["alpha"] = o.alpha
        if o.mmr_lambda is not None:
            search["mmr_lambda"] = o.mmr_lambda
        hits = self.retriever.search(prompt, **search)
        texts = fit_chunks([h.text.strip() for h in hits], lambda cs: n_tokens(build_context(cs, prompt)), budget)
        if texts is None or not any(texts):
            return Augmented(prompt, [])
        kept = [
            {
                "id": h.id,
                "source": h.source,
                "score": round(h.score, 6),
                **({"cut_to_chars": len(t)} if t != h.text.strip() else {}),
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
