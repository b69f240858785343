"""End-to-end tests of `aion-train pretrain`: real (tiny) training runs in subprocesses, read
back from the MLflow stores they wrote (the run folder's sqlite, or a real `mlflow server`).

Exact resume means bit-for-bit: the `train/loss` history of a run stopped halfway
(`train.stop_at_step`) and relaunched with the same command equals, with `==`, the history
of the same run done in one go, on 1 rank and on 2 ranks (ZeRO-1 bf16, ZeRO-2 fp32, TP=2).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sqlite3
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from aion_train.checkpoint import CheckpointManager

REPO = Path(__file__).resolve().parents[1]
N = 16
SMALL = [f"train.steps={N}", "train.eval_every=8", "train.save_every=4", "data.micro_batch_size=4"]
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _env() -> dict:
    env = dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true", PYTHONUNBUFFERED="1")
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def pretrain(overrides, nproc: int = 1, timeout: float = 420) -> tuple[subprocess.CompletedProcess, dict | None]:
    """`aion-train pretrain OVERRIDES [--nproc N] --json`; returns (process, summary or None)."""
    cmd = [sys.executable, "-m", "aion_train.cli", "pretrain", *overrides, "--json"]
    if nproc > 1:
        cmd += ["--nproc", str(nproc)]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)
    summary = None
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            summary = json.loads(line)
            break
    return proc, summary


def ok(proc: subprocess.CompletedProcess, summary):
    assert proc.returncode == 0 and summary is not None, (
        f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-6000:]}"
    )
    return summary


def history(run_dir: Path, key: str = "train/loss") -> list[tuple[int, float, str]]:
    """(step, value, run id) of every point of `key` in RUN_DIR/mlflow.db, by step then time."""
    db = sqlite3.connect(run_dir / "mlflow.db")
    try:
        return [
            (int(s), v, r)
            for s, v, r in db.execute(
                "SELECT step, value, run_uuid FROM metrics WHERE key = ? ORDER BY step, timestamp", (key,)
            )
        ]
    finally:
        db.close()


def run_ids(run_dir: Path) -> list[str]:
    db = sqlite3.connect(run_dir / "mlflow.db")
    try:
        return [r for (r,) in db.execute("SELECT run_uuid FROM runs")]
    finally:
        db.close()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------- exact resume


def check_exact_resume(tmp_path: Path, extra: list[str], nproc: int):
    ref, res = tmp_path / "uninterrupted", tmp_path / "resumed"
    s_ref = ok(*pretrain(SMALL + extra + [f"run_dir={ref}"], nproc))
    assert s_ref["final_step"] == N

    first = ok(*pretrain(SMALL + extra + [f"run_dir={res}", f"train.stop_at_step={N // 2}"], nproc))
    assert first["final_step"] == N // 2
    assert first["checkpoint"].endswith(f"step_{N // 2:08d}")
    assert [s for s, _, _ in history(res)] == list(range(1, N // 2 + 1))
    second = ok(*pretrain(SMALL + extra + [f"run_dir={res}"], nproc))  # same command, no stop_at_step
    assert second["final_step"] == N

    want = [(s, v) for s, v, _ in history(ref)]
    got = [(s, v) for s, v, _ in history(res)]
    assert [s for s, _ in want] == list(range(1, N + 1))
    assert got == want, "resumed losses differ from the uninterrupted run:\n" + "\n".join(
        f"step {a[0]}: {a[1]!r} vs {b[1]!r}" for a, b in zip(want, got) if a != b
    )
    # the relaunch continued the same MLflow run
    assert second["mlflow_run_id"] == first["mlflow_run_id"]
    assert run_ids(res) == [first["mlflow_run_id"]]
    assert {r for _, _, r in history(res)} == {first["mlflow_run_id"]}
    # and the held-out perplexity at the end is the same too
    assert second["final_val_ppl"] == s_ref["final_val_ppl"]
    mgr = CheckpointManager(res / "checkpoints")
    assert mgr.latest() == res / "checkpoints" / f"step_{N:08d}"
    mgr.verify(mgr.latest())


def test_exact_resume_single_rank(tmp_path):
    check_exact_resume(tmp_path, [], nproc=1)


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra",
    [
        pytest.param([], id="zero1-bf16"),
        pytest.param(["train.zero_stage=2", "train.precision=fp32"], id="zero2-fp32"),
        pytest.param(["parallel.tp=2"], id="tp2"),
    ],
)
def test_exact_resume_two_ranks(tmp_path, extra):
    check_exact_resume(tmp_path, extra, nproc=2)


# --------------------------------------------------------------------------- learning


def test_held_out_perplexity_falls(tmp_path):
    run = tmp_path / "run"
    s = ok(
        *pretrain(
            [
                "train.steps=60",
                "train.eval_every=30",
                "train.save_every=60",
                "train.warmup_steps=5",
                "data.micro_batch_size=4",
                f"run_dir={run}",
            ]
        )
    )
    assert s["final_step"] == 60 and s["skipped_steps"] == 0
    p0, p1 = s["initial_val_ppl"], s["final_val_ppl"]
    # an untrained model is near-uniform over the 2048-token vocabulary
    assert 1000 < p0 < 4000, p0
    assert math.isfinite(p1) and p1 < 0.35 * p0, f"held-out perplexity {p0:.1f} -> {p1:.1f}"
    val = history(run, "val/perplexity")
    assert [st for st, _, _ in val] == [0, 30, 60]
    assert val[0][1] > val[1][1] > val[2][1]
    loss = history(run)
    assert len(loss) == 60 and loss[-1][1] < loss[0][1] - 1.0


# --------------------------------------------------------------------------- incompatible checkpoint


def test_checkpoint_of_another_model_is_refused(tmp_path):
    run = tmp_path / "run"
    ok(
        *pretrain(
            ["train.steps=4", "train.eval_every=0", "train.save_every=4", "data.micro_batch_size=4", f"run_dir={run}"]
        )
    )
    ckpts = run / "checkpoints"
    manifest = ckpts / "step_00000004" / "manifest.json"
    before = {p.relative_to(run).as_posix(): sha256(p) for p in ckpts.rglob("*") if p.is_file()}
    latest_before = (ckpts / "latest").read_text()

    proc, summary = pretrain(
        [
            "train.steps=8",
            "train.eval_every=0",
            "train.save_every=4",
            "data.micro_batch_size=4",
            "model.d_model=64",
            f"run_dir={run}",
        ]
    )
    assert proc.returncode != 0 and summary is None
    lines = [ln for ln in proc.stderr.splitlines() if "cannot resume" in ln]
    assert lines, proc.stderr[-4000:]
    # one line names the differing key with both values and the checkpoint
    line = lines[0]
    assert "model.d_model: checkpoint 128 != config 64" in line
    assert str(ckpts / "step_00000004") in line
    assert "model.n_heads" not in line  # only the keys that differ
    # the checkpoint is untouched, byte for byte, and still the latest
    after = {p.relative_to(run).as_posix(): sha256(p) for p in ckpts.rglob("*") if p.is_file()}
    assert after == before and sha256(manifest) == before["checkpoints/step_00000004/manifest.json"]
    assert (ckpts / "latest").read_text() == latest_before
    CheckpointManager(ckpts).verify(ckpts / "step_00000004")
    assert len(run_ids(run)) == 1  # no MLflow run was started for the refused job


# --------------------------------------------------------------------------- MLflow server


def _get_json(url: str, endpoint: str, **query) -> dict:
    with _OPENER.open(f"{url}{endpoint}?{urllib.parse.urlencode(query)}", timeout=30) as resp:
        assert resp.status == 200
        return json.loads(resp.read().decode())


@pytest.mark.slow
def test_pretrain_logs_to_a_real_mlflow_server(tmp_path):
    from aion_train.tracking import start_mlflow_server, stop_server

    store = tmp_path / "server"
    proc, url = start_mlflow_server(
        f"sqlite:///{store / 'mlflow.db'}",
        port=0,
        artifacts_dir=store / "artifacts",
        log_path=store / "server.log",
        timeout=180,
    )
    try:
        run = tmp_path / "run"
        s = ok(
            *pretrain(
                SMALL
                + [
                    f"run_dir={run}",
                    f"tracking.uri={url}",
                    "tracking.experiment=pretrain-e2e",
                    "tracking.run_name=tiny-e2e",
                ]
            )
        )
        assert s["tracking_uri"] == url
        assert not (run / "mlflow.db").exists()  # everything went to the server
        run_id = s["mlflow_run_id"]

        info = _get_json(url, "/api/2.0/mlflow/runs/get", run_id=run_id)["run"]
        assert info["info"]["status"] == "FINISHED"
        assert info["info"]["run_name"] == "tiny-e2e"
        params = {p["key"]: p["value"] for p in info["data"]["params"]}
        assert params["model.d_model"] == "128" and params["train.steps"] == str(N)
        assert params["parallel.tp"] == "1" and params["train.zero_stage"] == "1"

        hist = _get_json(url, "/api/2.0/mlflow/metrics/get-history", run_id=run_id, metric_key="train/loss")["metrics"]
        steps = sorted(int(m["step"]) for m in hist)
        assert steps == list(range(1, N + 1)), "one train/loss point per step"
        loss = [m["value"] for m in sorted(hist, key=lambda m: int(m["step"]))]
        assert all(math.isfinite(v) for v in loss)
        assert loss[-1] < loss[0] - 0.5, loss
        latest = {m["key"]: m for m in info["data"]["metrics"]}
        assert latest["train/loss"]["step"] == N and latest["train/loss"]["value"] == loss[-1]
        for key in ("val/perplexity", "train/lr", "train/grad_norm", "perf/tokens_per_s", "train/skipped_steps"):
            assert key in latest, key

        files = {f["path"] for f in _get_json(url, "/api/2.0/mlflow/artifacts/list", run_id=run_id)["files"]}
        assert {"loss_curve.png", "config.yaml", "checkpoint"} <= files, files
        with _OPENER.open(f"{url}/get-artifact?path=loss_curve.png&run_uuid={run_id}", timeout=30) as resp:
            assert resp.read(8) == b"\x89PNG\r\n\x1a\n"
        with _OPENER.open(f"{url}/get-artifact?path=config.yaml&run_uuid={run_id}", timeout=30) as resp:
            text = resp.read().decode()
        assert "d_model: 128" in text and f"steps: {N}" in text
        ckpt_files = {
            f["path"]
            for f in _get_json(url, "/api/2.0/mlflow/artifacts/list", run_id=run_id, path="checkpoint")["files"]
        }
        assert ckpt_files == {"checkpoint/manifest.json"}
    finally:
        stop_server(proc)
    assert proc.poll() is not None
