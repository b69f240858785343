"""bench train: the training-step comparison with transformers' Mixtral and the ZeRO per-rank
bytes on 2 real gloo ranks, run once with the bench's QUICK settings."""
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
    assert result["speedup_vs_hf_of_medians"] == pytest.approx(result["tokens_per_s"] / result["hf_tokens_per_s"],
                                                               rel=0.01)
    assert 0 < result["mfu"] < 1
    for stage in ("0", "1", "2", "3"):
        z = result["zero"][stage]
        for key in ("param_bytes", "grad_bytes", "optim_bytes"):
            assert z[key] > 0 and z["theory"][key] > 0, (stage, key)
    # both models saw the same tokens and start near ln(vocab)
    for loss in result["initial_loss"].values():
        assert abs(loss - torch.log(torch.tensor(2048.0)).item()) < 1.0


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
    assert paired_ratio([3.0, 9.0, 4.0, 8.0], [1.0, 3.0, 1.0, 2.0]) == 3.5   # median of 3, 3, 4, 4
