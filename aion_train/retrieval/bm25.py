"""BM25 over chunk texts with bm25s (sparse-matrix BM25), saved without pickles.

bm25s.BM25.save writes its score matrix as ``.npy`` (``allow_pickle=False``) plus the vocab
and parameters as JSON, and we load with ``allow_pickle=False``; the tokenizer settings are
ours (``bm25_tokenizer.json``) so that queries are tokenized exactly like the corpus."""

from __future__ import annotations

import json
import os

import numpy as np

TOKENIZER_FILE = "bm25_tokenizer.json"


class BM25Index:
    def __init__(self, retriever, n_docs: int, stopwords: str = "en", lower: bool = True):
        self.retriever = retriever
        self.n_docs = int(n_docs)
        self.stopwords = stopwords
        self.lower = lower

    @classmethod
    def build(cls, texts, k1: float = 1.5, b: float = 0.75, method: str = "lucene", stopwords: str = "en") -> BM25Index:
        import bm25s

        tokens = bm25s.tokenize(list(texts), lower=True, stopwords=stopwords, show_progress=False)
        retriever = bm25s.BM25(k1=k1, b=b, method=method)
        retriever.index(tokens, show_progress=False)
        return cls(retriever, len(texts), stopwords)

    def query_tokens(self, query: str) -> list[str]:
        import bm25s

        toks = bm25s.tokenize(
            [query], lower=self.lower, stopwords=self.stopwords, return_ids=False, show_progress=False
        )
        return [t for t in toks[0] if t in self.retriever.vocab_dict]

    def scores(self, query: str) -> np.ndarray:
        """BM25 score of every document for ``query`` (float32 [n_docs]; zeros when no
        query term is in the vocabulary)."""
        toks = self.query_tokens(query)
        if not toks:
            return np.zeros(self.n_docs, np.float32)
        return np.asarray(self.retriever.get_scores(toks), dtype=np.float32)

    def top(self, query: str, k: int) -> tuple[np.ndarray, np.ndarray]:
        s = self.scores(query)
        k = min(k, len(s))
        if k <= 0:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        ids = np.argpartition(-s, k - 1)[:k]
        ids = ids[np.argsort(-s[ids], kind="stable")]
        return ids.astype(np.int64), s[ids]

    def save(self, directory: str) -> list[str]:
        """Write the index into ``directory``; returns the file names written."""
        os.makedirs(directory, exist_ok=True)
        before = set(os.listdir(directory))
        self.retriever.save(directory, show_progress=False, allow_pickle=False)
        with open(os.path.join(directory, TOKENIZER_FILE), "w") as f:
            json.dump({"n_docs": self.n_docs, "stopwords": self.stopwords, "lower": self.lower, "library": "bm25s"}, f)
        return sorted(set(os.listdir(directory)) - before | {TOKENIZER_FILE})

    @classmethod
    def load(cls, directory: str) -> BM25Index:
        import bm25s

        with open(os.path.join(directory, TOKENIZER_FILE)) as f:
            tok = json.load(f)
        retriever = bm25s.BM25.load(directory, allow_pickle=False, show_progress=False)
        return cls(retriever, tok["n_docs"], tok["stopwords"], tok["lower"])
