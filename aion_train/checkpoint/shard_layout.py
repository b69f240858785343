"""Which rank holds which slice of which parameter in a (tp, ep) layout, computed without
torch.distributed, and which rank writes each distinct model shard into a checkpoint."""
from __future__ import annotations

from aion_train.config import ModelConfig
from aion_train.model.transformer import is_moe_layer

Spec = dict[str, list[tuple[int, int, int]]]


def saver_rank(tp: int, tp_rank: int, ep_rank: int) -> int:
    """The global rank that wrote the model payload of shard (tp_rank, ep_rank)."""
    return ep_rank * tp + tp_rank


def shard_spec_for(cfg: ModelConfig, tp: int, ep: int, tp_rank: int, ep_rank: int) -> Spec:
    """What `parallelize(model, groups).shard_spec` is on the rank (tp_rank, ep_rank) of a
    (tp, ep) layout: {parameter name: [(dim, rank, n_parts), ...]} (sequence parallelism
    does not change any parameter's shape). For a multimodal model the names carry the
    trunk's "lm." prefix."""
    spec: Spec = {}
    t = (tp_rank, tp)
    e = (ep_rank, ep)
    moe = cfg.moe
    for i in range(cfg.n_layers):
        pre = f"blocks.{i}"
        if tp > 1:
            for name in ("q_proj", "k_proj", "v_proj"):
                spec[f"{pre}.attn.{name}.weight"] = [(0, *t)]
            spec[f"{pre}.attn.o_proj.weight"] = [(1, *t)]
        ffns = []
        if is_moe_layer(cfg, i):
            if tp > 1 or ep > 1:
                spec[f"{pre}.ffn.experts.w1"] = [(0, *e), (2, *t)]
                spec[f"{pre}.ffn.experts.w2"] = [(0, *e), (1, *t)]
                if cfg.activation == "swiglu":
                    spec[f"{pre}.ffn.experts.w3"] = [(0, *e), (2, *t)]
            if moe.shared_expert_d_ff:
                ffns.append(f"{pre}.ffn.shared_expert")
        else:
            ffns.append(f"{pre}.ffn")
        if tp > 1:
            for fpre in ffns:
                if cfg.activation == "swiglu":
                    spec[f"{fpre}.w_gate.weight"] = [(0, *t)]
                spec[f"{fpre}.w_up.weight"] = [(0, *t)]
                spec[f"{fpre}.w_down.weight"] = [(1, *t)]
    if tp > 1:
        spec["embed.weight"] = [(0, *t)]
        spec["lm_head.weight"] = [(0, *t)]
    if getattr(cfg, "multimodal", None) is not None and cfg.multimodal.enabled:
        spec = {f"lm.{k}": v for k, v in spec.items()}  # the trunk of MultimodalModel; encoders replicated
    return spec


def check_divisible(cfg: ModelConfig, tp: int, ep: int) -> None:
    errors = []
    kv = cfg.n_kv_heads or cfg.n_heads
    for key, val in (("model.n_heads", cfg.n_heads), ("model.n_kv_heads", kv), ("model.d_ff", cfg.d_ff),
                     ("model.vocab_size", cfg.vocab_size), ("model.moe.d_ff_expert", cfg.moe.d_ff_expert),
                     ("model.moe.shared_expert_d_ff", cfg.moe.shared_expert_d_ff)):
        if val % tp:
            errors.append(f"{key}={val} is not divisible by tp={tp}")
    if ep > 1 and cfg.moe.n_experts % ep:
        errors.append(f"model.moe.n_experts={cfg.moe.n_experts} is not divisible by ep={ep}")
    if errors:
        raise ValueError("cannot shard this model: " + "; ".join(errors))
