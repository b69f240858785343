"""Fast unit tests for aion_train.tracking against a real sqlite MLflow store (no server)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from aion_train.config import Config, TrackingConfig, config_to_dict, flatten
from aion_train.tracking import (
    RUN_INFO_FILE,
    Tracker,
    load_run_info,
    param_value,
    plot_curves,
    resolve_tracking_uri,
    sanitize_key,
)
from aion_train.tracking.mlflow_tracker import MAX_PARAM_VAL_LENGTH

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    # Run from an empty folder so that a stray ./mlruns or ./mlflow.db would be noticed.
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    yield
    assert not (cwd / "mlruns").exists(), "artifacts leaked into ./mlruns"
    assert not (cwd / "mlflow.db").exists(), "store leaked into ./mlflow.db"


def _client(tracker: Tracker):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracker.tracking_uri)


def _history(client, run_id, key):
    return [
        (m.step, m.value) for m in sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))
    ]


def test_tracking_uri_resolution(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    assert resolve_tracking_uri("", run_dir) == f"sqlite:///{run_dir.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    assert resolve_tracking_uri("", run_dir) == "http://127.0.0.1:1"
    assert resolve_tracking_uri("sqlite:////x/y.db", run_dir) == "sqlite:////x/y.db"
    t = Tracker(TrackingConfig(uri=""), "rel/run", active=False)
    assert t.tracking_uri == "http://127.0.0.1:1"
    assert os.environ["MLFLOW_DISABLE_TELEMETRY"] == "true"


def test_params_metrics_artifacts_round_trip(tmp_path):
    run_dir = tmp_path / "run"
    cfg = Config(run_dir=str(run_dir))
    cfg.model.moe.modality_experts = {"image": [6, 7]}
    tracker = Tracker(TrackingConfig(experiment="unit", run_name="r1"), run_dir, active=True, strict=True)
    params = config_to_dict(cfg)
    params["notes"] = "x" * 10_000  # over MLflow's 6000-char limit
    params["extra"] = {f"k{i:03d}": i for i in range(150)}  # > 100 params: several batches
    run_id = tracker.start(params)
    assert run_id and tracker.run_id == run_id and tracker.experiment_id

    steps = [(1, 2.5, 1e-3), (2, 2.25, 2e-3), (3, 1.875, 3e-3)]
    for step, loss, lr in steps:
        assert tracker.log_metrics({"loss": loss, "lr": lr}, step=step) == 2
    tracker.log_text("hello: world\n", "config/resolved.yaml")
    extra = tmp_path / "report.json"
    extra.write_text(json.dumps({"ok": True}))
    tracker.log_artifact(extra, subdir="reports")
    assert (
        tracker.log_loss_curve({"loss": [(s, l) for s, l, _ in steps], "lr": [(s, r) for s, _, r in steps]})
        == "loss_curve.png"
    )
    tracker.end("FINISHED")

    client = _client(tracker)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "r1"
    assert client.get_experiment(run.info.experiment_id).name == "unit"
    p = run.data.params
    flat = flatten(config_to_dict(cfg))
    for key in ("model.d_model", "model.moe.top_k", "train.lr", "tracking.experiment", "seed"):
        assert p[key] == str(flat[key])
    assert p["train.betas"] == "[0.9, 0.95]"
    assert json.loads(p["model.moe.modality_experts.image"]) == [6, 7]
    assert p["model.moe.capacity_factor"] == "None"
    assert len(p["notes"]) == MAX_PARAM_VAL_LENGTH and p["notes"].endswith("...[truncated]")
    assert all(p[f"extra.k{i:03d}"] == str(i) for i in range(150))
    assert len(p) == len(flat) + 1 + 150
    assert _history(client, run_id, "loss") == [(s, l) for s, l, _ in steps]
    assert _history(client, run_id, "lr") == [(s, r) for s, _, r in steps]
    assert run.data.metrics == {"loss": 1.875, "lr": 3e-3}

    # Artifacts live next to the store in the run folder, and read back byte-exact.
    names = {a.path for a in client.list_artifacts(run_id)}
    assert {"config", "reports", "loss_curve.png"} <= names
    dl = tmp_path / "dl"
    dl.mkdir()
    assert Path(client.download_artifacts(run_id, "config/resolved.yaml", str(dl))).read_text() == "hello: world\n"
    assert json.loads(Path(client.download_artifacts(run_id, "reports/report.json", str(dl))).read_text()) == {
        "ok": True
    }
    png = Path(client.download_artifacts(run_id, "loss_curve.png", str(dl))).read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 5000
    assert (run_dir / "mlflow.db").is_file()
    assert run.info.artifact_uri.startswith((run_dir / "mlartifacts").resolve().as_uri())
    assert load_run_info(run_dir)["run_id"] == run_id


def test_non_finite_and_non_numeric_metrics_are_skipped(tmp_path):
    torch = pytest.importorskip("torch")
    tracker = Tracker(TrackingConfig(), tmp_path / "run", active=True, strict=True)
    run_id = tracker.start({"a": 1})
    n = tracker.log_metrics(
        {
            "loss": float("nan"),
            "grad_norm": float("inf"),
            "neg": float("-inf"),
            "bad": "n/a",
            "lr": 0.5,
            "tensor": torch.tensor(2.0),
            "count": 3,
        },
        step=7,
    )
    assert n == 3 and tracker.skipped_metrics == 4
    tracker.log_metrics({"loss": float("nan")}, step=8)  # nothing finite: no crash
    tracker.log_metrics({"loss": 1.5}, step=9)
    tracker.end()
    client = _client(tracker)
    assert client.get_run(run_id).data.metrics == {"lr": 0.5, "tensor": 2.0, "count": 3.0, "loss": 1.5}
    assert _history(client, run_id, "loss") == [(9, 1.5)]
    assert _history(client, run_id, "grad_norm") == []


def test_many_metrics_in_one_call_are_batched(tmp_path):
    tracker = Tracker(TrackingConfig(), tmp_path / "run", active=True, strict=True)
    run_id = tracker.start({})
    metrics = {f"expert_load/{i}": i / 7 for i in range(1500)}  # > 1000 per log_batch
    assert tracker.log_metrics(metrics, step=1) == 1500
    tracker.end()
    stored = _client(tracker).get_run(run_id).data.metrics
    assert len(stored) == 1500 and stored["expert_load/1499"] == 1499 / 7


@pytest.mark.parametrize("active,enabled", [(False, True), (True, False)])
def test_inactive_tracker_writes_nothing(tmp_path, active, enabled):
    run_dir = tmp_path / "run"
    tracker = Tracker(TrackingConfig(enabled=enabled), run_dir, active=active)
    assert not tracker.active
    assert tracker.start({"a": 1}) is None
    assert tracker.log_metrics({"loss": 1.0}, step=1) is None
    tracker.log_text("x", "x.txt")
    f = tmp_path / "f.txt"
    f.write_text("x")
    tracker.log_artifact(f)
    assert tracker.log_loss_curve({"loss": [(1, 1.0)]}) is None
    tracker.set_tags({"a": "b"})
    tracker.end("FAILED")
    with tracker:
        pass
    assert tracker.run_id is None and tracker.experiment_id is None and tracker.client is None
    assert not run_dir.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cwd", "f.txt"]


def test_resume_continues_the_same_run(tmp_path):
    run_dir = tmp_path / "run"
    cfg = TrackingConfig(experiment="resume")
    first = Tracker(cfg, run_dir, active=True, strict=True)
    run_id = first.start({"train": {"steps": 5, "lr": 0.1}})
    for step in (1, 2, 3):
        first.log_metrics({"loss": 1.0 / step}, step=step)
    first.end("KILLED")  # job preempted after step 3
    assert _client(first).get_run(run_id).info.status == "KILLED"

    saved = load_run_info(run_dir)
    assert saved["run_id"] == run_id and (run_dir / RUN_INFO_FILE).is_file()
    second = Tracker(cfg, run_dir, active=True, strict=True)
    assert second.start({"train": {"steps": 10, "lr": 0.1}, "resume": {"step": 3}}, run_id=saved["run_id"]) == run_id
    assert second.resumed
    for step in (4, 5):
        second.log_metrics({"loss": 1.0 / step}, step=step)
    second.end()

    client = _client(second)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert _history(client, run_id, "loss") == [(s, 1.0 / s) for s in range(1, 6)]
    assert run.data.params["train.steps"] == "5"  # params are immutable in MLflow
    assert run.data.params["resume.step"] == "3"  # new params are added
    assert run.data.tags["aion.param_changed.train.steps"] == "10"
    assert run.data.tags["aion.resume_count"] == "1"
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_resume_of_unknown_run_starts_a_new_one(tmp_path):
    tracker = Tracker(TrackingConfig(), tmp_path / "run", active=True, strict=True)
    run_id = tracker.resume("0123456789abcdef0123456789abcdef", {"a": 1})
    assert run_id and run_id != "0123456789abcdef0123456789abcdef" and not tracker.resumed
    tracker.end()
    tags = _client(tracker).get_run(run_id).data.tags
    assert tags["aion.resumed_from"] == "0123456789abcdef0123456789abcdef"


def test_context_manager_marks_failed_run(tmp_path):
    tracker = Tracker(TrackingConfig(), tmp_path / "run", active=True, strict=True)
    with pytest.raises(ZeroDivisionError):
        with tracker:
            tracker.start({})
            raise ZeroDivisionError
    assert _client(tracker).get_run(tracker.run_id).info.status == "FAILED"
    tracker.end("FINISHED")  # already ended: no-op, status kept
    assert _client(tracker).get_run(tracker.run_id).info.status == "FAILED"
    with pytest.raises(ValueError):
        tracker.end("DONE")


def test_non_strict_tracker_reports_errors_instead_of_raising(tmp_path):
    tracker = Tracker(TrackingConfig(), tmp_path / "run", active=True)
    assert tracker.log_metrics({"loss": 1.0}, step=1) is None  # before start(): error
    assert tracker.errors == 1
    strict = Tracker(TrackingConfig(), tmp_path / "run", active=True, strict=True)
    with pytest.raises(RuntimeError):
        strict.log_metrics({"loss": 1.0}, step=1)


def test_key_and_value_helpers():
    assert sanitize_key("moe/expert load:0") == "moe/expert load_0"
    long = sanitize_key("k" * 400)
    assert len(long) == 250 and long != sanitize_key("k" * 401)
    assert param_value((0.9, 0.95)) == "[0.9, 0.95]"
    assert param_value({"b": 1, "a": [1]}) == '{"a": [1], "b": 1}'
    assert param_value(None) == "None" and param_value(True) == "True"
    assert len(param_value("é" * 7000)) == MAX_PARAM_VAL_LENGTH


def test_plot_curves_writes_a_png_per_series(tmp_path):
    from matplotlib.image import imread

    hist = {
        "loss": [(s, 3.0 * math.exp(-s / 10)) for s in range(1, 41)] + [(41, float("nan"))],
        "lr": [(s, 1e-3 * min(1, s / 5)) for s in range(1, 41)],
        "empty": [],
    }
    out = plot_curves(hist, tmp_path / "sub" / "curve.png", title="t")
    assert out.read_bytes().startswith(PNG_MAGIC)
    img = imread(out)
    assert img.shape[0] > img.shape[1] * 0.9  # three stacked panels: taller than wide
    assert img[..., :3].std() > 0.05  # not a blank image


def test_ui_command_arguments(tmp_path, monkeypatch):
    import argparse

    from aion_train.commands import ui

    p = argparse.ArgumentParser()
    ui.add_arguments(p)
    args = p.parse_args(["--run-dir", str(tmp_path / "r"), "--port", "5123"])
    uri, artifacts = ui.resolve_backend(args)
    assert uri == f"sqlite:///{(tmp_path / 'r').resolve()}/mlflow.db"
    assert artifacts == (tmp_path / "r" / "mlartifacts").resolve() and args.port == 5123
    args = p.parse_args(["--backend-store-uri", "sqlite:////data/x.db"])
    assert ui.resolve_backend(args) == ("sqlite:////data/x.db", Path("/data/mlartifacts"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://example:5000")  # a server, not a store
    assert ui.resolve_backend(p.parse_args([]))[0].endswith("runs/default/mlflow.db")
    with pytest.raises(SystemExit):
        p.parse_args(["--run-dir", "a", "--backend-store-uri", "b"])
