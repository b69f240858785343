"""The RNG state of a process (python, numpy, torch CPU, the current CUDA device) as a
tree that :func:`~.tree_save.save_tree` accepts, and back."""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from .errors import CheckpointError


def capture_rng_state() -> dict[str, Any]:
    """RNG state of python ``random``, numpy's global RNG, torch CPU and (if
    available) the current CUDA device, as a structure ``save_tree`` accepts."""
    version, internal, gauss_next = random.getstate()
    np_state = np.random.get_state(legacy=False)
    if np_state.get("bit_generator") != "MT19937":  # pragma: no cover - numpy's legacy global RNG
        raise CheckpointError(f"unsupported numpy bit generator {np_state.get('bit_generator')!r}")
    state: dict[str, Any] = {
        "python": {"version": int(version), "internal": [int(x) for x in internal], "gauss_next": gauss_next},
        "numpy": {
            "bit_generator": "MT19937",
            "key": np.asarray(np_state["state"]["key"], dtype=np.uint32).copy(),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        dev = torch.cuda.current_device()
        state["cuda"] = {"device": int(dev), "state": torch.cuda.get_rng_state(dev)}
    return state


def restore_rng_state(state: Mapping[str, Any], *, strict_cuda: bool = False) -> list[str]:
    """Restore what :func:`capture_rng_state` captured; returns the parts restored.

    The CUDA state is applied to the *current* device (ranks may map to other
    device indices after a restart).  If the checkpoint has a CUDA state but
    CUDA is unavailable it is skipped, or ``CheckpointError`` is raised with
    ``strict_cuda=True``.
    """
    done: list[str] = []
    if "python" in state:
        p = state["python"]
        random.setstate((int(p["version"]), tuple(int(x) for x in p["internal"]), p["gauss_next"]))
        done.append("python")
    if "numpy" in state:
        n = state["numpy"]
        np.random.set_state(
            {
                "bit_generator": n["bit_generator"],
                "state": {"key": np.asarray(n["key"], dtype=np.uint32), "pos": int(n["pos"])},
                "has_gauss": int(n["has_gauss"]),
                "gauss": float(n["gauss"]),
            }
        )
        done.append("numpy")
    if "torch" in state:
        torch.set_rng_state(state["torch"].to("cpu", torch.uint8))
        done.append("torch")
    if "cuda" in state:
        if torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"]["state"].to("cpu", torch.uint8), torch.cuda.current_device())
            done.append("cuda")
        elif strict_cuda:
            raise CheckpointError("checkpoint holds a CUDA RNG state but CUDA is not available")
    return done
