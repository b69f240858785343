"""The parallel plan as a value: checked by hand on small configs, without ranks."""

from __future__ import annotations

import pytest

from aion_train.config import load_config
from aion_train.parallel.plan import (
    ALL_TO_ALL_DISPATCH,
    COLUMN,
    EXPERTS,
    LM_HEAD,
    ROW,
    TIED_LM_HEAD,
    VOCAB_EMBEDDING,
    ParallelPlan,
)


def _cfg(*overrides):
    # two layers: layer 0 dense, layer 1 MoE (every=2) with a shared expert
    return load_config(
        overrides=[
            "model.n_layers=2",
            "model.moe.every=2",
            "model.moe.n_experts=4",
            "model.moe.shared_expert_d_ff=64",
            *overrides,
        ]
    ).model


def test_tp2_ep2_splits_every_parameter_as_megatron_does():
    plan = ParallelPlan.from_config(_cfg(), tp=2, ep=2)
    spec = plan.shard_spec(tp_rank=1, ep_rank=0)
    col, row = [(0, 1, 2)], [(1, 1, 2)]
    want = {
        **{f"blocks.{i}.attn.{n}.weight": col for i in (0, 1) for n in ("q_proj", "k_proj", "v_proj")},
        **{f"blocks.{i}.attn.o_proj.weight": row for i in (0, 1)},
        "blocks.0.ffn.w_gate.weight": col,
        "blocks.0.ffn.w_up.weight": col,
        "blocks.0.ffn.w_down.weight": row,
        "blocks.1.ffn.shared_expert.w_gate.weight": col,
        "blocks.1.ffn.shared_expert.w_up.weight": col,
        "blocks.1.ffn.shared_expert.w_down.weight": row,
        # experts [E, d, ff] / [E, ff, d]: experts over EP (dim 0), hidden width over TP
        "blocks.1.ffn.experts.w1": [(0, 0, 2), (2, 1, 2)],
        "blocks.1.ffn.experts.w3": [(0, 0, 2), (2, 1, 2)],
        "blocks.1.ffn.experts.w2": [(0, 0, 2), (1, 1, 2)],
        "embed.weight": col,
        "lm_head.weight": col,
    }
    assert spec == want
    assert {n for n, p in plan.params.items() if p.is_expert} == {f"blocks.1.ffn.experts.w{k}" for k in (1, 2, 3)}
    assert all(p.grad_group == ("edp" if p.is_expert else "dp") for p in plan.params.values())
    assert plan.modules["blocks.0.attn.q_proj"] == COLUMN and plan.modules["blocks.1.attn.o_proj"] == ROW
    assert plan.modules["blocks.1.ffn.experts"] == EXPERTS and plan.modules["blocks.1.ffn"] == ALL_TO_ALL_DISPATCH
    assert plan.modules["embed"] == VOCAB_EMBEDDING and plan.modules["lm_head"] == LM_HEAD
    assert list(plan.modules).index("embed") < list(plan.modules).index("lm_head")  # tying needs this order
    # replicated: norms and the router
    assert "blocks.1.ffn.router.weight" in plan.params and "blocks.1.ffn.router.weight" not in spec
    assert "norm.weight" in plan.params and not plan.params["norm.weight"].grad_sum_over_tp


def test_one_rank_splits_nothing_and_ep_alone_splits_only_experts():
    assert ParallelPlan.from_config(_cfg(), 1, 1).shard_spec() == {}
    assert ParallelPlan.from_config(_cfg(), 1, 1).modules == {}
    spec = ParallelPlan.from_config(_cfg(), tp=1, ep=2).shard_spec(0, 1)
    assert spec == {
        "blocks.1.ffn.experts.w1": [(0, 1, 2), (2, 0, 1)],
        "blocks.1.ffn.experts.w3": [(0, 1, 2), (2, 0, 1)],
        "blocks.1.ffn.experts.w2": [(0, 1, 2), (1, 0, 1)],
    }


def test_sequence_parallel_sums_exactly_the_norm_weights_over_tp():
    plan = ParallelPlan.from_config(_cfg("model.norm=layernorm"), tp=2, ep=1, sequence_parallel=True)
    summed = {n for n, p in plan.params.items() if p.grad_sum_over_tp}
    norms = {f"blocks.{i}.{k}.{w}" for i in (0, 1) for k in ("attn_norm", "ffn_norm") for w in ("weight", "bias")}
    assert summed == norms | {"norm.weight", "norm.bias"}
    # without TP there is no sequence to split
    assert not ParallelPlan.from_config(_cfg(), tp=1, ep=1, sequence_parallel=True).sequence_parallel


@pytest.mark.parametrize("activation", ["gelu", "relu"])
def test_non_gated_ffns_have_no_gate(activation):
    spec = ParallelPlan.from_config(_cfg(f"model.activation={activation}"), tp=2, ep=1).shard_spec(0, 0)
    assert "blocks.0.ffn.w_gate.weight" not in spec and "blocks.1.ffn.experts.w3" not in spec
    assert spec["blocks.0.ffn.w_up.weight"] == [(0, 0, 2)]


def test_tied_embeddings_keep_both_names_and_multimodal_names_carry_the_trunk_prefix():
    plan = ParallelPlan.from_config(_cfg("model.tie_embeddings=true"), tp=2, ep=1)
    spec = plan.shard_spec(0, 0)
    assert spec["embed.weight"] == spec["lm_head.weight"] == [(0, 0, 2)]
    assert plan.modules["lm_head"] == TIED_LM_HEAD
    mm = load_config("configs/tiny_multimodal_cpu.yaml").model
    mplan = ParallelPlan.from_config(mm, tp=2, ep=1)
    assert mplan.params and all(n.startswith("lm.") for n in mplan.params)
    assert mplan.shard_spec(1, 0)["lm.embed.weight"] == [(0, 1, 2)]
    assert mplan.layout() == {"tp": 2, "ep": 1, "sequence_parallel": False}


def test_a_wrapped_trunk_gets_its_plan_under_its_own_path():
    """A reward model or critic holds the trunk as `backbone`: the engine's plan (expert
    gradient groups, TP tags) must name its parameters as they are in the wrapper."""
    from aion_train.model import build_model
    from aion_train.posttrain.reward import RewardModel

    cfg = _cfg()
    rm = RewardModel(build_model(cfg, seed=0), cfg.d_model)
    plan = ParallelPlan.for_model(rm, cfg, tp=2, ep=2)
    names = {n for n, _ in rm.named_parameters()}
    experts = {n for n in names if plan.is_expert(n)}
    assert experts == {f"backbone.blocks.1.ffn.experts.w{k}" for k in (1, 2, 3)}
    assert plan.tp_sharded("backbone.blocks.0.attn.q_proj.weight") and not plan.tp_sharded("head.weight")
    bare = ParallelPlan.for_model(build_model(cfg, seed=0), cfg, tp=2, ep=2)
    assert bare.shard_spec(1, 1) == ParallelPlan.from_config(cfg, 2, 2).shard_spec(1, 1)
