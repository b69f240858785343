"""MLflow tracking for training runs, through an explicit `MlflowClient` (no fluent global state).

Only rank 0 talks to MLflow; every other rank gets a `Tracker` with the same API whose
methods do nothing. The tracking URI is, in order: `tracking.uri` from the config, the
`MLFLOW_TRACKING_URI` environment variable, `sqlite:///<abs run_dir>/mlflow.db`.

Resuming: `start(params, run_id=...)` continues an existing run (status back to RUNNING,
new params added, metrics appended). The run id is also written to
`<run_dir>/mlflow_run.json`, and `load_run_info(run_dir)` reads it back.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import re
import tempfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from aion_train.config.load import flatten
from aion_train.fsutil import atomic_write_text

log = logging.getLogger("aion_train.tracking")

# MLflow server-side limits (mlflow.utils.validation), repeated here so that importing
# this module does not import mlflow.
MAX_PARAM_VAL_LENGTH = 6000
MAX_TAG_VAL_LENGTH = 8000
MAX_ENTITY_KEY_LENGTH = 250
MAX_PARAMS_TAGS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000

RUN_INFO_FILE = "mlflow_run.json"
TERMINAL_STATUSES = ("FINISHED", "FAILED", "KILLED")
_TRUNC_MARK = "...[truncated]"
_BAD_KEY_CHARS = re.compile(r"[^\w\-. /]")


def resolve_tracking_uri(cfg_uri: str | None, run_dir: str | Path) -> str:
    """config uri > $MLFLOW_TRACKING_URI > sqlite:///<abs run_dir>/mlflow.db."""
    if cfg_uri:
        return cfg_uri
    env = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if env:
        return env
    return f"sqlite:///{Path(run_dir).resolve() / 'mlflow.db'}"


def default_artifact_location(tracking_uri: str) -> str | None:
    """Where a new experiment keeps artifacts.

    For a local sqlite store, next to the database file (`<db dir>/mlartifacts`) instead of
    MLflow's default `./mlruns` relative to whatever the working directory is. For a server
    (http/https) or any other store, None = let the store decide (a server proxies uploads).
    """
    if tracking_uri.startswith("sqlite:///") and ":memory:" not in tracking_uri:
        db = Path(tracking_uri[len("sqlite:///") :].split("?", 1)[0])
        return (db.parent / "mlartifacts").resolve().as_uri()
    return None


def sanitize_key(key: Any) -> str:
    """MLflow keys: alphanumerics, `_ - . space /`, at most 250 chars (hash-suffixed when cut)."""
    k = _BAD_KEY_CHARS.sub("_", str(key)) or "_"
    if len(k) > MAX_ENTITY_KEY_LENGTH:
        digest = hashlib.sha1(k.encode()).hexdigest()[:8]
        k = k[: MAX_ENTITY_KEY_LENGTH - 9] + "~" + digest
    return k


def truncate_value(value: str, limit: int) -> str:
    if len(value) <= limit:
        return value
    return value[: limit - len(_TRUNC_MARK)] + _TRUNC_MARK


def param_value(value: Any, limit: int = MAX_PARAM_VAL_LENGTH) -> str:
    """A config value as an MLflow param string: lists/dicts as JSON, cut to `limit` chars."""
    if isinstance(value, (list, tuple, dict)):
        try:
            text = json.dumps(value, sort_keys=True, default=str)
        except (TypeError, ValueError):
            text = str(value)
    else:
        text = str(value)
    return truncate_value(text, limit)


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict -> dotted keys (non-empty dicts are walked, everything else is a leaf)."""
    return flatten(params, prefix)


def _chunks(items: list, size: int) -> Iterable[list]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def load_run_info(run_dir: str | Path) -> dict | None:
    """What the last active Tracker wrote into `<run_dir>/mlflow_run.json` (or None)."""
    path = Path(run_dir) / RUN_INFO_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _guarded(method):
    """Non-strict trackers log (once per method) and count errors instead of raising,
    so that a tracking hiccup never kills a long training job."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        if not self._active:
            return None
        try:
            return method(self, *args, **kwargs)
        except Exception:
            if self.strict:
                raise
            self.errors += 1
            if method.__name__ not in self._warned:
                self._warned.add(method.__name__)
                log.exception(
                    "tracking: %s failed (further failures of it are counted in Tracker.errors, not logged)",
                    method.__name__,
                )
            return None

    return wrapper


class Tracker:
    """Rank-0 MLflow run for one training job; a no-op with the same API elsewhere.

    Args:
        tracking_cfg: `aion_train.config.TrackingConfig` (enabled, uri, experiment, run_name),
            or None for the defaults.
        run_dir: the job's run folder (default store location, `mlflow_run.json`).
        active: True on rank 0 only. A disabled config makes it inactive too.
        strict: raise tracking errors instead of logging them (tests); `start` always raises.
    """

    def __init__(self, tracking_cfg: Any, run_dir: str | Path, active: bool = True, strict: bool = False):
        self.cfg = tracking_cfg
        self.run_dir = Path(run_dir)
        enabled = bool(getattr(tracking_cfg, "enabled", True))
        self._active = bool(active) and enabled
        self.strict = strict
        self._tracking_uri = resolve_tracking_uri(getattr(tracking_cfg, "uri", ""), self.run_dir)
        self._experiment_name = getattr(tracking_cfg, "experiment", "") or "aion-train"
        self._run_name = getattr(tracking_cfg, "run_name", "") or self.run_dir.resolve().name
        self._client = None
        self._run_id: str | None = None
        self._experiment_id: str | None = None
        self._ended = False
        self.resumed = False
        self.errors = 0
        self.skipped_metrics = 0
        self._warned: set[str] = set()
        self._warned_keys: set[str] = set()

    # ---------------------------------------------------------------- properties
    @property
    def active(self) -> bool:
        return self._active

    @property
    def run_id(self) -> str | None:
        return self._run_id

    @property
    def tracking_uri(self) -> str:
        return self._tracking_uri

    @property
    def experiment_id(self) -> str | None:
        return self._experiment_id

    @property
    def client(self):
        """The underlying `mlflow.MlflowClient` (None when inactive)."""
        if self._client is None and self._active:
            from mlflow import MlflowClient

            if self._tracking_uri.startswith("sqlite:///"):
                Path(self._tracking_uri[len("sqlite:///") :].split("?", 1)[0]).parent.mkdir(parents=True, exist_ok=True)
            self._client = MlflowClient(tracking_uri=self._tracking_uri)
        return self._client

    # ---------------------------------------------------------------- lifecycle
    def _get_or_create_experiment(self) -> str:
        from mlflow.entities import LifecycleStage
        from mlflow.exceptions import MlflowException

        client = self.client
        exp = client.get_experiment_by_name(self._experiment_name)
        if exp is None:
            try:
                return client.create_experiment(
                    self._experiment_name, artifact_location=default_artifact_location(self._tracking_uri)
                )
            except MlflowException:
                # Another job created it between our get and create.
                exp = client.get_experiment_by_name(self._experiment_name)
                if exp is None:
                    raise
        if exp.lifecycle_stage == LifecycleStage.DELETED:
            client.restore_experiment(exp.experiment_id)
        return exp.experiment_id

    def start(
        self, params: Mapping[str, Any] | None = None, run_id: str | None = None, tags: Mapping[str, Any] | None = None
    ) -> str | None:
        """Create the run (or continue `run_id`) and log `params`; returns the run id.

        `params` may be nested (e.g. `config_to_dict(cfg)`) or already flat; keys are
        dotted, values stringified (lists/dicts as JSON) and cut to MLflow's 6000-char limit,
        and sent in batches of 100. On resume, params already on the run are kept; a param
        whose value changed is recorded as the tag `aion.param_changed.<key>` instead
        (MLflow params are immutable). An unknown `run_id` starts a new run tagged
        `aion.resumed_from`.
        """
        if not self._active:
            return None
        if self._run_id is not None and not self._ended:
            raise RuntimeError(f"tracker already has an open run {self._run_id}")
        from mlflow.exceptions import MlflowException

        client = self.client
        existing = None
        if run_id:
            try:
                existing = client.get_run(run_id)
            except MlflowException as e:
                log.warning(
                    "tracking: cannot resume run %s at %s (%s); starting a new run", run_id, self._tracking_uri, e
                )
        run_tags = {"aion.run_dir": str(self.run_dir.resolve())}
        run_tags.update({str(k): v for k, v in (tags or {}).items()})
        if existing is not None:
            self._experiment_id = existing.info.experiment_id
            self._run_id = existing.info.run_id
            if existing.info.lifecycle_stage == "deleted":
                client.restore_run(self._run_id)
            client.update_run(self._run_id, status="RUNNING")
            resumes = int(existing.data.tags.get("aion.resume_count", "0") or 0) + 1
            run_tags["aion.resume_count"] = resumes
            self.resumed = True
            old_params = dict(existing.data.params)
        else:
            self._experiment_id = self._get_or_create_experiment()
            if run_id:
                run_tags["aion.resumed_from"] = run_id
            run = client.create_run(self._experiment_id, run_name=self._run_name)
            self._run_id = run.info.run_id
            self.resumed = False
            old_params = {}
        self._ended = False
        self._log_params(params or {}, old_params)
        self._log_tags(run_tags)
        self._write_run_info()
        return self._run_id

    def resume(self, run_id: str, params: Mapping[str, Any] | None = None) -> str | None:
        """Continue an existing run (same as `start(params, run_id=run_id)`)."""
        return self.start(params, run_id=run_id)

    def _write_run_info(self) -> None:
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            info = {
                "run_id": self._run_id,
                "experiment_id": self._experiment_id,
                "tracking_uri": self._tracking_uri,
                "experiment": self._experiment_name,
            }
            atomic_write_text(self.run_dir / RUN_INFO_FILE, json.dumps(info, indent=1) + "\n")
        except OSError as e:
            log.warning("tracking: could not write %s: %s", self.run_dir / RUN_INFO_FILE, e)

    def _log_params(self, params: Mapping[str, Any], old: Mapping[str, str]) -> None:
        from mlflow.entities import Param

        new: list = []
        changed: dict[str, str] = {}
        seen: set[str] = set()
        for key, value in flatten_params(params).items():
            k = sanitize_key(key)
            if k in seen:
                continue
            seen.add(k)
            v = param_value(value)
            if k in old:
                if old[k] != v:
                    changed[f"aion.param_changed.{k}"[:MAX_ENTITY_KEY_LENGTH]] = v
                continue
            new.append(Param(k, v))
        for batch in _chunks(new, MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(self._run_id, params=batch, synchronous=True)
        if changed:
            self._log_tags(changed)

    def _log_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(sanitize_key(k), truncate_value(str(v), MAX_TAG_VAL_LENGTH)) for k, v in tags.items()]
        for batch in _chunks(items, MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(self._run_id, tags=batch, synchronous=True)

    @_guarded
    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if self._run_id is None:
            return
        self._log_tags(tags)

    def end(self, status: str = "FINISHED") -> None:
        """Close the run with FINISHED, FAILED or KILLED. Calling it again does nothing."""
        status = str(status).upper()
        if status not in TERMINAL_STATUSES:
            raise ValueError(f"status must be one of {TERMINAL_STATUSES}, got {status!r}")
        self._end(status)

    @_guarded
    def _end(self, status: str) -> None:
        if self._run_id is None or self._ended:
            return
        self.client.set_terminated(self._run_id, status=status)
        self._ended = True

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.end("FINISHED")
        elif issubclass(exc_type, KeyboardInterrupt):
            self.end("KILLED")
        else:
            self.end("FAILED")

    # ---------------------------------------------------------------- logging
    @_guarded
    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> int:
        """Log a dict of scalars at `step` in one `log_batch` call; returns how many were logged.

        Values may be floats, ints or 0-d tensors. Non-finite (nan/inf) or non-numeric
        values are skipped (counted in `skipped_metrics`, warned once per key).
        """
        if self._run_id is None:
            raise RuntimeError("log_metrics before start()")
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        step = int(step)
        batch = []
        for key, value in metrics.items():
            try:
                v = float(value.item() if hasattr(value, "item") else value)
            except (TypeError, ValueError, RuntimeError):
                v = float("nan")
            if not math.isfinite(v):
                self.skipped_metrics += 1
                if key not in self._warned_keys:
                    self._warned_keys.add(key)
                    log.warning(
                        "tracking: skipping non-finite/non-numeric metric %r=%r at "
                        "step %d (further skips of this key are not logged)",
                        key,
                        value,
                        step,
                    )
                continue
            batch.append(Metric(sanitize_key(key), v, ts, step))
        for chunk in _chunks(batch, MAX_METRICS_PER_BATCH):
            self.client.log_batch(self._run_id, metrics=chunk, synchronous=True)
        return len(batch)

    @_guarded
    def log_artifact(self, path: str | Path, subdir: str | None = None) -> None:
        """Upload a file (or a whole folder) under `subdir` in the run's artifacts."""
        if self._run_id is None:
            raise RuntimeError("log_artifact before start()")
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self._run_id, str(path), artifact_path=subdir)
        else:
            self.client.log_artifact(self._run_id, str(path), artifact_path=subdir)

    @_guarded
    def log_text(self, text: str, name: str) -> None:
        """Store `text` as the artifact file `name` (may contain folders, e.g. 'cfg/config.yaml')."""
        if self._run_id is None:
            raise RuntimeError("log_text before start()")
        self.client.log_text(self._run_id, text, name)

    @_guarded
    def log_loss_curve(
        self, history: Mapping[str, Iterable[tuple[int, float]]], name: str = "loss_curve.png", title: str | None = None
    ) -> str | None:
        """Plot each series of `history` ({name: [(step, value), ...]}) vs step as a PNG
        artifact `name` (may contain a folder). Returns the artifact path."""
        if self._run_id is None:
            raise RuntimeError("log_loss_curve before start()")
        from .plots import plot_curves

        rel = Path(name)
        with tempfile.TemporaryDirectory(prefix="aion-plot-") as tmp:
            png = plot_curves(history, Path(tmp) / rel.name, title=title if title is not None else self._run_name)
            subdir = str(rel.parent) if str(rel.parent) not in ("", ".") else None
            self.client.log_artifact(self._run_id, str(png), artifact_path=subdir)
        return rel.as_posix()

    def __repr__(self) -> str:
        return (
            f"Tracker(active={self._active}, uri={self._tracking_uri!r}, "
            f"experiment={self._experiment_name!r}, run_id={self._run_id!r})"
        )
