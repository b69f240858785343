"""Side-by-side timing: candidates run interleaved (A B C A B C ...) in one process, so a
busy machine slows them alike, and the median of the rounds is reported. For a ratio of two
candidates, `paired_ratio` takes the median of the per-round ratios: A and B of one round ran
back to back, so a slow stretch of a shared machine (which moves single timings by 10-30% here)
scales both terms of a round's ratio and largely cancels."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def interleaved_samples(
    fns: dict[str, Callable[[], None]], rounds: int = 7, warmup: int = 2, sync: Callable[[], None] = lambda: None
) -> dict[str, list[float]]:
    """Milliseconds of every call, per round, for each named function."""
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
    return samples


def time_interleaved(
    fns: dict[str, Callable[[], None]], rounds: int = 7, warmup: int = 2, sync: Callable[[], None] = lambda: None
) -> dict[str, float]:
    """Median milliseconds per call for each named function."""
    samples = interleaved_samples(fns, rounds, warmup, sync)
    return {k: statistics.median(v) for k, v in samples.items()}


def paired_ratio(numerator: list[float], denominator: list[float]) -> float:
    """Median over rounds of numerator[i] / denominator[i]."""
    return statistics.median(a / b for a, b in zip(numerator, denominator))
