"""PPO on a POMDP environment, through the same PPO maths as the RLHF loop
(`aion_train.posttrain.ppo_math`: GAE, advantage whitening, clipped surrogate, value clipping,
entropy bonus).

The agent acts on its exact belief (a sufficient statistic of its observation history, kept by
`BeliefEnv`) plus the fraction of the horizon left; episodes are the first `horizon` steps of
the POMDP, so the objective is E[sum_{t < H} gamma^t r_t], the same quantity finite-horizon
value iteration computes. Rollouts are [n_envs, horizon] tensors, laid out like RLHF's
[batch, response tokens], every step valid."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from aion_train.posttrain import ppo_math

from .pomdp import POMDP, BeliefEnv


@dataclass
class EnvPPOSettings:
    iterations: int = 60
    n_envs: int = 256
    horizon: int = 40
    epochs: int = 4
    minibatches: int = 4
    lr: float = 3e-3
    clip_eps: float = 0.2
    value_clip: float = 1.0  # in scaled-reward units
    gae_lambda: float = 0.95
    entropy_coef: float = 0.01
    value_coef: float = 0.5
    reward_scale: float = 0.1  # rewards are multiplied by this for learning (Tiger's are +-100)
    hidden: int = 64
    eval_episodes: int = 2000
    eval_every: int = 10
    seed: int = 0


class BeliefActorCritic(nn.Module):
    """Separate small MLPs for the policy logits and the value over [belief, time left]."""

    def __init__(self, n_states: int, n_actions: int, hidden: int):
        super().__init__()

        def mlp(out):
            return nn.Sequential(
                nn.Linear(n_states + 1, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, out)
            )

        self.actor, self.critic = mlp(n_actions), mlp(1)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.actor(features), self.critic(features).squeeze(-1)


def _features(beliefs: np.ndarray, t: int, horizon: int) -> torch.Tensor:
    left = np.full((beliefs.shape[0], 1), (horizon - t) / horizon)
    return torch.as_tensor(np.hstack([beliefs, left]), dtype=torch.float32)


@torch.no_grad()
def collect(
    pomdp: POMDP, model: BeliefActorCritic, n_envs: int, horizon: int, seed: int, greedy: bool = False
) -> dict[str, torch.Tensor]:
    """Run n_envs episodes of `horizon` steps; tensors [n_envs, horizon] (features [.., S+1])."""
    env = BeliefEnv(pomdp, n_envs, seed=seed)
    beliefs = env.reset()
    gen = torch.Generator().manual_seed(seed)
    out = {k: [] for k in ("features", "actions", "logp", "values", "rewards")}
    for t in range(horizon):
        feats = _features(beliefs, t, horizon)
        logits, values = model(feats)
        if greedy:
            actions = logits.argmax(-1)
        else:
            actions = torch.multinomial(torch.softmax(logits, -1), 1, generator=gen).squeeze(-1)
        _, rewards, beliefs = env.step(actions.numpy())
        out["features"].append(feats)
        out["actions"].append(actions)
        out["logp"].append(ppo_math.token_logprobs(logits, actions))
        out["values"].append(values)
        out["rewards"].append(torch.as_tensor(rewards, dtype=torch.float32))
    return {k: torch.stack(v, dim=1) for k, v in out.items()}


def mean_discounted_return(rewards: torch.Tensor, gamma: float) -> float:
    discounts = gamma ** torch.arange(rewards.shape[1], dtype=torch.float64)
    return float((rewards.double() * discounts).sum(1).mean())


def evaluate(pomdp: POMDP, model: BeliefActorCritic, settings: EnvPPOSettings, seed: int) -> float:
    """Mean discounted return of the (sampling) policy over settings.eval_episodes episodes."""
    batch = collect(pomdp, model, settings.eval_episodes, settings.horizon, seed)
    return mean_discounted_return(batch["rewards"], pomdp.gamma)


def ppo_update(model, optimizer, batch: dict, gamma: float, s: EnvPPOSettings, gen: torch.Generator) -> dict:
    """Several epochs of minibatch PPO on one rollout batch; returns the last epoch's means."""
    mask = torch.ones_like(batch["rewards"])
    rewards = batch["rewards"] * s.reward_scale
    adv, returns = ppo_math.gae(rewards, batch["values"], mask, gamma, s.gae_lambda)
    adv = ppo_math.whiten(adv, mask)
    flat = {k: v.reshape(-1, *v.shape[2:]) for k, v in dict(batch, adv=adv, returns=returns).items()}
    n = flat["actions"].shape[0]
    stats = {}
    for _ in range(s.epochs):
        perm = torch.randperm(n, generator=gen)
        sums = {"policy_loss": 0.0, "value_loss": 0.0, "entropy": 0.0, "clipfrac": 0.0, "approx_kl": 0.0}
        for idx in perm.chunk(s.minibatches):
            logits, values = model(flat["features"][idx])
            ones = torch.ones(len(idx))
            logp = ppo_math.token_logprobs(logits, flat["actions"][idx])
            pl, pinfo = ppo_math.clipped_surrogate(logp, flat["logp"][idx], flat["adv"][idx], ones, s.clip_eps)
            vl, _ = ppo_math.clipped_value_loss(values, flat["values"][idx], flat["returns"][idx], ones, s.value_clip)
            ent = ppo_math.entropy_from_logits(logits).mean()
            loss = pl + s.value_coef * vl - s.entropy_coef * ent
            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            for k, v in (
                ("policy_loss", pl),
                ("value_loss", vl),
                ("entropy", ent),
                ("clipfrac", pinfo["clipfrac"]),
                ("approx_kl", pinfo["approx_kl"]),
            ):
                sums[k] += float(v.detach()) / s.minibatches
        stats = sums
    return stats


def train_ppo_on_pomdp(pomdp: POMDP, settings: EnvPPOSettings | None = None, log=None) -> dict:
    """Train a belief policy with PPO. Returns {"eval_returns": mean discounted return of the
    policy before training, every eval_every iterations and at the end, "eval_iterations",
    "history": per-iteration stats}. `log(iteration, stats)` is called when given."""
    s = settings or EnvPPOSettings()
    if s.iterations < 1 or s.horizon < 1 or s.n_envs < s.minibatches:
        raise ValueError("EnvPPOSettings: iterations and horizon must be >= 1 and n_envs >= minibatches")
    torch.manual_seed(s.seed)
    model = BeliefActorCritic(pomdp.n_states, pomdp.n_actions, s.hidden)
    optimizer = torch.optim.Adam(model.parameters(), lr=s.lr)
    gen = torch.Generator().manual_seed(s.seed)
    eval_seed = 10**6 + s.seed
    evals, eval_at, history = [evaluate(pomdp, model, s, eval_seed)], [0], []
    for it in range(1, s.iterations + 1):
        batch = collect(pomdp, model, s.n_envs, s.horizon, seed=s.seed * 100003 + it)
        stats = ppo_update(model, optimizer, batch, pomdp.gamma, s, gen)
        stats["return"] = mean_discounted_return(batch["rewards"], pomdp.gamma)
        history.append(stats)
        if log is not None:
            log(it, stats)
        if it % s.eval_every == 0 or it == s.iterations:
            evals.append(evaluate(pomdp, model, s, eval_seed))
            eval_at.append(it)
    return {"eval_returns": evals, "eval_iterations": eval_at, "history": history, "model": model}


def run_env_ppo(cfg) -> dict:
    """`aion-train ppo ppo.env=NAME`: PPO on that POMDP with cfg.ppo's clip / GAE / entropy
    settings, against the point-based solver's optimum for the same horizon. Single process."""
    from .envs import make_env
    from .solver import point_based_value_iteration, reachable_beliefs, simplex_grid

    p = cfg.ppo
    pomdp = make_env(p.env)
    s = EnvPPOSettings(
        iterations=p.env_iterations,
        n_envs=p.env_batch,
        horizon=p.env_horizon,
        epochs=max(p.epochs, 4),
        clip_eps=p.clip_eps,
        gae_lambda=p.lam,
        entropy_coef=max(p.entropy_coef, 0.01),
        eval_every=max(1, p.env_iterations // 4),
        seed=cfg.seed,
    )
    beliefs = np.vstack([reachable_beliefs(pomdp, 8), simplex_grid(pomdp.n_states, 50)])
    V, _ = point_based_value_iteration(pomdp, beliefs, horizon=s.horizon)
    result = train_ppo_on_pomdp(pomdp, s)
    last = result["history"][-1]
    return {
        "env": p.env,
        "env_return": result["eval_returns"][-1],
        "env_return_first": result["eval_returns"][0],
        "solver_value": V.value(pomdp.b0),
        "horizon": s.horizon,
        "iterations": s.iterations,
        "clipfrac": last["clipfrac"],
        "entropy": last["entropy"],
        "value_loss": last["value_loss"],
    }
