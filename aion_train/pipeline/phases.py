"""The pipeline's phases: what runs, in which order, with which resource request.

A phase is a dotted path to an SPMD function `fn(cfg) -> dict` (imported lazily inside the Ray
worker, so the driver never imports torch models or DeepSpeed), the CPUs each rank asks for,
the number of ranks (world size; > 1 means an actor group forming one torch.distributed gloo
group), and the folder under `cfg.run_dir` whose `done.json` marks it finished. The phase
function writes that `done.json` atomically as its very last act, so an interrupted phase has
none and is rerun, a finished one is skipped.
"""
from __future__ import annotations

import importlib
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path


@dataclass(frozen=True)
class Phase:
    name: str
    fn: str                 # "package.module:function"
    num_cpus: float = 1.0   # per rank
    world_size: int = 1     # ranks; > 1 = actor group running torch.distributed
    out: str = ""           # folder under run_dir holding done.json ("" = the phase's name)

    def out_dir(self, run_dir: str | Path) -> Path:
        return Path(run_dir) / (self.out or self.name)

    def done_path(self, run_dir: str | Path) -> Path:
        return self.out_dir(run_dir) / "done.json"

    def read_done(self, run_dir: str | Path) -> dict | None:
        """The phase's metrics if it finished, else None. A done.json that is not a JSON object
        is an error (it is written atomically, so it is never torn)."""
        p = self.done_path(run_dir)
        if not p.is_file():
            return None
        data = json.loads(p.read_text())
        if not isinstance(data, dict):
            raise ValueError(f"{p}: expected a JSON object, got {type(data).__name__}")
        return data

    @property
    def total_cpus(self) -> float:
        return self.num_cpus * self.world_size

    def to_dict(self) -> dict:
        return asdict(self)


# The built-in phases. SFT, RM and PPO are the post-training SPMD entry points; the artifact
# phases wrap the libraries behind `aion-train build-index` / `build-policy`.
BUILTIN = {
    "sft": Phase("sft", "aion_train.posttrain.sft:run_sft", num_cpus=1, world_size=2, out="sft"),
    "rm": Phase("rm", "aion_train.posttrain.reward:run_rm", num_cpus=1, world_size=2, out="rm"),
    "ppo": Phase("ppo", "aion_train.posttrain.ppo:run_ppo", num_cpus=1, world_size=2, out="ppo"),
    "build-index": Phase("build-index", "aion_train.pipeline.artifacts:run_build_index",
                         num_cpus=1, world_size=1, out="artifacts/build-index"),
    "build-policy": Phase("build-policy", "aion_train.pipeline.artifacts:run_build_policy",
                          num_cpus=1, world_size=1, out="artifacts/build-policy"),
}


def pipeline_phases(cfg) -> list[Phase]:
    """The phases of `cfg.pipeline.phases`, in order, with `pipeline.resources` applied."""
    p = cfg.pipeline
    known = dict(BUILTIN)
    for name, spec in (p.extra or {}).items():
        known[name] = Phase(name, spec["fn"], float(spec.get("num_cpus", 1)),
                            int(spec.get("world_size", 1)), str(spec.get("out", "") or name))
    out = []
    for name in p.phases:
        if name not in known:
            raise ValueError(f"pipeline.phases: unknown phase {name!r} (known: {', '.join(sorted(known))})")
        phase = known[name]
        req = (p.resources or {}).get(name) or {}
        if req:
            phase = replace(phase, num_cpus=float(req.get("num_cpus", phase.num_cpus)),
                            world_size=int(req.get("world_size", phase.world_size)))
        out.append(phase)
    return out


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
