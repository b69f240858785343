"""Whether a checkpoint fits the current run: the saved and current configs compared key by
key, every difference named."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from aion_train.config.load import flatten

from .errors import CheckpointError


def flatten_config(cfg: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested mappings into ``{"a.b.c": value}`` (tuples become lists)."""
    return {k: _normalise(v) for k, v in flatten(cfg, prefix).items()}


def _normalise(v: Any) -> Any:
    if isinstance(v, (list, tuple)):
        return [_normalise(x) for x in v]
    if isinstance(v, Mapping):
        return {str(k): _normalise(x) for k, x in v.items()}
    return v


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    try:
        return bool(a == b)
    except Exception:  # pragma: no cover - exotic values
        return False


_MISSING = object()


def check_compatible(
    saved: Mapping[str, Any], current: Mapping[str, Any], what: str = "model config", *, ignore: Iterable[str] = ()
) -> None:
    """Raise ``CheckpointError`` listing every key whose value differs.

    Both configs may be nested or already flattened (dotted keys).  Keys equal
    to an entry of ``ignore`` or below it (``ignore=["train"]`` skips
    ``train.lr``) are not compared.  Message lines look like
    ``model.d_model: checkpoint 128 != config 256``.
    """
    a, b = flatten_config(saved), flatten_config(current)
    ignore = tuple(ignore)

    def ignored(key: str) -> bool:
        return any(key == i or key.startswith(i + ".") for i in ignore)

    lines = []
    for key in sorted(set(a) | set(b)):
        if ignored(key):
            continue
        va, vb = a.get(key, _MISSING), b.get(key, _MISSING)
        if va is not _MISSING and vb is not _MISSING and _same(va, vb):
            continue
        sa = "<missing>" if va is _MISSING else repr(va)
        sb = "<missing>" if vb is _MISSING else repr(vb)
        lines.append(f"  {key}: checkpoint {sa} != config {sb}")
    if lines:
        raise CheckpointError(
            f"{what} of the checkpoint is incompatible with the current run "
            f"({len(lines)} {'key differs' if len(lines) == 1 else 'keys differ'}):\n" + "\n".join(lines)
        )


def latest_compatible(mgr, model_config: Mapping[str, Any], layout: Mapping[str, Any], what: str):
    """The latest checkpoint of `mgr` as (path, manifest) after checking that its model config
    and its layout are this run's (`what` names the layout in the error); None when there is
    no checkpoint."""
    path = mgr.latest()
    if path is None:
        return None
    manifest = mgr.read_manifest(path)
    check_compatible({"model": manifest["model_config"]}, {"model": model_config})
    check_compatible({"layout": manifest["layout"]}, {"layout": layout}, what=what)
    return path, manifest
