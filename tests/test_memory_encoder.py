"""L_mem (posttrain/memory_encoder.py): the distilled encoder is the head of the model's
mean-pooled states, its initial head is the ridge least-squares solution, training lowers L_mem
while only the adapters and the head move, MRR@10 is the textbook one; and the command on a
checkpoint trained here reports the reference MRR that a direct computation gives."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from aion_train.config import load_config
from aion_train.model import build_model
from aion_train.posttrain.memory_encoder import (
    ProjectedModel,
    distill,
    encoder_state,
    l_mem,
    least_squares_head,
    mrr_at_10,
)
from aion_train.retrieval import open_book as ob
from aion_train.retrieval.embedders import ModelEmbedder

REPO = Path(__file__).resolve().parents[1]
OVR = [
    "model.vocab_size=256",
    "model.d_model=64",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "model.d_ff=128",
    "model.moe.every=2",
    "model.moe.n_experts=4",
    "model.moe.d_ff_expert=64",
    "model.kernels=torch",
    "lora.enabled=true",
    "lora.r=4",
    "lora.alpha=8",
    "lora.dropout=0.0",
]
TEXTS = [f"document {i}: " + "abcdefghij"[i % 10] * (3 + i % 7) + f" tail {i * 7}" for i in range(24)]


class ByteTok:
    bos_id, pad_id = 1, 0

    def encode(self, text):
        return [2 + (b % 250) for b in text.encode()]


def _setup(dim=12):
    cfg = load_config("configs/tiny_cpu.yaml", OVR)
    model = build_model(cfg.model, seed=0).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return cfg, model, ModelEmbedder(model, ByteTok(), max_len=64), ProjectedModel(model, dim)


def _targets(n, dim, seed=0):
    t = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return t / np.linalg.norm(t, axis=1, keepdims=True)


def test_the_projected_embedder_is_the_head_of_the_mean_pooled_states():
    _, model, plain, enc = _setup()
    torch.nn.init.normal_(enc.head.weight)
    got = ModelEmbedder(enc, ByteTok(), dim=12, max_len=64).encode(TEXTS[:5])
    for text, row in zip(TEXTS[:5], got):
        ids = torch.tensor([[1, *ByteTok().encode(text)]])
        with torch.no_grad():
            h = model(ids, return_hidden=True).hidden[0].mean(0)  # one text alone: no padding
        v = (enc.head.weight.detach() @ h).numpy()
        np.testing.assert_allclose(row, v / np.linalg.norm(v), atol=2e-5)


def test_the_initial_head_is_the_ridge_least_squares_fit():
    _, model, plain, _ = _setup()
    e = _targets(len(TEXTS), 12)
    w = least_squares_head(model, plain, TEXTS, e, ridge=1e-2).numpy()
    x = np.stack([_pooled(model, t) for t in TEXTS]).astype(np.float64)
    lam = 1e-2 * len(TEXTS)
    a = np.vstack([x, np.sqrt(lam) * np.eye(x.shape[1])])  # ridge as an augmented lstsq
    b = np.vstack([e, np.zeros((x.shape[1], 12))])
    ref = np.linalg.lstsq(a, b, rcond=None)[0].T
    np.testing.assert_allclose(w, ref, rtol=1e-3, atol=1e-5)


def _pooled(model, text):
    with torch.no_grad():
        return model(torch.tensor([[1, *ByteTok().encode(text)]]), return_hidden=True).hidden[0].mean(0).numpy()


def test_distillation_lowers_l_mem_and_moves_only_the_adapters_and_the_head():
    cfg, model, plain, enc = _setup()
    e = _targets(len(TEXTS), 12, seed=1)
    enc.head.weight.data.copy_(least_squares_head(model, plain, TEXTS, e))
    base = {k: v.clone() for k, v in model.state_dict().items()}
    head0 = enc.head.weight.detach().clone()
    r = distill(enc, plain, TEXTS, e, cfg.lora, steps=400, lr=1e-3, batch_size=24, seed=0)
    assert r.l_mem_after < 0.5 * r.l_mem_before, (r.l_mem_before, r.l_mem_after)
    # the reported numbers are L_mem of the encoder, recomputed here by hand
    with torch.no_grad():
        got = ModelEmbedder(enc, ByteTok(), dim=12, max_len=64).encode(TEXTS)
    assert r.l_mem_after == pytest.approx(float(((got - e) ** 2).sum(1).mean()), rel=1e-4)
    after = model.state_dict()
    for k, v in base.items():  # LoRALinear keeps the base weight under base.*
        kk = k if k in after else k.replace(".weight", ".base.weight").replace(".bias", ".base.bias")
        torch.testing.assert_close(after[kk], v, rtol=0, atol=0)
    state = encoder_state(enc)
    assert any(k.endswith("lora_B") for k in state) and "head.weight" in state
    assert any(float(v.abs().max()) > 0 for k, v in state.items() if k.endswith("lora_B"))
    assert not torch.equal(state["head.weight"], head0)


def test_l_mem_is_the_squared_distance_of_unit_vectors():
    p, t = torch.tensor([[3.0, 4.0], [0.0, 2.0]]), torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert float(l_mem(p, t)) == pytest.approx(((0.6 - 1) ** 2 + 0.8**2 + 0.0) / 2)


def test_mrr_at_10_against_a_loop():
    rng = np.random.default_rng(0)
    q, d = rng.standard_normal((40, 6)), rng.standard_normal((30, 6))
    rel = rng.integers(0, 30, 40)
    ref = 0.0
    for i in range(40):
        order = sorted(range(30), key=lambda j: -float(q[i] @ d[j]))
        rank = order.index(int(rel[i])) + 1
        ref += 1.0 / rank if rank <= 10 else 0.0
    assert mrr_at_10(q, d, rel) == pytest.approx(ref / 40)


@pytest.mark.skipif(not Path(ob.MAN_DIR, "man1").is_dir(), reason="needs the manual pages")
def test_the_command_reports_the_reference_mrr_and_keeps_the_encoder(tmp_path):
    from safetensors import safe_open

    from aion_train.eval.open_book import _chunks, index_chunking
    from aion_train.retrieval.embedders import HashEmbedder

    def cli(*args):
        p = subprocess.run(
            [sys.executable, "-m", "aion_train.cli", *args], cwd=REPO, capture_output=True, text=True, timeout=600
        )
        assert p.returncode == 0, p.stderr[-3000:]
        return json.loads(p.stdout.strip().splitlines()[-1])

    cli(
        "pretrain",
        "train.steps=2",
        "train.save_every=2",
        "data.micro_batch_size=2",
        f"run_dir={tmp_path / 'pt'}",
        "--json",
    )
    idx = tmp_path / "idx"
    cli(
        "build-index",
        "--corpus",
        "open-book",
        "--out",
        str(idx),
        "--embedder",
        "hash-64",
        "--max-chunks-per-doc",
        "1",
        "--json",
    )
    r = cli(
        "distill-memory", "--checkpoint", str(tmp_path / "pt"), "--index", str(idx), "--steps", "3",
        "--queries", "40", "--old-queries", "20", "--out", str(tmp_path / "enc"), "--json",
    )  # fmt: skip
    assert r["n_queries"] == 40 and r["n_queries_old"] == 20 and r["steps"] == 3
    train, held = ob.split_pages(ob.read_man_pages())
    assert r["memory_documents"] == len(train) + len(held) and r["distilled_documents"] == len(held)
    first, later = _chunks(train, held, index_chunking(str(idx)))
    chunks = sorted(first + later)
    row = {i.rsplit("@", 1)[0]: n for n, (i, _) in enumerate(chunks)}
    emb = HashEmbedder(64)
    docs = emb.encode([t for _, t in chunks])
    for suffix, qs in (("", list(ob.iter_examples(held))[:40]), ("_old", list(ob.iter_examples(train))[:20])):
        ref = mrr_at_10(emb.encode([e.question for e in qs]), docs, [row[e.doc_id] for e in qs])
        assert r[f"mrr_memory_encoder{suffix}"] == pytest.approx(ref, abs=1e-4)
    for key, v in r.items():
        if key.startswith("mrr_"):
            assert 0.0 <= v <= 1.0, key
    with safe_open(r["encoder"], framework="pt") as f:
        assert "head.weight" in f.keys() and f.get_tensor("head.weight").shape[0] == 64
        assert f.metadata()["dim"] == "64"
