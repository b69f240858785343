"""bench gpu: what one CUDA GPU does with this code, as one JSON line.

    aion-train bench gpu [--json] [--quick] [--write-docs] [--config F]

Three parts, each against a reference on the same GPU in the same process:

- train: training steps in bf16 of a ~1B-parameter MoE (`configs/gpu_1b_moe.yaml`: 1.08B
  parameters, 0.40B active) on random tokens, as the trainer steps it (head + loss fused,
  `return_logits=False`; bf16 parameters with fp32 master weights and fused AdamW, the way
  DeepSpeed's bf16 mode runs, `bench.train.MasterWeightAdamW`). Reports tokens/s, the achieved
  model TFLOP/s (`train.metrics.flops_per_token`: 6 x active parameters + causal attention,
  per token) and MFU against the device's dense bf16 peak: the vendor's number from
  `PEAK_BF16` when the device name is in it (H100 SXM / H200 989 TFLOP/s, A100 312), else a
  measured bf16 matmul rate (the measured rate is reported either way).
- attention: causal attention TFLOP/s, flash-attn (`flash_attn_func`) against torch SDPA, at
  a few sequence lengths with the same tokens per call; forward and forward+backward
  (FLOPs: 4 B H T^2 D / 2 forward, 2.5x that backward), and the largest output difference.
- kernels: each Triton kernel (`aion_train.kernels`, compiled) against its torch reference on
  training-sized inputs: forward+backward milliseconds, speedup, largest errors of the output
  and the input gradients.

Without CUDA it exits with code 2 and says it needs a GPU. `--write-docs` puts the result into
docs/benchmarks.md as a section for this device (date, versions, headline table, the JSON),
replacing the section an earlier run on the same device name wrote and keeping everything
else. `scripts/gpu_check.sh` runs it; CPU CI never does.
"""

from __future__ import annotations

import copy
import datetime as _dt
import importlib
import json
import math
import re
import statistics
import sys
import time
from pathlib import Path

import torch

from aion_train.fsutil import atomic_write_text

from .timing import interleaved_samples

DEFAULT_CONFIG = "configs/gpu_1b_moe.yaml"
DOCS = "docs/benchmarks.md"

# Dense (no sparsity) bf16 tensor-core peak FLOP/s by device-name substring; the longest key
# found in torch.cuda.get_device_name() wins ("H100 PCIe" over "H100", "A100" over "A10").
PEAK_BF16 = {
    "H200": 989e12,
    "GH200": 989e12,
    "H100": 989e12,  # SXM5 ("NVIDIA H100 80GB HBM3")
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H800": 989e12,
    "B200": 2250e12,
    "A100": 312e12,
    "A800": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "A10": 125e12,
}

# --quick: a smoke run (minutes -> seconds), numbers not for the docs
QUICK = {
    "train_overrides": ["model.n_layers=2", "data.micro_batch_size=2", "data.seq_len=1024"],
    "steps": 3,
    "warmup": 1,
    "seq_lens": (1024,),
    "attention_tokens": 8192,
    "kernel_scale": 8,
    "rounds": 3,
}
FULL = {
    "train_overrides": [],
    "steps": 10,
    "warmup": 3,
    "seq_lens": (1024, 2048, 4096),
    "attention_tokens": 32768,
    "kernel_scale": 1,
    "rounds": 10,
}


class NeedsGPU(RuntimeError):
    """bench gpu was asked to run where torch sees no CUDA device."""


# ------------------------------------------------------------------------------------------
# pure arithmetic (unit-tested on CPU)
# ------------------------------------------------------------------------------------------


def peak_bf16_from_table(device_name: str) -> tuple[float, str] | None:
    """(dense bf16 peak FLOP/s, table key) for a CUDA device name, or None when not in the table."""
    name = device_name.upper()
    hits = [k for k in PEAK_BF16 if k.upper() in name]
    if not hits:
        return None
    key = max(hits, key=len)
    return PEAK_BF16[key], key


def train_flops_per_token(model_cfg, seq_len: int) -> float:
    """The project's model FLOPs per trained token (forward + backward)."""
    from aion_train.train.metrics import flops_per_token

    return flops_per_token(model_cfg, seq_len)


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the peak."""
    return tokens_per_s * flops_per_token / peak_flops


def causal_attention_flops(batch: int, heads: int, seq_len: int, head_dim: int, backward: bool) -> float:
    """FLOPs of causal attention: QK^T and PV are 2 B H T^2 D each, half of them masked away;
    the backward pass is 2.5x the forward (as flash-attn's own benchmarks count it)."""
    fwd = 4.0 * batch * heads * seq_len * seq_len * head_dim / 2
    return fwd * 3.5 if backward else fwd


# ------------------------------------------------------------------------------------------
# versions and device
# ------------------------------------------------------------------------------------------


def _version(module: str) -> str | None:
    try:
        return getattr(importlib.import_module(module), "__version__", "unknown")
    except Exception:
        return None


def environment(device: str = "cuda") -> dict:
    out = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "flash_attn": _version("flash_attn"),
        "triton": _version("triton"),
    }
    if device == "cuda" and torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        out.update(
            device=torch.cuda.get_device_name(0),
            capability=f"{p.major}.{p.minor}",
            memory_gb=round(p.total_memory / 2**30, 1),
        )
    else:
        out["device"] = "cpu"
    out["grouped_mm_bf16"], out["grouped_mm_why"] = grouped_mm_bf16(device)
    return out


def grouped_mm_bf16(device: str) -> tuple[bool | str, str]:
    """(whether the MoE experts run torch's grouped GEMM in bf16 here, why)."""
    from aion_train.model.moe import experts

    try:
        status = getattr(experts, "grouped_mm_status", None)
        if status is not None:
            ok, why = status(device, torch.bfloat16)
            return bool(ok), why
        ok = bool(experts._grouped_mm_works(device, torch.bfloat16))
        return ok, "probe passed" if ok else "probe failed"
    except Exception as e:  # pragma: no cover - depends on the model code
        return f"unknown ({type(e).__name__})", str(e)[:300]


def _sync(device: str):
    return (lambda: torch.cuda.synchronize()) if device == "cuda" else (lambda: None)


def measured_matmul_flops(device: str, dtype=torch.bfloat16, n: int = 8192, seconds: float = 0.5) -> float:
    """FLOP/s of an n x n x n matmul in dtype, measured."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = _sync(device)
    for _ in range(3):
        a @ b
    sync()
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(5):
            a @ b
        reps += 5
        sync()
    return 2.0 * n**3 * reps / (time.perf_counter() - t0)


def peak_flops(device: str) -> dict:
    """The bf16 peak MFU is measured against: the table's vendor number, else the measured rate."""
    n = 8192 if device == "cuda" else 512
    measured = measured_matmul_flops(device, torch.bfloat16, n=n, seconds=0.5 if device == "cuda" else 0.1)
    name = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    hit = peak_bf16_from_table(name) if device == "cuda" else None
    if hit:
        return {"peak_flops": hit[0], "peak_source": f"table: {hit[1]}", "measured_matmul_flops": measured}
    return {"peak_flops": measured, "peak_source": f"measured bf16 matmul {n}^3", "measured_matmul_flops": measured}


# ------------------------------------------------------------------------------------------
# (a) training step MFU
# ------------------------------------------------------------------------------------------


def _config_path(config: str | None) -> str:
    if config:
        return config
    here = Path(DEFAULT_CONFIG)
    return str(here if here.is_file() else Path(__file__).resolve().parents[2] / DEFAULT_CONFIG)


def load_train_config(config: str | None = None, overrides: list[str] | None = None):
    from aion_train.config import load_config

    return load_config(_config_path(config), list(overrides or []))


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def measure_training(cfg, device: str = "cuda", steps: int = 10, warmup: int = 3) -> dict:
    """bf16 training steps of cfg's model on random tokens; a micro-batch that does not fit is
    halved (reported as micro_batch_size)."""
    b = cfg.data.micro_batch_size
    while True:
        try:
            return _measure_training(cfg, device, steps, warmup, b)
        except RuntimeError as e:
            if not (_is_oom(e) and b > 1):
                raise
            b //= 2
            if device == "cuda":
                torch.cuda.empty_cache()


def _measure_training(cfg, device: str, steps: int, warmup: int, micro_batch: int) -> dict:
    from aion_train.model import build_model

    from .train import MasterWeightAdamW

    t, v = cfg.data.seq_len, cfg.model.vocab_size
    gen = torch.Generator().manual_seed(cfg.seed)
    ids = torch.randint(0, v, (micro_batch, t), generator=gen).to(device)
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = ids[:, 1:]
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with torch.device(device):  # initialise on the GPU: no 4 GB fp32 copy on the host
        model = build_model(cfg.model, seed=cfg.seed)
    model = model.to(torch.bfloat16).train()
    opt = MasterWeightAdamW(model.parameters(), cfg.train)
    n_params = sum(p.numel() for p in model.parameters())
    losses: list[float] = []

    def step():
        loss = model(ids, labels=labels, return_logits=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())

    sync = _sync(device)
    try:
        for _ in range(warmup):
            step()
        sync()
        ms = []
        t_all = time.perf_counter()
        for _ in range(steps):
            t0 = time.perf_counter()
            step()
            sync()
            ms.append((time.perf_counter() - t0) * 1e3)
        total_s = time.perf_counter() - t_all
        values = [float(x) for x in losses]
        mem = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    finally:
        opt = model = None  # free the GPU memory before the next measurement
        if device == "cuda":
            torch.cuda.empty_cache()
    tokens = micro_batch * t
    fpt = train_flops_per_token(cfg.model, t)
    tps = tokens * steps / total_s
    from aion_train.planner.params import count_params

    counts = count_params(cfg.model)
    return {
        "params": n_params,
        "params_planner": counts.total,
        "params_active": counts.active,
        "micro_batch_size": micro_batch,
        "seq_len": t,
        "tokens_per_step": tokens,
        "step_ms_median": round(statistics.median(ms), 2),
        "tokens_per_s": round(tps, 1),
        "flops_per_token": fpt,
        "achieved_tflops": round(tps * fpt / 1e12, 2),
        "loss_first": round(values[0], 4),
        "loss_last": round(values[-1], 4),
        "loss_finite": all(math.isfinite(x) for x in values),
        "max_memory_gb": round(mem, 2) if mem is not None else None,
        "attention_backend": cfg.model.attention_backend,
        "kernels": cfg.model.kernels,
        "steps": steps,
        "warmup": warmup,
    }


# ------------------------------------------------------------------------------------------
# (b) attention: flash-attn vs SDPA
# ------------------------------------------------------------------------------------------


def _flash_func():
    try:
        from flash_attn import flash_attn_func

        return flash_attn_func, None
    except Exception as e:
        return None, f"flash-attn not installed ({type(e).__name__}: {e})"


def _sdpa_causal(q, k, v):
    """[B, T, H, D] in and out, as flash_attn_func takes them."""
    o = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
    )
    return o.transpose(1, 2)


def measure_attention(
    device: str = "cuda",
    seq_lens=(1024, 2048, 4096),
    tokens: int = 32768,
    heads: int = 16,
    head_dim: int = 128,
    rounds: int = 10,
    dtype=torch.bfloat16,
) -> dict:
    flash, why = _flash_func() if device == "cuda" else (None, "flash-attn needs CUDA")
    impls = {"sdpa": _sdpa_causal}
    if flash is not None:
        impls["flash"] = lambda q, k, v: flash(q, k, v, causal=True)
    sync = _sync(device)
    rows = []
    for t in seq_lens:
        b = max(1, tokens // t)
        g = torch.Generator(device=device).manual_seed(t)
        q, k, v = (
            torch.randn(b, t, heads, head_dim, device=device, dtype=dtype, generator=g).requires_grad_()
            for _ in range(3)
        )
        grad = torch.randn(b, t, heads, head_dim, device=device, dtype=dtype, generator=g)
        fwd = {n: (lambda f=f: f(q, k, v)) for n, f in impls.items()}

        def fwd_bwd(f):
            def run():
                q.grad = k.grad = v.grad = None
                f(q, k, v).backward(grad)

            return run

        both = {n: fwd_bwd(f) for n, f in impls.items()}
        with torch.no_grad():
            f_ms = {
                n: statistics.median(s) for n, s in interleaved_samples(fwd, rounds=rounds, warmup=2, sync=sync).items()
            }
        fb_ms = {
            n: statistics.median(s) for n, s in interleaved_samples(both, rounds=rounds, warmup=2, sync=sync).items()
        }
        row = {"seq_len": t, "batch": b, "heads": heads, "head_dim": head_dim}
        for n in impls:
            row[f"{n}_fwd_ms"] = round(f_ms[n], 3)
            row[f"{n}_fwd_tflops"] = round(causal_attention_flops(b, heads, t, head_dim, False) / f_ms[n] / 1e9, 1)
            row[f"{n}_fwd_bwd_ms"] = round(fb_ms[n], 3)
            row[f"{n}_fwd_bwd_tflops"] = round(causal_attention_flops(b, heads, t, head_dim, True) / fb_ms[n] / 1e9, 1)
        if flash is not None:
            with torch.no_grad():
                row["max_abs_diff"] = float(
                    (impls["flash"](q, k, v).float() - _sdpa_causal(q, k, v).float()).abs().max()
                )
            row["flash_over_sdpa_fwd_bwd"] = round(fb_ms["sdpa"] / fb_ms["flash"], 3)
        rows.append(row)
        q = k = v = grad = None  # free the GPU memory before the next length
    return {
        "flash": "flash_attn_func" if flash is not None else None,
        "flash_skipped": why,
        "dtype": str(dtype).split(".")[-1],
        "rows": rows,
    }


# ------------------------------------------------------------------------------------------
# (c) Triton kernels vs their torch references
# ------------------------------------------------------------------------------------------


def kernel_cases(device: str = "cuda", scale: int = 1, dtype=torch.bfloat16) -> dict:
    """name -> (inputs, indices of inputs that get gradients, kwargs): training-sized inputs of
    configs/gpu_1b_moe.yaml (width 1536, 12 heads of 128, 2048 tokens x 8, top-2 of 8 experts,
    expert width 2048, vocab 32000); `scale` divides the token counts."""
    g = torch.Generator().manual_seed(0)

    def randn(*shape, dt=dtype, s=1.0):
        return (torch.randn(*shape, generator=g) * s).to(device=device, dtype=dt)

    n, d, ff, vocab, top_k = 16384 // scale, 1536, 2048, 32000, 2
    t = 2048 // scale
    b = max(1, n // t)
    hd = 128
    pos = torch.arange(t, dtype=torch.float32)
    inv = 1.0 / (10000.0 ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    ang = pos[:, None] * inv[None, :]
    cos, sin = ang.cos().to(device), ang.sin().to(device)
    experts = torch.randint(0, 8, (n, top_k), generator=g)
    order = torch.argsort(experts.reshape(-1), stable=True)
    token_index = (order // top_k).to(device)
    gates = torch.rand(n * top_k, generator=g)[order].to(device)
    ce_rows = 8192 // scale
    labels = torch.randint(0, vocab, (ce_rows,), generator=g)
    labels[::17] = -100
    labels = labels.to(device)
    lce_labels = torch.randint(0, vocab, (n,), generator=g).to(device)
    return {
        "rms_norm": ([randn(n, d), (1 + 0.1 * torch.randn(d, generator=g)).to(device)], (0, 1), {"eps": 1e-5}),
        "rope": ([randn(b, t, 12, hd), cos, sin], (0,), {}),
        "swiglu": ([randn(n * top_k, ff), randn(n * top_k, ff)], (0, 1), {}),
        "moe_permute": ([randn(n, d), token_index], (0,), {}),
        "moe_unpermute": ([randn(n * top_k, d), token_index, gates, n], (0, 2), {}),
        "cross_entropy": ([randn(ce_rows, vocab, s=3.0), labels], (0,), {}),
        "linear_cross_entropy": ([randn(n, d), randn(vocab, d, s=0.05), lce_labels], (0, 1), {}),
    }


def _leaves(inputs, grad_of):
    return [x.detach().clone().requires_grad_() if i in grad_of else x for i, x in enumerate(inputs)]


def compare_kernel(impl, ref, inputs, grad_of, kwargs=None, rounds: int = 10, device: str = "cuda") -> dict:
    """Forward + backward of impl and ref on the same inputs and upstream gradient: median
    milliseconds of each, speedup (ref / impl) and the largest absolute and relative (to the
    reference's largest magnitude) differences of the output and of every input gradient."""
    kwargs = kwargs or {}
    a, r = _leaves(inputs, grad_of), _leaves(inputs, grad_of)
    out_a, out_r = impl(*a, **kwargs), ref(*r, **kwargs)
    g = torch.randn(out_r.shape, generator=torch.Generator().manual_seed(1)).to(out_r.device, out_r.dtype)
    ga = torch.autograd.grad(out_a, [a[i] for i in grad_of], g)
    gr = torch.autograd.grad(out_r, [r[i] for i in grad_of], g)

    def diff(x, y):
        x, y = x.detach().float(), y.detach().float()
        err = float((x - y).abs().max()) if x.numel() else 0.0
        scale = float(y.abs().max()) if y.numel() else 0.0
        return err, err / scale if scale > 0 else err

    fwd_abs, fwd_rel = diff(out_a, out_r)
    grads = [diff(x, y) for x, y in zip(ga, gr)]
    del out_a, out_r, ga, gr

    def run(fn, leaves):
        def call():
            for i in grad_of:
                leaves[i].grad = None
            fn(*leaves, **kwargs).backward(g)

        return call

    samples = interleaved_samples(
        {"impl": run(impl, a), "ref": run(ref, r)}, rounds=rounds, warmup=2, sync=_sync(device)
    )
    ms = {k: statistics.median(v) for k, v in samples.items()}
    return {
        "shape": list(inputs[0].shape),
        "dtype": str(inputs[0].dtype).split(".")[-1],
        "triton_ms": round(ms["impl"], 3),
        "torch_ms": round(ms["ref"], 3),
        "speedup": round(ms["ref"] / ms["impl"], 3),
        "max_abs_err": fwd_abs,
        "max_rel_err": fwd_rel,
        "grad_max_abs_err": max((e for e, _ in grads), default=0.0),
        "grad_max_rel_err": max((e for _, e in grads), default=0.0),
    }


def measure_kernels(device: str = "cuda", scale: int = 1, rounds: int = 10) -> dict:
    from aion_train.kernels import KERNELS, reference, select, triton_status

    ok, why = triton_status()
    if not ok:
        return {"skipped": why}
    from aion_train.kernels import triton_ops

    out: dict = {"backend": why, "interpreted": bool(triton_ops.INTERPRET)}
    cases = kernel_cases(device, scale)
    for name in KERNELS:
        if name not in cases:
            out[name] = {"skipped": "no case"}
            continue
        inputs, grad_of, kw = cases[name]
        try:
            out[name] = compare_kernel(
                select(name, "triton"), getattr(reference, name), inputs, grad_of, kw, rounds=rounds, device=device
            )
        except Exception as e:
            if _is_oom(e):
                torch.cuda.empty_cache()
            out[name] = {"error": f"{type(e).__name__}: {str(e)[-500:]}"}
    return out


def measure_grouped_mm(device: str = "cuda", scale: int = 1, rounds: int = 10) -> dict:
    """The experts' grouped GEMM (torch's grouped_mm, what the model calls) against one matmul
    per expert, forward + backward, at the 1B config's expert shapes."""
    from aion_train.model.moe.experts import _grouped_mm_works, grouped_linear

    if not _grouped_mm_works(device, torch.bfloat16):
        return {"available": False}
    g = torch.Generator().manual_seed(0)
    m, d, ff, e = 32768 // scale, 1536, 2048, 8
    counts = torch.bincount(torch.randint(0, e, (m,), generator=g), minlength=e).to(device)
    x = torch.randn(m, d, generator=g).to(device, torch.bfloat16).requires_grad_()
    w = (torch.randn(e, d, ff, generator=g) * 0.02).to(device, torch.bfloat16).requires_grad_()
    grad = torch.randn(m, ff, generator=g).to(device, torch.bfloat16)
    counts_list = counts.tolist()

    def loop(x, w):
        return torch.cat([c @ w[i] for i, c in enumerate(torch.split(x, counts_list))])

    def run(fn):
        def call():
            x.grad = w.grad = None
            fn(x, w).backward(grad)

        return call

    with torch.no_grad():
        err = float((grouped_linear(x, w, counts, counts_list).float() - loop(x, w).float()).abs().max())
    samples = interleaved_samples(
        {"grouped": run(lambda a, b: grouped_linear(a, b, counts, counts_list)), "loop": run(loop)},
        rounds=rounds,
        warmup=2,
        sync=_sync(device),
    )
    ms = {k: statistics.median(v) for k, v in samples.items()}
    return {
        "available": True,
        "rows": m,
        "shape": [e, d, ff],
        "grouped_ms": round(ms["grouped"], 3),
        "per_expert_loop_ms": round(ms["loop"], 3),
        "speedup": round(ms["loop"] / ms["grouped"], 3),
        "max_abs_diff": err,
    }


# ------------------------------------------------------------------------------------------
# the bench
# ------------------------------------------------------------------------------------------


def _part(fn, *args, **kwargs) -> dict:
    """One part of the bench; a failure is reported in its place instead of losing the others."""
    try:
        return fn(*args, **kwargs)
    except Exception as e:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return {"error": f"{type(e).__name__}: {str(e)[-800:]}"}


def run_bench(
    config: str | None = None,
    quick: bool = False,
    rounds: int | None = None,
    device: str = "cuda",
    train_overrides: list[str] | None = None,
) -> dict:
    if device == "cuda" and not torch.cuda.is_available():
        raise NeedsGPU(needs_gpu_message())
    p = dict(QUICK if quick else FULL)
    rounds = rounds or p["rounds"]
    t0 = time.perf_counter()
    result = {"bench": "gpu", "date": _dt.date.today().isoformat(), "quick": quick, **environment(device)}
    cfg = load_train_config(config, list(p["train_overrides"]) + list(train_overrides or []))
    result["config"] = _config_path(config)
    peak = _part(peak_flops, device)
    train = _part(measure_training, cfg, device, p["steps"], p["warmup"])
    if "tokens_per_s" in train and "peak_flops" in peak:
        train["peak_tflops"] = round(peak["peak_flops"] / 1e12, 1)
        train["peak_source"] = peak["peak_source"]
        train["measured_matmul_tflops"] = round(peak["measured_matmul_flops"] / 1e12, 1)
        train["mfu"] = round(mfu(train["tokens_per_s"], train["flops_per_token"], peak["peak_flops"]), 4)
        train["mfu_vs_measured_matmul"] = round(
            mfu(train["tokens_per_s"], train["flops_per_token"], peak["measured_matmul_flops"]), 4
        )
    elif "error" in peak:
        train["peak_error"] = peak["error"]
    result["train"] = train
    result["attention"] = _part(measure_attention, device, p["seq_lens"], p["attention_tokens"], rounds=rounds)
    result["kernels"] = _part(measure_kernels, device, p["kernel_scale"], rounds)
    result["grouped_mm"] = _part(measure_grouped_mm, device, p["kernel_scale"], rounds)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    return result


def needs_gpu_message() -> str:
    return (
        f"aion-train bench gpu needs a CUDA GPU: torch {torch.__version__} (CUDA build: "
        f"{torch.version.cuda or 'none'}) sees no CUDA device. Run it on a GPU machine "
        "(scripts/gpu_check.sh runs it there)."
    )


# ------------------------------------------------------------------------------------------
# docs/benchmarks.md
# ------------------------------------------------------------------------------------------

DOC_HEADER = """# Benchmarks

Numbers measured on real hardware by the benchmark commands, one section per device. The
sections below the marker comments are written by `aion-train bench gpu --write-docs` (which
`scripts/gpu_check.sh` runs): a later run on the same device name replaces its own section and
leaves the rest of this file alone. CPU numbers live in docs/notes.md.
"""

_SECTION = re.compile(r"<!-- bench-gpu: (?P<device>.*?) -->\n.*?<!-- /bench-gpu -->\n?", re.S)


def _fmt(x, nd=1):
    return "-" if x is None else (f"{x:,.{nd}f}" if isinstance(x, float) else str(x))


def render_section(result: dict) -> str:
    dev = result.get("device", "unknown device")
    lines = [
        f"<!-- bench-gpu: {dev} -->",
        f"## {dev}, {result.get('date', '')}"
        + (" (--quick: smoke sizes, not comparable)" if result.get("quick") else ""),
        "",
    ]
    lines.append(
        f"torch {result.get('torch')}, CUDA {result.get('cuda')}, flash-attn "
        f"{result.get('flash_attn') or 'not installed'}, triton {result.get('triton') or 'not installed'}, "
        f"grouped GEMM (bf16) {'yes' if result.get('grouped_mm_bf16') is True else 'no'}; "
        f"`aion-train bench gpu --json` ({result.get('seconds', '-')} s)."
    )
    lines += ["", "| measurement | result |", "| --- | --- |"]
    tr = result.get("train", {})
    if "mfu" in tr:
        lines.append(
            f"| training step, {Path(str(result.get('config', ''))).name} ({tr['params'] / 1e9:.2f}B params, "
            f"{tr['params_active'] / 1e9:.2f}B active), bf16, {tr['micro_batch_size']} x {tr['seq_len']} "
            f"tokens | {_fmt(tr['tokens_per_s'], 0)} tokens/s, {_fmt(tr['achieved_tflops'])} TFLOP/s, "
            f"**MFU {tr['mfu']:.3f}** of {_fmt(tr['peak_tflops'], 0)} TFLOP/s ({tr['peak_source']}); "
            f"{_fmt(tr['mfu_vs_measured_matmul'], 3)} of the measured bf16 matmul "
            f"({_fmt(tr['measured_matmul_tflops'])} TFLOP/s); loss {tr['loss_first']} -> {tr['loss_last']}, "
            f"{_fmt(tr['max_memory_gb'])} GiB |"
        )
    elif tr:
        lines.append(f"| training step | {tr.get('error', 'no result')} |")
    att = result.get("attention", {})
    for row in att.get("rows", []):
        flash = (
            f"flash-attn {_fmt(row['flash_fwd_bwd_tflops'])} TFLOP/s fwd+bwd ({_fmt(row['flash_fwd_tflops'])} fwd), "
            if "flash_fwd_bwd_tflops" in row
            else ""
        )
        lines.append(
            f"| causal attention T={row['seq_len']}, {row['batch']} x {row['heads']} heads x "
            f"{row['head_dim']} | {flash}SDPA {_fmt(row['sdpa_fwd_bwd_tflops'])} fwd+bwd "
            f"({_fmt(row['sdpa_fwd_tflops'])} fwd) |"
        )
    if att.get("flash_skipped"):
        lines.append(f"| flash-attn | skipped: {att['flash_skipped']} |")
    if "error" in att:
        lines.append(f"| attention | {att['error']} |")
    ker = result.get("kernels", {})
    for name, k in ker.items():
        if isinstance(k, dict) and "speedup" in k:
            lines.append(
                f"| Triton `{name}` {k['shape']} {k['dtype']}, fwd+bwd | {k['triton_ms']} ms vs torch "
                f"{k['torch_ms']} ms: {k['speedup']}x; max err {k['max_abs_err']:.2e} (grad "
                f"{k['grad_max_abs_err']:.2e}) |"
            )
        elif isinstance(k, dict) and "error" in k:
            lines.append(f"| Triton `{name}` | {k['error']} |")
    if "skipped" in ker:
        lines.append(f"| Triton kernels | skipped: {ker['skipped']} |")
    gm = result.get("grouped_mm", {})
    if gm.get("available"):
        lines.append(
            f"| expert grouped GEMM {gm['shape']}, {gm['rows']} rows, fwd+bwd | {gm['grouped_ms']} ms "
            f"vs {gm['per_expert_loop_ms']} ms per-expert loop: {gm['speedup']}x |"
        )
    lines += ["", "```json", json.dumps(result, sort_keys=True), "```", "<!-- /bench-gpu -->", ""]
    return "\n".join(lines)


def write_docs(result: dict, path: str | Path | None = None) -> Path:
    """Put result's section into the benchmarks doc: replace the section of the same device,
    else append one; everything else in the file is kept byte for byte."""
    path = Path(path) if path else default_docs_path()
    text = path.read_text() if path.is_file() else DOC_HEADER
    section = render_section(result)
    dev = result.get("device", "unknown device")
    for m in _SECTION.finditer(text):
        if m.group("device") == dev:
            text = text[: m.start()] + section + text[m.end() :]
            break
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)
    return path


def default_docs_path() -> Path:
    here = Path.cwd() / DOCS
    if here.parent.is_dir():
        return here
    return Path(__file__).resolve().parents[2] / DOCS


# ------------------------------------------------------------------------------------------
# `aion-train bench gpu`
# ------------------------------------------------------------------------------------------


def run_command(args) -> int:
    """Entry from aion_train.commands.bench: exit code 2 without CUDA."""
    if not torch.cuda.is_available():
        print(needs_gpu_message(), file=sys.stderr)
        return 2
    result = run_bench(
        config=getattr(args, "config", None),
        quick=bool(getattr(args, "quick", False)),
        rounds=getattr(args, "rounds", None),
    )
    if getattr(args, "write_docs", False):
        result["docs"] = str(write_docs(copy.deepcopy(result)))
    if getattr(args, "json", False):
        print(json.dumps(result, sort_keys=True))
    else:
        for k, v in result.items():
            print(f"{k:>20}: {v}")
    return 0
