"""The open-book phases of the pipeline (configs/pipeline_rag_tiny.yaml).

`open-book-data` writes the task's SFT records, PPO prompts and held-out questions from the
index the build-index phase wrote (`aion-train open-book-data`'s library function), so that
`sft.train_files` / `ppo.prompt_files` can name them. `eval-open-book` evaluates the models of
`pipeline.open_book_models` (the sft and ppo phases' outputs) on the held-out questions,
closed-book, open-book (the same index) and after the held-out documents are ingested into a
continual memory (`aion-train eval --task open-book`'s library function); its done.json carries
each model's three accuracies prefixed by its phase and, unprefixed, those of the last one.
"""

from __future__ import annotations

import sys
import tempfile
import time

from aion_train.config.pipeline_schema import BUILTIN

from .artifacts import _single_process, _write_done


def _index_dir(cfg) -> str:
    path = BUILTIN["build-index"].out_dir(cfg.run_dir) / "index"
    if not (path / "manifest.json").is_file():
        raise FileNotFoundError(f"{path}: no index (the build-index phase of pipeline.index_corpus: [open-book] first)")
    return str(path)


def run_open_book_data(cfg) -> dict:
    from aion_train.commands.open_book_data import write_open_book_files

    _single_process("open-book-data")
    p = cfg.pipeline
    out = BUILTIN["open-book-data"].out_dir(cfg.run_dir)
    m = write_open_book_files(
        _index_dir(cfg),
        str(out),
        noise=p.open_book_noise,
        fraction=p.open_book_held_out_fraction,
        seed=p.open_book_split_seed,
        overwrite=True,  # the phase's own folder: rerun when it has no done.json
        ppo_fraction=p.open_book_ppo_fraction,
        synthetic_pages=p.open_book_synthetic_pages,
    )
    print(f"open-book-data: {m}", file=sys.stderr)
    return _write_done("open-book-data", cfg, {f"open_book_{k}": v for k, v in m.items() if k != "out"})


def run_eval_open_book(cfg) -> dict:
    from aion_train.eval.open_book import evaluate_open_book, index_chunking, index_search, ingested_memory_search
    from aion_train.retrieval.open_book import iter_examples, read_man_pages, split_pages
    from aion_train.serve.loading import load_for_serving

    _single_process("eval-open-book")
    p = cfg.pipeline
    t0 = time.time()
    index = _index_dir(cfg)
    trained, held = split_pages(read_man_pages(), p.open_book_held_out_fraction, p.open_book_split_seed)
    examples = list(iter_examples(held))
    if p.open_book_eval_limit:
        examples = examples[: p.open_book_eval_limit]
    open_search, embedder = index_search(index, p.open_book_k)
    models = [m for m in p.open_book_models if m in p.phases]
    if not models:
        raise ValueError(f"pipeline.open_book_models={p.open_book_models}: none of them is in pipeline.phases")
    metrics: dict = {}
    with tempfile.TemporaryDirectory(prefix="aion-open-book-memory-") as tmp:
        memory_search = ingested_memory_search(tmp, embedder, trained, held, p.open_book_k, index_chunking(index))
        for name in models:
            loaded = load_for_serving(str(BUILTIN[name].out_dir(cfg.run_dir)))
            r = evaluate_open_book(
                loaded.model, loaded.tokenizer, loaded.chat, loaded.eos_ids, examples, open_search, memory_search
            )
            print(f"eval-open-book {name}: {r}", file=sys.stderr)
            metrics.update({f"{name}_{k}": v for k, v in r.items() if k != "n"})
            metrics.update(r)  # the last model's, unprefixed
    metrics["open_book_models"] = ",".join(models)
    metrics["eval_open_book_seconds"] = round(time.time() - t0, 1)
    return _write_done("eval-open-book", cfg, metrics)
