"""Exact parameter counts of `aion_train.model.Transformer`, split the way `parallelize` shards
them: TP-sharded dense weights, weights replicated over TP (norms, routers) and expert weights
(split over EP by expert and over TP by hidden width)."""

from __future__ import annotations

from dataclasses import dataclass

from aion_train.config import ModelConfig


def is_moe_layer(cfg: ModelConfig, layer: int) -> bool:
    """Same rule as `aion_train.model.transformer.is_moe_layer`, without importing torch (the
    planner runs on login nodes; tests/test_planner.py checks that the two agree)."""
    m = cfg.moe
    return m.every > 0 and m.n_experts > 1 and (layer + 1) % m.every == 0


@dataclass(frozen=True)
class ParamCounts:
    tp_sharded: int  # attention projections, dense/shared FFNs, embedding, LM head
    replicated: int  # norm weights, router weights (every TP rank holds all of them)
    expert: int  # routed experts' weights
    active: int  # parameters one token passes through (top_k of the experts)

    @property
    def total(self) -> int:
        return self.tp_sharded + self.replicated + self.expert

    @property
    def dense(self) -> int:
        return self.tp_sharded + self.replicated

    def per_rank(self, tp: int, ep: int) -> tuple[float, float]:
        """(dense, expert) parameters held by one rank before any ZeRO sharding."""
        return self.tp_sharded / tp + self.replicated, self.expert / (ep * tp)


def glu_mats(activation: str) -> int:
    return 3 if activation == "swiglu" else 2


def count_params(cfg: ModelConfig) -> ParamCounts:
    d, v = cfg.d_model, cfg.vocab_size
    hd = d // cfg.n_heads
    kv = cfg.n_kv_heads or cfg.n_heads
    norm = 2 * d if cfg.norm == "layernorm" else d
    g = glu_mats(cfg.activation)
    attn = d * cfg.n_heads * hd * 2 + d * kv * hd * 2  # q, o + k, v
    sharded = v * d + (0 if cfg.tie_embeddings else v * d)  # embedding + LM head
    replicated = norm  # final norm
    expert = 0
    active_expert = 0
    for layer in range(cfg.n_layers):
        sharded += attn
        replicated += 2 * norm
        if is_moe_layer(cfg, layer):
            m = cfg.moe
            replicated += m.n_experts * d  # router
            sharded += g * d * m.shared_expert_d_ff  # shared expert (0 if none)
            expert += m.n_experts * g * d * m.d_ff_expert
            active_expert += m.top_k * g * d * m.d_ff_expert
        else:
            sharded += g * d * cfg.d_ff
    return ParamCounts(sharded, replicated, expert, sharded + replicated + active_expert)
