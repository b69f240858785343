"""An engine's optimizer state <-> pickle-free trees.

DeepSpeed optimizer state dicts hold a few Python objects (a loss scaler, namedtuples that
map parameter fragments). We store their plain fields only, and on load put them back into
the live optimizer's own objects (its current state dict is the template), so loading never
constructs an object from the file."""

from __future__ import annotations

import enum

import torch

from aion_train.parallel.deepspeed_adapter import load_optimizer_state as load_into_optimizer

_PRIMITIVE = (int, float, bool, str, type(None), torch.Tensor)


def to_tree(obj):
    if isinstance(obj, enum.Enum):
        return {"__enum__": type(obj).__name__, "value": to_tree(obj.value)}
    if isinstance(obj, _PRIMITIVE):
        return obj
    if isinstance(obj, dict):
        return {k: to_tree(v) for k, v in obj.items()}
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return {"__namedtuple__": type(obj).__name__, "fields": {f: to_tree(getattr(obj, f)) for f in obj._fields}}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_tree(v) for v in obj)
    fields = {k: v for k, v in vars(obj).items() if isinstance(v, (int, float, bool, str, type(None)))}
    return {"__object__": type(obj).__name__, "fields": fields}


def from_tree(saved, template):
    """Rebuild `saved` using `template` (the live state dict) for every object."""
    if isinstance(saved, dict) and "__object__" in saved:
        if template is None or type(template).__name__ != saved["__object__"]:
            raise ValueError(
                f"checkpoint holds a {saved['__object__']} where the optimizer has {type(template).__name__}"
            )
        for k, v in saved["fields"].items():
            setattr(template, k, v)
        return template
    if isinstance(saved, dict) and "__enum__" in saved:
        if not isinstance(template, enum.Enum) or type(template).__name__ != saved["__enum__"]:
            raise ValueError(f"checkpoint holds a {saved['__enum__']} where the optimizer has {template!r}")
        return type(template)(saved["value"])
    if isinstance(saved, dict) and "__namedtuple__" in saved:
        if template is not None and hasattr(template, "_fields"):
            return type(template)(**{f: from_tree(v, getattr(template, f, None)) for f, v in saved["fields"].items()})
        return saved
    if isinstance(saved, dict):
        tmpl = template if isinstance(template, dict) else {}
        return {k: from_tree(v, tmpl.get(k)) for k, v in saved.items()}
    if isinstance(saved, (list, tuple)):
        tmpl = template if isinstance(template, (list, tuple)) and len(template) == len(saved) else [None] * len(saved)
        return type(saved)(from_tree(v, t) for v, t in zip(saved, tmpl))
    return saved


def optimizer_state(engine):
    """The optimizer state of a DeepSpeed engine as a tree `save_tree` accepts."""
    return to_tree(engine.optimizer.state_dict())


def load_optimizer_state(engine, saved, dp_rank: int, dp_size: int):
    """Put `saved` (from :func:`optimizer_state`) back into the engine's live optimizer."""
    opt = engine.optimizer
    restored = from_tree(saved, opt.state_dict())
    load_into_optimizer(opt, restored, dp_rank, dp_size)  # ZeRO-1/2: per DP rank (DeepSpeed internals)
