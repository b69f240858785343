"""Solvers for tiny discrete POMDPs, used to check the belief machinery and as the yardstick
for PPO on a POMDP.

The optimal value over beliefs is piecewise linear and convex: V(b) = max_k alpha_k . b.
A Bellman backup of a set of alpha-vectors (Sondik / Monahan, with incremental pruning of
Cassandra, Littman & Zhang 1997):

    g_{a,o,k}(s) = gamma * sum_s' T(s'|s,a) O(o|s',a) alpha_k(s')
    V'           = prune( U_a [ R(., a) + (+)_o prune({g_{a,o,k}}_k) ] )     ((+) = cross-sum)

`exact_value_iteration` repeats it (a horizon, or until the values stop moving);
`point_based_value_iteration` (PBVI, Pineau, Gordon & Thrun 2003) backs up only at a finite
set of beliefs, which scales past what exact enumeration can hold."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
from scipy.optimize import linprog

from .pomdp import POMDP


@dataclass
class AlphaVectors:
    """V(b) = max_k alphas[k] . b; acting greedily = the action of the maximising vector."""

    alphas: np.ndarray  # [K, S]
    actions: np.ndarray  # [K] (-1 for the horizon-0 zero vector)

    def values(self, beliefs: np.ndarray) -> np.ndarray:
        return (np.atleast_2d(beliefs) @ self.alphas.T).max(1)

    def value(self, b: np.ndarray) -> float:
        return float(self.values(b)[0])

    def action(self, b: np.ndarray) -> int:
        return int(self.actions[int(np.argmax(self.alphas @ np.asarray(b)))])


def projections(pomdp: POMDP, alphas: np.ndarray) -> np.ndarray:
    """g[a, o, k, s] = gamma * sum_s' T[a, s, s'] O[a, s', o] alphas[k, s']."""
    return pomdp.gamma * np.einsum("ast,ato,kt->aoks", pomdp.T, pomdp.O, alphas)


def _strictly_best_somewhere(v: np.ndarray, others: np.ndarray, eps: float) -> bool:
    """Is there a belief b with b.v > b.w + eps for every w in `others`? (max d over the simplex
    subject to b.(v - w) >= d, solved as an LP.)"""
    if len(others) == 0:
        return True
    S = v.shape[0]
    # variables x = (b_1..b_S, d); minimise -d
    c = np.zeros(S + 1)
    c[-1] = -1.0
    A_ub = np.hstack([-(v - others), np.ones((len(others), 1))])  # d - b.(v - w) <= 0
    A_eq = np.hstack([np.ones((1, S)), np.zeros((1, 1))])
    res = linprog(
        c,
        A_ub=A_ub,
        b_ub=np.zeros(len(others)),
        A_eq=A_eq,
        b_eq=[1.0],
        bounds=[(0, 1)] * S + [(None, None)],
        method="highs",
    )
    if not res.success:
        raise RuntimeError(f"alpha-vector pruning LP failed: {res.message}")
    return -res.fun > eps


def prune(alphas: np.ndarray, actions: np.ndarray, eps: float = 1e-9) -> tuple[np.ndarray, np.ndarray]:
    """Drop every vector that is nowhere the unique maximum (within eps); the max over the
    simplex is unchanged. Pointwise-dominated vectors go first (cheap), then one LP each,
    removing as we go so that ties are never all dropped together."""
    order = np.lexsort(alphas.T[::-1])
    alphas, actions = alphas[order], actions[order]
    _, first = np.unique(np.round(alphas, 12), axis=0, return_index=True)
    alphas, actions = alphas[np.sort(first)], actions[np.sort(first)]
    dominated = np.zeros(len(alphas), dtype=bool)
    for i in range(len(alphas)):
        ge = np.all(alphas >= alphas[i] - eps, axis=1)
        ge[i] = False
        dominated[i] = bool(np.any(ge & ~dominated))
    alphas, actions = alphas[~dominated], actions[~dominated]
    keep = np.ones(len(alphas), dtype=bool)
    for i in range(len(alphas)):
        others = alphas[keep & (np.arange(len(alphas)) != i)]
        if not _strictly_best_somewhere(alphas[i], others, eps):
            keep[i] = False
    return alphas[keep], actions[keep]


def exact_backup(pomdp: POMDP, V: AlphaVectors, eps: float = 1e-9) -> AlphaVectors:
    """One exact Bellman backup by incremental pruning."""
    g = projections(pomdp, V.alphas)
    out_alphas, out_actions = [], []
    for a in range(pomdp.n_actions):
        acc = g[a, 0]
        for o in range(1, pomdp.n_observations):
            summed = (acc[:, None, :] + g[a, o][None, :, :]).reshape(-1, pomdp.n_states)
            acc, _ = prune(summed, np.zeros(len(summed), dtype=np.int64), eps)
        out_alphas.append(acc + pomdp.R[:, a])
        out_actions.append(np.full(len(acc), a))
    alphas, actions = prune(np.concatenate(out_alphas), np.concatenate(out_actions), eps)
    return AlphaVectors(alphas, actions)


def simplex_grid(n_states: int, resolution: int) -> np.ndarray:
    """Every belief whose entries are multiples of 1/resolution."""
    pts = [c for c in itertools.product(range(resolution + 1), repeat=n_states - 1) if sum(c) <= resolution]
    return np.array([list(c) + [resolution - sum(c)] for c in pts], dtype=np.float64) / resolution


def exact_value_iteration(
    pomdp: POMDP, horizon: int | None = None, tol: float = 1e-6, max_iter: int = 2000, check_resolution: int = 40
) -> tuple[AlphaVectors, dict]:
    """Exact value iteration from V_0 = 0. With `horizon` h: V_h, the optimal value of h decisions.
    Without: iterate until the values on a simplex grid change by less than `tol`.
    Returns (alpha-vectors, {"iterations", "residual", "n_vectors"})."""
    if horizon is None and pomdp.gamma >= 1.0:
        raise ValueError("exact_value_iteration: an infinite horizon needs gamma < 1")
    V = AlphaVectors(np.zeros((1, pomdp.n_states)), np.array([-1]))
    grid = simplex_grid(pomdp.n_states, check_resolution)
    residual, n = float("inf"), 0
    limit = horizon if horizon is not None else max_iter
    while n < limit:
        new = exact_backup(pomdp, V)
        residual = float(np.max(np.abs(new.values(grid) - V.values(grid))))
        V, n = new, n + 1
        if horizon is None and residual < tol:
            break
    if horizon is None and residual >= tol:
        raise RuntimeError(f"exact_value_iteration did not converge in {max_iter} iterations (residual {residual:.3g})")
    return V, {"iterations": n, "residual": residual, "n_vectors": len(V.alphas)}


def reachable_beliefs(pomdp: POMDP, depth: int, max_points: int = 500, decimals: int = 9) -> np.ndarray:
    """Beliefs reachable from b0 in at most `depth` (action, observation) steps (breadth first,
    duplicates merged, at most `max_points`), plus the simplex corners."""
    seen = {tuple(np.round(pomdp.b0, decimals))}
    points, frontier = [pomdp.b0], [pomdp.b0]
    for _ in range(depth):
        nxt = []
        for b in frontier:
            for a in range(pomdp.n_actions):
                probs = pomdp.observation_probs(b, a)
                for o in np.nonzero(probs > 1e-12)[0]:
                    nb = pomdp.belief_update(b, a, int(o))
                    key = tuple(np.round(nb, decimals))
                    if key not in seen and len(points) < max_points:
                        seen.add(key)
                        points.append(nb)
                        nxt.append(nb)
        frontier = nxt
    return np.vstack(points + list(np.eye(pomdp.n_states)))


def point_based_value_iteration(
    pomdp: POMDP, beliefs: np.ndarray, horizon: int | None = None, tol: float = 1e-6, max_iter: int = 5000
) -> tuple[AlphaVectors, dict]:
    """PBVI backups at `beliefs` [N, S]: one alpha-vector per belief per iteration. From V_0 = 0
    with a horizon; otherwise from the lower bound min R / (1 - gamma) until the values at the
    beliefs move by less than `tol`. A lower bound of the exact value everywhere."""
    beliefs = np.atleast_2d(np.asarray(beliefs, dtype=np.float64))
    if horizon is None:
        if pomdp.gamma >= 1.0:
            raise ValueError("point_based_value_iteration: an infinite horizon needs gamma < 1")
        start = pomdp.R.min() / (1 - pomdp.gamma)
    else:
        start = 0.0
    V = AlphaVectors(np.full((1, pomdp.n_states), start), np.array([-1]))
    residual, n = float("inf"), 0
    limit = horizon if horizon is not None else max_iter
    while n < limit:
        g = projections(pomdp, V.alphas)  # [A, Z, K, S]
        scores = np.einsum("ns,aoks->naok", beliefs, g)  # b . g_{a,o,k}
        best = scores.argmax(-1)  # [N, A, Z]
        a_idx, o_idx = np.meshgrid(np.arange(pomdp.n_actions), np.arange(pomdp.n_observations), indexing="ij")
        chosen = g[a_idx[None], o_idx[None], best]  # [N, A, Z, S]
        cand = pomdp.R.T[None] + chosen.sum(2)  # [N, A, S]
        act = np.einsum("nas,ns->na", cand, beliefs).argmax(1)
        vecs = cand[np.arange(len(beliefs)), act]
        _, first = np.unique(np.round(vecs, 12), axis=0, return_index=True)  # many beliefs share a vector
        new = AlphaVectors(vecs[first], act[first])
        residual = float(np.max(np.abs(new.values(beliefs) - V.values(beliefs))))
        V, n = new, n + 1
        if horizon is None and residual < tol:
            break
    return V, {"iterations": n, "residual": residual, "n_vectors": len(V.alphas)}
