"""aion-train query DIR "text" [--k 5] [--json]: hybrid (BM25 + dense) search of an index
folder built by build-index, with MMR diversification; --context prints the
`<CTX> ... </CTX> query` block for the model.

--rerank --checkpoint C: the best --rerank-depth (default 2k) hybrid candidates are reordered
by the checkpoint's mean per-token log-likelihood of the query given the chunk (nats/token,
reported per hit as extra.lm_loglik); the hybrid score only picks the candidates."""

from __future__ import annotations

import json
import sys


def add_arguments(p):
    p.add_argument("index", help="index folder (from build-index)")
    p.add_argument("text", help="the query")
    p.add_argument("--k", type=int, default=5)
    p.add_argument(
        "--alpha", type=float, default=None, help="BM25 weight in [0, 1] (default: the index's, tuned by the bench)"
    )
    p.add_argument("--depth", type=int, default=50, help="candidates from each retriever")
    p.add_argument("--mmr-lambda", type=float, default=0.7)
    p.add_argument("--no-mmr", action="store_true")
    p.add_argument("--context", action="store_true", help="also print the <CTX> block")
    p.add_argument("--no-verify", action="store_true", help="skip the manifest checksums")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--rerank", action="store_true", help="rerank the candidates by --checkpoint's LM likelihood")
    p.add_argument("--checkpoint", default=None, help="with --rerank: the model (run or checkpoint folder)")
    p.add_argument("--tokenizer", default=None, help="with --rerank: the model's tokenizer (default: from the run)")
    p.add_argument("--rerank-depth", type=int, default=None, metavar="N", help="candidates to rerank (default 2k)")


def run(args) -> int:
    from aion_train.retrieval.hybrid import build_context
    from aion_train.retrieval.store import IndexIntegrityError, Retriever

    if args.rerank and not args.checkpoint:
        print("query: --rerank needs --checkpoint (the model that scores the candidates)", file=sys.stderr)
        return 2
    scorer = None
    if args.rerank:
        from aion_train.retrieval.hybrid import lm_loglik
        from aion_train.serve.loading import LoadError, load_for_serving

        try:
            loaded = load_for_serving(args.checkpoint, tokenizer=args.tokenizer)
        except LoadError as e:
            print(f"query: {e}", file=sys.stderr)
            return 1
        scorer = lm_loglik(loaded.model, loaded.tokenizer, max_len=loaded.max_seq_len)
    try:
        r = Retriever(args.index, verify=not args.no_verify)
        hits = r.search(
            args.text,
            k=args.k,
            alpha=args.alpha,
            depth=args.depth,
            mmr_lambda=None if args.no_mmr else args.mmr_lambda,
            rerank=scorer,
            rerank_depth=args.rerank_depth,
        )
    except (IndexIntegrityError, OSError, ValueError) as e:
        print(f"query: {e}", file=sys.stderr)
        return 1
    ctx = build_context([h.text for h in hits], args.text)
    if args.json:
        out = {"query": args.text, "index": args.index, "hits": [h.to_dict() for h in hits]}
        if args.context:
            out["context"] = ctx
        print(json.dumps(out, ensure_ascii=False))
        return 0
    for rank, h in enumerate(hits, 1):
        snippet = " ".join(h.text.split())[:160]
        lm = f", lm {h.extra['lm_loglik']:.3f}" if "lm_loglik" in h.extra else ""
        print(f"{rank:>2}. {h.score:.3f} (bm25 {h.bm25:.2f}, cos {h.cosine:.3f}{lm}) {h.source}\n    {snippet}")
    if args.context:
        print(ctx)
    return 0
