"""aion-train ppo [--config F] [overrides] [--nproc N] [--json] [--run-missing-phases]

PPO RLHF of the SFT policy against the reward model (default config: configs/rlhf_tiny.yaml;
needs finished `sft` and `rm` phases in the same run_dir, or --run-missing-phases to run
them first). With --json one JSON line {"ppo_accuracy", "ppo_kl", "sft_accuracy",
"reward_mean", ...} (held-out accuracy of the PPO policy and, on the same prompts, of the SFT
model). Under torchrun / deepspeed (WORLD_SIZE set) it runs as one rank; --nproc N starts N
local ranks. With `ppo.env=tiger` (or crying_baby) it trains a belief policy with the same
PPO maths on that POMDP instead and reports its return next to the solver's optimum."""

from __future__ import annotations

import sys
from pathlib import Path

from .local_ranks import launch_local_ranks, wants_local_ranks
from .sft import add_phase_arguments, run_phase

DEFAULT_CONFIG = "configs/rlhf_tiny.yaml"


def add_arguments(p):
    add_phase_arguments(p)
    p.add_argument(
        "--run-missing-phases",
        action="store_true",
        help="run the sft and rm phases first when their done.json is missing",
    )


def default_config() -> str:
    here = Path(DEFAULT_CONFIG)
    return str(here if here.is_file() else Path(__file__).resolve().parents[2] / DEFAULT_CONFIG)


def rlhf(cfg) -> dict:
    """SFT and RM (unless the reward is a function) when missing (SPMD like them), then PPO."""
    from aion_train.posttrain.common import read_done

    if read_done(cfg, "sft") is None:
        from aion_train.posttrain.phases import run_sft

        run_sft(cfg)
    if cfg.ppo.reward == "rm" and not cfg.ppo.reward_model and read_done(cfg, "rm") is None:
        from aion_train.posttrain.phases import run_rm

        run_rm(cfg)
    from aion_train.posttrain.phases import run_ppo

    return run_ppo(cfg)


def run(args) -> int:
    import logging

    from aion_train.config import ConfigError, load_config

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")  # progress on stderr
    args.config = args.config or default_config()
    try:
        pcfg = load_config(args.config, args.overrides).ppo
    except ConfigError as e:
        print(str(e), file=sys.stderr)
        return 2
    if pcfg.env:
        return run_phase(args, "ppo", "aion_train.rl.env_rollout:run_env_ppo", "env_return", phases=())
    if args.run_missing_phases:
        if wants_local_ranks(args):
            return launch_local_ranks(args, "ppo", "--run-missing-phases")
        return run_phase(
            args,
            "ppo",
            "aion_train.commands.ppo:rlhf",
            HEADLINE,
            phases=("sft", "rm", "ppo") if pcfg.reward == "rm" and not pcfg.reward_model else ("sft", "ppo"),
        )
    return run_phase(args, "ppo", "aion_train.posttrain.phases:run_ppo", HEADLINE)


HEADLINE = ("ppo_accuracy", "ppo_eval_reward")
