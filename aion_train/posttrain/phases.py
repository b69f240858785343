"""The post-training phases as the CLI, the launchers and the pipeline call them: one place
decides whether a run post-trains the text task (sft.py, reward.py, ppo.py) or the media task
of a multimodal model (multimodal/: model.multimodal.enabled)."""

from __future__ import annotations


def run_sft(cfg) -> dict:
    if cfg.model.multimodal.enabled:
        from .multimodal.sft import run_mm_sft

        return run_mm_sft(cfg)
    from .sft import run_sft as run

    return run(cfg)


def run_rm(cfg) -> dict:
    if cfg.model.multimodal.enabled:
        from .multimodal.reward import run_mm_rm

        return run_mm_rm(cfg)
    from .reward import run_rm as run

    return run(cfg)


def run_ppo(cfg) -> dict:
    if cfg.model.multimodal.enabled:
        from .multimodal.ppo import run_mm_ppo

        return run_mm_ppo(cfg)
    from .ppo import run_ppo as run

    return run(cfg)
