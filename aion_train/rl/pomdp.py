"""A finite POMDP (S, A, T, R, Omega, O, gamma) with the exact belief update, and a vectorised
simulator that runs many episodes at once and tracks each agent's belief.

Conventions (arrays, not callables, so that belief updates are one einsum):

    T[a, s, s'] = P(s' | s, a)          R[s, a] = expected immediate reward
    O[a, s', o] = P(o | s', a)          b0[s]   = initial belief, gamma in [0, 1]

Belief update after doing a and observing o (Kaelbling, Littman & Cassandra 1998):

    b'(s') = eta * O(o | s', a) * sum_s T(s' | s, a) b(s),   1/eta = P(o | b, a)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

_TOL = 1e-9


def _check_distribution(name: str, arr: np.ndarray, axis: int) -> None:
    if np.any(arr < -_TOL):
        raise ValueError(f"POMDP.{name} has negative probabilities")
    sums = arr.sum(axis=axis)
    if not np.allclose(sums, 1.0, atol=1e-6):
        bad = np.argwhere(~np.isclose(sums, 1.0, atol=1e-6))[0]
        raise ValueError(
            f"POMDP.{name}: the distribution at index {tuple(int(i) for i in bad)} sums to "
            f"{float(sums[tuple(bad)]):.6g}, not 1"
        )


@dataclass(frozen=True)
class POMDP:
    states: tuple
    actions: tuple
    observations: tuple
    T: np.ndarray
    R: np.ndarray
    O: np.ndarray
    gamma: float
    b0: np.ndarray
    name: str = ""
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        S, A, Z = len(self.states), len(self.actions), len(self.observations)
        for attr in ("T", "R", "O", "b0"):
            object.__setattr__(self, attr, np.asarray(getattr(self, attr), dtype=np.float64))
        expected = {"T": (A, S, S), "R": (S, A), "O": (A, S, Z), "b0": (S,)}
        for attr, shape in expected.items():
            if getattr(self, attr).shape != shape:
                raise ValueError(
                    f"POMDP.{attr} has shape {getattr(self, attr).shape}, expected {shape} "
                    f"(|S|={S}, |A|={A}, |Omega|={Z})"
                )
        _check_distribution("T", self.T, axis=2)
        _check_distribution("O", self.O, axis=2)
        _check_distribution("b0", self.b0, axis=0)
        if not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"POMDP.gamma={self.gamma} must be in [0, 1]")
        if not np.all(np.isfinite(self.R)):
            raise ValueError("POMDP.R has non-finite rewards")

    @property
    def n_states(self) -> int:
        return len(self.states)

    @property
    def n_actions(self) -> int:
        return len(self.actions)

    @property
    def n_observations(self) -> int:
        return len(self.observations)

    def predict(self, b: np.ndarray, a: int) -> np.ndarray:
        """sum_s T(s' | s, a) b(s): the state distribution after a, before observing."""
        return np.asarray(b, dtype=np.float64) @ self.T[a]

    def observation_probs(self, b: np.ndarray, a: int) -> np.ndarray:
        """P(o | b, a) for every o."""
        return self.predict(b, a) @ self.O[a]

    def belief_update(self, b: np.ndarray, a: int, o: int) -> np.ndarray:
        """The exact posterior b' over states; ValueError if o is impossible under (b, a)."""
        unnorm = self.O[a, :, o] * self.predict(b, a)
        z = unnorm.sum()
        if z <= 0.0:
            raise ValueError(
                f"observation {self.observations[o]!r} has probability 0 after action "
                f"{self.actions[a]!r} from this belief"
            )
        return unnorm / z

    def belief_update_batch(self, b: np.ndarray, a: np.ndarray, o: np.ndarray) -> np.ndarray:
        """Row-wise belief_update for beliefs [N, S], actions [N], observations [N]."""
        pred = np.einsum("ns,nst->nt", b, self.T[a])
        unnorm = pred * self.O[a, :, o]
        z = unnorm.sum(1, keepdims=True)
        if np.any(z <= 0.0):
            raise ValueError("belief_update_batch: an observation has probability 0 under its belief")
        return unnorm / z

    def expected_reward(self, b: np.ndarray, a: int) -> float:
        return float(np.asarray(b) @ self.R[:, a])


def discounted_return(rewards, gamma: float) -> float:
    """sum_t gamma^t r_t."""
    g = 0.0
    for r in reversed(list(rewards)):
        g = float(r) + gamma * g
    return g


def discounted_returns(rewards: np.ndarray, gamma: float, dones: np.ndarray | None = None) -> np.ndarray:
    """G_t = r_t + gamma (1 - done_t) G_{t+1} along the last axis (done_t: the episode ended with step t)."""
    rewards = np.asarray(rewards, dtype=np.float64)
    out = np.zeros_like(rewards)
    g = np.zeros(rewards.shape[:-1])
    for t in reversed(range(rewards.shape[-1])):
        if dones is not None:
            g = np.where(np.asarray(dones)[..., t], 0.0, g)
        g = rewards[..., t] + gamma * g
        out[..., t] = g
    return out


class BeliefEnv:
    """N independent episodes of `pomdp` stepped together. The hidden states are sampled from
    the model; each agent sees only its observations and its exact belief (a sufficient
    statistic of its history), which `step` updates."""

    def __init__(self, pomdp: POMDP, n_envs: int, seed: int = 0):
        if n_envs < 1:
            raise ValueError(f"BeliefEnv: n_envs={n_envs} must be >= 1")
        self.pomdp, self.n = pomdp, n_envs
        self.rng = np.random.default_rng(seed)
        self.state = np.zeros(n_envs, dtype=np.int64)
        self.belief = np.tile(pomdp.b0, (n_envs, 1))

    def _sample_rows(self, probs: np.ndarray) -> np.ndarray:
        cdf = np.cumsum(probs, axis=1)
        u = self.rng.random((probs.shape[0], 1)) * cdf[:, -1:]
        return np.minimum((u > cdf).sum(1), probs.shape[1] - 1)

    def reset(self) -> np.ndarray:
        p = self.pomdp
        self.state = self._sample_rows(np.tile(p.b0, (self.n, 1)))
        self.belief = np.tile(p.b0, (self.n, 1))
        return self.belief.copy()

    def step(self, actions) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Apply actions [N]; returns (observations [N], rewards [N], new beliefs [N, S])."""
        p = self.pomdp
        a = np.asarray(actions, dtype=np.int64)
        if a.shape != (self.n,) or a.min() < 0 or a.max() >= p.n_actions:
            raise ValueError(f"BeliefEnv.step: need {self.n} actions in [0, {p.n_actions})")
        rewards = p.R[self.state, a]
        self.state = self._sample_rows(p.T[a, self.state])
        obs = self._sample_rows(p.O[a, self.state])
        self.belief = p.belief_update_batch(self.belief, a, obs)
        return obs, rewards, self.belief.copy()
