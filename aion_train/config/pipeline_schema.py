"""Config of the Ray job pipeline (SFT -> RM -> PPO -> artifacts), `cfg.pipeline`.

The phase list, each phase's resource request (CPUs per rank, number of ranks), the private
cluster's size, and the inputs of the two artifact phases. See aion_train/pipeline/ and
docs/pipeline.md."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

RESOURCE_KEYS = ("num_cpus", "world_size")
EXTRA_KEYS = ("fn", "num_cpus", "world_size", "out")


@dataclass(frozen=True)
class Phase:
    name: str
    fn: str  # "package.module:function"
    num_cpus: float = 1.0  # per rank
    world_size: int = 1  # ranks; > 1 = actor group running torch.distributed
    out: str = ""  # folder under run_dir holding done.json ("" = the phase's name)

    def out_dir(self, run_dir: str | Path) -> Path:
        return Path(run_dir) / (self.out or self.name)

    def done_path(self, run_dir: str | Path) -> Path:
        return self.out_dir(run_dir) / "done.json"

    @property
    def total_cpus(self) -> float:
        return self.num_cpus * self.world_size

    def to_dict(self) -> dict:
        return asdict(self)


# The built-in phases. SFT, RM and PPO are the post-training SPMD entry points; the artifact
# phases wrap the libraries behind `aion-train build-index` / `build-policy`.
BUILTIN = {
    # the base model (aion_train/pipeline/pretrain_phase.py): sft starts from it when sft.init_from is ""
    "pretrain": Phase("pretrain", "aion_train.pipeline.pretrain_phase:run_pretrain", num_cpus=2, world_size=1),
    "sft": Phase("sft", "aion_train.posttrain.phases:run_sft", num_cpus=1, world_size=2, out="sft"),
    "rm": Phase("rm", "aion_train.posttrain.phases:run_rm", num_cpus=1, world_size=2, out="rm"),
    "ppo": Phase("ppo", "aion_train.posttrain.phases:run_ppo", num_cpus=1, world_size=2, out="ppo"),
    "build-index": Phase(
        "build-index",
        "aion_train.pipeline.artifacts:run_build_index",
        num_cpus=1,
        world_size=1,
        out="artifacts/build-index",
    ),
    "build-policy": Phase(
        "build-policy",
        "aion_train.pipeline.artifacts:run_build_policy",
        num_cpus=1,
        world_size=1,
        out="artifacts/build-policy",
    ),
    # the open-book task (configs/pipeline_rag_tiny.yaml): its training files from the index the
    # build-index phase wrote, and the held-out evaluation of the post-trained models
    "open-book-data": Phase(
        "open-book-data", "aion_train.pipeline.open_book:run_open_book_data", num_cpus=1, world_size=1
    ),
    "eval-open-book": Phase(
        "eval-open-book", "aion_train.pipeline.open_book:run_eval_open_book", num_cpus=1, world_size=1
    ),
}


def pipeline_phases(cfg) -> list[Phase]:
    """The phases of `cfg.pipeline.phases`, in order, with `pipeline.resources` applied."""
    p = cfg.pipeline
    known = dict(BUILTIN)
    for name, spec in (p.extra or {}).items():
        known[name] = Phase(
            name,
            spec["fn"],
            float(spec.get("num_cpus", 1)),
            int(spec.get("world_size", 1)),
            str(spec.get("out", "") or name),
        )
    out = []
    for name in p.phases:
        if name not in known:
            raise ValueError(f"pipeline.phases: unknown phase {name!r} (known: {', '.join(sorted(known))})")
        phase = known[name]
        req = (p.resources or {}).get(name) or {}
        if req:
            phase = replace(
                phase,
                num_cpus=float(req.get("num_cpus", phase.num_cpus)),
                world_size=int(req.get("world_size", phase.world_size)),
            )
        out.append(phase)
    return out


DEFAULT_PHASES = ["sft", "rm", "ppo", "build-index", "build-policy"]


@dataclass
class PipelineConfig:
    phases: list = field(default_factory=lambda: list(DEFAULT_PHASES))  # run in this order
    # per-phase overrides of the built-in requests: {phase: {num_cpus: C, world_size: N}};
    # a phase with world_size N > 1 runs as N Ray actors (C CPUs each) forming one gloo group
    resources: dict = field(default_factory=dict)
    # phases of your own: {name: {fn: "pkg.module:function", num_cpus, world_size, out}};
    # fn(cfg) -> dict is SPMD like the built-in run_* functions and writes {run_dir}/{out}/done.json
    extra: dict = field(default_factory=dict)
    num_cpus: int = 0  # CPUs of the private local cluster (0 = all of this machine)
    object_store_mb: int = 256  # its object store (Ray's default takes ~30% of RAM in /dev/shm)
    startup_timeout_s: float = 180.0  # for the private head node to come up
    phase_timeout_s: float = 3600.0  # a phase running longer is stopped and reported as failed
    log_tail_lines: int = 40  # lines of a failed phase's log shown in the report
    # build-index phase (the library behind `aion-train build-index`)
    index_corpus: list = field(default_factory=lambda: ["pydoc"])
    index_embedder: str = "minilm"  # minilm | hash-DIM | model:...
    index_factory: str = "HNSW32"
    index_max_chunks_per_doc: int = 0  # 0 = no limit
    index_chunk_chars: int = 400  # characters per chunk (the cut falls on a boundary)
    index_chunk_overlap: int = 50
    index_cache_dir: str = ""  # the embedding cache; "" = ~/.cache/aion-train/retrieval
    # the open-book phases: distractor chunks per SFT/PPO prompt, chunks retrieved per held-out
    # question, held-out questions evaluated (0 = all), the split, and the phases evaluated
    open_book_noise: int = 1
    open_book_k: int = 2
    open_book_eval_limit: int = 0
    open_book_held_out_fraction: float = 0.2
    open_book_split_seed: int = 0
    open_book_ppo_fraction: float = 0.0  # training pages kept out of SFT, the PPO prompts' (0: PPO = SFT prompts)
    open_book_synthetic_pages: int = 0  # made-up pages SFT learns besides the real ones (open_book.synthetic_pages)
    open_book_models: list = field(default_factory=lambda: ["sft", "ppo"])
    # build-policy phase (the library behind `aion-train build-policy`)
    policy_files: list = field(default_factory=lambda: ["configs/policies"])


def _positive_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def _check_request(key: str, spec, errors: list[str], allowed: tuple) -> None:
    if not isinstance(spec, dict):
        errors.append(f"{key}: expected a mapping with {', '.join(allowed)}, got {spec!r}")
        return
    for k in spec:
        if k not in allowed:
            errors.append(f"{key}.{k}: unknown key (allowed: {', '.join(allowed)})")
    if "num_cpus" in spec and not _positive_number(spec["num_cpus"]):
        errors.append(f"{key}.num_cpus={spec['num_cpus']!r}: must be a number > 0")
    ws = spec.get("world_size", 1)
    if not isinstance(ws, int) or isinstance(ws, bool) or ws < 1:
        errors.append(f"{key}.world_size={ws!r}: must be an integer >= 1")


def check(cfg, errors: list[str]) -> None:
    """Cross-field rules of this section; append one message per problem, naming its key."""
    before = len(errors)
    _check_fields(cfg, errors)
    p = cfg.pipeline
    if len(errors) == before and p.num_cpus > 0:
        for ph in pipeline_phases(cfg):
            if ph.total_cpus > p.num_cpus:
                errors.append(
                    f"pipeline.resources.{ph.name}: {ph.world_size} rank(s) x {ph.num_cpus:g} CPUs "
                    f"exceed the cluster's pipeline.num_cpus={p.num_cpus}"
                )


def _check_fields(cfg, errors: list[str]) -> None:
    p = cfg.pipeline
    extra = p.extra if isinstance(p.extra, dict) else {}
    if not isinstance(p.extra, dict):
        errors.append(f"pipeline.extra={p.extra!r}: must be a mapping name -> {{fn, num_cpus, world_size, out}}")
    known = set(BUILTIN) | set(extra)
    if not isinstance(p.phases, list) or not p.phases or not all(isinstance(x, str) for x in p.phases):
        errors.append(f"pipeline.phases={p.phases!r}: must be a non-empty list of phase names")
    else:
        for name in p.phases:
            if name not in known:
                errors.append(
                    f"pipeline.phases: unknown phase {name!r} (known: {', '.join(sorted(known))}; "
                    "add your own under pipeline.extra)"
                )
        dup = sorted({x for x in p.phases if p.phases.count(x) > 1})
        if dup:
            errors.append(f"pipeline.phases: {', '.join(dup)} listed more than once")
    if not isinstance(p.resources, dict):
        errors.append(f"pipeline.resources={p.resources!r}: must be a mapping phase -> {{num_cpus, world_size}}")
    else:
        for name, spec in p.resources.items():
            if name not in known:
                errors.append(f"pipeline.resources.{name}: unknown phase (known: {', '.join(sorted(known))})")
            _check_request(f"pipeline.resources.{name}", spec, errors, RESOURCE_KEYS)
    for name, spec in extra.items():
        key = f"pipeline.extra.{name}"
        if name in BUILTIN:
            errors.append(f"{key}: {name!r} is a built-in phase; override its resources in pipeline.resources")
        _check_request(key, spec, errors, EXTRA_KEYS)
        fn = spec.get("fn") if isinstance(spec, dict) else None
        if not isinstance(fn, str) or ":" not in fn or not all(fn.split(":", 1)):
            errors.append(f"{key}.fn={fn!r}: must be 'package.module:function'")
    if p.num_cpus < 0:
        errors.append(f"pipeline.num_cpus={p.num_cpus}: must be >= 0 (0 = all CPUs)")
    if p.object_store_mb < 80:
        errors.append(f"pipeline.object_store_mb={p.object_store_mb}: must be >= 80 (Ray needs at least 75 MiB)")
    for key in ("startup_timeout_s", "phase_timeout_s"):
        if getattr(p, key) <= 0:
            errors.append(f"pipeline.{key}={getattr(p, key)}: must be > 0")
    if p.log_tail_lines < 1:
        errors.append(f"pipeline.log_tail_lines={p.log_tail_lines}: must be >= 1")
    for key in ("index_corpus", "policy_files"):
        val = getattr(p, key)
        if not isinstance(val, list) or not val or not all(isinstance(x, str) and x for x in val):
            errors.append(f"pipeline.{key}={val!r}: must be a non-empty list of paths/globs")
    if not 0 < p.index_chunk_chars or not 0 <= p.index_chunk_overlap < p.index_chunk_chars:
        errors.append(
            f"pipeline.index_chunk_chars={p.index_chunk_chars}, index_chunk_overlap={p.index_chunk_overlap}: "
            "need chunk_chars > 0 and 0 <= overlap < chunk_chars"
        )
    if p.open_book_noise < 0 or p.open_book_k < 1 or p.open_book_eval_limit < 0:
        errors.append(
            f"pipeline.open_book_noise={p.open_book_noise} (>= 0), open_book_k={p.open_book_k} (>= 1), "
            f"open_book_eval_limit={p.open_book_eval_limit} (>= 0): out of range"
        )
    if not 0 < p.open_book_held_out_fraction < 1:
        errors.append(f"pipeline.open_book_held_out_fraction={p.open_book_held_out_fraction}: must be in (0, 1)")
    if not isinstance(p.open_book_synthetic_pages, int) or p.open_book_synthetic_pages < 0:
        errors.append(f"pipeline.open_book_synthetic_pages={p.open_book_synthetic_pages!r}: an integer >= 0")
    if not 0 <= p.open_book_ppo_fraction < 1:
        errors.append(f"pipeline.open_book_ppo_fraction={p.open_book_ppo_fraction}: must be in [0, 1)")
    if (
        not isinstance(p.open_book_models, list)
        or not set(p.open_book_models) <= {"sft", "ppo"}
        or not p.open_book_models
    ):
        errors.append(f"pipeline.open_book_models={p.open_book_models!r}: a non-empty list of sft / ppo")
    if p.index_max_chunks_per_doc < 0:
        errors.append(f"pipeline.index_max_chunks_per_doc={p.index_max_chunks_per_doc}: must be >= 0")
