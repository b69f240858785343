"""Per-GPU training memory: model states by ZeRO stage plus activations, and a search for the
TP / EP / ZeRO / checkpointing layout that fits.

Model states (Rajbhandari et al. 2020, ZeRO, sec. 3.1 and 5): mixed-precision Adam holds
2 bytes of bf16/fp16 parameters, 2 of gradients and 12 of fp32 master weights + momentum +
variance per parameter (16 in all); plain fp32 training holds 4 + 4 + 8. Stage 1 shards the
optimizer states over the data-parallel ranks, stage 2 also the gradients, stage 3 also the
parameters. Dense parameters are first split by TP and sharded over DP = gpus / TP; expert
parameters are split by EP x TP and sharded over the expert-data-parallel group EDP = DP / EP
only (DeepSpeed's MoE parameter groups). Not counted: DeepSpeed's communication buckets, fp32
gradient partitions, the CUDA context and allocator fragmentation; the headroom is for those.

Activations per layer (Korthikanti et al. 2022, "Reducing Activation Recomputation", sec. 4):
s b h (34 + 5 a s / h) bytes for a GPT layer with 16-bit activations, dropout and a 4h GeLU MLP;
with tensor + sequence parallelism everything is divided by t, and with full recomputation
only the layer input (2 s b h) is kept. Here the same terms are spelled out for this model:
no dropout (unless asked), SwiGLU/GeLU/ReLU FFNs of their own width, fused attention kernels
that keep only the fp32 log-sum-exp instead of the a s^2 b score matrices (flash-attn and
torch SDPA on CUDA; `attention_scores=True` counts the scores as an eager kernel would), and
MoE layers that keep top_k copies of every token (dispatched input, expert hidden states and
expert output) plus the fp32 router activations; the MoE layer routes the gathered sequence, so
those terms are not divided by TP. Balanced routing is assumed: a dropless MoE whose router
sends more tokens to one rank's experts needs more.

The terms follow what the torch implementation of the model saves for backward (checked per
layer against autograd's saved tensors in tests/test_planner.py): the fp32 RMSNorm keeps its
fp32 input and output, SwiGLU four tensors of FFN width. Fused kernels that keep less (an
RMSNorm keeping only its input, a SwiGLU only its two inputs, a fused LM head + loss without
logits) make this an upper bound. Around the loss the logits, the fp32 log-probabilities and
their fp32 gradient are counted (the peak at the start of backward).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from aion_train.config import Config, ConfigError, has_moe, validate_config

from .params import count_params, is_moe_layer

GIB = 1024**3
MAX_TP = 8  # tensor parallelism stays inside one node
DEFAULT_HEADROOM = 0.10


@dataclass(frozen=True)
class Layout:
    gpus: int
    tp: int = 1
    ep: int = 1
    zero: int = 1
    checkpointing: bool = False
    sequence_parallel: bool = False

    @property
    def dp(self) -> int:
        return self.gpus // self.tp

    @property
    def edp(self) -> int:
        return max(1, self.dp // self.ep)

    def as_dict(self) -> dict:
        return {
            "gpus": self.gpus,
            "tp": self.tp,
            "dp": self.dp,
            "ep": self.ep,
            "edp": self.edp,
            "zero_stage": self.zero,
            "activation_checkpointing": self.checkpointing,
            "sequence_parallel": self.sequence_parallel,
        }

    def overrides(self) -> list[str]:
        return [
            f"parallel.tp={self.tp}",
            f"parallel.ep={self.ep}",
            f"train.zero_stage={self.zero}",
            f"train.activation_checkpointing={str(self.checkpointing).lower()}",
            f"parallel.sequence_parallel={str(self.sequence_parallel).lower()}",
        ]


def state_bytes_per_param(precision: str) -> tuple[int, int, int]:
    """(parameter, gradient, optimizer-state) bytes per parameter with Adam."""
    if precision in ("bf16", "fp16"):
        return 2, 2, 12
    return 4, 4, 8


def model_state_bytes(cfg: Config, layout: Layout) -> dict:
    counts = count_params(cfg.model)
    dense, expert = counts.per_rank(layout.tp, layout.ep)
    sharded = dense / layout.dp + expert / layout.edp
    full = dense + expert
    p, g, k = state_bytes_per_param(cfg.train.precision)
    z = layout.zero
    return {
        "params": p * (sharded if z >= 3 else full),
        "grads": g * (sharded if z >= 2 else full),
        "optimizer": k * (sharded if z >= 1 else full),
    }


def _ffn_saved_tensors(activation: str) -> int:
    """Tensors of FFN width that autograd keeps: SwiGLU gate out, silu out, up out, product;
    GeLU input and output; ReLU output."""
    return {"swiglu": 4, "gelu": 2}.get(activation, 1)


def norm_saved_bytes(norm: str, e: int) -> int:
    """Bytes per element of the residual stream that a norm keeps for backward: LayerNorm its
    input (Korthikanti's 2 s b h in 16 bits); this platform's RMSNorm computes in fp32 and keeps
    the fp32 input and the fp32 normalised output."""
    return e if norm == "layernorm" else 8


def layer_activation_bytes(
    cfg: Config, layout: Layout, moe_layer: bool, attention_scores: bool = False, dropout: bool = False
) -> float:
    """Bytes one transformer layer keeps for backward on a GPU. (A bf16 run on CPU attends in
    fp32, `ExecutionPolicy.attention_fp32`, and keeps Q, K, V and the attention
    output in fp32 instead: 5 s b h e more, measured with as many KV heads as heads.)"""
    m, s, b = cfg.model, cfg.data.seq_len, cfg.data.micro_batch_size
    h, a, t = m.d_model, m.n_heads, layout.tp
    e = 4 if cfg.train.precision == "fp32" else 2
    mask = 1 if dropout else 0
    sbh = s * b * h
    nt = _ffn_saved_tensors(m.activation)
    rep_div = t if layout.sequence_parallel else 1
    # attention and both norms: what each norm keeps, QKV input, output dropout mask (replicated
    # over TP unless sequence parallel); Q, K, V, o_proj input (split over heads)
    rep = 2 * norm_saved_bytes(m.norm, e) * sbh + sbh * e + mask * sbh
    par = 4 * sbh * e
    if attention_scores:  # softmax output (+ dropout mask and output)
        par += a * s * s * b * (e + (mask + e if dropout else 0))
    else:  # fused kernel: fp32 log-sum-exp per query and head
        par += a * s * b * 4
    if moe_layer:
        moe = m.moe
        k = moe.top_k
        rep += mask * sbh
        gathered = sbh * e  # routed input (whole sequence)
        gathered += sbh * 4 if e < 4 else 0  # fp32 router input
        gathered += 2 * s * b * moe.n_experts * 4  # fp32 router probs + logits
        gathered += k * 3 * sbh * e  # dispatched copies, expert outputs and
        # their gate-weighted copies (combine)
        par += k * nt * s * b * moe.d_ff_expert * e + nt * s * b * moe.shared_expert_d_ff * e
        return rep / rep_div + par / t + gathered
    rep += sbh * e + mask * sbh  # FFN input, dropout mask
    par += nt * s * b * m.d_ff * e
    return rep / rep_div + par / t


def activation_bytes(cfg: Config, layout: Layout, attention_scores: bool = False, dropout: bool = False) -> float:
    m, s, b = cfg.model, cfg.data.seq_len, cfg.data.micro_batch_size
    e = 4 if cfg.train.precision == "fp32" else 2
    t = layout.tp
    rep_div = t if layout.sequence_parallel else 1
    layers = [
        layer_activation_bytes(cfg, layout, is_moe_layer(m, i), attention_scores, dropout) for i in range(m.n_layers)
    ]
    # final norm + LM-head input; around the loss: the logits, the fp32 log-probs and their fp32
    # gradient (vocab / TP)
    output = (norm_saved_bytes(m.norm, e) + e) * s * b * m.d_model / rep_div + s * b * m.vocab_size / t * (e + 4 + 4)
    if layout.checkpointing:
        # each block keeps its input; one block's activations live again while it is recomputed
        return m.n_layers * s * b * m.d_model * e / rep_div + max(layers) + output
    return sum(layers) + output


def layout_errors(cfg: Config, layout: Layout) -> list[str]:
    """The platform's own config rules applied to `cfg` run with `layout`."""
    trial = dataclasses.replace(
        cfg,
        parallel=dataclasses.replace(
            cfg.parallel,
            tp=layout.tp,
            ep=layout.ep,
            dp=None,
            world_size=layout.gpus,
            sequence_parallel=layout.sequence_parallel,
        ),
        train=dataclasses.replace(cfg.train, zero_stage=layout.zero, activation_checkpointing=layout.checkpointing),
    )
    try:
        validate_config(trial)
    except ConfigError as e:
        return list(e.errors)
    return []


def estimate(
    cfg: Config,
    layout: Layout,
    capacity_bytes: float,
    headroom: float = DEFAULT_HEADROOM,
    attention_scores: bool = False,
) -> dict:
    states = model_state_bytes(cfg, layout)
    act = activation_bytes(cfg, layout, attention_scores)
    total = sum(states.values()) + act
    usable = (1.0 - headroom) * capacity_bytes
    mem = {k: int(round(v)) for k, v in states.items()}
    mem["activations"] = int(round(act))
    mem["total"] = int(round(total))
    return {
        **layout.as_dict(),
        "memory_bytes": mem,
        "memory_gib": {k: round(v / GIB, 3) for k, v in mem.items()},
        "fits": total <= usable,
        "overrides": layout.overrides(),
    }


def candidate_layouts(cfg: Config, gpus: int):
    """Every valid layout: TP among the divisors of n_heads up to 8 (and of gpus), EP among the
    divisors of n_experts that divide DP, ZeRO 1/2 (and 3 without MoE), checkpointing off/on;
    sequence parallelism whenever TP > 1 and the sequence splits (same traffic, less memory)."""
    moe = has_moe(cfg)
    n_exp = cfg.model.moe.n_experts
    for tp in range(1, min(MAX_TP, gpus) + 1):
        if cfg.model.n_heads % tp or gpus % tp:
            continue
        dp = gpus // tp
        eps = [e for e in range(1, n_exp + 1) if n_exp % e == 0 and dp % e == 0] if moe else [1]
        for zero in (1, 2) if moe else (1, 2, 3):
            for ep in eps:
                for ckpt in (False, True):
                    for sp in (True, False) if tp > 1 else (False,):
                        layout = Layout(gpus, tp, ep, zero, ckpt, sp)
                        if not layout_errors(cfg, layout):
                            yield layout
                            break


def preference(layout: Layout) -> tuple:
    """Least communication first: smallest TP, then ZeRO stage, then EP (all-to-all); then
    no recomputation before activation checkpointing (compute, not communication)."""
    return (layout.tp, layout.zero, layout.ep, layout.checkpointing)


def search(
    cfg: Config, gpus: int, capacity_bytes: float, headroom: float = DEFAULT_HEADROOM, attention_scores: bool = False
) -> tuple[list[dict], dict | None]:
    """(fitting layouts, most preferred first; the layout with the smallest total if none fit)."""
    fitting, smallest = [], None
    for layout in sorted(candidate_layouts(cfg, gpus), key=preference):
        est = estimate(cfg, layout, capacity_bytes, headroom, attention_scores)
        if est["fits"]:
            fitting.append(est)
        if smallest is None or est["memory_bytes"]["total"] < smallest["memory_bytes"]["total"]:
            smallest = est
    return fitting, smallest


def plan_memory(
    cfg: Config,
    gpus: int,
    gpu_mem_gib: float,
    tp: int | None = None,
    ep: int | None = None,
    zero: int | None = None,
    headroom: float = DEFAULT_HEADROOM,
    attention_scores: bool = False,
    max_gpus: int = 65536,
) -> dict:
    if gpus < 1 or gpu_mem_gib <= 0:
        raise ValueError("--gpus must be >= 1 and --gpu-mem-gb > 0")
    if not 0 <= headroom < 1:
        raise ValueError("--headroom must be in [0, 1)")
    capacity = gpu_mem_gib * GIB
    counts = count_params(cfg.model)
    requested = Layout(
        gpus,
        tp or cfg.parallel.tp,
        ep or cfg.parallel.ep,
        cfg.train.zero_stage if zero is None else zero,
        cfg.train.activation_checkpointing,
        cfg.parallel.sequence_parallel,
    )
    req_errors = layout_errors(cfg, requested)
    req = {**requested.as_dict(), "errors": req_errors}
    if not req_errors:
        req = {**estimate(cfg, requested, capacity, headroom, attention_scores), "errors": []}
    fitting, smallest = search(cfg, gpus, capacity, headroom, attention_scores)
    out = {
        "gpus": gpus,
        "gpu_mem_gib": gpu_mem_gib,
        "headroom": headroom,
        "usable_gib": round((1 - headroom) * gpu_mem_gib, 3),
        "precision": cfg.train.precision,
        "micro_batch_size": cfg.data.micro_batch_size,
        "seq_len": cfg.data.seq_len,
        "attention_scores_stored": attention_scores,
        "params": {
            "total": counts.total,
            "dense": counts.dense,
            "expert": counts.expert,
            "active_per_token": counts.active,
        },
        "requested": req,
        "suggestions": fitting,
        "best": fitting[0] if fitting else None,
        "fits": bool(fitting),
    }
    if fitting:
        b = fitting[0]
        out["message"] = (
            f"fits: tp={b['tp']} ep={b['ep']} zero={b['zero_stage']} "
            f"checkpointing={'on' if b['activation_checkpointing'] else 'off'} needs "
            f"{b['memory_gib']['total']:.2f} of {out['usable_gib']:.2f} usable GiB per GPU"
        )
        return out
    need = None
    g = gpus * 2
    while g <= max_gpus:
        more, _ = search(cfg, g, capacity, headroom, attention_scores)
        if more:
            need = g
            break
        g *= 2
    out["min_gpus"] = need
    low = (
        (
            f"{smallest['memory_gib']['total']:.2f} GiB per GPU (tp={smallest['tp']} "
            f"ep={smallest['ep']} zero={smallest['zero_stage']} checkpointing="
            f"{'on' if smallest['activation_checkpointing'] else 'off'})"
        )
        if smallest
        else "n/a"
    )
    more = (
        f"; about {need} GPUs of {gpu_mem_gib:g} GiB would fit"
        if need
        else f"; no layout fits on up to {max_gpus} GPUs of {gpu_mem_gib:g} GiB: shrink the model or the micro batch"
    )
    out["message"] = (
        f"no layout fits {counts.total / 1e9:.3g}B parameters on {gpus} GPU(s) of "
        f"{gpu_mem_gib:g} GiB with {headroom:.0%} headroom: the smallest is {low} vs "
        f"{out['usable_gib']:.2f} GiB usable{more}"
    )
    return out
