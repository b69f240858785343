"""A Hugging Face model folder as a training run's starting weights: `train.init_from` (continued
pretraining) and `sft.init_from` (SFT) name a folder with config.json + safetensors of a family
`import-hf` reads (Mixtral, Llama, Mistral, Qwen2, Qwen2-MoE), or a checkpoint of ours.

For an HF folder, `apply_hf_init(cfg)` takes the architecture from its config.json (what
`import-hf` would write: vocabulary, widths, heads, layers, norm, RoPE, MoE shape); the config's
other model keys (init_std, loss coefficients, kernels) stay, and `model.max_seq_len` may only
shorten the context. It is applied wherever the config is read to build a model (the commands,
the pretraining trainer, every post-training phase), so every process builds the same model.
Where the run's tokenizer is not named, the folder's tokenizer.json is it. SFT adds the four
chat role tokens after the tokenizer's vocabulary: `model.vocab_size` grows to hold them (new
embedding and head rows drawn at init, `posttrain.common.load_weights`). Training starts at step
0 with a fresh optimizer; a run folder that already has a checkpoint resumes from it instead."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

ARCH_KEYS = (
    "vocab_size",
    "d_model",
    "n_layers",
    "n_heads",
    "n_kv_heads",
    "d_ff",
    "activation",
    "norm",
    "norm_eps",
    "rope_theta",
    "tie_embeddings",
)


def is_hf_folder(path) -> bool:
    """A folder with a Hugging Face config.json and safetensors weights (not one of our runs)."""
    p = Path(path)
    return (
        p.is_dir()
        and (p / "config.json").is_file()
        and not (p / "manifest.json").is_file()
        and ((p / "model.safetensors").is_file() or (p / "model.safetensors.index.json").is_file())
    )


def _hf_config(hf_dir: Path) -> dict:
    try:
        return json.loads((hf_dir / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{hf_dir}/config.json: not valid JSON ({e})") from None


def hf_model_config(hf_dir, base=None):
    """(our ModelConfig of the folder's architecture, notes); `base` gives the keys that do not
    change the forward pass. Raises NotExpressibleError naming what our model cannot express."""
    from . import hf_families, hf_mixtral

    hc = _hf_config(Path(hf_dir))
    if hc.get("model_type") == "mixtral":
        return hf_mixtral.from_hf_config(hc, base)
    return hf_families.config_from_hf(hc, base)


def hf_state_dict(hf_dir, cfg) -> dict:
    """The folder's tensors under our names, for the model of `hf_model_config` (full, unsharded)."""
    from . import hf_families, hf_mixtral

    hf_dir = Path(hf_dir)
    family = _hf_config(hf_dir).get("model_type")
    tensors = hf_mixtral.load_hf_tensors(hf_dir)
    if family == "mixtral":
        return hf_mixtral.from_hf_state_dict(cfg, tensors)
    return hf_families.state_from_hf(family, cfg, tensors)


def _role_vocab(cfg, hf_vocab: int) -> int:
    """SFT: the vocabulary holding the tokenizer's ids plus the four role tokens, a multiple of TP."""
    from aion_train.data.tokenizer import load_tokenizer

    n = max(hf_vocab, load_tokenizer(cfg.sft.tokenizer).vocab_size + 4)
    tp = max(1, cfg.parallel.tp)
    return -(-n // tp) * tp


KEYS = {"pretrain": "train.init_from", "posttrain": "sft.init_from"}


def apply_hf_init(cfg, stage: str):
    """Fill the config from the HF folder that `train.init_from` (stage "pretrain") or
    `sft.init_from` (stage "posttrain": SFT, and the RM / PPO phases that build the same model)
    names (see the module doc); a no-op for a checkpoint of ours or none. Idempotent. Returns cfg."""
    key = KEYS[stage]
    section, name = key.split(".")
    folder = getattr(getattr(cfg, section), name)
    if not folder or not is_hf_folder(folder):
        return cfg
    hf = Path(folder)
    cap = cfg.model.max_seq_len
    model, _ = hf_model_config(hf, cfg.model)
    if model.max_seq_len > cap:
        model = replace(model, max_seq_len=cap)  # the context may only shrink (RoPE is the same)
    tok_json = hf / "tokenizer.json"
    if stage == "pretrain" and not cfg.data.tokenizer and tok_json.is_file():
        cfg.data.tokenizer = str(tok_json)
    if stage == "posttrain":
        if not cfg.sft.tokenizer and tok_json.is_file():
            cfg.sft.tokenizer = str(tok_json)
        if cfg.sft.tokenizer:
            model = replace(model, vocab_size=_role_vocab(cfg, model.vocab_size))
    cfg.model = model
    return cfg


def load_init_weights(folder, model_cfg) -> tuple[dict, dict]:
    """(model config dict, full state dict) of starting weights: an HF folder (converted for
    the architecture of `model_cfg`, our ModelConfig; its vocabulary as the folder has it) or a
    checkpoint of ours (any TP/EP layout)."""
    from aion_train.checkpoint import load_full_state_dict, model_config_to_dict

    if is_hf_folder(folder):
        hf_cfg, _ = hf_model_config(folder, model_cfg)
        return model_config_to_dict(hf_cfg), hf_state_dict(folder, hf_cfg)
    return load_full_state_dict(folder)


def load_start_weights(folder, cfg, model, groups) -> str:
    """Cut this rank's shard of the starting weights (`load_init_weights`) into `model` (before
    the engine is built, so DeepSpeed's fp32 master copy starts from them). A checkpoint of ours
    must be of the same model (`checkpoint.compat`). Returns the folder."""
    from aion_train.checkpoint import shard_state_dict
    from aion_train.checkpoint.compat import check_compatible
    from aion_train.config import config_to_dict

    saved, full = load_init_weights(folder, cfg.model)
    if not is_hf_folder(folder):
        check_compatible({"model": saved}, {"model": config_to_dict(cfg)["model"]})
    model.load_state_dict(shard_state_dict(full, model, groups))
    return str(folder)


__all__ = [
    "apply_hf_init",
    "hf_model_config",
    "hf_state_dict",
    "is_hf_folder",
    "load_init_weights",
    "load_start_weights",
]
