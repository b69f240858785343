"""aion-train continual-finetune --checkpoint C --index DIR [--steps N] [--replay-fraction F] [--reservoir K] --json:
the open-book task's held-out ("new") pages are ingested into a continual memory after the
training pages, then LoRA adapters on the checkpoint learn them (aion_train.posttrain.
continual_finetune), twice from the same weights: without replay, and with `--replay-fraction` of
every batch drawn from the memory's reservoir (`--reservoir` ids over the stream). Prints, before
and after each run, the old (training) pages' open-book accuracy and the new pages' closed- and
open-book accuracy on `--old-questions` / `--new-questions` of their questions, and
`forgetting_*` = old open-book accuracy before - after."""

from __future__ import annotations

import copy
import json
import sys


def add_arguments(p):
    p.add_argument("--checkpoint", required=True, help="an sft / ppo run folder of the open-book task")
    p.add_argument("--index", required=True, help="the task's index (build-index --corpus open-book)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--replay-fraction", type=float, default=0.5)
    p.add_argument("--reservoir", type=int, default=256, help="reservoir size (document chunks)")
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--lora-alpha", type=float, default=16.0)
    p.add_argument("--noise", type=int, default=1, help="distractor chunks in the training blocks")
    p.add_argument("--k", type=int, default=2, help="retrieved chunks per evaluated question")
    p.add_argument("--old-questions", type=int, default=300)
    p.add_argument("--new-questions", type=int, default=300)
    p.add_argument("--held-out-fraction", type=float, default=0.2)
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON line")


def continual_finetune(args) -> dict:
    import random
    import tempfile
    import time

    from aion_train.commands.open_book_data import first_chunk
    from aion_train.config.posttrain_schema import LoRAConfig
    from aion_train.eval.open_book import accuracy, index_chunking, index_search, ingested_memory
    from aion_train.posttrain.continual_finetune import fine_tune, page_conversations, render
    from aion_train.retrieval.open_book import iter_examples, read_man_pages, split_pages
    from aion_train.serve.loading import load_for_serving

    if args.steps < 1:
        raise ValueError(f"--steps {args.steps}: must be >= 1")
    t0 = time.time()
    loaded = load_for_serving(args.checkpoint)
    if not loaded.chat:
        raise ValueError(f"{args.checkpoint}: not a post-trained (chat) checkpoint")
    tok, base = loaded.tokenizer, loaded.model.float()
    trained, held = split_pages(read_man_pages(), args.held_out_fraction, args.split_seed)
    open_search, embedder = index_search(args.index, args.k)
    from aion_train.retrieval.store import Retriever

    retriever = Retriever(args.index)
    held_ids = frozenset(p.doc_id for p in held)

    def distractors(question: str):
        return [(h.source, h.text) for h in retriever.search(question, k=2 * args.noise + 4)]

    own = first_chunk(args.index)
    page_of = {p.doc_id: p for p in [*trained, *held]}
    cache: dict = {}

    def records_of(page):
        if page.doc_id not in cache:
            cache[page.doc_id] = render(
                page_conversations(page, distractors, args.noise, args.seed, own), tok, loaded.max_seq_len
            )
        return cache[page.doc_id]

    new = [r for p in held for r in records_of(p)]
    old_q = list(iter_examples(trained))[: args.old_questions]
    new_q = list(iter_examples(held))[: args.new_questions]

    def measure(model) -> dict:
        acc = lambda qs, search: accuracy(model, tok, True, loaded.eos_ids, qs, search)["accuracy"]  # noqa: E731
        return {
            "old_open_book": round(acc(old_q, open_search), 4),
            "new_closed_book": round(acc(new_q, None), 4),
            "new_open_book": round(acc(new_q, open_search), 4),
        }

    result = {f"{k}_before": v for k, v in measure(base).items()}
    lora = LoRAConfig(enabled=True, r=args.lora_r, alpha=args.lora_alpha, dropout=0.0)
    with tempfile.TemporaryDirectory(prefix="aion-continual-") as tmp:
        memory = ingested_memory(tmp, embedder, trained, held, index_chunking(args.index), args.reservoir)
        rng = random.Random(args.seed + 1)
        drawn = {"new": 0, "old": 0}

        def replay(m: int):
            out = []
            for chunk_id, _ in memory.replay_sample(m):
                doc = chunk_id.rsplit("@", 1)[0]
                drawn["new" if doc in held_ids else "old"] += 1
                out.append(rng.choice(records_of(page_of[doc])))
            return out

        for name, fn in (("no_replay", None), ("replay", replay)):
            model = copy.deepcopy(base)
            t1 = time.time()
            losses = fine_tune(
                model, tok, new, fn, lora, args.steps, args.lr, args.batch_size, args.replay_fraction, args.seed
            )
            result[f"train_seconds_{name}"] = round(time.time() - t1, 1)
            result[f"loss_last_{name}"] = round(sum(losses[-10:]) / len(losses[-10:]), 4)
            result.update({f"{k}_after_{name}": v for k, v in measure(model).items()})
            del model
        stats = memory.stats()
        memory.close()
    for name in ("no_replay", "replay"):
        result[f"forgetting_{name}"] = round(result["old_open_book_before"] - result[f"old_open_book_after_{name}"], 4)
    result.update(
        replay_fraction=args.replay_fraction,
        reservoir=stats["replay_buffer"],
        stream_seen=stats["stream_seen"],
        replay_drawn_old=drawn["old"],
        replay_drawn_new=drawn["new"],
        new_records=len(new),
        n_old=len(old_q),
        n_new=len(new_q),
        steps=args.steps,
        seconds=round(time.time() - t0, 1),
    )
    return result


def run(args) -> int:
    from aion_train.serve.loading import LoadError

    try:
        r = continual_finetune(args)
    except (OSError, ValueError, LoadError) as e:
        print(f"continual-finetune: {e}", file=sys.stderr)
        return 1
    print(json.dumps(r) if args.json else "\n".join(f"{k}: {v}" for k, v in r.items()))
    return 0
