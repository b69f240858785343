"""Running the pipeline's phases: a phase's `done.json`, and its function resolved by name.

The phases themselves (what runs, in which order, with which resource request) are config:
`aion_train.config.pipeline_schema` (`Phase`, `BUILTIN`, `pipeline_phases`). A phase function
writes its `done.json` atomically as its very last act, so an interrupted phase has none and is
rerun, a finished one is skipped.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

from aion_train.config.pipeline_schema import Phase


def read_done(phase: Phase, run_dir: str | Path) -> dict | None:
    """The phase's metrics if it finished, else None. A done.json that is not a JSON object
    is an error (it is written atomically, so it is never torn)."""
    p = phase.done_path(run_dir)
    if not p.is_file():
        return None
    data = json.loads(p.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{p}: expected a JSON object, got {type(data).__name__}")
    return data


def resolve_callable(path: str):
    """'package.module:function' -> the function (imported now)."""
    if ":" not in path:
        raise ValueError(f"phase function {path!r}: expected 'package.module:function'")
    module, attr = path.split(":", 1)
    obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"phase function {path!r} is not callable")
    return obj
