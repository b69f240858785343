"""Slow end-to-end tests: a real `mlflow server` on 127.0.0.1, a real (tiny) torch
training loop logging through `Tracker` over HTTP, read back through the REST API,
and the run page rendered by headless Chromium.

CI needs the Debian package `chromium` for the browser test (it is skipped otherwise):
    apt-get install -y --no-install-recommends chromium
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from aion_train.config import Config, TrackingConfig, config_to_dict
from aion_train.tracking import Tracker, start_mlflow_server, stop_server

pytestmark = [pytest.mark.slow]

STEPS = 30
CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--virtual-time-budget=60000",
    "--window-size=1400,1700",
]
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _get_json(url: str, path: str, **query) -> dict:
    full = f"{url}{path}?{urllib.parse.urlencode(query)}"
    with _OPENER.open(full, timeout=30) as resp:
        assert resp.status == 200
        return json.loads(resp.read().decode())


@pytest.fixture
def server(tmp_path, monkeypatch):
    """A fresh lean server per test on a free port; stopped by PID (process group) after."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    store = tmp_path / "server"
    proc, url = start_mlflow_server(
        f"sqlite:///{store / 'mlflow.db'}",
        port=0,
        artifacts_dir=store / "artifacts",
        log_path=store / "server.log",
        timeout=120,
    )
    try:
        yield url, store
    finally:
        code = stop_server(proc)
        assert proc.poll() is not None, "mlflow server still running after stop_server"
        assert code is not None


def _train_and_log(url: str, run_dir: Path, run_name: str):
    """Fit a 2-layer MLP to y = sin(x) for STEPS full-batch Adam steps; log loss and lr per step."""
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(1)
    x = torch.linspace(-2, 2, 256).unsqueeze(1)
    y = torch.sin(x)
    model = torch.nn.Sequential(torch.nn.Linear(1, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=STEPS, eta_min=3e-4)

    cfg = Config(run_dir=str(run_dir))
    cfg.tracking = TrackingConfig(uri=url, experiment="server-e2e", run_name=run_name)
    tracker = Tracker(cfg.tracking, run_dir, active=True, strict=True)
    assert tracker.tracking_uri == url
    run_id = tracker.start(config_to_dict(cfg))
    logged: dict[str, list[tuple[int, float]]] = {"loss": [], "lr": []}
    for step in range(1, STEPS + 1):
        lr = opt.param_groups[0]["lr"]
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        metrics = {"loss": loss.item(), "lr": lr}
        tracker.log_metrics(metrics, step=step)
        for k, v in metrics.items():
            logged[k].append((step, v))
    tracker.log_loss_curve(logged)
    tracker.end("FINISHED")
    return tracker, run_id, logged


def test_training_run_read_back_through_rest_api(server, tmp_path):
    url, store = server
    tracker, run_id, logged = _train_and_log(url, tmp_path / "run", "mlp-rest")
    losses = [v for _, v in logged["loss"]]
    assert losses[-1] < 0.2 * losses[0], f"training did not learn: {losses[0]} -> {losses[-1]}"

    run = _get_json(url, "/api/2.0/mlflow/runs/get", run_id=run_id)["run"]
    assert run["info"]["status"] == "FINISHED"
    assert run["info"]["run_name"] == "mlp-rest"
    assert run["info"]["experiment_id"] == tracker.experiment_id
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    assert params["tracking.experiment"] == "server-e2e" and params["model.d_model"] == "128"
    latest = {m["key"]: m for m in run["data"]["metrics"]}
    assert latest["loss"]["value"] == logged["loss"][-1][1] and latest["loss"]["step"] == STEPS

    for key in ("loss", "lr"):
        hist = _get_json(url, "/api/2.0/mlflow/metrics/get-history", run_id=run_id, metric_key=key)["metrics"]
        got = sorted((int(m["step"]), m["value"]) for m in hist)
        assert got == logged[key], f"{key} history differs from what was logged"
    server_losses = [
        v
        for _, v in sorted(
            (int(m["step"]), m["value"])
            for m in _get_json(url, "/api/2.0/mlflow/metrics/get-history", run_id=run_id, metric_key="loss")["metrics"]
        )
    ]
    assert all(math.isfinite(v) for v in server_losses)
    assert server_losses[-1] < 0.2 * server_losses[0]
    # falls step after step (this seed and lr are monotone; allow two upticks of slack)
    assert sum(b > a for a, b in zip(server_losses, server_losses[1:])) <= 2

    # The loss-curve PNG went through the server's artifact proxy into its artifacts folder.
    files = _get_json(url, "/api/2.0/mlflow/artifacts/list", run_id=run_id).get("files", [])
    assert "loss_curve.png" in {f["path"] for f in files}
    with _OPENER.open(f"{url}/get-artifact?path=loss_curve.png&run_uuid={run_id}", timeout=30) as resp:
        assert resp.read(8) == b"\x89PNG\r\n\x1a\n"
    assert list((store / "artifacts").rglob("loss_curve.png"))


@pytest.mark.requires_binary("chromium")  # tests/conftest.py: skipped, naming the package, without it
def test_run_page_renders_metrics_in_chromium(server, tmp_path):
    url, _ = server
    tracker, run_id, logged = _train_and_log(url, tmp_path / "run", "mlp-browser")
    page = f"{url}/#/experiments/{tracker.experiment_id}/runs/{run_id}"
    profile = tempfile.mkdtemp(prefix="chromium-profile-", dir=tmp_path)
    shot = tmp_path / "run_page.png"
    proc = subprocess.run(
        [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--screenshot={shot}", "--dump-dom", page],
        capture_output=True,
        text=True,
        timeout=150,
        env={**os.environ, "HOME": str(tmp_path)},
    )
    dom = proc.stdout
    assert proc.returncode == 0, proc.stderr[-3000:]
    (tmp_path / "run_page.html").write_text(dom)
    assert "mlp-browser" in dom, "run name not rendered (page did not load the run?)"
    for metric in ("loss", "lr"):
        assert re.search(rf">\s*{metric}\s*<", dom), f"metric {metric!r} not in the rendered DOM"
    # The metrics table shows the latest values (JS and Python print floats the same way).
    text = " ".join(re.sub(r"<[^>]+>", " ", dom).split())
    assert "Metrics (2)" in text
    for metric in ("loss", "lr"):
        assert f"{metric} {logged[metric][-1][1]!r}" in text, f"latest {metric} value not shown"
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
