"""A trained checkpoint (any TP/EP layout) -> one single-process model in eval mode, with the
run's config and tokenizer."""

from __future__ import annotations

from pathlib import Path

import torch


def run_config_for(checkpoint: str, config: str | None = None):
    """The run's Config: `config` if given, else the config.yaml the trainer wrote in the run folder."""
    from aion_train.checkpoint import find_checkpoint
    from aion_train.config import load_config

    if config:
        return load_config(config)
    folder = find_checkpoint(checkpoint)
    for parent in (folder.parent.parent, folder.parent, Path(checkpoint)):
        if (parent / "config.yaml").is_file():
            return load_config(str(parent / "config.yaml"))
    raise FileNotFoundError(f"{checkpoint}: no config.yaml in its run folder; pass --config")


def load_trained_model(checkpoint: str, config: str | None = None, device=None):
    """(model, cfg) with the checkpoint's weights gathered into one unsharded fp32 model in eval
    mode, on `device` (default: the GPU of LOCAL_RANK when CUDA is present, else the CPU). The
    evaluations move their inputs to the model's device. fp32 attention runs through SDPA: a
    run trained with model.attention_backend=flash (fp16/bf16 only) is evaluated with auto."""
    from aion_train.checkpoint import check_compatible, load_full_state_dict
    from aion_train.config import config_to_dict

    cfg = run_config_for(checkpoint, config)
    saved_model, full = load_full_state_dict(checkpoint)
    check_compatible({"model": saved_model}, {"model": config_to_dict(cfg)["model"]})
    if cfg.model.attention_backend == "flash":
        cfg.model.attention_backend = "auto"  # same math; flash-attn takes no fp32
    if cfg.model.multimodal.enabled:
        from aion_train.model.multimodal import build_multimodal_model

        model = build_multimodal_model(cfg, seed=cfg.seed)
    else:
        from aion_train.model import build_model

        model = build_model(cfg.model, seed=cfg.seed)
    missing, unexpected = model.load_state_dict(full, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise ValueError(
            f"{checkpoint}: weights do not match the model (missing {missing[:4]}, unexpected {unexpected[:4]})"
        )
    if device is None:
        from aion_train.parallel.device import get_device

        device = get_device().torch_device if torch.cuda.is_available() else torch.device("cpu")
    from aion_train.runtime import apply_model_execution

    model = model.eval().to(device=device, dtype=torch.float32)
    return apply_model_execution(model, torch.device(device), cfg.runtime), cfg


def multimodal_data(cfg):
    """(data dir, tokenizer) of a multimodal run."""
    from aion_train.data import Tokenizer
    from aion_train.data.multimodal import multimodal_demo_paths

    if cfg.data.tokenizer:
        return cfg.data.dir, Tokenizer(cfg.data.tokenizer)
    return cfg.data.dir, Tokenizer(multimodal_demo_paths(cfg.data.dir)["tokenizer"])
