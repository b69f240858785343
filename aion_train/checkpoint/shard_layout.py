"""Which rank holds which slice of which parameter in a (tp, ep) layout (the model's
`ParallelPlan`, computed without torch.distributed), and which rank writes each distinct
model shard into a checkpoint."""

from __future__ import annotations

from aion_train.config import ModelConfig
from aion_train.parallel.plan import ParallelPlan, Spec


def saver_rank(tp: int, tp_rank: int, ep_rank: int) -> int:
    """The global rank that wrote the model payload of shard (tp_rank, ep_rank)."""
    return ep_rank * tp + tp_rank


def shard_spec_for(cfg: ModelConfig, tp: int, ep: int, tp_rank: int, ep_rank: int) -> Spec:
    """What the rank (tp_rank, ep_rank) of a (tp, ep) layout holds: its `ParallelPlan`'s
    shard spec, {parameter name: [(dim, rank, n_parts), ...]} (sequence parallelism does not
    change any parameter's shape). For a multimodal model the names carry the trunk's "lm."
    prefix."""
    return ParallelPlan.from_config(cfg, tp, ep).shard_spec(tp_rank, ep_rank)


def check_divisible(cfg: ModelConfig, tp: int, ep: int) -> None:
    errors = []
    kv = cfg.n_kv_heads or cfg.n_heads
    for key, val in (
        ("model.n_heads", cfg.n_heads),
        ("model.n_kv_heads", kv),
        ("model.d_ff", cfg.d_ff),
        ("model.vocab_size", cfg.vocab_size),
        ("model.moe.d_ff_expert", cfg.moe.d_ff_expert),
        ("model.moe.shared_expert_d_ff", cfg.moe.shared_expert_d_ff),
    ):
        if val % tp:
            errors.append(f"{key}={val} is not divisible by tp={tp}")
    if ep > 1 and cfg.moe.n_experts % ep:
        errors.append(f"model.moe.n_experts={cfg.moe.n_experts} is not divisible by ep={ep}")
    if errors:
        raise ValueError("cannot shard this model: " + "; ".join(errors))
