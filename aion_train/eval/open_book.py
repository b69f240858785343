"""Open-book evaluation: held-out questions about documents the model never trained on,
answered closed-book (the question alone), open-book (the `<CTX>` block from the index) and
after-ingest (the documents added to a continual memory after training, no retraining).

A prediction is the greedy continuation up to its first line break, checked against the answer
written in the document (`retrieval.open_book.is_correct`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from aion_train.retrieval.open_book import Example, is_correct, open_book_prompt

MAX_NEW_TOKENS = 48  # the longest answer (a description of 80 characters) is ~35 task-tokenizer tokens

Search = Callable[[str], list[str]]  # question -> retrieved chunk texts, best first


def prompt_ids(text: str, tokenizer, chat: bool) -> list[int]:
    if chat:
        from aion_train.posttrain.chat_template import render_chat

        return render_chat([{"role": "user", "content": text}], tokenizer)
    return [int(tokenizer.bos_id), *tokenizer.encode(text)]


@torch.no_grad()
def greedy_answers(model, tokenizer, prompts: Sequence[list[int]], eos_ids, max_new: int = MAX_NEW_TOKENS) -> list[str]:
    """Greedy continuation of every prompt (one at a time: no padding to reason about), up to
    the first of `eos_ids` and cut at its first line break."""
    from aion_train.model.generate import generate

    out = []
    max_len = int(model.cfg.max_seq_len)
    for ids in prompts:
        ids = ids[-(max_len - max_new) :]
        x = torch.tensor([ids], dtype=torch.long)
        y = generate(model, x, max_new, eos_id=tuple(eos_ids) or None)[0, len(ids) :].tolist()
        stop = next((i for i, t in enumerate(y) if t in eos_ids), len(y))
        text = tokenizer.decode(y[:stop])
        out.append(text.strip().split("\n", 1)[0])
    return out


def accuracy(model, tokenizer, chat: bool, eos_ids, examples: Sequence[Example], search: Search | None) -> dict:
    texts = [open_book_prompt(e.question, search(e.question) if search else ()) for e in examples]
    preds = greedy_answers(model, tokenizer, [prompt_ids(t, tokenizer, chat) for t in texts], set(eos_ids))
    right = [is_correct(p, e.answer) for p, e in zip(preds, examples)]
    return {"accuracy": sum(right) / max(1, len(right)), "predictions": preds, "correct": right}


def evaluate_open_book(
    model, tokenizer, chat: bool, eos_ids, examples: Sequence[Example], open_search: Search, memory_search: Search
) -> dict:
    """The three accuracies on the same held-out examples."""
    closed = accuracy(model, tokenizer, chat, eos_ids, examples, None)
    opened = accuracy(model, tokenizer, chat, eos_ids, examples, open_search)
    after = accuracy(model, tokenizer, chat, eos_ids, examples, memory_search)
    return {
        "closed_book_accuracy": round(closed["accuracy"], 4),
        "open_book_accuracy": round(opened["accuracy"], 4),
        "after_ingest_accuracy": round(after["accuracy"], 4),
        "open_book_accuracy_by_kind": by_kind(examples, opened["correct"]),
        "n": len(examples),
    }


def by_kind(examples: Sequence[Example], correct: Sequence[bool]) -> dict:
    """Accuracy per question kind (description / section / package)."""
    totals: dict = {}
    for e, ok in zip(examples, correct):
        n, r = totals.get(e.kind, (0, 0))
        totals[e.kind] = (n + 1, r + int(ok))
    return {k: round(r / n, 4) for k, (n, r) in sorted(totals.items())}


def index_search(index_dir: str, k: int) -> tuple[Search, object]:
    """Hybrid search over an index folder (`build-index --corpus open-book`); also its embedder."""
    from aion_train.retrieval.store import Retriever

    retriever = Retriever(index_dir)
    return (lambda q: [h.text for h in retriever.search(q, k=k)]), retriever.embedder


def index_chunking(index_dir: str) -> dict:
    """How the index chunked its documents (its manifest's `chunking`)."""
    import json

    with open(f"{index_dir}/manifest.json", encoding="utf-8") as f:
        return json.load(f)["chunking"]


def _chunks(trained, ingested, chunking: dict | None) -> tuple[list, list]:
    """(id, text) of every document of each group, cut as the index cut them (`chunk_documents`
    over all of them, duplicates dropped as the index drops them; whole documents without
    `chunking`). A chunk's id is `doc_id@start`."""
    from aion_train.retrieval.chunking import chunk_documents
    from aion_train.retrieval.open_book import task_documents

    docs = task_documents([*trained, *ingested])
    if chunking is None:
        pieces = [(d.source, d.source, d.text) for d in docs]
    else:
        cut = chunk_documents(docs, chunking["chunk_chars"], chunking["overlap"], chunking.get("max_chunks_per_doc"))
        pieces = [(c.source, f"{c.source}@{c.start}", c.text) for c in cut]
    later = {p.doc_id for p in ingested}
    return [(i, t) for s, i, t in pieces if s not in later], [(i, t) for s, i, t in pieces if s in later]


def ingested_memory(folder: str, embedder, trained, ingested, chunking: dict | None = None, reservoir_k: int = 1024):
    """A continual memory holding the training documents, then `ingested` added through the
    background ingestor after training (the write-ahead-logged path); with `chunking`
    (index_chunking) the memory holds the chunks the index holds; its replay reservoir keeps
    `reservoir_k` chunk ids of that stream."""
    from aion_train.retrieval.continual import ContinualIndex

    first, later = _chunks(trained, ingested, chunking)
    memory = ContinualIndex(folder, embedder=embedder, reservoir_k=reservoir_k)
    memory.put_many([(i, t, None) for i, t in first])
    ingestor = memory.start_ingestion()
    tickets = [ingestor.submit(i, t) for i, t in later]
    for t in tickets:
        t.wait(timeout=600)
    ingestor.stop()
    return memory


def ingested_memory_search(folder: str, embedder, trained, ingested, k: int, chunking: dict | None = None) -> Search:
    """`ingested_memory`, searched densely (top k chunk texts)."""
    memory = ingested_memory(folder, embedder, trained, ingested, chunking)
    return lambda q: [h.text for h in memory.search(q, k=k)]
