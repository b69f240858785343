"""The two artifact phases of the pipeline: the retrieval index and the policy bundle.

They call the same library functions as `aion-train build-index` and `aion-train
build-policy` on the embedded default inputs of `cfg.pipeline` (the Python reference topics
with MiniLM + HNSW, the policy files in configs/policies), write under
`{run_dir}/artifacts/<phase>/` and end with that folder's `done.json`, written atomically.
"""

from __future__ import annotations

import glob
import json
import os
import sys
import time
from pathlib import Path

from aion_train.config.pipeline_schema import BUILTIN
from aion_train.fsutil import atomic_write_text


def _single_process(name: str) -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise RuntimeError(f"the {name} phase is single-process; set pipeline.resources.{name}.world_size=1")


def _write_done(phase: str, cfg, metrics: dict) -> dict:
    out = BUILTIN[phase].out_dir(cfg.run_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "done.json", json.dumps(metrics, indent=1, sort_keys=True) + "\n")
    return metrics


def run_build_index(cfg) -> dict:
    """Chunk, embed and index `pipeline.index_corpus` into {run_dir}/artifacts/build-index/index."""
    from aion_train.retrieval.build import build_index
    from aion_train.retrieval.cache import stderr_log
    from aion_train.retrieval.dense import default_params

    _single_process("build-index")
    p = cfg.pipeline
    t0 = time.time()
    index_dir = BUILTIN["build-index"].out_dir(cfg.run_dir) / "index"
    index_dir.parent.mkdir(parents=True, exist_ok=True)
    m = build_index(
        p.index_corpus,
        str(index_dir),
        p.index_embedder,
        factory=p.index_factory,
        max_chunks_per_doc=p.index_max_chunks_per_doc or None,
        chunk_chars=p.index_chunk_chars,
        overlap=p.index_chunk_overlap,
        params=default_params(p.index_factory),
        cache_dir=p.index_cache_dir or None,
        log=stderr_log,
    )
    print(f"build-index: {m['counts']} {m['embedder']} -> {index_dir}", file=sys.stderr)
    return _write_done(
        "build-index",
        cfg,
        {
            "index_dir": str(index_dir),
            "index_chunks": m["counts"]["chunks"],
            "index_documents": m["counts"]["documents"],
            "index_dim": m["dim"],
            "index_embedder": m["embedder"],
            "index_factory": m["factory"],
            "index_seconds": round(time.time() - t0, 2),
        },
    )


def _policy_paths(patterns: list[str]) -> list[str]:
    files: list[str] = []
    for pat in patterns:
        path = Path(pat)
        if path.is_dir():
            files += sorted(str(x) for x in path.glob("*.json"))
        else:
            hits = sorted(glob.glob(pat))
            if not hits:
                raise FileNotFoundError(
                    f"pipeline.policy_files: {pat!r} matches no file (working directory {os.getcwd()})"
                )
            files += hits
    if not files:
        raise FileNotFoundError(f"pipeline.policy_files={patterns!r}: no policy JSON files found")
    return files


def run_build_policy(cfg) -> dict:
    """Validate, resolve and bundle `pipeline.policy_files` into
    {run_dir}/artifacts/build-policy/policy_bundle.json."""
    from aion_train.policy import PolicyError, build_bundle, write_bundle

    _single_process("build-policy")
    files = _policy_paths(cfg.pipeline.policy_files)
    try:
        bundle = build_bundle(files)
    except PolicyError as e:
        raise ValueError("invalid policy files:\n" + "\n".join(str(i) for i in e.issues)) from None
    path = write_bundle(bundle, BUILTIN["build-policy"].out_dir(cfg.run_dir))
    print(f"build-policy: {len(files)} files -> {path}", file=sys.stderr)
    return _write_done(
        "build-policy",
        cfg,
        {
            "policy_bundle": str(path),
            "policy_bundle_sha256": bundle["bundle_sha256"],
            "policy_jurisdictions": sorted(bundle["jurisdictions"]),
        },
    )
