"""Config of PPO RLHF (`cfg.ppo`) and of the POMDP environments it can train on.

RLHF: actor = SFT model + its LoRA adapters (trained), reference = the frozen SFT model,
critic = value head on a copy of the reward model's backbone (trained), reward model frozen.
Per-token reward -beta (log pi - log pi_ref), plus the reward model's score at the last token.
See aion_train/posttrain/ppo.py."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from .posttrain_schema import check_file_list

PRECISIONS = ("fp32", "bf16")
CRITIC_INIT = ("rm", "sft")
# gae: a critic's values (Schulman et al. 2016); rloo: each response's return minus the mean of
# the other samples of its prompt (Ahmadian et al. 2024); group_norm: the return standardised
# within its prompt's samples (GRPO, Shao et al. 2024). rloo / group_norm train no critic.
ADVANTAGES = ("gae", "rloo", "group_norm")
POMDP_ENVS = ("crying_baby", "tiger")  # the environments of aion_train.rl.envs.ENVS


@dataclass
class PPOConfig:
    steps: int = 40  # PPO iterations (one rollout batch each)
    rollout_prompts: int = 64  # prompts per iteration, over all data-parallel ranks
    samples_per_prompt: int = 1  # responses sampled per prompt and iteration (>= 2 for rloo / group_norm)
    advantage: str = "gae"  # gae | rloo | group_norm (ADVANTAGES above)
    epochs: int = 2  # passes over each rollout batch
    minibatches: int = 2  # optimizer steps per epoch (per rank)
    actor_lr: float = 1e-3  # LoRA adapters (or full weights without lora.enabled)
    critic_lr: float = 5e-4
    beta: float = 0.02  # KL penalty coefficient (0.01-0.05)
    gamma: float = 1.0  # discount over response tokens
    lam: float = 0.95  # GAE lambda
    clip_eps: float = 0.2  # clipped surrogate epsilon
    value_clip: float = 0.2  # value clipping range (reward units)
    entropy_coef: float = 0.0  # entropy bonus in the actor loss
    whiten_advantages: bool = True
    temperature: float = 1.0  # rollout sampling temperature
    max_new_tokens: int = 4  # response length cap (answers are 1-2 tokens + <|end|>)
    critic_init: str = "rm"  # rm: reward model's backbone and head | sft: SFT model + fresh head
    # MoE: record the experts each token was routed to when the rollout is scored (log pi_old)
    # and route the same tokens to the same experts in the updates (model/moe/router_replay.py)
    router_replay: bool = False
    precision: str = "fp32"  # the PPO engines' precision (log-prob ratios want fp32 on CPU)
    save_every: int = 5  # checkpoint under {run_dir}/ppo/checkpoints every N iterations
    keep_last: int = 2
    # reward: "rm" = the reward model of this run's rm phase; "package.module:function" = a
    # function called as fn(prompts, completions, **columns) -> list of floats (TRL's form;
    # aion_train.posttrain.rewards:exact_match / regex_match / token_f1 for checkable tasks)
    reward: str = "rm"
    reward_model: str = ""  # with reward=rm: "" = this run's rm phase, else another run (or its rm/ folder)
    prompt_files: list = field(default_factory=list)  # your prompts JSONL ({"prompt", ...}); [] = built-in task
    eval_files: list = field(default_factory=list)  # held-out prompts; [] = the first eval_prompts train prompts
    eval_prompts: int = 64  # held-out prompts scored at the end when eval_files is empty
    # POMDP environments (aion_train/rl): `aion-train ppo ppo.env=tiger` trains a belief policy
    env: str = ""  # "" = RLHF on the task; tiger | crying_baby
    env_iterations: int = 40
    env_horizon: int = 30
    env_batch: int = 128  # episodes per iteration


def check(cfg, errors: list[str]) -> None:
    """Cross-field rules of this section; append one message per problem, naming its key."""
    p = cfg.ppo
    for key in (
        "steps",
        "rollout_prompts",
        "samples_per_prompt",
        "epochs",
        "minibatches",
        "max_new_tokens",
        "save_every",
        "keep_last",
        "env_iterations",
        "env_horizon",
        "env_batch",
        "eval_prompts",
    ):
        if getattr(p, key) < 1:
            errors.append(f"ppo.{key}={getattr(p, key)}: must be >= 1")
    for key in ("actor_lr", "critic_lr", "clip_eps", "value_clip"):
        if getattr(p, key) <= 0:
            errors.append(f"ppo.{key}={getattr(p, key)}: must be > 0")
    if not 0 <= p.beta <= 1:
        errors.append(f"ppo.beta={p.beta}: must be in [0, 1] (0.01-0.05 is the usual range)")
    for key in ("gamma", "lam"):
        if not 0 <= getattr(p, key) <= 1:
            errors.append(f"ppo.{key}={getattr(p, key)}: must be in [0, 1]")
    if p.clip_eps >= 1:
        errors.append(f"ppo.clip_eps={p.clip_eps}: must be < 1")
    if p.entropy_coef < 0:
        errors.append(f"ppo.entropy_coef={p.entropy_coef}: must be >= 0")
    if p.temperature <= 0:
        errors.append(f"ppo.temperature={p.temperature}: must be > 0 (rollouts sample)")
    if p.precision not in PRECISIONS:
        errors.append(f"ppo.precision={p.precision!r}: must be one of {', '.join(PRECISIONS)}")
    if p.critic_init not in CRITIC_INIT:
        errors.append(f"ppo.critic_init={p.critic_init!r}: must be one of {', '.join(CRITIC_INIT)}")
    if p.advantage not in ADVANTAGES:
        errors.append(f"ppo.advantage={p.advantage!r}: must be one of {', '.join(ADVANTAGES)}")
    elif p.advantage != "gae" and p.samples_per_prompt < 2 and not p.env:
        errors.append(
            f"ppo.advantage={p.advantage} compares the samples of one prompt: ppo.samples_per_prompt="
            f"{p.samples_per_prompt} must be >= 2"
        )
    if p.env and p.env not in POMDP_ENVS:
        errors.append(f"ppo.env={p.env!r}: must be empty or one of {', '.join(POMDP_ENVS)}")
    check_file_list("ppo.prompt_files", p.prompt_files, errors)
    check_file_list("ppo.eval_files", p.eval_files, errors)
    if p.eval_files and not p.prompt_files:
        errors.append("ppo.eval_files needs ppo.prompt_files (held-out prompts of your own prompt data)")
    if p.reward_model and p.reward != "rm":
        errors.append(f"ppo.reward_model={p.reward_model!r} is only read with ppo.reward=rm (got {p.reward!r})")
    elif p.reward_model and not any(
        os.path.isfile(os.path.join(p.reward_model, *sub, "done.json")) for sub in ((), ("rm",))
    ):
        errors.append(f"ppo.reward_model={p.reward_model!r}: no done.json of a finished rm phase there (or in its rm/)")
    if p.reward != "rm":
        mod, _, fn = p.reward.partition(":")
        if not mod or not fn or any(not part.isidentifier() for part in mod.split(".") + fn.split(".")):
            errors.append(f"ppo.reward={p.reward!r}: must be 'rm' or 'package.module:function'")
        elif p.critic_init == "rm" and p.advantage == "gae":
            errors.append(
                f"ppo.critic_init=rm needs a reward model, but ppo.reward={p.reward!r} is a function: "
                "use ppo.critic_init=sft"
            )
    world = cfg.parallel.world_size
    if world and cfg.parallel.tp and not p.env:
        dp = world // cfg.parallel.tp
        if dp and p.rollout_prompts % dp:
            errors.append(f"ppo.rollout_prompts={p.rollout_prompts} is not divisible by the data-parallel size {dp}")
        elif dp and p.rollout_prompts // dp * p.samples_per_prompt < p.minibatches:
            errors.append(
                f"ppo.rollout_prompts={p.rollout_prompts} x ppo.samples_per_prompt={p.samples_per_prompt} gives "
                f"{p.rollout_prompts // dp * p.samples_per_prompt} responses per rank, fewer than "
                f"ppo.minibatches={p.minibatches}"
            )
