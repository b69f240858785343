"""DeepSpeed engine over our TP/EP groups, the optimizer groups, the schedule, FLOPs."""
import copy
import math

import pytest
import torch

from aion_train.config import load_config
from aion_train.model import build_model
from aion_train.parallel import ParallelPlan, build_groups, parallelize, run_ranks
from aion_train.parallel.verify import fixed_batch, reference
from aion_train.train.metrics import active_params, flops_per_token
from aion_train.train.optim import lr_at, param_groups

CFG = "configs/tiny_cpu.yaml"


def _engine_norm_worker(cfg, tp, ep):
    from aion_train.train.engine import build_engine
    groups = build_groups(tp, ep)
    full = build_model(cfg.model, seed=cfg.seed)
    inputs, labels = fixed_batch(cfg, groups.dp, per_shard=cfg.data.micro_batch_size)
    _, _, ref_grads = reference(copy.deepcopy(full), inputs, labels, groups.dp)
    ref_norm = torch.sqrt(sum(g.double().pow(2).sum() for g in ref_grads.values())).item()
    engine, _ = build_engine(parallelize(full, groups), cfg, groups)
    x = inputs.chunk(groups.dp)[groups.dp_rank]
    y = labels.chunk(groups.dp)[groups.dp_rank]
    out = engine(x, labels=y)
    engine.backward(out.loss)
    engine.step()
    return float(engine.get_global_grad_norm()), ref_norm


@pytest.mark.slow
@pytest.mark.parametrize("zero", [1, 2])
def test_deepspeed_grad_norm_matches_single_process_under_tp_and_ep(zero):
    """DeepSpeed sees our groups: the global gradient norm it clips with (TP-sharded params,
    replicated params counted once, expert grads reduced over the EDP group) equals the norm
    of the single-process model's gradient."""
    cfg = load_config(CFG, ["parallel.tp=2", "parallel.ep=2", f"train.zero_stage={zero}", "train.precision=fp32",
                            "data.micro_batch_size=2", "train.grad_clip=1000"], world_size=4)
    norm, ref = run_ranks(_engine_norm_worker, 4, cfg, 2, 2, timeout_s=120)
    assert norm == pytest.approx(ref, rel=1e-5)


def test_lr_schedule_is_warmup_then_cosine_to_tenth():
    t = load_config(CFG, ["train.steps=110", "train.warmup_steps=10", "train.lr=1e-3"]).train
    assert lr_at(0, t) == pytest.approx(1e-4)
    assert lr_at(9, t) == pytest.approx(1e-3)
    assert lr_at(10, t) == pytest.approx(1e-3)
    mid = 1e-4 + 0.5 * (1e-3 - 1e-4) * (1 + math.cos(math.pi * 50 / 100))
    assert lr_at(60, t) == pytest.approx(mid)
    assert lr_at(110, t) == pytest.approx(1e-4)   # eta_min = 0.1 eta_max


def test_param_groups_no_decay_on_norms_and_experts_apart():
    cfg = load_config(CFG)
    model = parallelize(build_model(cfg.model, seed=0), build_groups())
    groups = param_groups(model, 0.1, ParallelPlan.from_config(cfg.model))
    names = {id(p): n for n, p in model.named_parameters()}
    for g in groups:
        for p in g["params"]:
            n = names[id(p)]
            if "norm" in n:
                assert g["weight_decay"] == 0.0
            if "experts" in n:
                assert g.get("moe") is True and g["name"] == "ep_size_1"
            elif p.dim() >= 2:
                assert g["weight_decay"] == 0.1 and not g.get("moe")
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_adamw_step_matches_the_seed_formula():
    """theta_t = theta - lr * (m_hat / (sqrt(v_hat) + eps) + lambda * theta), decoupled decay."""
    torch.manual_seed(0)
    w = torch.randn(5, requires_grad=True)
    g = torch.randn(5)
    w0 = w.detach().clone()
    opt = torch.optim.AdamW([w], lr=0.1, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    w.grad = g.clone()
    opt.step()
    m_hat = (0.1 * g) / (1 - 0.9)
    v_hat = (0.05 * g * g) / (1 - 0.95)
    want = w0 - 0.1 * (m_hat / (v_hat.sqrt() + 1e-8) + 0.1 * w0)
    assert torch.allclose(w.detach(), want, atol=1e-6)


def test_active_params_count_matches_the_module():
    cfg = load_config(CFG, ["model.moe.every=0"])   # dense: active == all parameters (minus norms)
    model = build_model(cfg.model, seed=0)
    matrices = sum(p.numel() for n, p in model.named_parameters() if p.dim() >= 2 and n != "embed.weight")
    assert active_params(cfg.model)["active"] == matrices
    moe = load_config(CFG).model
    m = moe.moe
    per_expert = 3 * moe.d_model * m.d_ff_expert
    assert (active_params(moe)["total"] - active_params(moe)["active"]
            == moe.n_layers * (m.n_experts - m.top_k) * per_expert + moe.d_model * moe.vocab_size)
    assert flops_per_token(moe, 128) == 6 * active_params(moe)["active"] + 6 * moe.n_layers * 128 * moe.d_model
