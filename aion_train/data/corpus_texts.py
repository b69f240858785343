"""Texts of ``--from``/``--data`` paths, streamed: a shard folder of ours (its ``manifest.json``:
the chosen split), ``.tar`` shards, or any corpus :mod:`.user_sources` reads (text, JSONL,
Parquet, CSV, HF datasets folders). Used by `train-tokenizer` and `eval --task perplexity`."""

from __future__ import annotations

import os
from collections.abc import Iterator

from .shards import MANIFEST, ShardError, iter_shard_samples, manifest_shards
from .user_sources import check_sources, iter_raw, record_text, resolve_sources


def iter_texts(paths: list[str], split: str = "train", fmt: str = "auto", text_field: str = "text") -> Iterator[str]:
    """Every text of `paths` in order (documents without text are skipped). A shard folder
    contributes its `split` shards; a shard that cannot be read is an error naming it."""
    plain: list[str] = []

    def flush() -> Iterator[str]:
        if plain:
            sources = resolve_sources(list(plain), fmt)
            check_sources(sources, text_field)
            for src in sources:
                for raw in iter_raw(src, text_field):
                    text, _ = record_text(src.format, text_field, raw)
                    if text is not None:
                        yield text
            plain.clear()

    for p in paths:
        shards = None
        if os.path.isdir(p) and os.path.isfile(os.path.join(p, MANIFEST)):
            try:
                shards = manifest_shards(p, split)
            except KeyError as e:
                raise ValueError(f"{p}: its manifest has no {split!r} split") from e
        elif p.endswith(".tar") and os.path.isfile(p):
            shards = [p]
        if shards is None:
            plain.append(p)
            continue
        yield from flush()
        for shard in shards:
            for s in iter_shard_samples(shard):
                if isinstance(s, ShardError):
                    raise ValueError(f"{shard}: unreadable shard ({s.error})")
                if "txt" in s:
                    yield s["txt"].decode("utf-8")
    yield from flush()
