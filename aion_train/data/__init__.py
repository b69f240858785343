"""Text data pipeline: demo corpus, SentencePiece tokenizer, WebDataset shards, and the
resumable packed-token loader.

Names are imported lazily, so that ``aion-train make-shards`` does not pay for torch."""
from __future__ import annotations

import importlib

_EXPORTS = {
    "demo_documents": "text_sources",
    "SPECIAL_TOKENS": "tokenizer", "Tokenizer": "tokenizer", "train_tokenizer": "tokenizer",
    "write_shards": "shards", "read_manifest": "shards", "verify_manifest": "shards",
    "sha256_file": "shards", "iter_shard_samples": "shards", "summarize_manifest": "shards",
    "TokenLoader": "loader", "expand_shards": "loader",
    "ensure_demo_data": "demo",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
