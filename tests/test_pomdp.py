"""POMDP machinery against textbook references: Bayes by enumeration, Monte Carlo frequencies,
brute-force expectimax over the belief tree, the Tiger problem's known value and policy, and
PPO on Tiger approaching the solver's value."""

import itertools

import numpy as np
import pytest

from aion_train.rl import POMDP, BeliefEnv, discounted_return, discounted_returns
from aion_train.rl.envs import crying_baby, make_env, tiger
from aion_train.rl.solver import exact_value_iteration, point_based_value_iteration, reachable_beliefs, simplex_grid


def random_pomdp(rng, S=3, A=2, Z=3, gamma=0.9) -> POMDP:
    def stoch(*shape):
        x = rng.random(shape) + 0.05
        return x / x.sum(-1, keepdims=True)

    return POMDP(
        tuple(range(S)),
        tuple(range(A)),
        tuple(range(Z)),
        stoch(A, S, S),
        rng.normal(size=(S, A)),
        stoch(A, S, Z),
        gamma,
        stoch(S),
    )


def bayes_by_enumeration(p: POMDP, b, a, o):
    """P(s' | b, a, o) = sum_s b(s) T(s'|s,a) O(o|s',a) / sum_{s, s''} (same), by explicit loops."""
    joint = np.zeros(p.n_states)
    for s, s2 in itertools.product(range(p.n_states), repeat=2):
        joint[s2] += b[s] * p.T[a, s, s2] * p.O[a, s2, o]
    return joint / joint.sum()


def test_belief_update_is_bayes_rule():
    rng = np.random.default_rng(0)
    for _ in range(20):
        p = random_pomdp(rng)
        b = rng.dirichlet(np.ones(p.n_states))
        a, o = rng.integers(p.n_actions), rng.integers(p.n_observations)
        np.testing.assert_allclose(p.belief_update(b, a, o), bayes_by_enumeration(p, b, a, o), rtol=1e-12)
        np.testing.assert_allclose(p.observation_probs(b, a).sum(), 1.0)
    bs = rng.dirichlet(np.ones(p.n_states), size=5)
    acts, obs = rng.integers(p.n_actions, size=5), rng.integers(p.n_observations, size=5)
    batch = p.belief_update_batch(bs, acts, obs)
    for i in range(5):
        np.testing.assert_allclose(batch[i], p.belief_update(bs[i], acts[i], obs[i]), rtol=1e-12)


def test_tiger_belief_after_listening_matches_hand_computation():
    p = tiger()
    b = p.belief_update(p.b0, 0, 0)  # hear-left once
    assert b[0] == pytest.approx(0.85)
    b = p.belief_update(b, 0, 0)  # twice
    assert b[0] == pytest.approx(0.85**2 / (0.85**2 + 0.15**2))
    np.testing.assert_allclose(p.belief_update(b, 1, 1), [0.5, 0.5])  # opening resets


def test_impossible_observation_and_bad_models_are_named():
    p = tiger(listen_accuracy=1.0)
    with pytest.raises(ValueError, match="'hear-right' has probability 0"):
        p.belief_update(np.array([1.0, 0.0]), 0, 1)  # a perfect ear never hears the empty side
    t = tiger()
    with pytest.raises(ValueError, match=r"POMDP\.T"):
        POMDP(t.states, t.actions, t.observations, t.T * 0.9, t.R, t.O, t.gamma, t.b0)
    with pytest.raises(ValueError, match=r"POMDP\.O has shape"):
        POMDP(t.states, t.actions, t.observations, t.T, t.R, t.O[:, :, :1], t.gamma, t.b0)
    with pytest.raises(ValueError, match="gamma"):
        POMDP(t.states, t.actions, t.observations, t.T, t.R, t.O, 1.5, t.b0)
    with pytest.raises(ValueError, match="unknown POMDP environment 'tigre'"):
        make_env("tigre")


def test_tracked_belief_matches_monte_carlo_frequency():
    """Among simulated episodes with the same observation history, the share whose hidden state
    is s equals the tracked belief b(s)."""
    p = crying_baby()
    env = BeliefEnv(p, 40000, seed=1)
    env.reset()
    actions = np.full(env.n, 2)  # ignore, ignore, ignore
    history = np.zeros((env.n, 3), dtype=np.int64)
    for t in range(3):
        obs, _, beliefs = env.step(actions)
        history[:, t] = obs
    for h in itertools.product(range(2), repeat=3):
        sel = np.all(history == np.array(h), axis=1)
        if sel.sum() < 2000:
            continue
        freq = np.bincount(env.state[sel], minlength=2) / sel.sum()
        np.testing.assert_allclose(beliefs[sel][0], freq, atol=0.02)
        assert np.ptp(beliefs[sel], axis=0).max() < 1e-12  # same history -> same belief


def test_discounted_returns_against_a_loop():
    rng = np.random.default_rng(2)
    r = rng.normal(size=(4, 7))
    dones = rng.random((4, 7)) < 0.2
    got = discounted_returns(r, 0.9, dones)
    for i in range(4):
        for t in range(7):
            g, k = 0.0, t
            while k < 7:  # sum up to and including the step that ends the episode
                g += 0.9 ** (k - t) * r[i, k]
                if dones[i, k]:
                    break
                k += 1
            assert got[i, t] == pytest.approx(g)
    assert discounted_return([1.0, 2.0, 3.0], 0.5) == pytest.approx(1 + 1 + 0.75)


def expectimax(p: POMDP, b, h) -> float:
    """Optimal h-step value by enumerating the whole (action, observation) tree."""
    if h == 0:
        return 0.0
    best = -np.inf
    for a in range(p.n_actions):
        v = p.expected_reward(b, a)
        probs = p.observation_probs(b, a)
        for o in range(p.n_observations):
            if probs[o] > 1e-15:
                v += p.gamma * probs[o] * expectimax(p, p.belief_update(b, a, o), h - 1)
        best = max(best, v)
    return best


@pytest.mark.parametrize("make", [tiger, crying_baby, lambda: random_pomdp(np.random.default_rng(3))])
def test_exact_value_iteration_equals_brute_force_expectimax(make):
    p = make()
    beliefs = [
        p.b0,
        np.full(p.n_states, 1 / p.n_states),
        np.eye(p.n_states)[-1],
        np.random.default_rng(4).dirichlet(np.ones(p.n_states)),
    ]
    for h in (1, 2, 4):
        V, info = exact_value_iteration(p, horizon=h)
        assert info["iterations"] == h
        for b in beliefs:
            assert V.value(b) == pytest.approx(expectimax(p, b, h), rel=1e-9, abs=1e-9)


def test_point_based_is_exact_on_a_reachability_closed_belief_set():
    p = tiger()
    h = 6
    V_exact, _ = exact_value_iteration(p, horizon=h)
    V_pb, _ = point_based_value_iteration(p, reachable_beliefs(p, h, max_points=10**5), horizon=h)
    assert V_pb.value(p.b0) == pytest.approx(V_exact.value(p.b0), rel=1e-10)
    grid = simplex_grid(2, 50)
    assert np.all(V_pb.values(grid) <= V_exact.values(grid) + 1e-9)  # PBVI is a lower bound


def listen_twice_policy_value(p: POMDP) -> float:
    """Value at b0 of 'listen until the hear-left / hear-right counts differ by 2, then open the
    other door', by solving its linear Bellman equations over (count difference, tiger side)."""
    acc, g = 0.85, p.gamma
    idx = {(d, s): i for i, (d, s) in enumerate(itertools.product((-1, 0, 1), (0, 1)))}
    n = len(idx) + 1  # + V0: the value right after a reset
    A, rhs = np.eye(n), np.zeros(n)
    for (d, s), i in idx.items():
        p_left = acc if s == 0 else 1 - acc
        rhs[i] = -1.0
        for step, prob in ((1, p_left), (-1, 1 - p_left)):
            nd = d + step
            if abs(nd) == 2:  # open the door away from the heard side
                rhs[i] += g * prob * (10.0 if (nd > 0) == (s == 0) else -100.0)
                A[i, -1] -= g * prob * g
            else:
                A[i, idx[(nd, s)]] -= g * prob
    A[-1, idx[(0, 0)]] -= 0.5
    A[-1, idx[(0, 1)]] -= 0.5
    return float(np.linalg.solve(A, rhs)[-1])


def test_tiger_optimal_value_and_policy():
    p = tiger()
    beliefs = np.vstack([reachable_beliefs(p, 8), simplex_grid(2, 50)])
    V, info = point_based_value_iteration(p, beliefs, tol=1e-9)
    reference = listen_twice_policy_value(p)
    assert reference == pytest.approx(19.37, abs=0.01)  # the published value at b0
    assert V.value(p.b0) == pytest.approx(reference, abs=1e-4)
    listen, open_left, open_right = 0, 1, 2
    b1 = p.belief_update(p.b0, listen, 0)
    b2 = p.belief_update(b1, listen, 0)
    assert V.action(p.b0) == listen and V.action(b1) == listen
    assert V.action(b2) == open_right and V.action(b2[::-1]) == open_left
    V12, _ = exact_value_iteration(p, horizon=12)
    assert V12.value(p.b0) < V.value(p.b0)  # finite horizons approach it from below


def test_ppo_on_tiger_improves_and_approaches_the_solver():
    """PPO on belief features (same ppo_math as RLHF) vs the point-based optimum for the same
    30-step horizon (a lower bound of the exact optimum, exact at the reachable beliefs)."""
    import torch

    from aion_train.rl.env_rollout import EnvPPOSettings, train_ppo_on_pomdp

    torch.set_num_threads(1)
    p = tiger()
    settings = EnvPPOSettings(iterations=40, n_envs=128, horizon=30, eval_every=20, eval_episodes=1000, seed=0)
    beliefs = np.vstack([reachable_beliefs(p, 8), simplex_grid(2, 50)])
    V, _ = point_based_value_iteration(p, beliefs, horizon=settings.horizon)
    optimum = V.value(p.b0)
    assert exact_value_iteration(p, horizon=12)[0].value(p.b0) < optimum < listen_twice_policy_value(p)
    result = train_ppo_on_pomdp(p, settings)
    first, last = result["eval_returns"][0], result["eval_returns"][-1]
    assert first < -100.0 < 0.0 < optimum  # a random policy opens doors blindly
    assert last > 0.85 * optimum  # within 15% of the optimum
    assert last < optimum + 3 * 30.0 / np.sqrt(settings.eval_episodes)  # and not above it beyond noise


def test_ppo_command_trains_on_a_pomdp_and_prints_one_json_line(capfd):
    import json

    from aion_train.cli import main

    rc = main(
        [
            "ppo",
            "--config",
            "configs/rlhf_tiny.yaml",
            "ppo.env=crying_baby",
            "ppo.env_iterations=3",
            "ppo.env_batch=32",
            "ppo.env_horizon=10",
            "--json",
        ]
    )
    out = capfd.readouterr().out.strip().splitlines()
    assert rc == 0 and len(out) == 1
    result = json.loads(out[0])
    assert result["env"] == "crying_baby" and result["iterations"] == 3
    V, _ = exact_value_iteration(crying_baby(), horizon=10)
    assert result["solver_value"] == pytest.approx(V.value(crying_baby().b0), abs=1e-6)  # PBVI exact here
    assert np.isfinite(result["env_return"]) and result["env_return"] <= result["solver_value"] + 5.0


def test_config_names_exactly_the_environments_of_the_table():
    from aion_train.config import ConfigError, load_config
    from aion_train.config.ppo_schema import POMDP_ENVS
    from aion_train.rl.envs import ENVS

    assert sorted(ENVS) == list(POMDP_ENVS)
    with pytest.raises(ConfigError, match="ppo.env='tigre'"):
        load_config(overrides=["ppo.env=tigre"])
