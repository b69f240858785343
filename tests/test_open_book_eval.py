"""eval --task open-book on a checkpoint trained here: the three accuracies from the command,
and the predictions behind them equal a greedy loop written out over the model's full forward."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from aion_train.retrieval import open_book as ob

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not Path(ob.MAN_DIR, "man1").is_dir(), reason="needs the manual pages")


def _cli(*args, timeout=300):
    p = subprocess.run(
        [sys.executable, "-m", "aion_train.cli", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout
    )
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("open_book")
    _cli(
        "pretrain",
        "train.steps=4",
        "train.eval_every=4",
        "train.save_every=4",
        "data.micro_batch_size=2",
        f"run_dir={root / 'pt'}",
        "--json",
    )
    _cli("build-index", "--corpus", "open-book", "--out", str(root / "idx"), "--embedder", "hash-64", "--json")
    return root


def test_command_reports_the_three_accuracies(trained):
    r = _cli(
        "eval",
        "--task",
        "open-book",
        "--checkpoint",
        str(trained / "pt"),
        "--index",
        str(trained / "idx"),
        "--limit",
        "6",
        "--json",
    )
    assert r["task"] == "open-book" and r["n"] == 6
    for key in ("closed_book_accuracy", "open_book_accuracy", "after_ingest_accuracy"):
        assert 0.0 <= r[key] <= 1.0 and r[key] * 6 == pytest.approx(round(r[key] * 6), abs=1e-3), key
    kinds = [e.kind for e in list(ob.iter_examples(ob.split_pages(ob.read_man_pages())[1]))[:6]]
    by_kind = r["open_book_accuracy_by_kind"]
    assert set(by_kind) == set(kinds)
    right = sum(by_kind[k] * kinds.count(k) for k in by_kind)
    assert right == pytest.approx(r["open_book_accuracy"] * 6, abs=1e-3)


def test_predictions_are_the_models_greedy_answers(trained):
    from aion_train.eval.open_book import MAX_NEW_TOKENS, accuracy, index_search, prompt_ids
    from aion_train.retrieval.open_book import open_book_prompt
    from aion_train.serve.loading import load_for_serving

    loaded = load_for_serving(str(trained / "pt"))
    _, held = ob.split_pages(ob.read_man_pages())
    examples = list(ob.iter_examples(held))[:3]
    search, _ = index_search(str(trained / "idx"), 2)
    got = accuracy(loaded.model, loaded.tokenizer, loaded.chat, loaded.eos_ids, examples, search)
    for e, pred, right in zip(examples, got["predictions"], got["correct"]):
        chunks = search(e.question)
        text = open_book_prompt(e.question, chunks)
        assert text.startswith("<CTX> ") and " </CTX> " + e.question in text and text.endswith("\nAnswer:")
        ids = prompt_ids(text, loaded.tokenizer, loaded.chat)
        ids = ids[-(loaded.model.cfg.max_seq_len - MAX_NEW_TOKENS) :]  # the prompt's tail that leaves room
        out = []
        with torch.no_grad():  # no KV cache: the whole sequence through the model every step
            for _ in range(MAX_NEW_TOKENS):
                nxt = int(loaded.model(torch.tensor([ids + out])).logits[0, -1].argmax())
                if nxt in loaded.eos_ids:
                    break
                out.append(nxt)
        expect = loaded.tokenizer.decode(out).strip().split("\n", 1)[0]
        assert pred == expect
        assert right == ob.is_correct(expect, e.answer)


def test_training_files_hold_the_own_document_and_distractors_never_held_out(trained, tmp_path):
    r = _cli("open-book-data", "--index", str(trained / "idx"), "--out", str(tmp_path / "d"), "--noise", "2", "--json")
    train_pages, held = ob.split_pages(ob.read_man_pages())
    assert r["sft_records"] == 3 * len(train_pages) and r["held_out_questions"] == 3 * len(held)
    sft = [json.loads(line) for line in (tmp_path / "d" / "sft_train.jsonl").read_text().splitlines()]
    ppo = [json.loads(line) for line in (tmp_path / "d" / "ppo_prompts.jsonl").read_text().splitlines()]
    held_heads = [p.document()[:80] for p in held]
    by_question = {e.question: (p, e) for p in train_pages for e in ob.examples_of(p)}
    first_chunk = {}  # the index's first chunk of every document: what retrieval gives at inference
    for line in (trained / "idx" / "chunks.jsonl").read_text().splitlines():
        c = json.loads(line)
        first_chunk.setdefault(c["source"], c["text"])
    cut = 0
    for rec, prompt in zip(sft, ppo):
        user, answer = rec["messages"][0]["content"], rec["messages"][1]["content"]
        question = user.split(" </CTX> ", 1)[1][: -len(ob.ANSWER_CUE)]
        page, example = by_question[question]
        own = first_chunk[page.doc_id]
        assert answer == example.answer and own in user and page.document().startswith(own[:60])
        cut += own != page.document()
        assert user.count("\n\n") == 2  # the own document and two distractors
        assert not any(h in user for h in held_heads)
        assert prompt == {"prompt": user, "answer": answer}
    assert cut > 0  # some documents are longer than one chunk: the prompt holds the chunk, not the page


def test_ppo_fraction_keeps_a_seeded_share_of_the_training_pages_out_of_sft(trained, tmp_path):
    idx, out = str(trained / "idx"), str(tmp_path / "d")
    r = _cli("open-book-data", "--index", idx, "--out", out, "--noise", "1", "--ppo-fraction", "0.3", "--json")
    train_pages, held = ob.split_pages(ob.read_man_pages())
    sft_pages, ppo_pages = ob.split_pages(train_pages, 0.3, 1)  # the split seed + 1
    assert (r["sft_documents"], r["ppo_documents"]) == (len(sft_pages), len(ppo_pages))
    assert 0.2 < len(ppo_pages) / len(train_pages) < 0.4
    assert r["sft_records"] == 3 * len(sft_pages) and r["ppo_prompts"] == 3 * len(ppo_pages)

    def questions(name, key):
        lines = (tmp_path / "d" / name).read_text().splitlines()
        return {key(json.loads(x)).split(" </CTX> ", 1)[1][: -len(ob.ANSWER_CUE)] for x in lines}

    sft_q = questions("sft_train.jsonl", lambda x: x["messages"][0]["content"])
    ppo_q = questions("ppo_prompts.jsonl", lambda x: x["prompt"])
    assert sft_q == {e.question for e in ob.iter_examples(sft_pages)}
    assert ppo_q == {e.question for e in ob.iter_examples(ppo_pages)}
    assert not sft_q & ppo_q
    p = subprocess.run(
        [sys.executable, "-m", "aion_train.cli", "open-book-data", "--index", idx, "--out", str(tmp_path / "e")]
        + ["--ppo-fraction", "1.0"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 1 and "--ppo-fraction 1.0: must be in [0, 1)" in p.stderr
    held_rows = [json.loads(line) for line in (tmp_path / "d" / "held_out.jsonl").read_text().splitlines()]
    assert {row["doc_id"] for row in held_rows} == {p.doc_id for p in held}


def test_synthetic_pages_are_added_to_sft_only(trained, tmp_path):
    idx, out = str(trained / "idx"), str(tmp_path / "d")
    r = _cli("open-book-data", "--index", idx, "--out", out, "--noise", "1", "--synthetic-pages", "40", "--json")
    train_pages, held = ob.split_pages(ob.read_man_pages())
    made = ob.synthetic_pages(train_pages, 40, 0, avoid=[p.name for p in (*train_pages, *held)])
    assert r["synthetic_documents"] == 40 and r["sft_records"] == 3 * (len(train_pages) + 40)
    assert r["ppo_prompts"] == 3 * len(train_pages)
    rows = [json.loads(x) for x in (tmp_path / "d" / "sft_train.jsonl").read_text().splitlines()]
    synthetic = rows[3 * len(train_pages) :]
    for row, e in zip(synthetic, ob.iter_examples(made)):
        user, answer = row["messages"][0]["content"], row["messages"][1]["content"]
        assert user.endswith(e.question + ob.ANSWER_CUE) and answer == e.answer
        name = e.doc_id[len("man:") :].rsplit(".", 1)[0]
        assert f"{name}(" in user.split(" </CTX> ")[0]  # its own document is in the block
    ppo = [json.loads(x)["prompt"] for x in (tmp_path / "d" / "ppo_prompts.jsonl").read_text().splitlines()]
    questions = {e.question for e in ob.iter_examples(made)}
    assert not any(p.endswith(q + ob.ANSWER_CUE) for p in ppo for q in questions)


def test_training_files_refuse_a_foreign_folder(trained, tmp_path):
    (tmp_path / "mine.txt").write_text("keep")
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "aion_train.cli",
            "open-book-data",
            "--index",
            str(trained / "idx"),
            "--out",
            str(tmp_path),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert p.returncode == 1 and "--overwrite" in p.stderr and str(tmp_path) in p.stderr
    assert (tmp_path / "mine.txt").read_text() == "keep"


def test_the_memory_after_ingest_holds_the_chunks_the_index_holds(trained, tmp_path):
    """After ingest, the continual memory holds every document cut as the index cut it (so
    open-book and after-ingest prompts are made of the same pieces), the held-out documents'
    chunks arrived through the ingestor."""
    from aion_train.eval.open_book import index_chunking, index_search, ingested_memory_search
    from aion_train.retrieval.continual import ContinualIndex

    train_pages, held = ob.split_pages(ob.read_man_pages())
    _, embedder = index_search(str(trained / "idx"), 2)
    chunking = index_chunking(str(trained / "idx"))
    assert chunking["chunk_chars"] == 400
    ingested_memory_search(str(tmp_path / "mem"), embedder, train_pages, held, 2, chunking)
    memory = ContinualIndex(str(tmp_path / "mem"), embedder=embedder)
    index_chunks = [json.loads(line) for line in (trained / "idx" / "chunks.jsonl").read_text().splitlines()]
    expect = {f"{c['source']}@{c['start']}": c["text"] for c in index_chunks}
    stored = {doc: memory.get(doc)["text"] for doc in list(memory.docs)}
    assert stored == expect and len(expect) > len(train_pages) + len(held)  # longer pages: several chunks
