"""Checks that need a CUDA GPU; every test here is `gpu`-marked and skips without CUDA (the
marker alone skips it through conftest.py; the skipif says why when run on its own).

- the Triton kernels compiled (not interpreted) forward and backward against their torch
  references at training sizes, one by one and inside the model;
- packed rows (document masks): flash-attn's varlen kernel against SDPA with the
  block-diagonal causal mask, and the model's packed forward under attention_backend=flash and
  sdpa against each document run alone;
- torch's grouped GEMM (what the MoE experts call) and faiss's GPU index, the two things the
  docker image must provide;
- one bf16 training step of the tiny config on CUDA with a finite loss.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

KERNELS = ("rms_norm", "rope", "swiglu", "moe_permute", "moe_unpermute", "cross_entropy", "linear_cross_entropy")


def _flash():
    try:
        import flash_attn

        return flash_attn
    except Exception as e:
        pytest.skip(f"flash-attn not installed ({type(e).__name__}: {e})")


def _triton_compiled():
    from aion_train.kernels import triton_status

    ok, why = triton_status()
    if not ok:
        pytest.skip(why)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("TRITON_INTERPRET is set: the kernels would be interpreted, not compiled")


def _tiny_cfg(overrides=()):
    from aion_train.config import load_config

    return load_config(str(REPO / "configs" / "tiny_cpu.yaml"), ["model.n_layers=2", *overrides])


def _model(cfg, device="cuda", dtype=torch.bfloat16):
    from aion_train.model import build_model

    return build_model(cfg.model, seed=cfg.seed).to(device=device, dtype=dtype)


def _rel(a, b):
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-6))


# ------------------------------------------------------------------ Triton kernels, compiled


@pytest.mark.parametrize("name", KERNELS)
def test_triton_kernel_compiled_matches_reference_at_training_size(name):
    _triton_compiled()
    from aion_train.bench.gpu import compare_kernel, kernel_cases
    from aion_train.kernels import backend_of, reference, select, triton_ops

    assert triton_ops.INTERPRET is False
    impl = select(name, "triton")
    assert backend_of(impl) == "triton"
    inputs, grad_of, kw = kernel_cases("cuda", scale=4)[name]
    r = compare_kernel(impl, getattr(reference, name), inputs, grad_of, kw, rounds=2, device="cuda")
    assert r["max_rel_err"] < 2e-2, r
    assert r["grad_max_rel_err"] < 3e-2, r


def test_model_with_triton_kernels_matches_torch_kernels():
    """The same weights and batch through kernels=triton and kernels=torch: in fp32 the loss and
    every parameter gradient agree closely (no router decision flips); in bf16 the loss agrees
    to bf16 precision."""
    _triton_compiled()
    cfg_t, cfg_r = _tiny_cfg(["model.kernels=triton"]), _tiny_cfg(["model.kernels=torch"])
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg_t.model.vocab_size, (4, 128), generator=g).to("cuda")
    labels = torch.roll(ids, -1, dims=1)
    labels[:, -1] = -100
    for dtype in (torch.float32, torch.bfloat16):
        m_t, m_r = _model(cfg_t, dtype=dtype), _model(cfg_r, dtype=dtype)
        m_r.load_state_dict(m_t.state_dict())
        for return_logits in (True, False):
            m_t.zero_grad(set_to_none=True)
            m_r.zero_grad(set_to_none=True)
            lt = m_t(ids, labels=labels, return_logits=return_logits).loss
            lr = m_r(ids, labels=labels, return_logits=return_logits).loss
            lt.backward()
            lr.backward()
            tol = 1e-4 if dtype == torch.float32 else 2e-2
            assert math.isfinite(lt.item()) and abs(lt.item() - lr.item()) < tol * abs(lr.item()), (dtype, lt, lr)
            if dtype != torch.float32:
                continue
            for (n, pt), (_, pr) in zip(m_t.named_parameters(), m_r.named_parameters()):
                assert pt.grad is not None and pr.grad is not None, n
                assert _rel(pt.grad, pr.grad) < 1e-3, (n, return_logits, _rel(pt.grad, pr.grad))


# ------------------------------------------------------------------ document masks: flash varlen vs SDPA


def _documents(lengths, device="cuda"):
    seg = torch.cat([torch.full((n,), i + 1, dtype=torch.long) for i, n in enumerate(lengths)])
    pos = torch.cat([torch.arange(n) for n in lengths])
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
    return seg.to(device), pos.to(device), cu.to(device)


def _block_causal_mask(seg):
    t = seg.numel()
    return (seg[:, None] == seg[None, :]) & torch.ones(t, t, dtype=torch.bool, device=seg.device).tril()


def test_flash_attn_varlen_matches_sdpa_with_a_document_mask():
    """Packed documents: flash_attn_varlen_func with cu_seqlens equals SDPA over the packed row
    with the block-diagonal causal mask, forward and backward, with grouped KV heads."""
    fa = _flash()
    from flash_attn import flash_attn_varlen_func

    lengths = [37, 200, 5, 1, 270, 511]
    seg, _, cu = _documents(lengths)
    total, hq, hkv, d = sum(lengths), 8, 2, 128
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(total, hq, d, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    k = torch.randn(total, hkv, d, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    v = torch.randn(total, hkv, d, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    grad = torch.randn(total, hq, d, device="cuda", dtype=torch.bfloat16, generator=g)
    out = flash_attn_varlen_func(q, k, v, cu, cu, max(lengths), max(lengths), causal=True)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad)

    qs, ks, vs = (t.detach().float().requires_grad_() for t in (q, k, v))  # fp32 reference
    ref = torch.nn.functional.scaled_dot_product_attention(
        qs.transpose(0, 1)[None],
        ks.transpose(0, 1)[None],
        vs.transpose(0, 1)[None],
        attn_mask=_block_causal_mask(seg),
        enable_gqa=True,
    )[0].transpose(0, 1)
    rq, rk, rv = torch.autograd.grad(ref, (qs, ks, vs), grad.float())
    assert out.shape == ref.shape
    assert _rel(out, ref) < 2e-2, f"flash-attn {fa.__version__}: forward {_rel(out, ref)}"
    for name, a, b in (("dq", dq, rq), ("dk", dk, rk), ("dv", dv, rv)):
        assert _rel(a, b) < 3e-2, (name, _rel(a, b))
    # and a document never sees another: the first token of every document attends to itself only
    firsts = cu[:-1].long()
    torch.testing.assert_close(
        out[firsts].float(), v.detach()[firsts].float().repeat_interleave(hq // hkv, 1), atol=1e-2, rtol=1e-2
    )


@pytest.mark.parametrize("backend", ["sdpa", "flash"])
def test_model_packed_rows_equal_each_document_alone(backend):
    """The model's forward over packed rows (segment_ids + restarting position_ids) gives each
    document the logits it gets alone, under attention_backend=sdpa and =flash (flash-attn's
    varlen path on CUDA where the model uses it)."""
    if backend == "flash":
        _flash()
    cfg = _tiny_cfg([f"model.attention_backend={backend}", "model.kernels=torch"])
    model = _model(cfg).eval()
    lengths = [[30, 70, 28], [128]]
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.model.vocab_size, (2, 128), generator=g).cuda()
    seg = torch.stack([_documents(row)[0] for row in lengths])
    pos = torch.stack([_documents(row)[1] for row in lengths])
    with torch.no_grad():
        packed = model(ids, segment_ids=seg, position_ids=pos).logits
        for b, row in enumerate(lengths):
            start = 0
            for n in row:
                alone = model(ids[b : b + 1, start : start + n]).logits[0]
                got = packed[b, start : start + n]
                assert _rel(got, alone) < 3e-2, (backend, b, start, n, _rel(got, alone))
                start += n


def test_model_packed_rows_flash_matches_sdpa():
    _flash()
    cfg_f = _tiny_cfg(["model.attention_backend=flash", "model.kernels=torch"])
    cfg_s = _tiny_cfg(["model.attention_backend=sdpa", "model.kernels=torch"])
    m_f, m_s = _model(cfg_f), _model(cfg_s)
    m_s.load_state_dict(m_f.state_dict())
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, cfg_f.model.vocab_size, (2, 128), generator=g).cuda()
    seg = torch.stack([_documents([50, 50, 28])[0], _documents([100, 28])[0]])
    pos = torch.stack([_documents([50, 50, 28])[1], _documents([100, 28])[1]])
    labels = torch.roll(ids, -1, dims=1)
    out_f = m_f(ids, labels=labels, segment_ids=seg, position_ids=pos)
    out_s = m_s(ids, labels=labels, segment_ids=seg, position_ids=pos)
    assert _rel(out_f.logits, out_s.logits) < 3e-2
    out_f.loss.backward()
    out_s.loss.backward()
    for (n, a), (_, b) in zip(m_f.named_parameters(), m_s.named_parameters()):
        assert _rel(a.grad, b.grad) < 6e-2, (n, _rel(a.grad, b.grad))


# ------------------------------------------------------------------ what the docker image must provide


def test_torch_grouped_gemm_runs_on_this_gpu():
    """The MoE experts call torch.nn.functional.grouped_mm (public since torch 2.10; bf16 on
    compute capability >= 8.0, the CUTLASS kernel on 9.0); without it they fall back to one
    matmul per expert."""
    import torch.nn.functional as F

    from aion_train.model.moe.experts import _grouped_mm_works, grouped_linear

    major, minor = torch.cuda.get_device_capability()
    if (major, minor) < (8, 0):
        pytest.skip(f"compute capability {major}.{minor} < 8.0")
    assert hasattr(F, "grouped_mm"), f"torch {torch.__version__} has no torch.nn.functional.grouped_mm"
    assert _grouped_mm_works("cuda", torch.bfloat16), f"grouped_mm fails on {torch.cuda.get_device_name(0)}"
    g = torch.Generator().manual_seed(0)
    counts = torch.tensor([5, 0, 17, 42], device="cuda")
    x = torch.randn(64, 128, generator=g).to("cuda", torch.bfloat16)
    w = torch.randn(4, 128, 256, generator=g).to("cuda", torch.bfloat16)
    want = torch.cat([c.float() @ w[e].float() for e, c in enumerate(torch.split(x, counts.tolist()))])
    assert _rel(grouped_linear(x, w, counts), want) < 1e-2


def test_faiss_gpu_index_matches_the_cpu_index():
    try:
        import faiss
    except Exception as e:
        pytest.skip(f"faiss not installed ({type(e).__name__})")
    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() < 1:
        pytest.skip(f"faiss {faiss.__version__} is a CPU build (or sees no GPU)")
    import numpy as np

    rng = np.random.default_rng(0)
    xb = rng.standard_normal((5000, 64)).astype("float32")
    xq = xb[:50] + 0.01 * rng.standard_normal((50, 64)).astype("float32")
    cpu = faiss.IndexFlatL2(64)
    cpu.add(xb)
    res = faiss.StandardGpuResources()
    gpu_index = faiss.index_cpu_to_gpu(res, 0, faiss.IndexFlatL2(64))
    gpu_index.add(xb)
    d_c, i_c = cpu.search(xq, 5)
    d_g, i_g = gpu_index.search(xq, 5)
    assert (i_g[:, 0] == np.arange(50)).all() and (i_g == i_c).mean() > 0.98
    np.testing.assert_allclose(d_g, d_c, rtol=1e-3, atol=1e-3)


# ------------------------------------------------------------------ a training step


def test_bf16_training_step_of_the_tiny_config():
    from aion_train.bench.train import MasterWeightAdamW

    cfg = _tiny_cfg()
    model = _model(cfg).train()
    opt = MasterWeightAdamW(model.parameters(), cfg.train)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.model.vocab_size, (8, 128), generator=g).cuda()
    labels = torch.roll(ids, -1, dims=1)
    labels[:, -1] = -100
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses = []
    for _ in range(3):
        loss = model(ids, labels=labels, return_logits=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses), losses
    assert losses[-1] < losses[0], losses  # the same batch: the loss falls
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert len(changed) == len(before), set(before) - set(changed)
    assert all(p.dtype == torch.bfloat16 and p.device.type == "cuda" for p in model.parameters())
