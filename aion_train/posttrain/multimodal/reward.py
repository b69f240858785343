"""The multimodal reward model (`aion-train rm` on a multimodal config): a scalar head on the
fused sequence, trained with the Bradley-Terry loss of `posttrain/reward.py`.

Pairs: a media prompt of the task with its answer (+ `</T>`) preferred over the same prompt
with a wrong answer of its closed set, or (`rm.malformed_fraction` of them) a malformed
response (empty, two answers, cut off, an answer of another kind, random pieces: what PPO
could otherwise exploit). Training pairs from the train prompts, held-out pairs from the test
prompts (other images). The backbone starts from the SFT model (adapters merged,
`rm.init=sft`) or the multimodal base (`rm.init=base`); the media path stays frozen unless
`lora.encoders`."""

from __future__ import annotations

from ..lora import apply_lora
from ..reward import response_pairs, run_rm
from .models import FusedRewardModel, build_mm_model, media_lora_targets
from .rollout import sequences
from .sft import base_checkpoint, freeze_media_path, load_mm_policy
from .task import build_mm_task


def mm_pair_batch(task, pairs):
    """(input_ids [2B, L], context) of [(example, chosen, rejected)]: the chosen rows, then the rejected."""
    examples = [e for e, _, _ in pairs] * 2
    responses = [c for _, c, _ in pairs] + [r for _, _, r in pairs]
    (ids, _, _, _), ctx = sequences(task, examples, responses)
    return ids, ctx


def mm_reward_setup(cfg, groups):
    """(reward model, train pairs, held-out pairs, held-out split, make_batch): run_rm's inputs."""
    from ..common import load_weights

    if cfg.rm.init == "sft":
        backbone, task = load_mm_policy(cfg, merge=True, groups=groups)
    else:
        backbone, task = build_mm_model(cfg, groups), build_mm_task(cfg)
        load_weights(backbone, base_checkpoint(cfg), groups)
    if cfg.rm.use_lora:
        import copy

        lcfg = copy.deepcopy(cfg.lora)
        if cfg.lora.encoders:
            lcfg.targets = list(lcfg.targets) + media_lora_targets(backbone)
        apply_lora(backbone, lcfg, seed=cfg.seed)
    else:
        for p in backbone.parameters():
            p.requires_grad_(True)
        if not cfg.lora.encoders:
            freeze_media_path(backbone)
    tok = task.answer_tokenizer
    n_new = cfg.ppo.max_new_tokens
    train = response_pairs(
        task.prompts("sft"),
        tok,
        cfg.rm.train_pairs or len(task.prompts("sft")),
        cfg.seed + 11,
        cfg.rm.malformed_fraction,
        n_new,
    )
    held = response_pairs(task.prompts("test"), tok, cfg.rm.eval_pairs, cfg.seed + 12)
    model = FusedRewardModel(backbone, cfg.model.d_model)
    return model, train, held, "easy-vqa test images", lambda p: mm_pair_batch(task, p)


def run_mm_rm(cfg) -> dict:
    """SPMD: the reward-model phase of `posttrain/reward.py` on the media task's pairs."""
    return run_rm(cfg, setup=mm_reward_setup)


__all__ = ["mm_pair_batch", "mm_reward_setup", "run_mm_rm"]
