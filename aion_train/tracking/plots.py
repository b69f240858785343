"""Loss-curve PNGs with matplotlib's Agg canvas (no pyplot global state, no display)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path


def _finite_points(points: Iterable[Sequence[float]]) -> tuple[list[float], list[float]]:
    xs: list[float] = []
    ys: list[float] = []
    for point in points:
        step, value = point[0], point[1]
        try:
            step_f, value_f = float(step), float(value)
        except (TypeError, ValueError):
            continue
        if math.isfinite(step_f) and math.isfinite(value_f):
            xs.append(step_f)
            ys.append(value_f)
    return xs, ys


def plot_curves(
    history: Mapping[str, Iterable[Sequence[float]]],
    path: str | Path,
    title: str | None = None,
    logy: bool | str = "auto",
    dpi: int = 100,
) -> Path:
    """Write a PNG with one panel per series (value vs step) and return its path.

    `history` maps a series name to (step, value) pairs. Non-finite points are dropped.
    `logy="auto"` uses a log y-axis for a panel whose values are all positive and span
    more than two decades (typical of a loss that falls from ~10 to ~0.01).
    """
    # Imported here so that importing aion_train.tracking stays cheap.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = list(history)
    n = max(1, len(names))
    fig = Figure(figsize=(8, 2.6 * n + 0.6), dpi=dpi)
    FigureCanvasAgg(fig)
    axes = fig.subplots(n, 1, sharex=True, squeeze=False)[:, 0]
    for ax, name in zip(axes, names):
        xs, ys = _finite_points(history[name])
        if xs:
            ax.plot(xs, ys, marker="." if len(xs) <= 50 else None, linewidth=1.2, label=name)
            use_log = logy is True or (logy == "auto" and min(ys) > 0 and max(ys) / min(ys) > 100.0)
            if use_log:
                ax.set_yscale("log")
        else:
            ax.text(0.5, 0.5, "no finite values", ha="center", va="center", transform=ax.transAxes)
        ax.set_ylabel(name)
        ax.grid(True, alpha=0.3)
    if not names:
        axes[0].text(0.5, 0.5, "no series", ha="center", va="center", transform=axes[0].transAxes)
    axes[-1].set_xlabel("step")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
