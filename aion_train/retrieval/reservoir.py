"""Reservoir sampling (Vitter's algorithm R) for a continual-learning replay buffer.

``k`` slots; the first ``k`` items fill them; the ``n``-th item (n > k) is kept with
probability ``k / n`` and then replaces a uniformly chosen slot. After ``n`` items every
item is in the buffer with probability ``k / n``. The RNG state is JSON-serialisable, so
the buffer is persisted and a replayed log rebuilds it exactly."""

from __future__ import annotations

from typing import Any

import numpy as np


class ReservoirBuffer:
    def __init__(self, k: int, seed: int = 0):
        if k <= 0:
            raise ValueError(f"k must be positive, got {k}")
        self.k = int(k)
        self.n_seen = 0
        self.items: list[Any] = []
        self.rng = np.random.Generator(np.random.PCG64(seed))

    def offer(self, item: Any) -> int | None:
        """Offer the next stream item; returns the slot it took or None if dropped."""
        self.n_seen += 1
        if len(self.items) < self.k:
            self.items.append(item)
            return len(self.items) - 1
        j = int(self.rng.integers(0, self.n_seen))  # uniform in [0, n)
        if j < self.k:  # probability k / n; slot j uniform
            self.items[j] = item
            return j
        return None

    def sample(self, m: int, exclude=None) -> list[Any]:
        """``m`` distinct buffer items drawn uniformly (for a replay batch)."""
        pool = [x for x in self.items if exclude is None or x not in exclude]
        if not pool:
            return []
        idx = self.rng.choice(len(pool), size=min(m, len(pool)), replace=False)
        return [pool[i] for i in idx]

    def __len__(self) -> int:
        return len(self.items)

    def state_dict(self) -> dict:
        return {"k": self.k, "n_seen": self.n_seen, "items": list(self.items), "rng": self.rng.bit_generator.state}

    @classmethod
    def from_state(cls, state: dict) -> ReservoirBuffer:
        r = cls(state["k"])
        r.n_seen = int(state["n_seen"])
        r.items = list(state["items"])
        r.rng.bit_generator.state = state["rng"]
        return r
