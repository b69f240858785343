"""Multimodal data: real image / speech / video / text samples in WebDataset shards
(:mod:`.sources`, :mod:`.build`), decoders (:mod:`.decode`), the packed batch contract
(:mod:`.collate`), the resumable :class:`MultimodalLoader` (:mod:`.loader`) and held-out
evaluation sets (:mod:`.eval_sets`). Names are imported lazily (no torch for make-shards)."""
from __future__ import annotations

import importlib

_EXPORTS = {
    "MultimodalLoader": "loader",
    "MediaSpec": "sample", "make_sample": "sample", "decode_sample": "sample",
    "collate_rows": "collate", "count_samples": "collate", "SegmentRenderer": "collate",
    "build_multimodal_demo": "build", "ensure_multimodal_demo": "build", "multimodal_demo_paths": "build",
    "load_vqa_eval": "eval_sets", "load_caption_eval": "eval_sets",
    "patchify": "decode", "tubeletize": "decode", "log_mel": "decode", "mel_filterbank": "decode",
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
