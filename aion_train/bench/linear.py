"""bench linear: generation's bf16 linear layers on the CPU, side by side in one process: the
AVX512-BF16 kernel (kernels/bf16_linear.py), oneDNN's bf16 GEMM on a weight reordered once
(`packed_weights`' onednn layout) and plain `F.linear`, at the shapes of the mid-size serving
model (q|k|v, o, an expert's [w1; w3] and w2, the head) and the row counts of decoding and
prefill.

Each timed call runs the product once for each of a set of distinct weights that together
exceed the CPU's last-level cache (`cold_mb`), so the weights come from memory as they do in a
decode step; a time is per product. `read_gb_s` is a plain read of a large bf16 tensor on the
same threads (`Tensor.sum`), the bandwidth a product at one row cannot beat by much. A
speedup is the median over rounds of onednn / kernel of one round (`paired_ratio`)."""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

from aion_train.kernels import bf16_linear
from aion_train.model import packed_weights as pw

from .timing import interleaved_samples, paired_ratio

# (name, out_features, in_features) of the mid-size serving config (bench serve's MID_MODEL)
SHAPES = (("qkv", 1024, 512), ("o_proj", 512, 512), ("w13", 2048, 512), ("w2", 512, 1024), ("head", 32000, 512))
ROWS = (1, 2, 4, 8, 16, 64, 256)
QUICK = {"shapes": (("w13", 256, 128),), "rows": (1, 8), "rounds": 2, "cold_mb": 4}


def _read_gb_s(mb: int = 256) -> float:
    big = torch.ones(mb * (1 << 20) // 2, dtype=torch.bfloat16)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        big.sum()
        best = min(best, time.perf_counter() - t0)
    return big.numel() * 2 / best / 1e9


def _onednn(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight, 1)


def run_bench(shapes=SHAPES, rows=ROWS, rounds: int = 5, cold_mb: int = 64, seed: int = 0) -> dict:
    kernel_ok, why = bf16_linear.status()
    onednn_ok = pw.native_bf16()
    g = torch.Generator().manual_seed(seed)
    out = []
    speedups = []
    for name, n, k in shapes:
        mb = n * k * 2 / 1e6
        count = max(2, int(cold_mb / mb) + 1)
        weights = [torch.randn(n, k, generator=g).mul_(0.02).bfloat16() for _ in range(count)]
        layouts = {"plain": (F.linear, weights)}
        if onednn_ok:
            layouts["onednn"] = (pw.packed_linear, [_onednn(w) for w in weights])
        if kernel_ok:
            layouts["kernel"] = (bf16_linear.linear, [bf16_linear.pack(w) for w in weights])
        per_rows = {}
        for m in rows:
            x = torch.randn(m, k, generator=g).bfloat16()

            def over_all(fn, ws, x=x):
                return lambda: [fn(x, w) for w in ws]

            samples = interleaved_samples({c: over_all(*v) for c, v in layouts.items()}, rounds=rounds, warmup=1)
            us = {c: [1e3 * t / count for t in s] for c, s in samples.items()}
            entry = {f"{c}_us": round(statistics.median(v), 1) for c, v in us.items()}
            entry.update({f"{c}_gb_s": round(mb / 1e3 / (statistics.median(v) / 1e6), 1) for c, v in us.items()})
            if "kernel" in us and "onednn" in us:
                entry["speedup_vs_onednn"] = round(paired_ratio(us["onednn"], us["kernel"]), 3)
                speedups.append(entry["speedup_vs_onednn"])
            entry["rounds_us"] = {c: [round(t, 2) for t in v] for c, v in us.items()}
            per_rows[str(m)] = entry
        out.append({"name": name, "out_features": n, "in_features": k, "weight_mb": round(mb, 2), "rows": per_rows})
    return {
        "shapes": out,
        "speedup_vs_onednn_p50": round(statistics.median(speedups), 3) if speedups else None,
        "kernel": kernel_ok,
        "kernel_status": why,
        "onednn_native_bf16": onednn_ok,
        "generation_layout": pw.backend(),
        "read_gb_s": round(_read_gb_s(), 1),
        "cold_mb": cold_mb,
        "threads": torch.get_num_threads(),
        "rounds": rounds,
    }
