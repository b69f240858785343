"""Multimodal PPO (`aion-train ppo` on a multimodal config): the loop, losses, checkpoints and
metrics of `posttrain/ppo.py`, with media prompts.

    actor      the SFT multimodal model + its LoRA adapters (FusedLM; DeepSpeed engine)
    reference  the same model, adapters merged, frozen
    reward     the multimodal reward model (scalar head on the fused sequence), frozen
    critic     a value head on a copy of the reward model's backbone (DeepSpeed engine)

Rollouts are KV-cached over the fused prompt: each item's media go through encoder ->
resampler -> gated projection once (`models.media_tokens`; with a frozen media path the
result is kept per item for the whole run and every model), the prompt is prefilled once,
decoding runs on text tokens. Scoring (actor, reference, critic, reward model) reads the
same fused rows; with `ppo.router_replay` the actor's scoring pass records each token's
experts and the updates reuse them (model/moe/router_replay.py)."""

from __future__ import annotations

import torch

from aion_train.parallel.device import module_device, to_device

from ..ppo import PPOOps, run_ppo
from ..rollout import experience
from .models import FusedCritic, FusedLM, FusedRewardModel, build_mm_model
from .rollout import evaluate_accuracy, generate_responses, sequences
from .task import is_correct, modalities_of


def load_mm_reward_model(cfg, groups):
    from ..reward import load_reward_model

    return load_reward_model(cfg, groups, build_backbone=build_mm_model, cls=FusedRewardModel)


def build_mm_critic(cfg, groups) -> FusedCritic:
    """A value head on a copy of the reward model's backbone and head (ppo.critic_init=rm) or
    on the SFT model with a zero head (sft); trainable but for a frozen media path."""
    from .sft import freeze_media_path, load_mm_policy

    if cfg.ppo.critic_init == "rm":
        rm = load_mm_reward_model(cfg, groups)
        critic = FusedCritic(rm.backbone, cfg.model.d_model)
        with torch.no_grad():
            critic.value_head.weight.copy_(rm.head.weight)
            critic.value_head.bias.copy_(rm.head.bias)
    else:
        critic = FusedCritic(load_mm_policy(cfg, merge=True, groups=groups)[0], cfg.model.d_model)
    for p in critic.parameters():
        p.requires_grad_(True)
    if not cfg.lora.encoders:
        freeze_media_path(critic.backbone)
    return critic.train()


def build_mm_models(cfg, groups):
    """(actor engine, critic engine, reference, reward model, task): run_ppo's models."""
    from ..ppo import engines
    from .sft import load_mm_policy

    actor_model, task = load_mm_policy(cfg, merge=False, groups=groups)
    reference = FusedLM(load_mm_policy(cfg, merge=True, groups=groups)[0])
    for p in reference.parameters():
        p.requires_grad_(False)
    reference.eval()
    if cfg.ppo.reward == "rm":
        reward_model = load_mm_reward_model(cfg, groups)
    else:  # a function of the decoded answers (posttrain/rewards.py), e.g. rewards:exact_match
        from ..rewards import FunctionReward

        reward_model = FunctionReward(cfg.ppo.reward)
    actor_and_critic = engines(cfg, groups, FusedLM(actor_model), lambda: build_mm_critic(cfg, groups))
    return actor_and_critic + (reference, reward_model, task)


def sample_mm_sequences(model, task, examples, pcfg, generator, groups):
    """(responses, (input_ids, resp_pos, resp_tokens, resp_mask), context) of one sampled
    response per media prompt."""
    responses = generate_responses(
        model, examples, pcfg.max_new_tokens, task.end_id, groups, pcfg.temperature, generator
    )
    seqs, ctx = sequences(task, examples, responses)
    return responses, seqs, ctx


@torch.no_grad()
def make_mm_experience(
    examples, actor, reference, critic, reward_model, task, pcfg, generator, groups=None, dp_group=None
):
    """The RolloutBatch of one sampled response per media prompt (rollout.experience)."""
    responses, seqs, ctx = sample_mm_sequences(actor, task, examples, pcfg, generator, groups)
    device = module_device(actor)
    seqs = to_device(seqs, device)

    def outcome():
        texts = [task.decode(r) for r in responses]
        if getattr(reward_model, "scores_text", False):
            scores = reward_model.score(examples, texts)
        else:
            scores = reward_model(seqs[0], ctx)
        return scores, [float(is_correct(e, t)) for e, t in zip(examples, texts)]

    return experience(seqs, outcome, actor, reference, critic, pcfg, groups, dp_group, ctx)


MM_OPS = PPOOps(
    build_mm_models,
    make_mm_experience,
    evaluate_accuracy,
    sample_mm_sequences,
    lambda cfg: {"modalities": modalities_of(cfg.sft.mm_kinds)},
)


def run_mm_ppo(cfg) -> dict:
    """SPMD: the PPO phase of `posttrain/ppo.py` on media prompts."""
    return run_ppo(cfg, MM_OPS)


__all__ = ["MM_OPS", "build_mm_critic", "build_mm_models", "make_mm_experience", "run_mm_ppo", "sample_mm_sequences"]
