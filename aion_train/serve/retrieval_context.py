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

    def augment(self, prompt: str, n_tokens: Callable[[str], int], budget: int) -> Augmented:
        """`prompt` with the best chunks that keep `n_tokens(text) <= budget` (whole chunks,
        best first; none when even the best one does not fit)."""
        from aion_train.retrieval.hybrid import build_context

        hits = self.retriever.search(prompt, k=self.k)
        for n in range(len(hits), 0, -1):
            text = build_context([h.text for h in hits[:n]], prompt)
            if n_tokens(text) <= budget:
                return Augmented(text, [{"id": h.id, "source": h.source, "score": round(h.score, 6)} for h in hits[:n]])
        return Augmented(prompt, [])
