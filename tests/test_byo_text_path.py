"""Bring your own text (issue 17, first bar): `make-shards --from` a JSONL file, `train-tokenizer`
on it, `pretrain` 20 steps on those shards with that tokenizer, `eval --task perplexity`; each
exits 0. The perplexity is checked against exp(mean token NLL) computed here one window at a
time, and the tokenizer's reserved tokens are checked."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_train_tokenizer_eval import reference_perplexity, write_corpus

REPO = Path(__file__).resolve().parents[1]


def cli(*args, timeout=600) -> str:
    env = dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true", PYTHONPATH=str(REPO))
    env.pop("MLFLOW_TRACKING_URI", None)
    p = subprocess.run(
        [sys.executable, "-m", "aion_train.cli", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )
    assert p.returncode == 0, f"{args[0]} exited {p.returncode}\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}"
    return p.stdout


def last_json(out: str) -> dict:
    return json.loads([line for line in out.splitlines() if line.startswith("{")][-1])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("byo"))


@pytest.mark.slow
def test_jsonl_to_shards_tokenizer_pretrain_perplexity(corpus, tmp_path):
    shards, tok_path, run = tmp_path / "shards", tmp_path / "tok.model", tmp_path / "run"
    out = cli(
        "make-shards", "--from", str(corpus / "corpus.jsonl"), "--out", str(shards), "--text-field", "content",
        "--val-fraction", "0.1", "--samples-per-shard", "256", "--verify",
    )  # fmt: skip
    paras = [json.loads(line)["content"].strip() for line in open(corpus / "corpus.jsonl")]
    assert f"-> {len(set(paras))} documents ({len(paras) - len(set(paras))} duplicates" in out and "sha256: ok" in out
    tk = last_json(
        cli("train-tokenizer", "--from", str(shards), "--out", str(tok_path), "--vocab-size", "1024", "--json")
    )
    assert tk["vocab_size"] == 1024 and tk["texts"] > 500

    from aion_train.data import Tokenizer

    tok = Tokenizer(str(tok_path))
    assert [tok.id_to_piece(i) for i in range(4)] == ["<pad>", "<unk>", "<s>", "</s>"]
    assert tok.encode("before<CTX>after").count(tok.special_id("<CTX>")) == 1
    user = tok.special_id("<|user|>")  # reserved, but no text encodes to it
    assert user not in tok.encode("<|user|> hi") and tok.decode(tok.encode("<|user|> hi")) == "<|user|> hi"

    summary = last_json(
        cli(
            "pretrain",
            "--config",
            "configs/tiny_cpu.yaml",
            f"run_dir={run}",
            "model.vocab_size=1024",
            f"data.train_shards={shards}/train-*.tar",
            f"data.val_shards={shards}/val-*.tar",
            f"data.tokenizer={tok_path}",
            "train.steps=20",
            "train.warmup_steps=2",
            "train.eval_every=10",
            "train.save_every=20",
            "train.eval_batches=4",
            "data.micro_batch_size=4",
            "--json",
        )  # fmt: skip
    )
    assert summary["final_step"] == 20 and summary["final_val_ppl"] < summary["initial_val_ppl"]

    ev = last_json(cli("eval", "--task", "perplexity", "--checkpoint", str(run), "--data", str(shards), "--json"))
    assert set(ev) >= {"perplexity", "tokens", "loss"}
    assert ev["perplexity"] == pytest.approx(math.exp(ev["loss"]), rel=1e-9)

    from aion_train.data.corpus_texts import iter_texts
    from aion_train.eval.loading import load_trained_model

    model, cfg = load_trained_model(str(run))
    ref, n = reference_perplexity(model, tok, iter_texts([str(shards)], "val"), cfg.model.max_seq_len)
    assert ev["tokens"] == n and ev["perplexity"] == pytest.approx(ref, rel=1e-4)
    assert ev["perplexity"] < 1024 / 2  # it learned something in 20 steps (uniform is 1024)
    # a JSONL file as --data gives the same numbers as the shards of the same documents
    val_file = tmp_path / "val.jsonl"
    val_file.write_text("".join(json.dumps({"t": t}) + "\n" for t in iter_texts([str(shards)], "val")))
    ev2 = last_json(
        cli(
            "eval",
            "--task",
            "perplexity",
            "--checkpoint",
            str(run),
            "--data",
            str(val_file),
            "--text-field",
            "t",
            "--json",
        )
    )
    assert ev2["tokens"] == ev["tokens"] and ev2["loss"] == pytest.approx(ev["loss"], rel=1e-6)
