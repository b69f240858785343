"""configs/pipeline_rag_tiny.yaml end to end on a private Ray cluster, at a few steps per phase:
every phase runs, the SFT / PPO files the open-book-data phase writes are the ones the
post-training phases read, and the last line's three accuracies are those `aion-train eval
--task open-book` gives for the PPO model on the same index (same k, same questions)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from aion_train.config import load_config
from aion_train.retrieval import open_book as ob

pytest.importorskip("ray")
REPO = Path(__file__).resolve().parents[1]
pytestmark = [
    pytest.mark.slow,  # ~1 min: a Ray head, five phases, two of them 2-rank groups
    pytest.mark.skipif(not Path(ob.MAN_DIR, "man1").is_dir(), reason="needs the manual pages"),
]
LIMIT = 6
SYNTHETIC = 40  # made-up pages (the config has thousands)


def _cli(*args, timeout=900):
    p = subprocess.run(
        [sys.executable, "-m", "aion_train.cli", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout
    )
    assert p.returncode == 0, (p.stdout[-2000:], p.stderr[-3000:])
    return [json.loads(line) for line in p.stdout.strip().splitlines()]


def test_the_rag_pipeline_runs_and_reports_what_eval_reports(tmp_path):
    run = tmp_path / "run"
    data = run / "open-book-data"
    lines = _cli(
        "pipeline",
        "--config",
        "configs/pipeline_rag_tiny.yaml",
        f"run_dir={run}",
        "model.n_layers=2",
        "sft.base_steps=4",
        "sft.steps=2",
        "ppo.steps=1",
        "ppo.rollout_prompts=4",
        "ppo.eval_prompts=4",
        "ppo.max_new_tokens=4",
        "pipeline.index_embedder=hash-64",
        f"pipeline.open_book_eval_limit={LIMIT}",
        f"pipeline.open_book_synthetic_pages={SYNTHETIC}",
        "--json",
    )
    last = lines[-1]
    assert last["status"] == "ok", last
    assert [x["phase"] for x in lines[:-1]] == ["build-index", "open-book-data", "sft", "ppo", "eval-open-book"]
    train_pages, held = ob.split_pages(ob.read_man_pages())
    p = load_config("configs/pipeline_rag_tiny.yaml").pipeline
    fraction = p.open_book_ppo_fraction
    sft_pages, ppo_pages = ob.split_pages(train_pages, fraction, 1) if fraction else (train_pages, train_pages)
    sft_records = 3 * (len(sft_pages) + SYNTHETIC)
    assert last["open_book_sft_records"] == last["sft_examples"] == sft_records
    assert (data / "sft_train.jsonl").read_text().count("\n") == sft_records  # {run_dir} in sft.train_files
    assert last["open_book_ppo_prompts"] == 3 * len(ppo_pages)
    assert last["n"] == LIMIT and last["open_book_models"] == "sft,ppo"
    got = _cli(
        "eval",
        "--task",
        "open-book",
        "--checkpoint",
        str(run / "ppo"),
        "--index",
        str(run / "artifacts" / "build-index" / "index"),
        "--k",
        "2",
        "--limit",
        str(LIMIT),
        "--json",
    )[-1]
    for key in ("closed_book_accuracy", "open_book_accuracy", "after_ingest_accuracy"):
        assert last[key] == last[f"ppo_{key}"] == got[key], key
        assert 0.0 <= last[f"sft_{key}"] <= 1.0
