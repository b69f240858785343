"""`train-tokenizer` (bpe/unigram, reserved tokens, bad inputs named) and the perplexity
evaluation (against exp(mean token NLL) computed one window at a time, without batching)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

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


def write_corpus(d: Path) -> Path:
    """A JSONL file of Python's own documentation, one paragraph a line (field `content`)."""
    from pydoc_data.topics import topics

    with open(d / "corpus.jsonl", "w") as f:
        for name, text in sorted(topics.items()):
            for k, para in enumerate(text.split("\n\n")):
                if para.strip():
                    f.write(json.dumps({"id": f"{name}-{k}", "content": para}) + "\n")
    return d


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("byo"))


def reference_perplexity(model, tok, texts, seq_len) -> tuple[float, int]:
    """exp(mean NLL) one window at a time (no batching, no padding)."""
    nll, n = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = [tok.bos_id, *tok.encode(text), tok.eos_id]
            for s in range(0, len(ids) - 1, seq_len):
                w = torch.tensor([ids[s : s + seq_len + 1]])
                logp = F.log_softmax(model(input_ids=w[:, :-1]).logits.double(), -1)
                nll -= logp[0].gather(1, w[0, 1:, None]).sum().item()
                n += w.shape[1] - 1
    return math.exp(nll / n), n


def test_perplexity_matches_per_window_reference(corpus, tmp_path):
    from aion_train.config import ModelConfig
    from aion_train.data import Tokenizer, train_tokenizer
    from aion_train.eval.perplexity import perplexity
    from aion_train.model import build_model

    texts = [json.loads(line)["content"] for line in open(corpus / "corpus.jsonl")][:40]
    tok = Tokenizer(train_tokenizer(texts, str(tmp_path / "t.model"), 400))
    cfg = ModelConfig(vocab_size=400, d_model=32, n_layers=2, n_heads=2, d_ff=64, max_seq_len=48)
    cfg.moe.n_experts, cfg.moe.d_ff_expert = 4, 32
    model = build_model(cfg, seed=3).eval()
    got = perplexity(model, tok, texts[:12], seq_len=48, batch_size=5)  # ragged windows, padded batches
    ref, n = reference_perplexity(model, tok, texts[:12], 48)
    assert got["tokens"] == n == sum(len(tok.encode(t)) + 1 for t in texts[:12])
    assert got["perplexity"] == pytest.approx(ref, rel=1e-5) and got["loss"] == pytest.approx(math.log(ref), rel=1e-5)
    assert 100 < got["perplexity"] < 1000  # an untrained model: near uniform over 400 ids


def test_unigram_and_errors(corpus, tmp_path, capsys):
    from aion_train import cli as aion_cli
    from aion_train.data import Tokenizer

    out = tmp_path / "u.model"
    argv = ["train-tokenizer", "--from", str(corpus / "corpus.jsonl"), "--text-field", "content"]
    assert aion_cli.main([*argv, "--out", str(out), "--vocab-size", "600", "--model-type", "unigram"]) == 0
    tok = Tokenizer(str(out))
    assert tok.vocab_size == 600 and tok.decode(tok.encode("x = [1, 2]  # ok")) == "x = [1, 2]  # ok"
    assert aion_cli.main([*argv, "--out", str(out), "--vocab-size", "600"]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert aion_cli.main([*argv[:3], "--out", str(tmp_path / "v.model"), "--vocab-size", "600"]) == 1
    assert "no field 'text'" in capsys.readouterr().err
