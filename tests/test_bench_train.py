"""bench train: the training-step comparison with transformers' Mixtral and the ZeRO per-rank
bytes on 2 real gloo ranks, run once with the bench's QUICK settings; its ratios and rates are
recomputed from the timings the same JSON reports."""

import statistics

import pytest
import torch

from aion_train.bench import train as bench_train


@pytest.fixture(scope="module")
def result():
    return bench_train.run_bench(**bench_train.QUICK)


def test_json_fields_exist_and_are_positive(result):
    import json

    json.dumps(result)  # one JSON line
    for key in ("tokens_per_s", "mfu", "hf_tokens_per_s", "speedup_vs_hf", "speedup_vs_hf_1thread_cpu"):
        assert isinstance(result[key], float) and result[key] > 0, key
    assert 0 < result["mfu"] < 1
    for stage in ("0", "1", "2", "3"):
        z = result["zero"][stage]
        for key in ("param_bytes", "grad_bytes", "optim_bytes"):
            assert z[key] > 0 and z["theory"][key] > 0, (stage, key)
    # both models saw the same tokens and start near ln(vocab)
    for loss in result["initial_loss"].values():
        assert abs(loss - torch.log(torch.tensor(2048.0)).item()) < 1.0


def _tokens_per_s(tokens: int, step_ms: list[float]) -> float:
    return tokens / statistics.median(step_ms) * 1e3


def test_ratios_follow_from_the_reported_timings(result):
    """Every ratio and rate is recomputed here from the per-round step times (and the other
    inputs) the same JSON reports."""
    tok, rounds = result["tokens_per_step"], result["step_ms_rounds"]
    for r in (result, result["fp32"]):
        ours, hf = r["step_ms_rounds"]["ours"], r["step_ms_rounds"]["hf"]
        assert len(ours) == len(hf) == result["rounds"] and all(t > 0 for t in ours + hf)
        assert r["speedup_vs_hf"] == round(statistics.median(h / o for h, o in zip(hf, ours)), 3)
        assert r["step_ms"] == {k: round(statistics.median(v), 2) for k, v in r["step_ms_rounds"].items()}
        assert r["tokens_per_s"] == round(_tokens_per_s(tok, ours), 1)
        assert r["hf_tokens_per_s"] == round(_tokens_per_s(tok, hf), 1)
    ours_tps, hf_tps = _tokens_per_s(tok, rounds["ours"]), _tokens_per_s(tok, rounds["hf"])
    assert result["speedup_vs_hf_of_medians"] == round(ours_tps / hf_tps, 3)
    fpt, peak = result["flops_per_token"], result["peak_flops"]
    assert result["mfu"] == round(fpt * ours_tps / peak, 4) and result["hf_mfu"] == round(fpt * hf_tps / peak, 4)
    cpu = result["cpu_ms_1thread"]
    assert result["speedup_vs_hf_1thread_cpu"] == round(cpu["hf"] / cpu["ours"], 3)
    z = result["zero"]
    for key, (stage, field) in {
        "zero1_optim_ratio": ("1", "optim_bytes"),
        "zero2_grad_ratio": ("2", "grad_bytes"),
        "zero3_param_ratio": ("3", "param_bytes"),
    }.items():
        assert z[key] == round(z[stage][field] / z["0"][field], 4), key
    assert result["tokens_per_step"] == result["micro_batch_size"] * result["seq_len"]


def test_hf_reference_has_our_parameter_count(result):
    cfg = bench_train.load_bench_config()
    from aion_train.model import build_model

    ours = build_model(cfg.model, seed=0)
    hf = bench_train.build_hf_model(cfg.model, seed=0)
    n_ours, n_hf = bench_train.param_count(ours), bench_train.param_count(hf)
    assert n_ours == n_hf == result["params"] == result["hf_params"]
    # and the same pieces: experts, router, attention, embeddings, head
    m = cfg.model
    experts = sum(p.numel() for n, p in hf.named_parameters() if ".experts." in n)
    assert experts == m.n_layers * m.moe.n_experts * 3 * m.d_model * m.moe.d_ff_expert
    assert experts == sum(p.numel() for n, p in ours.named_parameters() if ".experts." in n)
    assert hf.config.num_experts_per_tok == m.moe.top_k and hf.config.output_router_logits
    assert hf.config.router_aux_loss_coef == m.moe.balance_coef


def test_zero_bytes_follow_theory(result):
    z = result["zero"]
    assert z["zero1_optim_ratio"] == pytest.approx(0.5, rel=0.05)
    assert z["zero3_param_ratio"] == pytest.approx(0.5, rel=0.05)
    assert z["2"]["grad_bytes"] / z["0"]["grad_bytes"] == pytest.approx(0.5, rel=0.05)
    n = z["0"]["params"]
    assert z["0"]["param_bytes"] == 4 * n and z["0"]["grad_bytes"] == 4 * n and z["0"]["optim_bytes"] == 8 * n
    for stage in ("0", "1", "2", "3"):
        for key in ("param_bytes", "grad_bytes", "optim_bytes"):
            assert z[stage][key] == pytest.approx(z[stage]["theory"][key], rel=0.05), (stage, key)
        # both ranks hold the same amount
        a, b = z[stage]["per_rank"]
        assert a == pytest.approx(b, rel=0.01)


def test_paired_ratio_is_the_median_of_round_ratios():
    from aion_train.bench.timing import paired_ratio

    # a slow second round (both 2x) leaves the round ratios, and so the result, unchanged
    assert paired_ratio([10.0, 20.0, 11.0], [5.0, 10.0, 5.0]) == 2.0
    assert paired_ratio([3.0, 9.0, 4.0, 8.0], [1.0, 3.0, 1.0, 2.0]) == 3.5  # median of 3, 3, 4, 4


def _check_size_entry(entry: dict, tokens: int):
    ours, hf = entry["step_ms_rounds"]["ours"], entry["step_ms_rounds"]["hf"]
    assert len(ours) == len(hf) > 0 and all(t > 0 for t in ours + hf)
    assert entry["speedup_vs_hf"] == round(statistics.median(h / o for h, o in zip(hf, ours)), 3)
    assert entry["tokens_per_s"] == round(_tokens_per_s(tokens, ours), 1)
    assert entry["hf_tokens_per_s"] == round(_tokens_per_s(tokens, hf), 1)
    fpt, peak = entry["flops_per_token"], entry["peak_flops"]
    assert entry["mfu"] == round(fpt * entry["tokens_per_s"] / peak, 4)
    assert entry["hf_mfu"] == round(fpt * entry["hf_tokens_per_s"] / peak, 4)


def test_sweep_reports_the_tiny_size_as_the_top_level(result):
    """The sweep's first size is the tiny config, in both precisions, with the top-level numbers."""
    tiny = result["sizes"][0]
    assert tiny["name"] == "tiny" and tiny["params"] == result["params"]
    assert tiny["bf16"]["speedup_vs_hf"] == result["speedup_vs_hf"]
    assert tiny["fp32"]["speedup_vs_hf"] == result["fp32"]["speedup_vs_hf"]
    for precision in ("bf16", "fp32"):
        _check_size_entry(tiny[precision], result["tokens_per_step"])
    assert set(result["peak"]["tflops"]) == {"bf16", "fp32"} and "matmul" in result["peak"]["method"]


def test_one_size_of_the_sweep_in_both_precisions(monkeypatch):
    """measure_size times our step and Mixtral's of identical size in bf16 and fp32; the
    parameter count is the model's own."""
    monkeypatch.setitem(bench_train.SIZE_CONFIGS, "small", "configs/tiny_cpu.yaml")
    entry = bench_train.measure_size("small", rounds=2, warmup=1, threads=None)
    cfg = bench_train.load_bench_config("configs/tiny_cpu.yaml")
    from aion_train.model import build_model

    assert entry["params"] == bench_train.param_count(build_model(cfg.model, seed=0))
    assert entry["tokens_per_step"] == cfg.data.micro_batch_size * cfg.data.seq_len
    for precision in ("bf16", "fp32"):
        _check_size_entry(entry[precision], entry["tokens_per_step"])
