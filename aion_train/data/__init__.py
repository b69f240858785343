"""Text data pipeline: demo corpus, SentencePiece tokenizer, WebDataset shards, and the
resumable packed-token loader.

Names are imported lazily, so that ``aion-train make-shards`` does not pay for torch."""

from __future__ import annotations

from aion_train.lazy_exports import lazy_exports

_EXPORTS = {
    "demo_documents": "text_sources",
    "SPECIAL_TOKENS": "tokenizer",
    "Tokenizer": "tokenizer",
    "train_tokenizer": "tokenizer",
    "write_shards": "shards",
    "read_manifest": "shards",
    "verify_manifest": "shards",
    "sha256_file": "shards",
    "iter_shard_samples": "shards",
    "summarize_manifest": "shards",
    "TokenLoader": "loader",
    "expand_shards": "loader",
    "ensure_demo_data": "demo",
}
__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
