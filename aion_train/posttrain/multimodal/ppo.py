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

from ..rollout import experience
from .models import FusedLM
from .rollout import evaluate_accuracy, generate_responses, sequences
from .task import is_correct, modalities_of


def build_mm_models(cfg, groups):
    """(actor engine, critic engine, reference, reward model, task): run_ppo's models."""
    from ..critic import build_critic
    from ..ppo import _engine
    from ..reward import load_reward_model
    from .sft import load_mm_policy

    if cfg.ppo.reward != "rm":
        raise ValueError(f"ppo.reward={cfg.ppo.reward!r}: a multimodal run is rewarded by its reward model (rm)")
    actor_model, task = load_mm_policy(cfg, merge=False, groups=groups)
    reference = FusedLM(load_mm_policy(cfg, merge=True, groups=groups)[0])
    for p in reference.parameters():
        p.requires_grad_(False)
    reference.eval()
    reward_model = load_reward_model(cfg, groups)
    critic = build_critic(cfg, groups)
    per_rank = cfg.ppo.rollout_prompts // groups.dp
    mb = max(1, per_rank // cfg.ppo.minibatches)
    actor = _engine(FusedLM(actor_model), cfg, groups, cfg.ppo.actor_lr, mb)
    critic_engine = _engine(critic, cfg, groups, cfg.ppo.critic_lr, mb)
    return actor, critic_engine, reference, reward_model, task


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
    reward_model.eval()
    scores = reward_model(seqs[0], ctx)
    correct = [float(is_correct(e, task.decode(r))) for e, r in zip(examples, responses)]
    return experience(seqs, scores, correct, actor, reference, critic, pcfg, groups, dp_group, ctx)


__all__ = [
    "build_mm_models",
    "evaluate_accuracy",
    "make_mm_experience",
    "modalities_of",
    "sample_mm_sequences",
]
