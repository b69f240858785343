"""Our text backbone <-> a Hugging Face `MixtralForCausalLM` checkpoint (safetensors + config.json).

Parameter correspondence (layer i, expert j):

    embed.weight                    model.embed_tokens.weight
    blocks.i.attn_norm.weight       model.layers.i.input_layernorm.weight
    blocks.i.attn.{q,k}_proj.weight model.layers.i.self_attn.{q,k}_proj.weight  (rows permuted, see below)
    blocks.i.attn.{v,o}_proj.weight model.layers.i.self_attn.{v,o}_proj.weight
    blocks.i.ffn_norm.weight        model.layers.i.post_attention_layernorm.weight
    blocks.i.ffn.router.weight      model.layers.i.block_sparse_moe.gate.weight
    blocks.i.ffn.experts.w1[j]      model.layers.i.block_sparse_moe.experts.j.w1.weight  (transposed: [ff, d])
    blocks.i.ffn.experts.w3[j]      model.layers.i.block_sparse_moe.experts.j.w3.weight  (transposed: [ff, d])
    blocks.i.ffn.experts.w2[j]      model.layers.i.block_sparse_moe.experts.j.w2.weight  (transposed: [d, ff])
    norm.weight                     model.norm.weight
    lm_head.weight                  lm_head.weight (absent when tied)

The per-expert names are the layout of every published Mixtral checkpoint (transformers 4.x,
vLLM and llama.cpp read it; transformers 5 fuses it on load into `mlp.experts.gate_up_proj`
[E, 2*ff, d] = cat(w1, w3) and `mlp.experts.down_proj` [E, d, ff]). `expert_layout="fused"`
writes transformers 5's own names instead; import reads either.

RoPE: we rotate interleaved pairs (x_2i, x_2i+1), HF rotates halves (x_i, x_{i+d/2}), both
with frequency theta^(-2i/d). Permuting the q/k output rows of every head (the permutation of
transformers' convert_llama_weights_to_hf) turns one into the other; q.k is unchanged since q
and k get the same permutation, and v/o are untouched."""

from __future__ import annotations

import json
import shutil
import uuid
from dataclasses import replace
from pathlib import Path

import torch

from aion_train.checkpoint import (
    load_full_state_dict,
    model_config_from_dict,
    model_config_to_dict,
    save_sharded_checkpoint,
)
from aion_train.config import ModelConfig
from aion_train.ownership import check_writable, claim_run_dir, looks_like_run_dir, publish_dir

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


class NotExpressibleError(ValueError):
    """The model config has features a Mixtral checkpoint cannot represent."""


# ------------------------------------------------------------------------ config checks

# every ModelConfig key the exporter knows about: how it maps, or why it does not matter
_KNOWN_KEYS = {
    "vocab_size",
    "d_model",
    "n_layers",
    "n_heads",
    "n_kv_heads",
    "activation",
    "norm",
    "norm_eps",
    "rope_theta",
    "max_seq_len",
    "tie_embeddings",
    "d_ff",  # dense FFN width: unused when every layer is MoE
    "attention_backend",  # kernel choice, same math
    "kernels",  # fused-kernel choice, same math
    "init_std",  # initialisation only
    "moe.n_experts",
    "moe.top_k",
    "moe.d_ff_expert",
    "moe.every",
    "moe.capacity_factor",
    "moe.balance_coef",
    "moe.z_loss_coef",  # training losses only
    "moe.shared_expert_d_ff",
    "moe.normalize_gates",
    "moe.modality_experts",  # a router mask for non-text modalities; text tokens are never masked
}


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and k == "moe":
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def check_exportable(cfg: ModelConfig) -> list[str]:
    """Raise NotExpressibleError naming every key Mixtral cannot represent; return notes
    about exportable configs whose HF model may still behave differently."""
    m = cfg.moe
    problems = []
    if cfg.activation != "swiglu":
        problems.append(f"model.activation={cfg.activation!r}: Mixtral experts are SwiGLU (needs 'swiglu')")
    if cfg.norm != "rmsnorm":
        problems.append(f"model.norm={cfg.norm!r}: Mixtral uses RMSNorm (needs 'rmsnorm')")
    if m.n_experts <= 1 or m.every != 1:
        problems.append(
            f"model.moe.every={m.every}, model.moe.n_experts={m.n_experts}: Mixtral has an MoE "
            "FFN in every layer (needs moe.every=1 and moe.n_experts>1)"
        )
    if m.shared_expert_d_ff:
        problems.append(f"model.moe.shared_expert_d_ff={m.shared_expert_d_ff}: Mixtral has no shared expert (needs 0)")
    if m.top_k == 1:
        problems.append(
            "model.moe.top_k=1: our top-1 gate is the softmax probability, Mixtral renormalises it "
            "to 1.0 (needs top_k>=2)"
        )
    elif not m.normalize_gates:
        problems.append("model.moe.normalize_gates=false: Mixtral renormalises the top-k gates (needs true)")
    if cfg.d_model % cfg.n_heads:
        problems.append(f"model.d_model={cfg.d_model} is not divisible by model.n_heads={cfg.n_heads}")
    defaults = _flat(model_config_to_dict(ModelConfig()))
    for key, value in _flat(model_config_to_dict(cfg)).items():
        if key not in _KNOWN_KEYS and value != defaults.get(key, object()):
            problems.append(f"model.{key}={value!r}: not known to the Mixtral exporter")
    if problems:
        raise NotExpressibleError(
            "this model cannot be exported as a Hugging Face Mixtral checkpoint:\n  " + "\n  ".join(problems)
        )
    notes = []
    if m.capacity_factor is not None:
        notes.append(
            f"model.moe.capacity_factor={m.capacity_factor}: our model drops token copies past each "
            "expert's capacity, Mixtral is dropless; logits agree only where nothing is dropped"
        )
    if m.modality_experts:
        notes.append(
            "model.moe.modality_experts: the per-modality router mask is not exported (text tokens never use it)"
        )
    return notes


def to_hf_config(cfg: ModelConfig, dtype: torch.dtype | None = None):
    """`MixtralConfig` of an exportable ModelConfig."""
    from transformers import MixtralConfig

    from aion_train.data.tokenizer import BOS_ID, EOS_ID, PAD_ID

    hc = MixtralConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.moe.d_ff_expert,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads or cfg.n_heads,
        head_dim=cfg.d_model // cfg.n_heads,
        hidden_act="silu",
        max_position_embeddings=cfg.max_seq_len,
        initializer_range=cfg.init_std,
        rms_norm_eps=cfg.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": float(cfg.rope_theta)},
        tie_word_embeddings=cfg.tie_embeddings,
        sliding_window=None,
        num_local_experts=cfg.moe.n_experts,
        num_experts_per_tok=cfg.moe.top_k,
        router_aux_loss_coef=cfg.moe.balance_coef,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
    )
    hc.architectures = ["MixtralForCausalLM"]
    if dtype is not None:
        hc.dtype = dtype
    return hc


def from_hf_config(hc: dict, base: ModelConfig | None = None) -> tuple[ModelConfig, list[str]]:
    """A Mixtral config.json (dict) -> (our ModelConfig, notes). Keys that do not change the
    forward pass (init_std, balance/z-loss coefficients, attention backend) come from `base`."""
    problems, notes = [], []
    if hc.get("model_type") != "mixtral":
        raise NotExpressibleError(
            f"cannot import this Hugging Face checkpoint: model_type={hc.get('model_type')!r} "
            "(only 'mixtral' checkpoints are imported)"
        )
    if hc.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={hc.get('hidden_act')!r}: our experts are SwiGLU (needs 'silu')")
    d, heads = int(hc["hidden_size"]), int(hc["num_attention_heads"])
    head_dim = hc.get("head_dim") or d // heads
    if d % heads or head_dim != d // heads:
        problems.append(
            f"head_dim={head_dim}, hidden_size={d}, num_attention_heads={heads}: our attention "
            "needs head_dim = hidden_size / num_attention_heads"
        )
    rope = hc.get("rope_parameters") or {}
    rope_type = rope.get("rope_type", "default")
    scaling = hc.get("rope_scaling")
    if rope_type != "default" or (scaling and scaling.get("rope_type", scaling.get("type")) not in (None, "default")):
        problems.append(
            f"rope_parameters.rope_type={rope_type!r}, rope_scaling={scaling!r}: only plain RoPE is supported"
        )
    theta = rope.get("rope_theta", hc.get("rope_theta", 1e6))
    if hc.get("attention_bias") or hc.get("mlp_bias"):
        problems.append("attention_bias/mlp_bias: our projections have no biases")
    if problems:
        raise NotExpressibleError("cannot import this Hugging Face checkpoint:\n  " + "\n  ".join(problems))
    max_len = int(hc.get("max_position_embeddings", 4096))
    window = hc.get("sliding_window")
    if window is not None and int(window) < max_len:
        notes.append(
            f"sliding_window={window}: our attention is global, so model.max_seq_len is capped at "
            f"{window} (identical within it)"
        )
        max_len = int(window)
    base = base or ModelConfig()
    moe = replace(
        base.moe,
        n_experts=int(hc["num_local_experts"]),
        top_k=int(hc["num_experts_per_tok"]),
        d_ff_expert=int(hc["intermediate_size"]),
        every=1,
        capacity_factor=None,
        shared_expert_d_ff=0,
        normalize_gates=True,
    )
    cfg = replace(
        base,
        vocab_size=int(hc["vocab_size"]),
        d_model=d,
        n_layers=int(hc["num_hidden_layers"]),
        n_heads=heads,
        n_kv_heads=int(hc.get("num_key_value_heads") or heads),
        activation="swiglu",
        norm="rmsnorm",
        norm_eps=float(hc.get("rms_norm_eps", 1e-5)),
        rope_theta=float(theta),
        max_seq_len=max_len,
        tie_embeddings=bool(hc.get("tie_word_embeddings", False)),
        moe=moe,
    )
    if cfg.n_kv_heads == cfg.n_heads and base.n_kv_heads is None:
        cfg = replace(cfg, n_kv_heads=None)
    return cfg, notes


# ------------------------------------------------------------------------ tensors


def interleaved_to_halves(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of a q/k projection for interleaved-pair RoPE -> rows for rotate-half RoPE
    (per head: new row j < D/2 is old row 2j, new row D/2 + j is old row 2j + 1)."""
    rows, cols = w.shape
    hd = rows // n_heads
    return w.reshape(n_heads, hd // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def halves_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    rows, cols = w.shape
    hd = rows // n_heads
    return w.reshape(n_heads, 2, hd // 2, cols).transpose(1, 2).reshape(rows, cols)


def to_hf_state_dict(
    cfg: ModelConfig, sd: dict[str, torch.Tensor], expert_layout: str = "per-expert", dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """Our full state dict -> HF Mixtral tensor names (every tensor contiguous and unshared)."""
    if expert_layout not in ("per-expert", "fused"):
        raise ValueError(f"expert_layout={expert_layout!r}: must be 'per-expert' or 'fused'")
    kv = cfg.n_kv_heads or cfg.n_heads
    out: dict[str, torch.Tensor] = {"model.embed_tokens.weight": sd["embed.weight"]}
    moe_name = "block_sparse_moe" if expert_layout == "per-expert" else "mlp"
    for i in range(cfg.n_layers):
        src, dst = f"blocks.{i}", f"model.layers.{i}"
        out[f"{dst}.input_layernorm.weight"] = sd[f"{src}.attn_norm.weight"]
        out[f"{dst}.self_attn.q_proj.weight"] = interleaved_to_halves(sd[f"{src}.attn.q_proj.weight"], cfg.n_heads)
        out[f"{dst}.self_attn.k_proj.weight"] = interleaved_to_halves(sd[f"{src}.attn.k_proj.weight"], kv)
        out[f"{dst}.self_attn.v_proj.weight"] = sd[f"{src}.attn.v_proj.weight"]
        out[f"{dst}.self_attn.o_proj.weight"] = sd[f"{src}.attn.o_proj.weight"]
        out[f"{dst}.post_attention_layernorm.weight"] = sd[f"{src}.ffn_norm.weight"]
        out[f"{dst}.{moe_name}.gate.weight"] = sd[f"{src}.ffn.router.weight"]
        w1, w2, w3 = (sd[f"{src}.ffn.experts.{w}"] for w in ("w1", "w2", "w3"))
        if expert_layout == "fused":
            out[f"{dst}.mlp.experts.gate_up_proj"] = torch.cat([w1.transpose(1, 2), w3.transpose(1, 2)], dim=1)
            out[f"{dst}.mlp.experts.down_proj"] = w2.transpose(1, 2)
        else:
            for j in range(w1.shape[0]):
                out[f"{dst}.block_sparse_moe.experts.{j}.w1.weight"] = w1[j].t()
                out[f"{dst}.block_sparse_moe.experts.{j}.w2.weight"] = w2[j].t()
                out[f"{dst}.block_sparse_moe.experts.{j}.w3.weight"] = w3[j].t()
    out["model.norm.weight"] = sd["norm.weight"]
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    return {k: (v.to(dtype) if dtype is not None else v).contiguous().clone() for k, v in out.items()}


def from_hf_state_dict(cfg: ModelConfig, hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF Mixtral tensors (per-expert or fused names, `block_sparse_moe.` or `mlp.`) -> our
    full state dict. Every HF tensor must be used: leftovers are an error."""
    left = dict(hf)

    def take(name):
        if name not in left:
            raise KeyError(f"the Hugging Face checkpoint has no tensor {name!r}")
        return left.pop(name)

    kv = cfg.n_kv_heads or cfg.n_heads
    E = cfg.moe.n_experts
    sd: dict[str, torch.Tensor] = {"embed.weight": take("model.embed_tokens.weight")}
    for i in range(cfg.n_layers):
        src, dst = f"model.layers.{i}", f"blocks.{i}"
        sd[f"{dst}.attn_norm.weight"] = take(f"{src}.input_layernorm.weight")
        sd[f"{dst}.attn.q_proj.weight"] = halves_to_interleaved(take(f"{src}.self_attn.q_proj.weight"), cfg.n_heads)
        sd[f"{dst}.attn.k_proj.weight"] = halves_to_interleaved(take(f"{src}.self_attn.k_proj.weight"), kv)
        sd[f"{dst}.attn.v_proj.weight"] = take(f"{src}.self_attn.v_proj.weight")
        sd[f"{dst}.attn.o_proj.weight"] = take(f"{src}.self_attn.o_proj.weight")
        sd[f"{dst}.ffn_norm.weight"] = take(f"{src}.post_attention_layernorm.weight")
        moe = f"{src}.block_sparse_moe" if f"{src}.block_sparse_moe.gate.weight" in left else f"{src}.mlp"
        sd[f"{dst}.ffn.router.weight"] = take(f"{moe}.gate.weight")
        if f"{moe}.experts.gate_up_proj" in left:
            gate_up = take(f"{moe}.experts.gate_up_proj")  # [E, 2ff, d]
            ff = gate_up.shape[1] // 2
            sd[f"{dst}.ffn.experts.w1"] = gate_up[:, :ff].transpose(1, 2)
            sd[f"{dst}.ffn.experts.w3"] = gate_up[:, ff:].transpose(1, 2)
            sd[f"{dst}.ffn.experts.w2"] = take(f"{moe}.experts.down_proj").transpose(1, 2)
        else:
            for w in ("w1", "w2", "w3"):
                sd[f"{dst}.ffn.experts.{w}"] = torch.stack(
                    [take(f"{moe}.experts.{j}.{w}.weight").t() for j in range(E)]
                )
    sd["norm.weight"] = take("model.norm.weight")
    if "lm_head.weight" in left and not cfg.tie_embeddings:
        sd["lm_head.weight"] = take("lm_head.weight")
    elif cfg.tie_embeddings:
        left.pop("lm_head.weight", None)
        sd["lm_head.weight"] = sd["embed.weight"]
    else:
        raise KeyError("the Hugging Face checkpoint has no lm_head.weight and tie_word_embeddings is false")
    if left:
        raise KeyError(
            f"tensors of the Hugging Face checkpoint that have no place in our model: {sorted(left)[:10]}"
            + (" ..." if len(left) > 10 else "")
        )
    out = {k: v.contiguous().clone() for k, v in sd.items() if k != "lm_head.weight" or not cfg.tie_embeddings}
    if cfg.tie_embeddings:
        out["lm_head.weight"] = out["embed.weight"]
    return out


# ------------------------------------------------------------------------ files


def parse_size(text: str | int) -> int:
    if isinstance(text, int):
        return text
    t = text.strip().upper()
    for unit, mult in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3), ("B", 1)):
        if t.endswith(unit):
            return int(float(t[: -len(unit)]) * mult)
    return int(t)


def save_safetensors_sharded(tensors: dict[str, torch.Tensor], out: Path, max_shard_bytes: int) -> list[str]:
    """model.safetensors, or model-0000i-of-0000n.safetensors + model.safetensors.index.json."""
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += n
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata=meta)
        return ["model.safetensors"]
    names, weight_map = [], {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / fname), metadata=meta)
        names.append(fname)
        weight_map.update({k: fname for k in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n"
    )
    return names + ["model.safetensors.index.json"]


def load_hf_tensors(hf_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (hf_dir / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(
            f"{hf_dir}: no model.safetensors or model.safetensors.index.json (only "
            "safetensors checkpoints are read; pickled .bin files are not loaded)"
        )
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(str(hf_dir / f)))
    return out


def export_hf(
    checkpoint,
    out_dir,
    *,
    dtype: torch.dtype | None = None,
    expert_layout: str = "per-expert",
    max_shard_size: str | int = "5GB",
    overwrite: bool = False,
    extra_files=None,
) -> dict:
    """Write a checkpoint of ours (any TP/EP layout) as a HF Mixtral folder; returns a summary
    with the notes of `check_exportable`. Raises NotExpressibleError for other models, and
    ForeignFolderError for a non-empty `out_dir` aion-train did not write (unless `overwrite`).
    The folder is written beside `out_dir` and moved into place; an earlier export's files
    that this one does not write (e.g. more shards) are removed, other files are kept.
    `extra_files(folder) -> names` writes more files (tokenizer, generation config) into the
    folder before it is published."""
    check_writable(out_dir, "export-hf", overwrite)
    cfg_dict, sd = load_full_state_dict(checkpoint)
    cfg = model_config_from_dict(cfg_dict)
    check_exportable(cfg)  # raises NotExpressibleError before anything is written
    if dtype is None:
        dtype = sd["embed.weight"].dtype
    final = Path(out_dir).absolute()
    out = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    out.mkdir(parents=True)
    try:
        written = write_hf_folder(cfg, sd, out, dtype=dtype, expert_layout=expert_layout, max_shard_size=max_shard_size)
        if extra_files is not None:
            written["files"] += extra_files(out)
        publish_dir(out, final, "export-hf", overwrite=overwrite, last=("config.json",))
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return {"out": str(Path(out_dir)), **written}


def write_hf_folder(
    cfg: ModelConfig,
    sd: dict[str, torch.Tensor],
    out: Path,
    *,
    dtype: torch.dtype,
    expert_layout: str = "per-expert",
    max_shard_size: str | int = "5GB",
) -> dict:
    """Our full state dict as HF Mixtral files (safetensors shards + config.json) in the
    existing folder `out`, which `MixtralForCausalLM.from_pretrained` reads."""
    notes = check_exportable(cfg)
    hf = to_hf_state_dict(cfg, sd, expert_layout, dtype)
    files = save_safetensors_sharded(hf, out, parse_size(max_shard_size))
    to_hf_config(cfg, dtype).save_pretrained(str(out))
    # transformers < 5 and other readers (vLLM, llama.cpp converters) look for a top-level rope_theta
    cpath = out / "config.json"
    doc = json.loads(cpath.read_text())
    doc.setdefault("rope_theta", float(cfg.rope_theta))
    doc["aion_train"] = {"expert_layout": expert_layout, "notes": notes}
    cpath.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    return {
        "files": files + ["config.json"],
        "dtype": _DTYPE_NAMES.get(dtype, str(dtype)),
        "parameters": sum(t.numel() for t in hf.values()),
        "notes": notes,
    }


def import_hf(
    hf_dir,
    run_dir,
    tp: int = 1,
    ep: int = 1,
    *,
    base: ModelConfig | None = None,
    world: int | None = None,
    zero_stage: int = 1,
    dtype: torch.dtype | None = None,
    max_seq_len: int | None = None,
    overwrite: bool = False,
) -> dict:
    """Write a HF Mixtral folder as `run_dir/checkpoints/step_00000000` in the (tp, ep) layout
    (model payloads only: training from it starts a fresh optimizer). `run_dir` must be absent,
    empty or a run of ours (ForeignFolderError otherwise, unless `overwrite`)."""
    check_writable(run_dir, "import-hf", overwrite, recognise=looks_like_run_dir)
    hf_dir = Path(hf_dir)
    hc = json.loads((hf_dir / "config.json").read_text())
    cfg, notes = from_hf_config(hc, base)
    if max_seq_len is not None:
        cfg = replace(cfg, max_seq_len=max_seq_len)
    sd = from_hf_state_dict(cfg, load_hf_tensors(hf_dir))
    return save_imported(
        hf_dir, run_dir, cfg, sd, notes, "hf-mixtral", tp, ep,
        world=world, zero_stage=zero_stage, dtype=dtype, overwrite=overwrite,
    )  # fmt: skip


def save_imported(
    hf_dir: Path,
    run_dir,
    cfg: ModelConfig,
    sd: dict[str, torch.Tensor],
    notes: list[str],
    source_format: str,
    tp: int = 1,
    ep: int = 1,
    *,
    world: int | None = None,
    zero_stage: int = 1,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
) -> dict:
    """Our full state dict of an imported HF model, saved as step 0 of `run_dir` in the
    (tp, ep) layout; the import's summary."""
    if dtype is not None:
        sd = {k: v.to(dtype) for k, v in sd.items()}
        if cfg.tie_embeddings:
            sd["lm_head.weight"] = sd["embed.weight"]
    claim_run_dir(run_dir, "import-hf", overwrite)
    folder = save_sharded_checkpoint(
        run_dir,
        cfg,
        sd,
        tp,
        ep,
        step=0,
        world=world,
        zero_stage=zero_stage,
        extra_manifest={"source": {"format": source_format, "path": str(Path(hf_dir).resolve())}, "notes": notes},
    )
    return {
        "checkpoint": str(folder),
        "model_config": model_config_to_dict(cfg),
        "tp": tp,
        "ep": ep,
        "dtype": _DTYPE_NAMES.get(sd["embed.weight"].dtype, str(sd["embed.weight"].dtype)),
        "notes": notes,
        "parameters": sum(t.numel() for k, t in sd.items() if not (cfg.tie_embeddings and k == "lm_head.weight")),
    }


__all__ = [
    "NotExpressibleError",
    "check_exportable",
    "export_hf",
    "from_hf_config",
    "from_hf_state_dict",
    "halves_to_interleaved",
    "import_hf",
    "interleaved_to_halves",
    "to_hf_config",
    "to_hf_state_dict",
]
