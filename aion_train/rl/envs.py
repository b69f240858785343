"""Two classic tiny POMDPs.

Tiger (Kaelbling, Littman & Cassandra 1998): a tiger is behind the left or the right door.
Listening costs 1 and reports the tiger's side correctly with probability 0.85; opening the
tiger's door costs 100, the other door pays 10, and either opening resets the problem (tiger
placed uniformly again, uninformative observation). The optimal policy listens until it is
confident and then opens the other door.

Crying baby (Kochenderfer, Wheeler & Wray, "Algorithms for Decision Making", 2022): a baby is
sated or hungry; feeding (cost 5) sates it, otherwise a sated baby gets hungry with probability
0.1 and a hungry one stays hungry; hunger costs 10 a step, singing 0.5. A hungry baby cries with
probability 0.8 (0.9 while sung to), a sated one 0.1 (0 while sung to).
"""

from __future__ import annotations

import numpy as np

from .pomdp import POMDP


def tiger(
    listen_accuracy: float = 0.85,
    gamma: float = 0.95,
    listen_cost: float = 1.0,
    tiger_penalty: float = 100.0,
    treasure: float = 10.0,
) -> POMDP:
    """States (tiger-left, tiger-right); actions (listen, open-left, open-right);
    observations (hear-left, hear-right)."""
    if not 0.5 <= listen_accuracy <= 1.0:
        raise ValueError(f"tiger: listen_accuracy={listen_accuracy} must be in [0.5, 1]")
    S, A = 2, 3
    T = np.zeros((A, S, S))
    T[0] = np.eye(S)  # listening leaves the tiger where it is
    T[1] = T[2] = 0.5  # opening a door resets the problem
    O = np.zeros((A, S, 2))
    p = listen_accuracy
    O[0] = [[p, 1 - p], [1 - p, p]]
    O[1] = O[2] = 0.5
    R = np.array([[-listen_cost, -tiger_penalty, treasure], [-listen_cost, treasure, -tiger_penalty]])
    return POMDP(
        ("tiger-left", "tiger-right"),
        ("listen", "open-left", "open-right"),
        ("hear-left", "hear-right"),
        T,
        R,
        O,
        gamma,
        np.array([0.5, 0.5]),
        name="tiger",
    )


def crying_baby(gamma: float = 0.9) -> POMDP:
    """States (sated, hungry); actions (feed, sing, ignore); observations (crying, quiet)."""
    S, A = 2, 3
    T = np.zeros((A, S, S))
    T[0] = [[1.0, 0.0], [1.0, 0.0]]  # feeding sates
    T[1] = T[2] = [[0.9, 0.1], [0.0, 1.0]]
    O = np.zeros((A, S, 2))
    O[0] = O[2] = [[0.1, 0.9], [0.8, 0.2]]
    O[1] = [[0.0, 1.0], [0.9, 0.1]]
    hunger = np.array([0.0, -10.0])
    R = np.stack([hunger - 5.0, hunger - 0.5, hunger], axis=1)
    return POMDP(
        ("sated", "hungry"),
        ("feed", "sing", "ignore"),
        ("crying", "quiet"),
        T,
        R,
        O,
        gamma,
        np.array([1.0, 0.0]),
        name="crying_baby",
    )


ENVS = {"tiger": tiger, "crying_baby": crying_baby}


def make_env(name: str, **kwargs) -> POMDP:
    if name not in ENVS:
        raise ValueError(f"unknown POMDP environment {name!r}; choose one of {', '.join(sorted(ENVS))}")
    return ENVS[name](**kwargs)
