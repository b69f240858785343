"""Our text backbone <-> Hugging Face Llama / Mistral / Qwen2 (dense, ``model.moe.every=0``) and
Qwen2-MoE checkpoints (Mixtral: :mod:`.hf_mixtral`).

Parameter correspondence (layer i; q/k rows permuted for RoPE exactly as in hf_mixtral):

    blocks.i.attn.{q,k,v,o}_proj.weight   model.layers.i.self_attn.{q,k,v,o}_proj.weight
    blocks.i.ffn.{w_gate,w_up,w_down}     model.layers.i.mlp.{gate,up,down}_proj.weight   (dense layers)
    blocks.i.ffn.router.weight            model.layers.i.mlp.gate.weight                  (Qwen2-MoE)
    blocks.i.ffn.experts.{w1,w3,w2}[j]    model.layers.i.mlp.experts.j.{gate,up,down}_proj.weight (transposed)
    blocks.i.ffn.shared_expert.*          model.layers.i.mlp.shared_expert.*  (see below)

What our model cannot express is refused with the tensor or key named:

* Qwen2 / Qwen2-MoE have q/k/v biases; ours has none. A checkpoint whose biases are all zero
  (a freshly initialised one) imports exactly; any non-zero bias is refused.
* Qwen2-MoE gates its shared expert per token with sigmoid(shared_expert_gate . x); ours is
  always on. A gate whose weight is all zero is the constant 0.5, folded into the shared
  expert's down projection (exact: a power of two); any other gate is refused. Export writes a
  zero gate and twice our down projection, so the round trip is exact.
* Llama 3 style RoPE scaling, head_dim != hidden/heads, non-SiLU activations, MLP biases,
  ``mlp_only_layers``, Qwen2-MoE top-1 with ``norm_topk_prob`` (our top-1 gate is the
  probability) are refused; sliding windows cap ``model.max_seq_len`` (identical within it).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from aion_train.config import ModelConfig

from .hf_mixtral import NotExpressibleError, halves_to_interleaved, interleaved_to_halves

DENSE = ("llama", "mistral", "qwen2")
MOE = ("qwen2_moe",)
FAMILIES = ("mixtral", *DENSE, *MOE)
ARCH = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "mixtral": "MixtralForCausalLM",
}
_QKV_BIAS = ("qwen2", "qwen2_moe")


def _common(hc: dict, problems: list[str], notes: list[str]) -> dict:
    """The attention/norm/embedding keys every family shares, as ModelConfig fields."""
    if hc.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={hc.get('hidden_act')!r}: our FFNs are SwiGLU (needs 'silu')")
    if hc.get("mlp_bias"):
        problems.append("mlp_bias=true: our FFNs have no biases")
    d, heads = int(hc["hidden_size"]), int(hc["num_attention_heads"])
    head_dim = hc.get("head_dim") or d // heads
    if d % heads or head_dim != d // heads:
        problems.append(
            f"head_dim={head_dim}, hidden_size={d}, num_attention_heads={heads}: needs head_dim = hidden_size / heads"
        )
    rope = hc.get("rope_parameters") or {}
    scaling = hc.get("rope_scaling")
    kinds = {rope.get("rope_type", "default"), (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))}
    if kinds - {"default", None}:
        problems.append(
            f"rope_parameters.rope_type / rope_scaling = {sorted(map(str, kinds - {'default', None}))}: only plain RoPE is supported"
        )
    max_len = int(hc.get("max_position_embeddings", 4096))
    window = hc.get("sliding_window")
    if hc.get("model_type") in _QKV_BIAS and not hc.get("use_sliding_window", False):
        window = None
    if window and int(window) < max_len:
        notes.append(
            f"sliding_window={window}: our attention is global, so model.max_seq_len is capped at {window} (identical within it)"
        )
        max_len = int(window)
    return dict(
        vocab_size=int(hc["vocab_size"]),
        d_model=d,
        n_layers=int(hc["num_hidden_layers"]),
        n_heads=heads,
        n_kv_heads=int(hc.get("num_key_value_heads") or heads),
        activation="swiglu",
        norm="rmsnorm",
        norm_eps=float(hc.get("rms_norm_eps", 1e-6)),
        rope_theta=float(rope.get("rope_theta", hc.get("rope_theta", 10000.0))),
        max_seq_len=max_len,
        tie_embeddings=bool(hc.get("tie_word_embeddings", False)),
        d_ff=int(hc["intermediate_size"]),
    )


def config_from_hf(hc: dict, base: ModelConfig | None = None) -> tuple[ModelConfig, list[str]]:
    """config.json of a dense or Qwen2-MoE family -> (ModelConfig, notes)."""
    family = hc.get("model_type")
    if family not in DENSE + MOE:
        raise NotExpressibleError(f"model_type={family!r}: import-hf reads {', '.join(FAMILIES)}")
    problems: list[str] = []
    notes: list[str] = []
    fields = _common(hc, problems, notes)
    base = base or ModelConfig()
    if family in DENSE:
        moe = replace(base.moe, every=0, shared_expert_d_ff=0)
    else:
        if hc.get("mlp_only_layers"):
            problems.append(
                f"mlp_only_layers={hc['mlp_only_layers']}: our MoE layers are every n-th (decoder_sparse_step) only"
            )
        k, norm = int(hc["num_experts_per_tok"]), bool(hc.get("norm_topk_prob", False))
        if k == 1 and norm:
            problems.append("num_experts_per_tok=1 with norm_topk_prob=true: our top-1 gate is the probability")
        shared = int(hc.get("shared_expert_intermediate_size") or 0)
        if not shared:
            problems.append("shared_expert_intermediate_size=0: not a Qwen2-MoE layout we map")
        moe = replace(
            base.moe,
            n_experts=int(hc["num_experts"]),
            top_k=k,
            d_ff_expert=int(hc["moe_intermediate_size"]),
            every=int(hc.get("decoder_sparse_step", 1)),
            capacity_factor=None,
            shared_expert_d_ff=shared,
            normalize_gates=norm,
        )
    if problems:
        raise NotExpressibleError(f"cannot import this {family} checkpoint:\n  " + "\n  ".join(problems))
    cfg = replace(base, **fields, moe=moe)
    if cfg.n_kv_heads == cfg.n_heads and base.n_kv_heads is None:
        cfg = replace(cfg, n_kv_heads=None)
    return cfg, notes


def _moe_layer(cfg: ModelConfig, i: int) -> bool:
    m = cfg.moe
    return m.every > 0 and m.n_experts > 1 and (i + 1) % m.every == 0


def check_family_exportable(cfg: ModelConfig, family: str) -> None:
    problems = []
    if cfg.activation != "swiglu":
        problems.append(f"model.activation={cfg.activation!r}: {family} MLPs are SwiGLU")
    if cfg.norm != "rmsnorm":
        problems.append(f"model.norm={cfg.norm!r}: {family} uses RMSNorm")
    m = cfg.moe
    moe = m.every > 0 and m.n_experts > 1
    if family in DENSE and moe:
        problems.append(
            f"model.moe.every={m.every}, model.moe.n_experts={m.n_experts}: {family} is dense (needs moe.every=0)"
        )
    if family in MOE:
        if not moe:
            problems.append("model.moe.every=0: Qwen2-MoE has MoE layers")
        if not m.shared_expert_d_ff:
            problems.append("model.moe.shared_expert_d_ff=0: Qwen2-MoE has a shared expert in every MoE layer")
        if m.top_k == 1 and m.normalize_gates:
            pass  # ours: top-1 gate = probability = Qwen2-MoE with norm_topk_prob=false
    if problems:
        raise NotExpressibleError(f"this model cannot be exported as {family}:\n  " + "\n  ".join(problems))


def config_to_hf(cfg: ModelConfig, family: str, source: dict | None = None) -> dict:
    """config.json fields of `family` for an exportable cfg; token ids etc. from `source`
    (the config.json it was imported from) when given."""
    check_family_exportable(cfg, family)
    src = dict(source or {})
    hc = {
        "model_type": family,
        "architectures": [ARCH[family]],
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads or cfg.n_heads,
        "head_dim": cfg.d_model // cfg.n_heads,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": float(cfg.rope_theta),
        "rope_parameters": {"rope_type": "default", "rope_theta": float(cfg.rope_theta)},
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "attention_bias": False,
        "mlp_bias": False,
        "sliding_window": None,
        "use_sliding_window": False,
    }
    if family in MOE:
        m = cfg.moe
        hc.update(
            num_experts=m.n_experts,
            num_experts_per_tok=m.top_k,
            moe_intermediate_size=m.d_ff_expert,
            shared_expert_intermediate_size=m.shared_expert_d_ff,
            decoder_sparse_step=m.every,
            mlp_only_layers=[],
            norm_topk_prob=bool(m.normalize_gates and m.top_k > 1),
            router_aux_loss_coef=m.balance_coef,
            qkv_bias=True,
        )
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if key in src:
            hc[key] = src[key]
    return hc


def _attn_to_ours(cfg, hf, take, src, dst, family, problems):
    kv = cfg.n_kv_heads or cfg.n_heads
    sd = {
        f"{dst}.attn_norm.weight": take(f"{src}.input_layernorm.weight"),
        f"{dst}.attn.q_proj.weight": halves_to_interleaved(take(f"{src}.self_attn.q_proj.weight"), cfg.n_heads),
        f"{dst}.attn.k_proj.weight": halves_to_interleaved(take(f"{src}.self_attn.k_proj.weight"), kv),
        f"{dst}.attn.v_proj.weight": take(f"{src}.self_attn.v_proj.weight"),
        f"{dst}.attn.o_proj.weight": take(f"{src}.self_attn.o_proj.weight"),
        f"{dst}.ffn_norm.weight": take(f"{src}.post_attention_layernorm.weight"),
    }
    for p in ("q", "k", "v", "o"):
        name = f"{src}.self_attn.{p}_proj.bias"
        if name in hf:
            b = take(name)
            if b.abs().max() > 0:
                problems.append(
                    f"{name}: non-zero attention bias (max |b| {b.abs().max().item():.3g}); our attention has no biases"
                )
    return sd


def state_from_hf(family: str, cfg: ModelConfig, hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF tensors of `family` -> our full state dict (every HF tensor used, else an error)."""
    left = dict(hf)
    problems: list[str] = []

    def take(name):
        if name not in left:
            raise KeyError(f"the Hugging Face checkpoint has no tensor {name!r}")
        return left.pop(name)

    sd = {"embed.weight": take("model.embed_tokens.weight")}
    for i in range(cfg.n_layers):
        src, dst = f"model.layers.{i}", f"blocks.{i}"
        sd.update(_attn_to_ours(cfg, left, take, src, dst, family, problems))
        mlp = f"{src}.mlp"
        if not _moe_layer(cfg, i):
            for ours, theirs in (("w_gate", "gate_proj"), ("w_up", "up_proj"), ("w_down", "down_proj")):
                sd[f"{dst}.ffn.{ours}.weight"] = take(f"{mlp}.{theirs}.weight")
            continue
        sd[f"{dst}.ffn.router.weight"] = take(f"{mlp}.gate.weight")
        if f"{mlp}.experts.gate_up_proj" in left:  # transformers' fused layout
            gate_up = take(f"{mlp}.experts.gate_up_proj")
            ff = gate_up.shape[1] // 2
            sd[f"{dst}.ffn.experts.w1"] = gate_up[:, :ff].transpose(1, 2)
            sd[f"{dst}.ffn.experts.w3"] = gate_up[:, ff:].transpose(1, 2)
            sd[f"{dst}.ffn.experts.w2"] = take(f"{mlp}.experts.down_proj").transpose(1, 2)
        else:
            for ours, theirs in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
                sd[f"{dst}.ffn.experts.{ours}"] = torch.stack(
                    [take(f"{mlp}.experts.{j}.{theirs}.weight").t() for j in range(cfg.moe.n_experts)]
                )
        gate = take(f"{mlp}.shared_expert_gate.weight")
        if gate.abs().max() > 0:
            problems.append(
                f"{mlp}.shared_expert_gate.weight: a per-token sigmoid gate on the shared expert (max |w| "
                f"{gate.abs().max().item():.3g}); our shared expert is always on (only an all-zero gate, the constant 0.5, maps)"
            )
        for ours, theirs in (("w_gate", "gate_proj"), ("w_up", "up_proj"), ("w_down", "down_proj")):
            w = take(f"{mlp}.shared_expert.{theirs}.weight")
            sd[f"{dst}.ffn.shared_expert.{ours}.weight"] = w * 0.5 if ours == "w_down" else w
    if problems:
        raise NotExpressibleError(f"cannot import this {family} checkpoint:\n  " + "\n  ".join(problems))
    sd["norm.weight"] = take("model.norm.weight")
    if cfg.tie_embeddings:
        left.pop("lm_head.weight", None)
        sd["lm_head.weight"] = sd["embed.weight"]
    else:
        sd["lm_head.weight"] = take("lm_head.weight")
    if left:
        raise KeyError(f"tensors of the {family} checkpoint that have no place in our model: {sorted(left)[:10]}")
    out = {k: v.contiguous().clone() for k, v in sd.items() if k != "lm_head.weight" or not cfg.tie_embeddings}
    if cfg.tie_embeddings:
        out["lm_head.weight"] = out["embed.weight"]
    return out


def state_to_hf(family: str, cfg: ModelConfig, sd: dict[str, torch.Tensor], dtype=None) -> dict[str, torch.Tensor]:
    kv = cfg.n_kv_heads or cfg.n_heads
    out = {"model.embed_tokens.weight": sd["embed.weight"]}
    for i in range(cfg.n_layers):
        src, dst = f"blocks.{i}", f"model.layers.{i}"
        a = f"{dst}.self_attn"
        out[f"{dst}.input_layernorm.weight"] = sd[f"{src}.attn_norm.weight"]
        out[f"{a}.q_proj.weight"] = interleaved_to_halves(sd[f"{src}.attn.q_proj.weight"], cfg.n_heads)
        out[f"{a}.k_proj.weight"] = interleaved_to_halves(sd[f"{src}.attn.k_proj.weight"], kv)
        out[f"{a}.v_proj.weight"] = sd[f"{src}.attn.v_proj.weight"]
        out[f"{a}.o_proj.weight"] = sd[f"{src}.attn.o_proj.weight"]
        if family in _QKV_BIAS:  # these families always have q/k/v biases: zeros
            for p in ("q", "k", "v"):
                w = out[f"{a}.{p}_proj.weight"]
                out[f"{a}.{p}_proj.bias"] = torch.zeros(w.shape[0], dtype=w.dtype)
        out[f"{dst}.post_attention_layernorm.weight"] = sd[f"{src}.ffn_norm.weight"]
        mlp = f"{dst}.mlp"
        if not _moe_layer(cfg, i):
            for ours, theirs in (("w_gate", "gate_proj"), ("w_up", "up_proj"), ("w_down", "down_proj")):
                out[f"{mlp}.{theirs}.weight"] = sd[f"{src}.ffn.{ours}.weight"]
            continue
        out[f"{mlp}.gate.weight"] = sd[f"{src}.ffn.router.weight"]
        for ours, theirs in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
            w = sd[f"{src}.ffn.experts.{ours}"]
            for j in range(w.shape[0]):
                out[f"{mlp}.experts.{j}.{theirs}.weight"] = w[j].t()
        for ours, theirs in (("w_gate", "gate_proj"), ("w_up", "up_proj"), ("w_down", "down_proj")):
            w = sd[f"{src}.ffn.shared_expert.{ours}.weight"]
            out[f"{mlp}.shared_expert.{theirs}.weight"] = w * 2 if ours == "w_down" else w
        w = sd[f"{src}.ffn.router.weight"]
        out[f"{mlp}.shared_expert_gate.weight"] = torch.zeros(1, w.shape[1], dtype=w.dtype)  # sigmoid(0) = 0.5
    out["model.norm.weight"] = sd["norm.weight"]
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    return {k: (v.to(dtype) if dtype is not None else v).contiguous().clone() for k, v in out.items()}
