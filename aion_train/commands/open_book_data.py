"""aion-train open-book-data --index DIR --out DIR [--noise N] [--held-out-fraction X] [--split-seed S] [--ppo-fraction P]:
the open-book task's training files from the man-page documents (retrieval/open_book.py):
`sft_train.jsonl` (chat records: the question's own document and N retrieved distractors in the
`<CTX>` block, the answer as the assistant turn), `ppo_prompts.jsonl` (the same prompts with
their `answer`, for `ppo.reward=aion_train.posttrain.rewards:exact_match`) and
`held_out.jsonl` (the held-out questions, never trained on). With `--ppo-fraction P` that share
of the training pages is kept out of SFT and gives the PPO prompts alone: PPO then learns on
documents the SFT model has not memorised (on its own SFT prompts it already earns ~0.95 of the
reward), which is the held-out situation it is evaluated in. With `--synthetic-pages N`, SFT also
learns N made-up pages recombined from its own (`open_book.synthetic_pages`), whose answers are
in the block and nowhere else."""

from __future__ import annotations

import json
import random
import sys

from .output_dirs import add_overwrite_argument


def add_arguments(p):
    p.add_argument("--index", required=True, help="the task's index (build-index --corpus open-book)")
    p.add_argument("--out", required=True, help="folder to write (refused if another program's, unless --overwrite)")
    p.add_argument("--noise", type=int, default=2, help="distractor chunks per question")
    p.add_argument("--held-out-fraction", type=float, default=0.2)
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--ppo-fraction", type=float, default=0.0, help="training pages kept out of SFT for PPO")
    p.add_argument(
        "--synthetic-pages",
        type=int,
        default=0,
        help="made-up pages recombined from the SFT pages, answerable only from the block (retrieval/open_book.py)",
    )
    p.add_argument("--json", action="store_true", help="print the counts as one JSON line")
    add_overwrite_argument(p)


def _jsonl(records) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def first_chunk(index: str):
    """page -> the first chunk of its document as the index chunked it (manifest.json)."""
    from aion_train.eval.open_book import index_chunking
    from aion_train.retrieval.chunking import chunk_text

    chunking = index_chunking(index)

    def own(page) -> str:
        return chunk_text(page.document(), chunking["chunk_chars"], chunking["overlap"])[0][1]

    return own


def write_open_book_files(
    index: str,
    out: str,
    noise: int = 2,
    fraction: float = 0.2,
    seed: int = 0,
    overwrite=False,
    ppo_fraction=0.0,
    synthetic_pages=0,
):
    from aion_train.fsutil import atomic_write_text
    from aion_train.ownership import claim_dir
    from aion_train.retrieval import open_book
    from aion_train.retrieval.open_book import iter_examples, read_man_pages, sft_records, split_pages
    from aion_train.retrieval.store import Retriever

    if noise < 0:
        raise ValueError(f"--noise {noise}: must be >= 0")
    if not 0.0 <= ppo_fraction < 1.0:
        raise ValueError(f"--ppo-fraction {ppo_fraction}: must be in [0, 1)")
    if synthetic_pages < 0:
        raise ValueError(f"--synthetic-pages {synthetic_pages}: must be >= 0")
    folder = claim_dir(out, "open-book-data", overwrite)
    trained, held = split_pages(read_man_pages(), fraction, seed)
    sft_pages, ppo_pages = split_pages(trained, ppo_fraction, seed + 1) if ppo_fraction else (trained, trained)
    retriever = Retriever(index)
    held_ids = frozenset(p.doc_id for p in held)

    def search(question: str):
        return [(h.source, h.text) for h in retriever.search(question, k=2 * noise + 4)]

    own = first_chunk(index)
    real = sft_records(sft_pages, search, noise, seed, exclude=held_ids, own_text=own)
    made_up = open_book.synthetic_pages(sft_pages, synthetic_pages, seed, avoid=[p.name for p in (*trained, *held)])
    # a made-up page's distractors: random SFT pages' chunks (an index search per made-up question
    # would cost more than their SFT steps)
    pool = [(p.doc_id, own(p)) for p in sft_pages]
    pick = random.Random(f"distractors:{seed}")
    sft = real + sft_records(made_up, lambda q: pick.sample(pool, noise), noise, seed + 2, held_ids, own)
    ppo_records = real if ppo_pages is trained else sft_records(ppo_pages, search, noise, seed, held_ids, own)
    ppo = [{"prompt": r["messages"][0]["content"], "answer": r["messages"][1]["content"]} for r in ppo_records]
    held_q = [
        {"doc_id": e.doc_id, "question": e.question, "answer": e.answer, "kind": e.kind} for e in iter_examples(held)
    ]
    for name, records in (("sft_train.jsonl", sft), ("ppo_prompts.jsonl", ppo), ("held_out.jsonl", held_q)):
        atomic_write_text(folder / name, _jsonl(records))
    return {
        "out": str(folder),
        "sft_records": len(sft),
        "ppo_prompts": len(ppo),
        "held_out_questions": len(held_q),
        "train_documents": len(trained),
        "sft_documents": len(sft_pages),
        "synthetic_documents": len(made_up),
        "ppo_documents": len(ppo_pages),
        "held_out_documents": len(held),
    }


def run(args) -> int:
    from aion_train.ownership import ForeignFolderError

    try:
        r = write_open_book_files(
            args.index,
            args.out,
            args.noise,
            args.held_out_fraction,
            args.split_seed,
            args.overwrite,
            args.ppo_fraction,
            args.synthetic_pages,
        )
    except (OSError, ValueError, ForeignFolderError) as e:
        print(f"open-book-data: {e}", file=sys.stderr)
        return 1
    print(json.dumps(r) if args.json else "\n".join(f"{k}: {v}" for k, v in r.items()))
    return 0
