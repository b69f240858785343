"""Multimodal data: real image / speech / video / text samples in WebDataset shards
(:mod:`.sources`, :mod:`.build`), decoders (:mod:`.decode`), the packed batch contract
(:mod:`.collate`), the resumable :class:`MultimodalLoader` (:mod:`.loader`) and held-out
evaluation sets (:mod:`.eval_sets`). Names are imported lazily (no torch for make-shards)."""

from __future__ import annotations

from aion_train.lazy_exports import lazy_exports

_EXPORTS = {
    "MultimodalLoader": "loader",
    "MediaSpec": "sample",
    "make_sample": "sample",
    "decode_sample": "sample",
    "collate_rows": "collate",
    "count_samples": "collate",
    "SegmentRenderer": "collate",
    "build_multimodal_demo": "build",
    "ensure_multimodal_demo": "build",
    "multimodal_demo_paths": "build",
    "load_vqa_eval": "eval_sets",
    "load_caption_eval": "eval_sets",
    "patchify": "decode",
    "tubeletize": "decode",
    "log_mel": "decode",
    "mel_filterbank": "decode",
}
__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
