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
    cfg = load_config(
        CFG,
        [
            "parallel.tp=2",
            "parallel.ep=2",
            f"train.zero_stage={zero}",
            "train.precision=fp32",
            "data.micro_batch_size=2",
            "train.grad_clip=1000",
        ],
        world_size=4,
    )
    norm, ref = run_ranks(_engine_norm_worker, 4, cfg, 2, 2, timeout_s=120)
    assert norm == pytest.approx(ref, rel=1e-5)


def test_lr_schedule_is_warmup_then_cosine_to_tenth():
    t = load_config(CFG, ["train.steps=110", "train.warmup_steps=10", "train.lr=1e-3"]).train
    assert lr_at(0, t) == pytest.approx(1e-4)
    assert lr_at(9, t) == pytest.approx(1e-3)
    assert lr_at(10, t) == pytest.approx(1e-3)
    mid = 1e-4 + 0.5 * (1e-3 - 1e-4) * (1 + math.cos(math.pi * 50 / 100))
    assert lr_at(60, t) == pytest.approx(mid)
    assert lr_at(110, t) == pytest.approx(1e-4)  # eta_min = 0.1 eta_max


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


def _engine_adamw_worker(cfg, steps):
    """`steps` DeepSpeed-engine steps on one fixed batch, next to the same steps with AdamW
    written out here (float64 moments) on a single-process copy of the model."""
    from aion_train.parallel.deepspeed_adapter import init_comm
    from aion_train.train.engine import build_engine

    t = cfg.train
    (b1, b2), lr, eps, wd, clip = t.betas, t.lr, t.eps, t.weight_decay, t.grad_clip
    init_comm("gloo")  # a 1-rank group, as the trainer has (bench train does the same)
    groups = build_groups(1, 1)
    full = build_model(cfg.model, seed=cfg.seed)
    ref = copy.deepcopy(full)
    x, y = fixed_batch(cfg, 1, per_shard=cfg.data.micro_batch_size, seq_len=cfg.data.seq_len)
    engine, _ = build_engine(parallelize(full, groups), cfg, groups)
    start = {n: p.detach().double().clone() for n, p in ref.named_parameters()}
    m = {n: torch.zeros_like(p) for n, p in start.items()}
    v = {n: torch.zeros_like(p) for n, p in start.items()}
    clipped = []
    for step in range(1, steps + 1):
        engine.backward(engine(x, labels=y).loss)
        engine.step()
        ref.zero_grad(set_to_none=True)
        ref(x, labels=y).loss.backward()
        grads = {n: p.grad.double() for n, p in ref.named_parameters()}
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads.values()))
        coef = min(1.0, clip / (norm.item() + 1e-6))  # clip the global norm to `clip`
        clipped.append(coef < 1.0)
        with torch.no_grad():
            for n, p in ref.named_parameters():
                g = grads[n] * coef
                decay = 0.0 if p.dim() < 2 or "norm" in n else wd  # norms are not decayed
                w = p.double() * (1 - lr * decay)  # decoupled weight decay
                m[n] = b1 * m[n] + (1 - b1) * g
                v[n] = b2 * v[n] + (1 - b2) * g * g
                m_hat, v_hat = m[n] / (1 - b1**step), v[n] / (1 - b2**step)
                p.copy_(w - lr * m_hat / (v_hat.sqrt() + eps))
    # per parameter: the largest change by hand, and the largest |engine - hand| in units of
    # (1e-6 + 1e-6 |hand|), fp32's tolerance (small numbers: a rank's result goes back through a pipe)
    out = {}
    for n, p in engine.module.named_parameters():
        hand = ref.get_parameter(n).detach().double()
        err = (p.detach().double() - hand).abs() / (1e-6 + 1e-6 * hand.abs())
        out[n] = ((hand - start[n]).abs().max().item(), err.max().item())
    return out, clipped


def test_deepspeed_engine_steps_equal_adamw_by_hand():
    """Five steps of the engine training uses (ZeRO-1, fp32, the global norm clipped) move
    every parameter as AdamW written out: m, v, bias corrections 1 - b^t, eps, decoupled
    decay on matrices only."""
    cfg = load_config(
        CFG,
        [
            "train.precision=fp32",
            "train.zero_stage=1",
            "train.lr=0.01",
            "train.weight_decay=0.1",
            "train.grad_clip=2.0",
            "data.micro_batch_size=2",
            "data.seq_len=16",
            "model.vocab_size=128",
            "model.d_model=32",
            "model.d_ff=64",
            "model.moe.d_ff_expert=32",
            "model.max_seq_len=32",
        ],
    )
    moved, clipped = run_ranks(_engine_adamw_worker, 1, cfg, 5, timeout_s=240)
    assert any(clipped) and not all(clipped)  # the clip both acted and did not
    assert len(moved) == len(list(build_model(cfg.model, seed=0).parameters()))
    for n, (change, err) in moved.items():
        assert change > 1e-4, n  # every parameter really moved (>> the tolerance)
        assert err <= 1.0, (n, err)  # |engine - hand| <= 1e-6 + 1e-6 |hand|


def test_active_params_count_matches_the_module():
    cfg = load_config(CFG, ["model.moe.every=0"])  # dense: active == all parameters (minus norms)
    model = build_model(cfg.model, seed=0)
    matrices = sum(p.numel() for n, p in model.named_parameters() if p.dim() >= 2 and n != "embed.weight")
    assert active_params(cfg.model)["active"] == matrices
    moe = load_config(CFG).model
    m = moe.moe
    per_expert = 3 * moe.d_model * m.d_ff_expert
    assert (
        active_params(moe)["total"] - active_params(moe)["active"]
        == moe.n_layers * (m.n_experts - m.top_k) * per_expert + moe.d_model * moe.vocab_size
    )
    assert flops_per_token(moe, 128) == 6 * active_params(moe)["active"] + 6 * moe.n_layers * 128 * moe.d_model
