"""`aion-train bench gpu` (aion_train/bench/gpu.py): the parts that need no GPU run here (the
peak table, the MFU and attention FLOP arithmetic against textbook formulas, the ~1B config,
the docs writer, the exit code without CUDA, the measuring code on CPU at toy sizes); the
bench itself is `gpu`-marked and skips without CUDA. Also: scripts/gpu_check.sh parses and is
called by nothing that CPU CI runs."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from aion_train.bench import gpu

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gpu_check.sh"


# ------------------------------------------------------------------ peak table


@pytest.mark.parametrize(
    "name, peak, key",
    [
        ("NVIDIA H100 80GB HBM3", 989e12, "H100"),
        ("NVIDIA H100 PCIe", 756e12, "H100 PCIe"),
        ("NVIDIA H100 NVL", 835e12, "H100 NVL"),
        ("NVIDIA H200", 989e12, "H200"),
        ("NVIDIA GH200 480GB", 989e12, "GH200"),
        ("NVIDIA A100-SXM4-80GB", 312e12, "A100"),
        ("NVIDIA A100 80GB PCIe", 312e12, "A100"),
        ("NVIDIA A10", 125e12, "A10"),
        ("NVIDIA L40S", 362e12, "L40S"),
        ("NVIDIA L4", 121e12, "L4"),
    ],
)
def test_peak_table_picks_the_most_specific_name(name, peak, key):
    assert gpu.peak_bf16_from_table(name) == (peak, key)


def test_unknown_device_has_no_table_peak():
    assert gpu.peak_bf16_from_table("NVIDIA GeForce RTX 3090") is None
    assert gpu.peak_bf16_from_table("cpu") is None


# ------------------------------------------------------------------ FLOPs and MFU


def _cfg(overrides):
    from aion_train.config import load_config

    return load_config(str(REPO / "configs" / "tiny_cpu.yaml"), overrides)


def test_dense_flops_per_token_is_6n_plus_causal_attention():
    """Kaplan et al. (2020) / PaLM (Chowdhery et al. 2022, app. B): training FLOPs per token
    = 6 N (N = non-embedding matmul parameters, LM head included) + 12 L T d for attention,
    half of which a causal mask skips: 6 N + 6 L T d."""
    L, d, h, ff, V, T = 3, 64, 4, 256, 100, 32
    cfg = _cfg(
        [
            f"model.n_layers={L}",
            f"model.d_model={d}",
            f"model.n_heads={h}",
            "model.n_kv_heads=null",
            f"model.d_ff={ff}",
            f"model.vocab_size={V}",
            "model.moe.every=0",
            f"data.seq_len={T}",
        ]
    )
    n = L * (4 * d * d + 3 * d * ff) + d * V  # q, k, v, o; SwiGLU's 3 matrices; the head
    assert gpu.train_flops_per_token(cfg.model, T) == 6 * n + 6 * L * T * d


def test_moe_flops_count_top_k_experts_and_the_router():
    L, d, h, kv, E, k, ffe, V, T = 2, 64, 4, 2, 8, 2, 96, 100, 16
    cfg = _cfg(
        [
            f"model.n_layers={L}",
            f"model.d_model={d}",
            f"model.n_heads={h}",
            f"model.n_kv_heads={kv}",
            f"model.vocab_size={V}",
            "model.moe.every=1",
            f"model.moe.n_experts={E}",
            f"model.moe.top_k={k}",
            f"model.moe.d_ff_expert={ffe}",
            f"data.seq_len={T}",
        ]
    )
    hd = d // h
    attn = 2 * d * d + 2 * d * kv * hd
    n_active = L * (attn + k * 3 * d * ffe + d * E) + d * V
    assert gpu.train_flops_per_token(cfg.model, T) == 6 * n_active + 6 * L * T * d


def test_mfu_arithmetic():
    # 100k tokens/s of a 6 GFLOP/token model on a 989 TFLOP/s part: 600 TFLOP/s achieved
    assert gpu.mfu(1e5, 6e9, 989e12) == pytest.approx(6e14 / 989e12)
    assert gpu.mfu(0.0, 6e9, 989e12) == 0.0


def test_causal_attention_flops():
    # B=2, H=16, T=1024, D=128: QK^T + PV = 4 B H T^2 D, half masked; backward 2.5x forward
    fwd = 4 * 2 * 16 * 1024**2 * 128 / 2
    assert gpu.causal_attention_flops(2, 16, 1024, 128, backward=False) == fwd
    assert gpu.causal_attention_flops(2, 16, 1024, 128, backward=True) == 3.5 * fwd


def test_the_1b_config_has_about_a_billion_parameters():
    from aion_train.model.transformer import Transformer
    from aion_train.planner.params import count_params

    cfg = gpu.load_train_config()
    with torch.device("meta"):  # no memory: shapes only
        model = Transformer(cfg.model)
    n = sum(p.numel() for p in model.parameters())
    counts = count_params(cfg.model)
    assert n == counts.total
    assert 0.9e9 <= n <= 1.3e9, n
    assert counts.active < n / 2  # top-2 of 8 experts
    assert cfg.train.precision == "bf16" and cfg.data.seq_len <= cfg.model.max_seq_len
    # grouped GEMM wants 16-byte aligned rows; tensor cores want multiples of 8 (bf16)
    for width in (cfg.model.d_model, cfg.model.moe.d_ff_expert, cfg.model.d_model // cfg.model.n_heads):
        assert width % 64 == 0, width
    # the comment in the YAML states the counts: keep it true
    text = (REPO / "configs" / "gpu_1b_moe.yaml").read_text()
    assert f"{counts.total:,}" in text and f"{counts.active:,}" in text


# ------------------------------------------------------------------ docs writer


def _result(device="NVIDIA H200", mfu=0.41, date="2026-12-02"):
    return {
        "bench": "gpu",
        "device": device,
        "date": date,
        "torch": "2.13.0+cu126",
        "cuda": "12.6",
        "flash_attn": "2.8.3",
        "triton": "3.7.1",
        "grouped_mm_bf16": True,
        "quick": False,
        "seconds": 95.0,
        "config": "configs/gpu_1b_moe.yaml",
        "train": {
            "params": 1079956992,
            "params_active": 400479744,
            "micro_batch_size": 8,
            "seq_len": 2048,
            "tokens_per_s": 170000.0,
            "achieved_tflops": 396.8,
            "mfu": mfu,
            "peak_tflops": 989.0,
            "peak_source": "table: H200",
            "mfu_vs_measured_matmul": 0.55,
            "measured_matmul_tflops": 720.0,
            "loss_first": 10.5,
            "loss_last": 10.1,
            "max_memory_gb": 41.0,
        },
        "attention": {
            "flash": "flash_attn_func",
            "flash_skipped": None,
            "rows": [
                {
                    "seq_len": 2048,
                    "batch": 16,
                    "heads": 16,
                    "head_dim": 128,
                    "flash_fwd_tflops": 500.0,
                    "flash_fwd_bwd_tflops": 400.0,
                    "sdpa_fwd_tflops": 450.0,
                    "sdpa_fwd_bwd_tflops": 350.0,
                }
            ],
        },
        "kernels": {
            "rms_norm": {
                "shape": [16384, 1536],
                "dtype": "bfloat16",
                "triton_ms": 0.1,
                "torch_ms": 0.3,
                "speedup": 3.0,
                "max_abs_err": 0.01,
                "grad_max_abs_err": 0.02,
            }
        },
        "grouped_mm": {
            "available": True,
            "rows": 32768,
            "shape": [8, 1536, 2048],
            "grouped_ms": 1.0,
            "per_expert_loop_ms": 2.0,
            "speedup": 2.0,
        },
    }


def _sections(text):
    return re.findall(r"<!-- bench-gpu: (.*?) -->", text)


def _json_of(text, device):
    m = re.search(r"<!-- bench-gpu: " + re.escape(device) + r" -->.*?```json\n(.*?)\n```", text, re.S)
    return json.loads(m.group(1))


def test_docs_writer_creates_the_file_with_a_dated_section(tmp_path):
    doc = tmp_path / "docs" / "benchmarks.md"
    gpu.write_docs(_result(), doc)
    text = doc.read_text()
    assert text.startswith("# Benchmarks")
    assert _sections(text) == ["NVIDIA H200"]
    assert "## NVIDIA H200, 2026-12-02" in text and "MFU 0.410" in text and "flash-attn 400.0 TFLOP/s" in text
    assert _json_of(text, "NVIDIA H200") == _result()


def test_docs_writer_replaces_only_the_same_devices_section(tmp_path):
    doc = tmp_path / "benchmarks.md"
    intro = "# Benchmarks\n\nHand-written notes that must survive.\n\n| a | b |\n| --- | --- |\n| 1 | 2 |\n"
    doc.write_text(intro)
    gpu.write_docs(_result("NVIDIA H100 80GB HBM3", mfu=0.30), doc)
    gpu.write_docs(_result("NVIDIA H200", mfu=0.40), doc)
    with doc.open("a") as f:
        f.write("\n## A later hand-written section\n\nkept too.\n")
    before = doc.read_text()
    gpu.write_docs(_result("NVIDIA H100 80GB HBM3", mfu=0.35, date="2026-12-03"), doc)
    after = doc.read_text()
    assert after.startswith(intro)
    assert "## A later hand-written section\n\nkept too.\n" in after
    assert _sections(after) == ["NVIDIA H100 80GB HBM3", "NVIDIA H200"]  # replaced in place
    assert _json_of(after, "NVIDIA H100 80GB HBM3")["train"]["mfu"] == 0.35
    assert _json_of(after, "NVIDIA H200")["train"]["mfu"] == 0.40
    assert "2026-12-03" in after and "MFU 0.300" not in after
    # the H200 section is byte-identical to before
    h200 = re.compile(r"<!-- bench-gpu: NVIDIA H200 -->.*?<!-- /bench-gpu -->", re.S)
    assert h200.search(before).group(0) == h200.search(after).group(0)
    # writing the same result again changes nothing
    gpu.write_docs(_result("NVIDIA H100 80GB HBM3", mfu=0.35, date="2026-12-03"), doc)
    assert doc.read_text() == after


def test_render_survives_failed_parts():
    r = _result()
    r["train"] = {"error": "OutOfMemoryError: ..."}
    r["attention"] = {"flash": None, "flash_skipped": "flash-attn not installed", "rows": []}
    r["kernels"] = {"skipped": "triton not importable"}
    r["grouped_mm"] = {"available": False}
    text = gpu.render_section(r)
    assert "OutOfMemoryError" in text and "flash-attn not installed" in text and "triton not importable" in text


def test_repo_benchmarks_doc_sections_are_well_formed():
    doc = REPO / "docs" / "benchmarks.md"
    text = doc.read_text()
    assert text.count("<!-- bench-gpu: ") == text.count("<!-- /bench-gpu -->")
    for dev in _sections(text):
        data = _json_of(text, dev)
        assert data["device"] == dev and data["bench"] == "gpu"


# ------------------------------------------------------------------ the command without CUDA


def test_bench_gpu_without_cuda_exits_2_and_says_it_needs_a_gpu(monkeypatch, capsys, tmp_path):
    from aion_train.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "gpu", "--json", "--write-docs"]) == 2
    out = capsys.readouterr()
    assert out.out == "" and "needs a CUDA GPU" in out.err
    assert not (tmp_path / "docs").exists()
    with pytest.raises(gpu.NeedsGPU):
        gpu.run_bench()


# ------------------------------------------------------------------ the measuring code, on CPU at toy sizes


def test_training_measurement_runs_on_cpu():
    cfg = gpu.load_train_config(
        str(REPO / "configs" / "tiny_cpu.yaml"), ["model.n_layers=1", "data.micro_batch_size=2", "data.seq_len=32"]
    )
    r = gpu.measure_training(cfg, "cpu", steps=1, warmup=1)
    assert r["loss_finite"] and r["tokens_per_s"] > 0 and r["tokens_per_step"] == 64
    assert r["params"] == r["params_planner"]
    assert r["flops_per_token"] == gpu.train_flops_per_token(cfg.model, 32)


def test_attention_measurement_runs_on_cpu_without_flash():
    r = gpu.measure_attention("cpu", seq_lens=(64,), tokens=128, heads=2, head_dim=16, rounds=1)
    assert r["flash"] is None and "CUDA" in r["flash_skipped"]
    (row,) = r["rows"]
    assert row["batch"] == 2 and row["sdpa_fwd_bwd_ms"] > 0 and "flash_fwd_ms" not in row


def test_compare_kernel_measures_errors_and_times():
    from aion_train.kernels import reference

    cases = gpu.kernel_cases("cpu", scale=64)
    assert set(cases) >= {
        "rms_norm",
        "rope",
        "swiglu",
        "moe_permute",
        "moe_unpermute",
        "cross_entropy",
        "linear_cross_entropy",
    }
    inputs, grad_of, kw = cases["swiglu"]
    same = gpu.compare_kernel(reference.swiglu, reference.swiglu, inputs, grad_of, kw, rounds=1, device="cpu")
    assert same["max_abs_err"] == 0 and same["grad_max_abs_err"] == 0 and same["speedup"] > 0

    def off(gate, up):  # a wrong kernel: 1% too large
        return reference.swiglu(gate, up) * 1.01

    bad = gpu.compare_kernel(off, reference.swiglu, inputs, grad_of, kw, rounds=1, device="cpu")
    assert 0.005 < bad["max_rel_err"] < 0.05 and bad["grad_max_rel_err"] > 0.005
    inputs, grad_of, kw = cases["rms_norm"]
    r = gpu.compare_kernel(reference.rms_norm, reference.rms_norm, inputs, grad_of, kw, rounds=1, device="cpu")
    assert r["shape"] == [256, 1536] and r["dtype"] == "bfloat16"


# ------------------------------------------------------------------ the bench itself (CUDA)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bench_gpu_quick_on_cuda(tmp_path):
    r = gpu.run_bench(quick=True)
    tr = r["train"]
    assert "error" not in tr, tr
    assert tr["loss_finite"] and 0 < tr["mfu"] < 1 and tr["tokens_per_s"] > 0
    assert r["attention"]["rows"] and all(row["sdpa_fwd_bwd_tflops"] > 0 for row in r["attention"]["rows"])
    if "skipped" not in r["kernels"]:
        assert r["kernels"]["interpreted"] is False
        for name, k in r["kernels"].items():
            if isinstance(k, dict) and "speedup" in k:
                assert k["max_rel_err"] < 3e-2 and k["grad_max_rel_err"] < 5e-2, (name, k)
    doc = gpu.write_docs(r, tmp_path / "benchmarks.md")
    assert _sections(doc.read_text()) == [r["device"]]
    assert math.isfinite(json.loads(json.dumps(r))["train"]["mfu"])


# ------------------------------------------------------------------ scripts/gpu_check.sh


def test_gpu_check_script_parses():
    assert SCRIPT.is_file()
    proc = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    if shutil.which("shellcheck"):
        proc = subprocess.run(["shellcheck", "-S", "warning", str(SCRIPT)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout + proc.stderr


def test_gpu_check_script_is_called_by_nothing_cpu_ci_runs():
    """The bar: CPU CI (.ci/run, which runs pytest) never starts the GPU check. This file only
    reads the script and parses it with `bash -n`; the package names it in prose only."""
    assert "gpu_check" not in (REPO / ".ci" / "run").read_text()
    assert "gpu_check" not in (REPO / "pytest.ini").read_text()
    for path in sorted((REPO / "tests").glob("*.py")):
        if path.name != Path(__file__).name:
            assert "gpu_check" not in path.read_text(), f"{path} refers to scripts/gpu_check.sh"
    for path in sorted((REPO / "aion_train").rglob("*.py")):
        for line in path.read_text().splitlines():
            if "gpu_check" in line:
                assert not any(w in line for w in ("subprocess", "Popen", "os.system", "check_call", "bash")), (
                    f"{path}: {line.strip()}"
                )
