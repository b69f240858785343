"""aion-train distill-memory --checkpoint C --index DIR [--documents new|all] [--steps N] [--out DIR] --json:
L_mem (aion_train.posttrain.memory_encoder) on the open-book task's continual memory. The
memory holds the training documents, then the held-out ("new") documents are ingested, each
stored as the index's embedder (MiniLM) encodes it; the checkpoint's own mean-pooled embedder
(LoRA adapters + a linear head to the memory's dimension; base weights frozen) is distilled
towards the stored vectors of `--documents`. Prints retrieval MRR@10 of the task's questions
(each question's own document among all the memory's documents):

* `mrr_memory_encoder`: queries and documents by the memory's encoder (MiniLM: the reference);
* `mrr_model_before` / `mrr_model_linear_head` / `mrr_model_after`: queries and documents by
  the model: its plain mean-pooled states, the least-squares head on the frozen model, the
  distilled encoder;
* `mrr_model_on_memory_before` / `_after`: queries by the model (head before / after), the
  documents' vectors as the memory stores them: the model as the memory's query encoder;

each over the new documents' questions, and with an `_old` suffix over the training
documents' (`--old-queries` of them). `l_mem_before` / `l_mem_after` are L_mem on the
distilled documents. `--out` keeps the adapters and the head (encoder.safetensors)."""

from __future__ import annotations

import json
import sys

from .output_dirs import add_overwrite_argument


def add_arguments(p):
    p.add_argument("--checkpoint", required=True, help="an sft / ppo run folder or a pretraining checkpoint")
    p.add_argument("--index", required=True, help="the task's index (build-index --corpus open-book)")
    p.add_argument("--documents", choices=("new", "all"), default="new", help="whose stored vectors to distil")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--lora-alpha", type=float, default=16.0)
    p.add_argument("--queries", type=int, default=None, help="new documents' questions scored (default: all)")
    p.add_argument("--old-queries", type=int, default=675, help="training documents' questions scored (_old)")
    p.add_argument("--held-out-fraction", type=float, default=0.2)
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="folder for encoder.safetensors (refused if another program's)")
    p.add_argument("--json", action="store_true", help="print one JSON line")
    add_overwrite_argument(p)


def _doc_rows(ids: list[str]) -> tuple[list[str], list[int]]:
    """(document ids in first-seen order, row -> document index) of `doc@start` chunk ids."""
    docs: dict[str, int] = {}
    rows = [docs.setdefault(i.rsplit("@", 1)[0], len(docs)) for i in ids]
    return list(docs), rows


def _mrr(queries, chunks, chunk_doc, relevant) -> float:
    """MRR@10 by document: a document scores its best chunk."""
    import numpy as np

    from aion_train.posttrain.memory_encoder import mrr_at_10

    n_docs = max(chunk_doc) + 1
    if n_docs == len(chunk_doc):  # one chunk per document: rows are documents
        order = np.argsort(chunk_doc)
        return mrr_at_10(queries, chunks[order], relevant)
    scores = queries @ chunks.T
    by_doc = np.full((len(queries), n_docs), -2.0, dtype=np.float32)  # below any cosine
    for row, d in enumerate(chunk_doc):
        by_doc[:, d] = np.maximum(by_doc[:, d], scores[:, row])
    eye = np.eye(n_docs, dtype=np.float32)  # by_doc as "queries" against one-hot "documents"
    return mrr_at_10(by_doc, eye, relevant)


def distill_memory(args) -> dict:
    import tempfile
    import time

    import numpy as np

    from aion_train.config.posttrain_schema import LoRAConfig
    from aion_train.eval.open_book import index_chunking, ingested_memory
    from aion_train.posttrain.memory_encoder import ProjectedModel, distill, encoder_state, least_squares_head
    from aion_train.retrieval.embedders import ModelEmbedder
    from aion_train.retrieval.open_book import iter_examples, read_man_pages, split_pages
    from aion_train.retrieval.store import Retriever
    from aion_train.serve.loading import load_for_serving

    if args.steps < 1:
        raise ValueError(f"--steps {args.steps}: must be >= 1")
    folder = None
    if args.out:
        from aion_train.ownership import claim_dir

        folder = claim_dir(args.out, "distill-memory", args.overwrite)
    t0 = time.time()
    loaded = load_for_serving(args.checkpoint)
    model = loaded.model.float()
    trained, held = split_pages(read_man_pages(), args.held_out_fraction, args.split_seed)
    embedder = Retriever(args.index).embedder
    with tempfile.TemporaryDirectory(prefix="aion-distill-memory-") as tmp:
        memory = ingested_memory(tmp, embedder, trained, held, index_chunking(args.index))
        ids = sorted(memory.docs)
        texts = [memory.get(i)["text"] for i in ids]
        stored = np.stack([memory.vector(i) for i in ids]).astype(np.float32)
        memory.close()
    doc_ids, chunk_doc = _doc_rows(ids)
    row_of = {d: n for n, d in enumerate(doc_ids)}
    new_docs = {p.doc_id for p in held}
    pick = [r for r, i in enumerate(ids) if args.documents == "all" or i.rsplit("@", 1)[0] in new_docs]
    q_new = list(iter_examples(held))[: args.queries]
    q_old = list(iter_examples(trained))[: args.old_queries]
    groups = {"": q_new, "_old": q_old}
    ref = {g: embedder.encode([e.question for e in qs]) for g, qs in groups.items()}
    relevant = {g: [row_of[e.doc_id] for e in qs] for g, qs in groups.items()}

    def scores(name: str, enc, on_memory: bool) -> dict:
        out = {}
        docs = stored if on_memory else enc.encode(texts)
        for g, qs in groups.items():
            out[f"mrr_{name}{g}"] = round(_mrr(enc.encode([e.question for e in qs]), docs, chunk_doc, relevant[g]), 4)
        return out

    tok = loaded.tokenizer
    plain = ModelEmbedder(model, tok, max_len=loaded.max_seq_len)
    result: dict = {}
    for g in groups:
        result[f"mrr_memory_encoder{g}"] = round(_mrr(ref[g], stored, chunk_doc, relevant[g]), 4)
    result.update(scores("model_before", plain, False))
    encoder = ProjectedModel(model, stored.shape[1])
    with_head = ModelEmbedder(encoder, tok, dim=stored.shape[1], max_len=loaded.max_seq_len)
    encoder.head.weight.data.copy_(least_squares_head(model, plain, [texts[r] for r in pick], stored[pick]))
    result.update(scores("model_linear_head", with_head, False))
    result.update(scores("model_on_memory_before", with_head, True))
    lora = LoRAConfig(enabled=True, r=args.lora_r, alpha=args.lora_alpha, dropout=0.0)
    t1 = time.time()
    r = distill(
        encoder, plain, [texts[i] for i in pick], stored[pick], lora, args.steps, args.lr, args.batch_size, args.seed
    )
    result["distill_seconds"] = round(time.time() - t1, 1)
    result.update(scores("model_after", with_head, False))
    result.update(scores("model_on_memory_after", with_head, True))
    result.update(
        l_mem_before=round(r.l_mem_before, 4),
        l_mem_after=round(r.l_mem_after, 4),
        documents=args.documents,
        distilled_documents=len(pick),
        memory_documents=len(doc_ids),
        n_queries=len(q_new),
        n_queries_old=len(q_old),
        memory_encoder=getattr(embedder, "name", type(embedder).__name__),
        steps=args.steps,
        seconds=round(time.time() - t0, 1),
    )
    if folder is not None:
        from aion_train.posttrain.common import save_tensors

        meta = {"r": args.lora_r, "alpha": args.lora_alpha, "checkpoint": args.checkpoint, "dim": stored.shape[1]}
        result["encoder"] = str(save_tensors(encoder_state(encoder), folder / "encoder.safetensors", meta))
    return result


def run(args) -> int:
    from aion_train.ownership import ForeignFolderError
    from aion_train.serve.loading import LoadError

    try:
        r = distill_memory(args)
    except (OSError, ValueError, LoadError, ForeignFolderError) as e:
        print(f"distill-memory: {e}", file=sys.stderr)
        return 1
    print(json.dumps(r) if args.json else "\n".join(f"{k}: {v}" for k, v in r.items()))
    return 0
