"""The LM head + loss that never stores the logits (kernels/linear_cross_entropy.py) against
F.cross_entropy on materialised logits: losses and gradients, for a mean over tokens (the
gradient formed in the forward pass) and for any per-row weighting (recomputed in backward),
and the model's training path (`return_logits=False`) against its logits path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_model_math import tiny_model

import aion_train.kernels.linear_cross_entropy as lce
from aion_train.kernels.reference import mean_loss


def _inputs(n=300, h=24, v=517, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g) * 0.3).to(dtype).requires_grad_()
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::7] = -100
    return hidden, weight, labels


def _grads(loss, hidden, weight):
    return torch.autograd.grad(loss, (hidden, weight))


@pytest.mark.parametrize("chunk_logits", [1 << 21, 517 * 70])  # one chunk; 5 uneven chunks
def test_mean_loss_and_grads_equal_materialised_logits(monkeypatch, chunk_logits):
    monkeypatch.setattr(lce, "CHUNK_LOGITS", chunk_logits)
    monkeypatch.setattr(lce, "MIN_CHUNK_ROWS", 1)
    hidden, weight, labels = _inputs()
    want = F.cross_entropy(hidden @ weight.t(), labels, ignore_index=-100)
    got = mean_loss(lce.linear_cross_entropy(hidden, weight, labels), labels)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    for a, b in zip(_grads(got, hidden, weight), _grads(want, hidden, weight)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_per_row_weighted_grads_are_recomputed_exactly(monkeypatch):
    monkeypatch.setattr(lce, "MIN_CHUNK_ROWS", 1)
    monkeypatch.setattr(lce, "CHUNK_LOGITS", 517 * 64)
    hidden, weight, labels = _inputs(seed=1)
    w_rows = torch.rand(labels.shape, generator=torch.Generator().manual_seed(2))
    want = F.cross_entropy(hidden @ weight.t(), labels, ignore_index=-100, reduction="none")
    got = lce.linear_cross_entropy(hidden, weight, labels)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    assert (got[labels == -100] == 0).all()
    for a, b in zip(_grads((got * w_rows).sum(), hidden, weight), _grads((want * w_rows).sum(), hidden, weight)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_bf16_inputs_give_fp32_loss_close_to_fp32():
    hidden, weight, labels = _inputs(dtype=torch.bfloat16, seed=3)
    got = mean_loss(lce.linear_cross_entropy(hidden, weight, labels), labels)
    want = F.cross_entropy(hidden.float() @ weight.float().t(), labels, ignore_index=-100)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
    gh, gw = _grads(got, hidden, weight)
    assert gh.dtype == gw.dtype == torch.bfloat16
    rh, _ = _grads(want, hidden, weight)
    torch.testing.assert_close(gh.float(), rh.float(), atol=2e-3, rtol=5e-2)


def test_no_grad_forward_computes_only_the_loss():
    hidden, weight, labels = _inputs(seed=4)
    with torch.no_grad():
        got = lce.linear_cross_entropy(hidden, weight, labels)
    torch.testing.assert_close(
        got, F.cross_entropy(hidden @ weight.t(), labels, reduction="none"), atol=1e-6, rtol=1e-6
    )
    assert got.grad_fn is None


def test_model_training_path_equals_logits_path():
    """Transformer(return_logits=False): same loss and every gradient as the logits path."""
    model = tiny_model(seed=5).train()
    ids = torch.randint(0, 64, (3, 17), generator=torch.Generator().manual_seed(6))
    labels = ids.roll(-1, 1)
    labels[:, -1] = -100
    ref = model(ids, labels=labels)
    ref_grads = torch.autograd.grad(ref.loss, list(model.parameters()))
    out = model(ids, labels=labels, return_logits=False)
    assert out.logits is None and ref.logits is not None
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-6, rtol=1e-6)
    for (name, _), a, b in zip(
        model.named_parameters(), torch.autograd.grad(out.loss, list(model.parameters())), ref_grads
    ):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def test_rows_with_underflowing_label_probability_keep_the_exact_loss():
    """A label whose softmax probability underflows fp32 (loss ~ 300 nats) gets
    logsumexp - logit, not -log(0) = inf; its gradient stays softmax - onehot."""
    hidden, weight, labels = _inputs(n=40, h=8, v=33, seed=5)
    with torch.no_grad():
        hidden[3] *= 60  # sharp rows: the label's probability is ~exp(-300)
        hidden[11] *= 60
    labels[3] = int((hidden[3] @ weight.t()).argmin())
    labels[11] = int((hidden[11] @ weight.t()).argmin())
    got = lce.linear_cross_entropy(hidden, weight, labels)
    want = F.cross_entropy(hidden @ weight.t(), labels, ignore_index=-100, reduction="none")
    assert want[3] > 100 and want[11] > 100
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-6)
    for a, b in zip(_grads(mean_loss(got, labels), hidden, weight), _grads(mean_loss(want, labels), hidden, weight)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("chunk_logits", [1 << 21, 517 * 70])
def test_loss_without_gradients_is_per_row_cross_entropy(monkeypatch, chunk_logits):
    """Evaluation (no gradient wanted) takes the loss-only path: per-row losses, 0 on ignored rows."""
    monkeypatch.setattr(lce, "CHUNK_LOGITS", chunk_logits)
    monkeypatch.setattr(lce, "MIN_CHUNK_ROWS", 1)
    hidden, weight, labels = _inputs(seed=4)
    want = F.cross_entropy(hidden.detach() @ weight.detach().t(), labels, ignore_index=-100, reduction="none")
    with torch.no_grad():  # an evaluation: parameters that require grad, grad mode off
        got = lce.linear_cross_entropy(hidden, weight, labels)
    assert got.grad_fn is None
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-6)
    got = lce.linear_cross_entropy(hidden.detach(), weight.detach(), labels)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-6)
    assert len(set(got[labels != -100].tolist())) > 10  # one loss per row, not one broadcast


def test_bf16_weight_gradient_summed_over_chunks_matches_fp32(monkeypatch):
    """bf16 weights: the weight gradient of each block of BLOCK_CHUNKS chunks comes from one
    bf16 GEMM and the blocks are summed in fp32 (5 chunks: a full block and a partial one);
    against the fp32 computation on the same (bf16-representable) numbers."""
    monkeypatch.setattr(lce, "MIN_CHUNK_ROWS", 1)
    monkeypatch.setattr(lce, "CHUNK_LOGITS", 517 * 70)  # 5 chunks
    hidden, weight, labels = _inputs(dtype=torch.bfloat16, seed=6)
    got = _grads(mean_loss(lce.linear_cross_entropy(hidden, weight, labels), labels), hidden, weight)
    h32, w32 = hidden.detach().float().requires_grad_(), weight.detach().float().requires_grad_()
    want = _grads(F.cross_entropy(h32 @ w32.t(), labels, ignore_index=-100), h32, w32)
    for a, b in zip(got, want):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), b, atol=2e-3, rtol=2e-2)


def test_bf16_per_row_weighted_grads_over_blocks_match_fp32(monkeypatch):
    """The recomputing backward (a per-row weighting) in bf16 over several blocks of chunks."""
    monkeypatch.setattr(lce, "MIN_CHUNK_ROWS", 1)
    monkeypatch.setattr(lce, "CHUNK_LOGITS", 517 * 30)  # 10 chunks: 3 blocks
    hidden, weight, labels = _inputs(dtype=torch.bfloat16, seed=7)
    w_rows = torch.rand(labels.shape, generator=torch.Generator().manual_seed(8))
    got = _grads((lce.linear_cross_entropy(hidden, weight, labels) * w_rows).sum(), hidden, weight)
    h32, w32 = hidden.detach().float().requires_grad_(), weight.detach().float().requires_grad_()
    want_rows = F.cross_entropy(h32 @ w32.t(), labels, ignore_index=-100, reduction="none")
    want = _grads((want_rows * w_rows).sum(), h32, w32)
    for a, b in zip(got, want):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), b, atol=2e-2, rtol=2e-2)
