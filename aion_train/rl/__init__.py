"""Agentic RL as POMDPs: the environment interface with the exact belief update
(`pomdp.py`), exact / point-based solvers for tiny models (`solver.py`), classic environments
(`envs.py`) and PPO on such an environment through the same PPO maths as RLHF
(`env_rollout.py`)."""

from .pomdp import POMDP, BeliefEnv, discounted_return, discounted_returns

__all__ = ["POMDP", "BeliefEnv", "discounted_return", "discounted_returns"]
