"""`generate` and `serve` on a run trained with a Hugging Face tokenizer.json: make-shards from a
JSONL file, pretrain a few steps with `data.tokenizer=tokenizer.json`, then the run's tokenizer is
found from its config.yaml; the greedy tokens equal our model's argmax continuation of the
tokenizer's ids and the text is the tokenizer's own decoding."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

tokenizers = pytest.importorskip("tokenizers")

REPO = Path(__file__).resolve().parents[1]
V = 320


def make_hf_tokenizer(out: Path, texts: list[str]) -> Path:
    """A byte-level BPE tokenizer.json (as Llama 3 / Qwen2 ship theirs) with bos/eos named in
    tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=V, special_tokens=["<pad>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tk.train_from_iterator(texts, trainer)
    out.mkdir(parents=True, exist_ok=True)
    tk.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"})
    )
    return out / "tokenizer.json"


def corpus() -> list[str]:
    from pydoc_data.topics import topics

    paras = [p.strip() for t in list(topics.values())[:40] for p in t.split("\n\n") if len(p.strip()) > 40]
    return paras[:400]


@pytest.mark.slow
def test_generate_and_serve_a_run_trained_with_a_tokenizer_json(tmp_path, capsys):
    from aion_train.cli import main
    from aion_train.data.hf_tokenizer import HFTokenizer
    from aion_train.serve.loading import load_for_serving

    texts = corpus()
    tok_file = make_hf_tokenizer(tmp_path / "tok", texts)
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    shards, run = tmp_path / "shards", tmp_path / "run"
    assert (
        main(["make-shards", "--from", str(tmp_path / "corpus.jsonl"), "--out", str(shards), "--val-fraction", "0.1"])
        == 0
    )
    env = dict(os.environ, PYTHONPATH=str(REPO), MLFLOW_DISABLE_TELEMETRY="true", OMP_NUM_THREADS="1")
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "aion_train.cli",
            "pretrain",
            "--config",
            "configs/tiny_cpu.yaml",
            f"run_dir={run}",
            f"model.vocab_size={V}",
            f"data.train_shards={shards}/train-*.tar",
            f"data.val_shards={shards}/val-*.tar",
            f"data.tokenizer={tok_file}",
            "train.steps=4",
            "train.warmup_steps=1",
            "train.eval_every=4",
            "train.save_every=4",
            "train.eval_batches=1",
            "data.micro_batch_size=4",
            "tracking.enabled=false",
            "--json",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    capsys.readouterr()

    loaded = load_for_serving(str(run))  # the tokenizer from the run's config.yaml
    tok = loaded.tokenizer
    assert isinstance(tok, HFTokenizer) and tok.file == str(tok_file) and loaded.eos_ids == (tok.eos_id,)
    prompt = "The with statement"
    ids = [tok.bos_id, *tokenizers.Tokenizer.from_file(str(tok_file)).encode(prompt).ids]
    assert loaded.encode_prompt(prompt) == ids
    ref = torch.tensor([ids])
    with torch.no_grad():
        for _ in range(8):
            nxt = loaded.model(ref).logits[:, -1].float().argmax(-1, keepdim=True)
            ref = torch.cat([ref, nxt], 1)
    want = ref[0, len(ids) :].tolist()
    if tok.eos_id in want:
        want = want[: want.index(tok.eos_id)]

    cmd = ["generate", "--checkpoint", str(run), prompt, "--max-tokens", "8", "--temperature", "0", "--json"]
    assert main(cmd) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["token_ids"] == want
    assert out["text"] == tokenizers.Tokenizer.from_file(str(tok_file)).decode(ids[1:] + want)[len(prompt) :]

    from fastapi.testclient import TestClient

    from aion_train.serve.openai_api import create_app
    from aion_train.serve.service import Service

    service = Service(loaded)
    service.scheduler.start()
    try:
        with TestClient(create_app(service)) as client:
            r = client.post(
                "/v1/completions",
                json={"model": loaded.model_id, "prompt": prompt, "max_tokens": 8, "temperature": 0},
            )
    finally:
        service.scheduler.stop()
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == out["text"]
