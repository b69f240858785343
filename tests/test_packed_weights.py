"""Packed bf16 weights for generation (model/packed_weights.py): with oneDNN's native bf16 the
packed products are bitwise the plain ones; with the AVX512-BF16 kernel (kernels/bf16_linear.py)
and with fp32 copies they are the fp32 products of the same bf16 values (up to fp32 summation
order), rounded once; the parameters and state dict are untouched either way."""

import pytest
import torch
import torch.nn.functional as F

from aion_train.config import ModelConfig, MoEConfig
from aion_train.kernels import bf16_linear
from aion_train.model import build_model
from aion_train.model import packed_weights as pw
from aion_train.model.execution import ExecutionPolicy, apply_execution_policy


def _cfg():
    return ModelConfig(
        vocab_size=96, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, max_seq_len=64,
        moe=MoEConfig(n_experts=4, top_k=2, d_ff_expert=96, every=1),
    )  # fmt: skip


@pytest.fixture(params=["kernel", "native", "fp32-copies"])
def mode(request, monkeypatch):
    if request.param == "kernel" and not bf16_linear.available():
        pytest.skip(f"the bf16 linear kernel cannot run here: {bf16_linear.status()[1]}")
    if request.param == "native" and not pw.native_bf16():
        pytest.skip("oneDNN has no native bf16 matmul on this CPU")
    layout = {"kernel": "kernel", "native": "onednn", "fp32-copies": "fp32"}[request.param]
    monkeypatch.setattr(pw, "backend", lambda: layout)
    return request.param


def _reference_linear(x, w, mode):
    if mode == "native":
        return F.linear(x, w)
    return F.linear(x.float(), w.float()).to(x.dtype)


def test_packed_linear_is_the_reference_product(mode):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(80, 48, generator=g).bfloat16()
    for m in (1, 3, 17):
        x = torch.randn(m, 48, generator=g).bfloat16()
        out = pw.packed_linear(x, pw.pack(w))
        assert out.dtype == torch.bfloat16
        ref = _reference_linear(x, w, mode)
        if mode == "native":
            assert torch.equal(out, ref)
        else:  # fp32 sums in another order: within one bf16 rounding of the fp32 product
            torch.testing.assert_close(out.float(), ref.float(), rtol=2**-7, atol=1e-5)


def test_packed_model_keeps_its_parameters_and_matches_the_reference(mode):
    model = build_model(_cfg(), seed=0).eval().bfloat16()
    plain = build_model(_cfg(), seed=0).eval().bfloat16()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    n = pw.pack_weights(model)
    # q|k|v as one per layer, o_proj, [w1; w3] and w2 of 4 experts per layer, and the head (the
    # router is fp32)
    assert n == 2 * (1 + 1 + 8) + 1
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    ids = torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(1))
    # generation's policy: every step runs one matmul per expert with rows (the packed experts
    # with SwiGLU's two input projections as one matmul; the plain model: three matmuls)
    policy = ExecutionPolicy.for_device("cpu").for_generation()
    apply_execution_policy(model, policy)
    apply_execution_policy(plain, policy)
    with torch.no_grad():
        got = model(ids).logits.float()
        want = plain(ids).logits.float()
        exact = build_model(_cfg(), seed=0).eval().bfloat16().float()(ids).logits  # the bf16 values in fp32
    if mode == "native":
        assert torch.equal(got, want)
    else:
        # fp32 products of the same bf16 weights: at least as close to the fp32 model as bf16 GEMMs
        err_packed = (got - exact).abs().max()
        err_plain = (want - exact).abs().max()
        assert err_packed <= err_plain * 1.05 + 1e-3, (err_packed, err_plain)
    with torch.enable_grad():  # a grad-enabled call takes the plain parameters
        model(ids).logits.float().sum().backward()
    assert model.lm_head.weight.grad is not None
