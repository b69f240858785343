"""Packed sequences with document masks: the loader's segment / position ids, the attention
backends' packed paths (SDPA's block-diagonal mask on the CPU, flash-attn's varlen kernel via
cu_seqlens), the bar (a packed row gives each document the logits it gets alone, fp32, 1e-5,
through the real model), the text task passing them on, and the loud backend errors."""

from __future__ import annotations

import json
import logging

import pytest
import torch
import torch.nn.functional as F

from aion_train.config import load_config
from aion_train.data.loader import TokenLoader, document_segments
from aion_train.data.shards import write_shards
from aion_train.data.text_sources import demo_documents
from aion_train.data.tokenizer import Tokenizer, train_tokenizer
from aion_train.model import attention_backend as ab
from aion_train.model import build_model
from aion_train.model.attention_backend import (
    AttentionBackendError,
    PackedSegments,
    attention,
    segment_causal_mask,
    varlen_from_segments,
)

SEQ, MB = 48, 4


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("packing")
    docs = [d[:200] for d in demo_documents()[:40]]
    paths = write_shards([{"__key__": f"d{i:03d}", "txt": t} for i, t in enumerate(docs)], str(root), "train", 8)
    tok = Tokenizer(train_tokenizer(demo_documents()[:120], str(root / "tok.model"), 600))
    return {"paths": paths, "tok": tok}


def _loader(corpus, **kw):
    args = dict(seq_len=SEQ, micro_batch_size=MB, seed=3, shuffle_buffer=8)
    args.update(kw)
    return TokenLoader(corpus["paths"], corpus["tok"], **args)


def _cfg(*overrides):
    return load_config("configs/tiny_cpu.yaml", ["model.kernels=torch", *overrides])


# ------------------------------------------------------------------ the loader's segment ids
def test_document_segments_start_at_row_start_bos_and_after_eos():
    bos, eos = 2, 3
    ids = torch.tensor(
        [
            [7, 8, eos, bos, 9, 9, eos, bos],  # a piece continued from the last row
            [bos, 5, eos, bos, 6, 6, 6, 6],
        ]
    )
    seg, pos = document_segments(ids, bos, eos)
    assert seg.tolist() == [[1, 1, 1, 2, 2, 2, 2, 3], [1, 1, 1, 2, 2, 2, 2, 2]]
    assert pos.tolist() == [[0, 1, 2, 0, 1, 2, 3, 0], [0, 1, 2, 0, 1, 2, 3, 4]]
    # no bos (a tokenizer without one): pieces still split after every eos
    seg2, _ = document_segments(torch.tensor([[5, eos, 6, 6, eos, 7]]), None, eos)
    assert seg2.tolist() == [[1, 1, 2, 2, 2, 3]]
    assert seg.dtype == pos.dtype == torch.long


def test_loader_adds_segments_without_changing_rows_labels_or_state(corpus):
    tok = corpus["tok"]
    plain = list(_loader(corpus, loop=False))
    masked_loader = _loader(corpus, loop=False, document_mask=True)
    masked = list(masked_loader)
    assert len(plain) == len(masked) > 3
    for a, b in zip(plain, masked):
        assert set(a) == {"input_ids", "labels"}
        assert set(b) == {"input_ids", "labels", "segment_ids", "position_ids"}
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
        ids, seg, pos = b["input_ids"], b["segment_ids"], b["position_ids"]
        assert seg.shape == pos.shape == ids.shape
        starts = pos == 0
        assert starts[:, 0].all()
        # every piece but a row's first begins with <bos>, and each id is one more than the last
        assert (ids[:, 1:][starts[:, 1:]] == tok.bos_id).all()
        assert torch.equal(seg, starts.long().cumsum(1))
    some = torch.cat([b["segment_ids"] for b in masked])
    assert (some.max(1).values > 1).any()  # rows do pack several documents
    assert _loader(corpus).state_dict()["settings"] == _loader(corpus, document_mask=True).state_dict()["settings"]


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_with_document_mask_is_bit_identical(corpus, workers):
    first = _loader(corpus, document_mask=True, num_workers=workers)
    it = iter(first)
    for _ in range(5):
        next(it)
    state = json.loads(json.dumps(first.state_dict()))
    want = [next(it) for _ in range(6)]
    fresh = _loader(corpus, document_mask=True, num_workers=workers)
    fresh.load_state_dict(state)
    got = [b for _, b in zip(range(6), fresh)]
    for a, b in zip(want, got):
        assert set(a) == set(b)
        assert all(torch.equal(a[k], b[k]) for k in a)
    # a state saved without the mask resumes with it (the mask adds batch keys, no state)
    plain = _loader(corpus, num_workers=workers)
    pit = iter(plain)
    for _ in range(5):
        next(pit)
    again = _loader(corpus, document_mask=True, num_workers=workers)
    again.load_state_dict(plain.state_dict())
    assert torch.equal(next(iter(again))["input_ids"], want[0]["input_ids"])


# ------------------------------------------------------------------ cu_seqlens for flash-attn's varlen kernel
def test_varlen_from_segments_runs_per_row_with_padding():
    seg = torch.tensor([[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 1, 1], [1, 2, 3, 3, 0, 0]])
    cu, max_len = varlen_from_segments(seg)
    assert cu.dtype == torch.int32
    assert cu.tolist() == [0, 3, 5, 6, 12, 13, 14, 16, 18]
    assert max_len == 6
    one, m = varlen_from_segments(torch.ones(2, 4, dtype=torch.long))  # equal ids in two rows: two sequences
    assert one.tolist() == [0, 4, 8] and m == 4
    with pytest.raises(ValueError):
        varlen_from_segments(torch.ones(4, dtype=torch.long))


def _varlen_reference(q, k, v, cu_q, cu_k, max_q, max_k, causal=True):
    """What flash_attn_varlen_func computes: causal attention within each cu_seqlens sequence
    of the [total, H, D] tokens (grouped KV heads repeated)."""
    out = torch.empty_like(q)
    rep = q.shape[1] // k.shape[1]
    for s, e in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
        qs, ks, vs = q[s:e].transpose(0, 1), k[s:e].transpose(0, 1), v[s:e].transpose(0, 1)
        ks, vs = ks.repeat_interleave(rep, 0), vs.repeat_interleave(rep, 0)
        out[s:e] = F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal).transpose(0, 1)
    return out


def test_varlen_reading_of_segments_equals_the_block_diagonal_mask():
    """Attention within the sequences that cu_seqlens describes == SDPA over the packed rows
    with the block-diagonal causal mask (what the CUDA varlen path replaces)."""
    g = torch.Generator().manual_seed(0)
    seg = torch.tensor([[1, 1, 1, 2, 2, 2, 2, 0], [1, 1, 2, 3, 3, 3, 3, 3]])
    b, t, hq, hkv, d = 2, 8, 4, 2, 8
    q = torch.randn(b, t, hq, d, generator=g)
    k, v = torch.randn(b, t, hkv, d, generator=g), torch.randn(b, t, hkv, d, generator=g)
    cu, m = varlen_from_segments(seg)
    got = _varlen_reference(q.reshape(b * t, hq, d), k.reshape(b * t, hkv, d), v.reshape(b * t, hkv, d), cu, cu, m, m)
    want = attention(q, k, v, causal=True, backend="sdpa", attn_mask=segment_causal_mask(seg))
    torch.testing.assert_close(got.reshape(b, t, hq, d), want, atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------ the bar: packed row == documents alone
def _packed(lengths_per_row, t):
    seg = torch.stack([torch.cat([torch.full((n,), i + 1) for i, n in enumerate(r)]) for r in lengths_per_row])
    pos = torch.stack([torch.cat([torch.arange(n) for n in r]) for r in lengths_per_row])
    assert seg.shape[1] == t
    return seg, pos


@pytest.mark.parametrize("overrides", [(), ("model.n_kv_heads=1", "model.moe.every=2", "model.n_layers=3")])
def test_packed_row_gives_each_document_its_logits_alone(overrides):
    cfg = _cfg(*overrides)
    model = build_model(cfg.model, seed=1).float().eval()
    lengths = [[30, 70, 28], [128], [1, 1, 90, 36]]
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(4, cfg.model.vocab_size, (len(lengths), 128), generator=g)
    seg, pos = _packed(lengths, 128)
    with torch.no_grad():
        packed = model(ids, segment_ids=seg, position_ids=pos).logits
        mixed = model(ids).logits  # no mask: documents see each other
        worst, leak = 0.0, 0.0
        for b, row in enumerate(lengths):
            start = 0
            for n in row:
                alone = model(ids[b : b + 1, start : start + n]).logits[0]
                worst = max(worst, float((packed[b, start : start + n] - alone).abs().max()))
                if start:
                    leak = max(leak, float((mixed[b, start : start + n] - alone).abs().max()))
                start += n
    assert worst < 1e-5, worst
    assert leak > 1e-3, leak  # without the mask the later documents differ


def test_loader_rows_through_the_model_equal_each_document_alone(corpus):
    """The bar end to end: a batch of the text loader (data.document_mask) through the real
    model; each document piece's logits equal that piece run alone (fp32, 1e-5)."""
    cfg = _cfg(f"model.vocab_size={max(600, corpus['tok'].vocab_size)}")
    model = build_model(cfg.model, seed=4).float().eval()
    batch = next(iter(_loader(corpus, document_mask=True, shuffle_buffer=0)))
    ids, seg = batch["input_ids"], batch["segment_ids"]
    with torch.no_grad():
        packed = model(ids, segment_ids=seg, position_ids=batch["position_ids"]).logits
        worst, pieces = 0.0, 0
        for b in range(ids.shape[0]):
            for s in seg[b].unique().tolist():
                cols = (seg[b] == s).nonzero().squeeze(1)
                alone = model(ids[b : b + 1, cols]).logits[0]
                worst = max(worst, float((packed[b, cols] - alone).abs().max()))
                pieces += 1
    assert pieces > ids.shape[0]
    assert worst < 1e-5, worst


def test_packed_backward_with_activation_checkpointing_matches_without():
    cfg = _cfg()
    a = build_model(cfg.model, seed=5).float().train()
    b = build_model(cfg.model, seed=5).float().train()
    b.activation_checkpointing = True
    g = torch.Generator().manual_seed(6)
    ids = torch.randint(4, cfg.model.vocab_size, (2, 64), generator=g)
    labels = torch.roll(ids, -1, 1)
    seg, pos = _packed([[20, 44], [10, 10, 44]], 64)
    la = a(ids, labels=labels, segment_ids=seg, position_ids=pos).loss
    lb = b(ids, labels=labels, segment_ids=seg, position_ids=pos).loss
    la.backward()
    lb.backward()
    assert torch.allclose(la, lb, atol=1e-6)
    for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.allclose(pa.grad, pb.grad, atol=1e-6), n


def test_single_segment_rows_take_the_plain_causal_kernel(monkeypatch):
    seen = []
    real = F.scaled_dot_product_attention

    def spy(*args, **kw):
        seen.append("mask" if kw.get("attn_mask") is not None else "causal" if kw.get("is_causal") else "none")
        return real(*args, **kw)

    monkeypatch.setattr(ab.F, "scaled_dot_product_attention", spy)
    q = torch.randn(2, 6, 2, 4)
    attention(q, q, q, causal=True, backend="sdpa", attn_mask=PackedSegments(torch.ones(2, 6, dtype=torch.long)))
    attention(q, q, q, causal=True, backend="sdpa", attn_mask=PackedSegments(torch.tensor([[1] * 3 + [2] * 3] * 2)))
    assert seen == ["causal", "mask"]


# ------------------------------------------------------------------ the text task hands them to the model
class _RecordingEngine(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.device = torch.device("cpu")
        self.calls = []

    def forward(self, input_ids, labels=None, return_logits=True, **kw):
        self.calls.append({"input_ids": input_ids, "labels": labels, **kw})
        from aion_train.model.transformer import ModelOutput

        z = torch.zeros(())
        return ModelOutput(logits=None, loss=z, lm_loss=z, aux_loss=z)


def _text_task(corpus, document_mask: bool):
    from aion_train.parallel.groups import ParallelGroups
    from aion_train.train.tasks import TextTask

    cfg = _cfg(f"data.document_mask={str(document_mask).lower()}", f"data.seq_len={SEQ}", "train.eval_batches=2")
    task = TextTask.__new__(TextTask)  # no demo data: the corpus of this module
    task.cfg, task.groups = cfg, ParallelGroups()
    task.train_shards = task.val_shards = corpus["paths"]
    task.tokenizer = corpus["tok"]
    return task


@pytest.mark.parametrize("document_mask", [True, False])
def test_text_task_passes_segments_in_training_and_evaluation(corpus, document_mask):
    task = _text_task(corpus, document_mask)
    assert task.cfg.data.document_mask is document_mask
    engine = _RecordingEngine()
    batch = next(iter(task.train_loader()))
    task.forward(engine, batch, torch.device("cpu"))
    task.evaluate(engine)
    assert len(engine.calls) == 3
    for call in engine.calls:
        assert ("segment_ids" in call) is document_mask and ("position_ids" in call) is document_mask
        if document_mask:
            assert torch.equal(call["segment_ids"], document_segments(call["input_ids"], 2, 3)[0])


def test_document_mask_is_on_by_default():
    from aion_train.config.schema import DataConfig

    assert DataConfig().document_mask is True
    assert load_config("configs/tiny_cpu.yaml").data.document_mask is True


# ------------------------------------------------------------------ loud backend choices
def test_flash_without_flash_attn_fails_at_build_naming_the_reason():
    if ab._flash_attn()[0] is not None:
        pytest.skip("flash-attn is installed here")
    cfg = _cfg("model.attention_backend=flash")
    with pytest.raises(AttentionBackendError, match="flash-attn is not importable"):
        build_model(cfg.model)
    with pytest.raises(AttentionBackendError, match="model.attention_backend=flash"):
        ab.resolve_backend("flash", torch.device("cpu"), torch.bfloat16)


def test_config_refuses_flash_in_fp32():
    from aion_train.config import ConfigError

    with pytest.raises(ConfigError, match="model.attention_backend=flash needs train.precision bf16 or fp16"):
        load_config("configs/tiny_cpu.yaml", ["model.attention_backend=flash", "train.precision=fp32"])
    load_config("configs/tiny_cpu.yaml", ["model.attention_backend=flash"])  # bf16: fine


def _fake_flash(monkeypatch, calls):
    def flash_func(q, k, v, causal=True):
        calls.append(("dense", q.shape))
        return _varlen_reference(
            q.flatten(0, 1),
            k.flatten(0, 1),
            v.flatten(0, 1),
            torch.arange(0, q.shape[0] * q.shape[1] + 1, q.shape[1]),
            None,
            0,
            0,
            causal,
        ).view_as(q)

    def varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, causal=True):
        calls.append(("varlen", cu_q.tolist(), max_q))
        assert torch.equal(cu_q, cu_k) and causal
        return _varlen_reference(q, k, v, cu_q, cu_k, max_q, max_k, causal)

    monkeypatch.setattr(ab, "_flash_attn", lambda: (flash_func, varlen_func, None))


def test_flash_requested_on_cpu_or_fp32_raises_naming_why(monkeypatch):
    _fake_flash(monkeypatch, [])
    with pytest.raises(AttentionBackendError, match="CUDA only"):
        ab.resolve_backend("flash", torch.device("cpu"), torch.bfloat16)
    with pytest.raises(AttentionBackendError, match="fp16 or bf16"):
        ab.resolve_backend("flash", torch.device("cuda", 0), torch.float32)
    assert ab.resolve_backend("flash", torch.device("cuda", 0), torch.bfloat16) == "flash"
    assert ab.resolve_backend("auto", torch.device("cpu"), torch.bfloat16) == "sdpa"  # auto: no error
    with pytest.raises(ValueError):
        ab.resolve_backend("fast", torch.device("cpu"), torch.float32)


def test_auto_logs_the_chosen_backend_once(monkeypatch, caplog):
    monkeypatch.setattr(ab, "_logged", set())
    with caplog.at_level(logging.INFO, logger="aion_train.model"):
        for _ in range(3):
            assert ab.resolve_backend("auto", torch.device("cpu"), torch.float32) == "sdpa"
    lines = [r.getMessage() for r in caplog.records if r.name == "aion_train.model"]
    assert len(lines) == 1 and "torch SDPA" in lines[0] and "auto" in lines[0], lines


def test_model_under_flash_takes_the_varlen_kernel_with_cu_seqlens(monkeypatch):
    """The flash path's plumbing, run on the CPU with a reference varlen kernel standing in for
    flash-attn's (the real one runs in tests/test_gpu.py): packed rows reach
    flash_attn_varlen_func with the cu_seqlens of their segments and give the SDPA logits;
    rows without segments take flash_attn_func."""
    calls = []
    _fake_flash(monkeypatch, calls)
    monkeypatch.setattr(ab, "flash_unavailable_reason", lambda device=None, dtype=None: None)
    cfg_f, cfg_s = _cfg("model.attention_backend=flash"), _cfg("model.attention_backend=sdpa")
    m_f, m_s = build_model(cfg_f.model, seed=7).eval(), build_model(cfg_s.model, seed=7).eval()
    g = torch.Generator().manual_seed(8)
    ids = torch.randint(4, cfg_f.model.vocab_size, (2, 32), generator=g)
    seg, pos = _packed([[10, 22], [5, 5, 22]], 32)
    with torch.no_grad():
        got = m_f(ids, segment_ids=seg, position_ids=pos).logits
        want = m_s(ids, segment_ids=seg, position_ids=pos).logits
        m_f(ids)
    varlen = [c for c in calls if c[0] == "varlen"]
    assert len(varlen) == cfg_f.model.n_layers
    assert varlen[0][1:] == ([0, 10, 32, 37, 42, 64], 22)
    assert [c[0] for c in calls[len(varlen) :]] == ["dense"] * cfg_f.model.n_layers
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ the grouped-GEMM choice
def test_grouped_mm_choice_is_logged_once_and_forced_paths_fail_loudly(monkeypatch, caplog):
    from aion_train.model.moe import experts

    monkeypatch.setattr(experts, "_logged", set())
    x, w = torch.randn(6, 8), torch.randn(2, 8, 8)
    counts = torch.tensor([2, 4])
    want = torch.cat([x[:2] @ w[0], x[2:] @ w[1]])
    with caplog.at_level(logging.INFO, logger="aion_train.model"):
        for _ in range(2):
            torch.testing.assert_close(experts.grouped_linear(x, w, counts), want, atol=1e-5, rtol=1e-5)
    lines = [r.getMessage() for r in caplog.records if "MoE experts" in r.getMessage()]
    ok, why = experts.grouped_mm_status("cpu", torch.float32)
    assert len(lines) == 1 and (("grouped GEMM" in lines[0]) if ok else ("per expert" in lines[0])), lines

    monkeypatch.setattr(experts.F, "grouped_mm", lambda *a, **k: pytest.fail("grouped_mm ran under per_expert"))
    torch.testing.assert_close(experts.grouped_linear(x, w, counts, mode="per_expert"), want, atol=1e-5, rtol=1e-5)

    monkeypatch.setattr(experts, "grouped_mm_status", lambda d, t=None: (False, "the probe raised X"))
    with pytest.raises(RuntimeError, match="runtime.grouped_mm=grouped but .*the probe raised X"):
        experts.grouped_linear(x, w, counts, mode="grouped")
    with pytest.raises(RuntimeError, match="16-byte aligned"):
        experts.grouped_linear(torch.randn(6, 3), torch.randn(2, 3, 8), counts, mode="grouped")
    from aion_train.model.execution import ExecutionPolicy

    with pytest.raises(ValueError, match="runtime.grouped_mm='sometimes'"):
        ExecutionPolicy.for_device("cpu", grouped_mm="sometimes")
