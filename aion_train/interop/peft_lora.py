"""LoRA adapters as PEFT folders (adapter_config.json + adapter_model.safetensors) for the
Hugging Face Mixtral that `export-hf` writes.

PEFT's convention: a target Linear W [out, in] gets W + (alpha / r) * B @ A with
A = lora_A.weight [r, in] and B = lora_B.weight [out, r], saved under
`base_model.model.<module path>.lora_{A,B}.weight` (no adapter name in the file).

Names may be ours (`blocks.0.attn.q_proj`) or HF's (`model.layers.0.self_attn.q_proj`).
With our names the q/k deltas are moved to HF's rotate-half RoPE layout the way
`export-hf` moves the weights: B's rows are permuted per head (P (B A) = (P B) A)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from aion_train.config import ModelConfig

from .hf_mixtral import interleaved_to_halves

SUPPORTED = ("q_proj", "k_proj", "v_proj", "o_proj", "lm_head")
_OURS = re.compile(r"^(?:base_model\.model\.)?blocks\.(\d+)\.attn\.([qkvo]_proj)$")
_HF = re.compile(r"^(?:base_model\.model\.)?model\.layers\.(\d+)\.self_attn\.([qkvo]_proj)$")


def hf_module_name(name: str) -> tuple[str, bool]:
    """(HF module path, whether the name was ours)."""
    name = name.removesuffix(".weight")
    m = _OURS.match(name)
    if m:
        return f"model.layers.{m.group(1)}.self_attn.{m.group(2)}", True
    m = _HF.match(name)
    if m:
        return f"model.layers.{m.group(1)}.self_attn.{m.group(2)}", False
    if name in ("lm_head", "base_model.model.lm_head"):
        return "lm_head", False
    raise ValueError(
        f"LoRA module {name!r}: only the attention projections ({', '.join(SUPPORTED[:4])}) and "
        "lm_head map onto Mixtral Linear layers (our MoE experts are fused tensors there, and "
        "the router is not an nn.Linear)"
    )


def export_lora_adapter(
    lora_state: dict[str, tuple[torch.Tensor, torch.Tensor]],
    r: int,
    alpha: float,
    target_modules,
    out_dir,
    *,
    model_cfg: ModelConfig | None = None,
    base_model_name_or_path: str | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write `lora_state` {module name: (A [r, in], B [out, r])} as a PEFT LoRA adapter.

    `model_cfg` (head counts) is needed when q_proj/k_proj are given under our names, to
    apply the RoPE row permutation. Returns the folder."""
    from safetensors.torch import save_file

    targets = sorted(set(target_modules))
    bad = [t for t in targets if t not in SUPPORTED]
    if bad:
        raise ValueError(f"target_modules {bad}: supported are {list(SUPPORTED)}")
    tensors: dict[str, torch.Tensor] = {}
    for name, (a, b) in lora_state.items():
        module, ours = hf_module_name(name)
        short = module.rsplit(".", 1)[-1]
        if short not in targets:
            raise ValueError(f"LoRA module {name!r} ({short}) is not in target_modules={targets}")
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != r or b.shape[1] != r:
            raise ValueError(
                f"LoRA module {name!r}: A {tuple(a.shape)} / B {tuple(b.shape)} do not have rank r={r} "
                "(A must be [r, in], B [out, r])"
            )
        if ours and short in ("q_proj", "k_proj"):
            if model_cfg is None:
                raise ValueError("model_cfg is needed to permute q_proj/k_proj LoRA weights given under our names")
            heads = model_cfg.n_heads if short == "q_proj" else (model_cfg.n_kv_heads or model_cfg.n_heads)
            b = interleaved_to_halves(b, heads)
        if dtype is not None:
            a, b = a.to(dtype), b.to(dtype)
        tensors[f"base_model.model.{module}.lora_A.weight"] = a.detach().contiguous().clone()
        tensors[f"base_model.model.{module}.lora_B.weight"] = b.detach().contiguous().clone()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": int(r),
        "lora_alpha": alpha,
        "target_modules": targets,
        "lora_dropout": 0.0,
        "fan_in_fan_out": False,
        "bias": "none",
        "use_rslora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_dora": False,
    }
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


__all__ = ["export_lora_adapter", "hf_module_name"]
