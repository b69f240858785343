"""Cross-field rules, checked before any process starts. Every message names its keys."""

from __future__ import annotations

from pathlib import Path

from . import multimodal_schema, pipeline_schema, posttrain_schema, ppo_schema
from .errors import ConfigError, require_divisible
from .schema import Config

CHOICES = {
    "model.activation": ("swiglu", "gelu", "relu"),
    "model.norm": ("rmsnorm", "layernorm"),
    "model.attention_backend": ("auto", "sdpa", "flash"),
    "model.kernels": ("auto", "torch", "triton"),
    "parallel.backend": ("auto", "gloo", "nccl"),
    "train.precision": ("fp32", "bf16", "fp16"),
    "train.compile": ("eager", "blocks"),
    "runtime.progress_bar": ("auto", "always", "never"),
    "runtime.cpu_allocator": ("keep", "system"),
    "runtime.grouped_mm": ("auto", "grouped", "per_expert"),
}


def _get(cfg, dotted):
    node = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def has_moe(cfg: Config) -> bool:
    return cfg.model.moe.every > 0 and cfg.model.moe.n_experts > 1


def data_parallel_size(cfg: Config) -> int | None:
    p = cfg.parallel
    if p.dp is not None:
        return p.dp
    if p.world_size is not None and p.world_size % p.tp == 0:
        return p.world_size // p.tp
    return None


def validate_config(cfg: Config) -> Config:
    errors: list[str] = []
    m, moe, p, t = cfg.model, cfg.model.moe, cfg.parallel, cfg.train

    for key, allowed in CHOICES.items():
        if _get(cfg, key) not in allowed:
            errors.append(f"{key}={_get(cfg, key)!r}: must be one of {', '.join(allowed)}")

    positive = [
        "model.vocab_size",
        "model.d_model",
        "model.n_layers",
        "model.n_heads",
        "model.d_ff",
        "model.max_seq_len",
        "parallel.tp",
        "parallel.ep",
        "data.seq_len",
        "data.micro_batch_size",
        "train.steps",
        "train.grad_accum",
    ]
    for key in positive:
        if _get(cfg, key) < 1:
            errors.append(f"{key}={_get(cfg, key)}: must be >= 1")
    if errors:
        raise ConfigError(errors)

    kv = m.n_kv_heads or m.n_heads
    if m.d_model % m.n_heads:
        errors.append(f"model.d_model={m.d_model} is not divisible by model.n_heads={m.n_heads}")
    elif (m.d_model // m.n_heads) % 2:
        errors.append(f"model.d_model/model.n_heads={m.d_model // m.n_heads}: RoPE needs an even head dim")
    if m.n_heads % kv:
        errors.append(f"model.n_heads={m.n_heads} is not divisible by model.n_kv_heads={kv}")
    for key, val in (
        ("model.n_heads", m.n_heads),
        ("model.n_kv_heads", kv),
        ("model.d_ff", m.d_ff),
        ("model.vocab_size", m.vocab_size),
    ):
        if val % p.tp:
            errors.append(f"{key}={val} is not divisible by parallel.tp={p.tp}")
    if p.sequence_parallel and cfg.data.seq_len % p.tp:
        errors.append(
            f"data.seq_len={cfg.data.seq_len} is not divisible by parallel.tp={p.tp} "
            "(parallel.sequence_parallel splits the sequence over TP)"
        )
    if cfg.data.seq_len > m.max_seq_len:
        errors.append(f"data.seq_len={cfg.data.seq_len} exceeds model.max_seq_len={m.max_seq_len}")
    if m.attention_backend == "flash" and t.precision == "fp32":
        errors.append(
            "model.attention_backend=flash needs train.precision bf16 or fp16 (flash-attn has no fp32 "
            "kernels); use model.attention_backend=auto to run torch SDPA in fp32"
        )

    if has_moe(cfg):
        if not 1 <= moe.top_k <= moe.n_experts:
            errors.append(f"model.moe.top_k={moe.top_k} must be between 1 and model.moe.n_experts={moe.n_experts}")
        require_divisible(errors, "model.moe.n_experts", moe.n_experts, "parallel.ep", p.ep)
        for key in ("d_ff_expert", "shared_expert_d_ff"):
            require_divisible(errors, f"model.moe.{key}", getattr(moe, key), "parallel.tp", p.tp)
        if moe.capacity_factor is not None and moe.capacity_factor <= 0:
            errors.append(f"model.moe.capacity_factor={moe.capacity_factor} must be > 0 (or null for dropless)")
        if t.zero_stage == 3:
            errors.append(
                "train.zero_stage=3 with MoE layers (model.moe.every>0): DeepSpeed refuses MoE "
                "under ZeRO-3; use train.zero_stage 0, 1 or 2"
            )
    elif p.ep > 1:
        errors.append(f"parallel.ep={p.ep} needs MoE layers (model.moe.every>0, model.moe.n_experts>1)")

    if p.world_size is not None:
        if p.dp is not None and p.tp * p.dp != p.world_size:
            errors.append(
                f"parallel.world_size={p.world_size} is not parallel.tp x parallel.dp = {p.tp} x {p.dp} = {p.tp * p.dp}"
            )
        elif p.world_size % p.tp:
            errors.append(f"parallel.world_size={p.world_size} is not divisible by parallel.tp={p.tp}")
    dp = data_parallel_size(cfg)
    if dp is not None and dp % p.ep:
        errors.append(
            f"parallel.ep={p.ep} does not divide the data-parallel size {dp} (parallel.world_size / parallel.tp)"
        )
    if t.compile != "eager" and (t.zero_stage == 3 or p.tp > 1 or p.ep > 1):
        errors.append(
            f"train.compile={t.compile!r} with train.zero_stage={t.zero_stage}, parallel.tp={p.tp}, "
            f"parallel.ep={p.ep}: compiled blocks run with ZeRO 0-2 and without tensor/expert-parallel "
            "layers (ZeRO-3 gathers weights in per-module hooks and the parallel layers communicate inside "
            "the block); set train.compile=eager"
        )
    if t.compile != "eager" and t.activation_checkpointing:
        errors.append(
            f"train.compile={t.compile!r} with train.activation_checkpointing=true: the recomputation in "
            "backward can pick another compiled graph than the forward did (torch.utils.checkpoint then "
            "finds different saved tensors); set one of them off"
        )
    if t.zero_stage not in (0, 1, 2, 3):
        errors.append(f"train.zero_stage={t.zero_stage}: must be 0, 1, 2 or 3")
    if t.init_from and not Path(t.init_from).exists():
        errors.append(f"train.init_from={t.init_from!r}: no such folder (a Hugging Face model folder or a checkpoint)")
    if not 0 <= t.min_lr_ratio <= 1:
        errors.append(f"train.min_lr_ratio={t.min_lr_ratio}: must be in [0, 1]")
    for section in (multimodal_schema, posttrain_schema, ppo_schema, pipeline_schema):
        section.check(cfg, errors)
    if errors:
        raise ConfigError(errors)
    return cfg
