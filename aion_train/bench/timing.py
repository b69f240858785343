"""Side-by-side timing: candidates run interleaved (A B C A B C ...) in one process, so a
busy machine slows them alike, and the median of the rounds is reported."""
from __future__ import annotations

import statistics
import time
from typing import Callable


def time_interleaved(fns: dict[str, Callable[[], None]], rounds: int = 7, warmup: int = 2,
                     sync: Callable[[], None] = lambda: None) -> dict[str, float]:
    """Median milliseconds per call for each named function."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            sync()
            samples[name].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in samples.items()}
