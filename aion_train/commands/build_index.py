"""aion-train build-index --corpus GLOB --out DIR: chunk, embed (MiniLM or our model) and
index a corpus (FAISS ANN + BM25); the folder holds a checksummed manifest and no pickles."""

from __future__ import annotations

import json
import sys

from .output_dirs import add_overwrite_argument


def add_arguments(p):
    p.add_argument(
        "--corpus",
        action="append",
        required=True,
        metavar="GLOB",
        help="files to index (repeatable; '**' ok; .gz and man pages handled; 'pydoc' = the Python reference topics)",
    )
    p.add_argument(
        "--out", required=True, help="index folder to write (an index of ours is replaced; a foreign folder is refused)"
    )
    p.add_argument(
        "--embedder",
        default="minilm",
        help="minilm | model:CONFIG.yaml[@tokenizer.model] | model:CHECKPOINT (needs a registered loader) | hash-DIM",
    )
    p.add_argument("--factory", default="HNSW32", help="FAISS factory string, e.g. HNSW32, 'IVF256,PQ32', Flat")
    p.add_argument("--pca", type=int, default=None, help="reduce dims with a PCA first (e.g. 128)")
    p.add_argument("--ef-search", type=int, default=None, help="HNSW efSearch (default 64)")
    p.add_argument("--nprobe", type=int, default=None, help="IVF nprobe (default 16)")
    p.add_argument("--chunk-chars", type=int, default=400)
    p.add_argument("--overlap", type=int, default=50)
    p.add_argument("--max-chunks-per-doc", type=int, default=None)
    p.add_argument("--no-cache", action="store_true", help="do not use the embedding cache")
    p.add_argument("--cache-dir", default=None, help="the embedding cache (default ~/.cache/aion-train/retrieval)")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")
    add_overwrite_argument(p)


def run(args) -> int:
    from aion_train.ownership import ForeignFolderError
    from aion_train.retrieval.build import build_index
    from aion_train.retrieval.cache import stderr_log
    from aion_train.retrieval.dense import default_params

    params = default_params(args.factory)
    if args.ef_search is not None:
        params["efSearch"] = args.ef_search
    if args.nprobe is not None:
        params["nprobe"] = args.nprobe
    try:
        m = build_index(
            args.corpus,
            args.out,
            args.embedder,
            factory=args.factory,
            pca=args.pca,
            chunk_chars=args.chunk_chars,
            overlap=args.overlap,
            max_chunks_per_doc=args.max_chunks_per_doc,
            params=params,
            use_cache=not args.no_cache,
            cache_dir=args.cache_dir,
            log=stderr_log,
            overwrite=args.overwrite,
        )
    except ForeignFolderError as e:
        print(f"build-index: {e}", file=sys.stderr)
        return 2
    except (ValueError, OSError, RuntimeError) as e:
        print(f"build-index: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(m))
    else:
        c = m["counts"]
        print(
            f"{args.out}: {c['documents']} documents, {c['chunks']} chunks, "
            f"{m['embedder']} dim {m['dim']} -> {m['index_dim']}, index {m['factory']} "
            f"{m['search_params']}, {len(m['files'])} files, {m['build_s']} s"
        )
    return 0
