"""Fault tests of the pretraining loop, with real runs: a rank SIGKILLed mid-run, a crash in
the middle of a checkpoint write, and non-finite losses / gradients.

In-process faults (a failing `save_rank`, a poisoned weight) are injected by a small helper
script that monkeypatches the trainer and calls `pretrain(cfg)` in its own process, so the
test process never initialises torch.distributed or DeepSpeed itself."""

from __future__ import annotations

import json
import math
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from aion_train.checkpoint import CheckpointManager, load_rank

REPO = Path(__file__).resolve().parents[1]
SMALL = ["train.steps=16", "train.eval_every=8", "train.save_every=4", "data.micro_batch_size=4"]

HELPER = r'''
"""Run pretrain(cfg) in this process with one injected fault (see tests/test_train_faults.py)."""
import json, logging, os, signal, sys

import torch

import aion_train.checkpoint.training_job as training_job
from aion_train.config import load_config
from aion_train.train import trainer as trainer_mod
from aion_train.checkpoint import tree_paths

fault, arg, overrides = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")  # as the CLI

if fault in ("save-raise", "save-kill"):
    # the arg-th save_rank call writes its payload, then the "crash" happens mid-checkpoint
    real_save_rank, calls = training_job.save_rank, [0]

    def save_rank(folder, rank, name, tree, **kw):
        calls[0] += 1
        prefix = real_save_rank(folder, rank, name, tree, **kw)
        if calls[0] == arg:
            if fault == "save-kill":  # a torn file, then the process dies without any cleanup
                _, st = tree_paths(prefix)
                with open(st, "r+b") as f:
                    f.truncate(os.path.getsize(st) // 2)
                os.kill(os.getpid(), signal.SIGKILL)
            raise OSError(f"simulated I/O error after writing {prefix}")
        return prefix

    training_job.save_rank = save_rank
elif fault == "poison-after-save":
    # right after the checkpoint of step `arg` is written, one weight becomes NaN
    real_save = trainer_mod.Trainer.save

    def save(self):
        real_save(self)
        if self.state["step"] == arg:
            with torch.no_grad():
                next(self.model.parameters()).fill_(float("nan"))
            print(f"poisoned after step {arg}", file=sys.stderr, flush=True)

    trainer_mod.Trainer.save = save
else:
    raise SystemExit(f"unknown fault {fault}")

cfg = load_config("configs/tiny_cpu.yaml", overrides, world_size=1)
summary = trainer_mod.pretrain(cfg)
print(json.dumps({k: v for k, v in summary.items() if k != "losses"}), flush=True)
'''


def _env() -> dict:
    env = dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true", PYTHONUNBUFFERED="1")
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def _summary(stdout: str):
    for line in reversed(stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return None


def pretrain_cmd(overrides, nproc: int = 1) -> list[str]:
    cmd = [sys.executable, "-m", "aion_train.cli", "pretrain", *overrides, "--json"]
    return cmd + (["--nproc", str(nproc)] if nproc > 1 else [])


def pretrain(overrides, nproc: int = 1, timeout: float = 420):
    proc = subprocess.run(
        pretrain_cmd(overrides, nproc), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout
    )
    return proc, _summary(proc.stdout)


def with_fault(tmp_path: Path, fault: str, arg: int, overrides, timeout: float = 420):
    helper = tmp_path / "fault_helper.py"
    helper.write_text(HELPER)
    proc = subprocess.run(
        [sys.executable, str(helper), fault, str(arg), *overrides],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return proc, _summary(proc.stdout)


def ok(proc, summary):
    assert proc.returncode == 0 and summary is not None, (
        f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-6000:]}"
    )
    return summary


def metric(run_dir: Path, key: str) -> list[tuple[int, float]]:
    """(step, value) of every point of `key` in RUN_DIR/mlflow.db, in the order they were logged
    (a relaunch logs the steps after its checkpoint again, after those of the first launch)."""
    db = sqlite3.connect(run_dir / "mlflow.db")
    try:
        return [
            (int(s), v)
            for s, v in db.execute("SELECT step, value FROM metrics WHERE key = ? ORDER BY timestamp, step", (key,))
        ]
    finally:
        db.close()


def run_rows(run_dir: Path) -> list[tuple[str, str]]:
    db = sqlite3.connect(run_dir / "mlflow.db")
    try:
        return list(db.execute("SELECT run_uuid, status FROM runs"))
    finally:
        db.close()


def latest_step(ckpt_root: Path) -> int:
    try:
        return int((ckpt_root / "latest").read_text().strip().split("_")[1])
    except (OSError, IndexError, ValueError):
        return -1


def assert_loadable(ckpt: Path) -> dict:
    """sha256 of every file checks out, and the payloads load with finite weights."""
    doc = CheckpointManager(ckpt.parent).verify(ckpt)
    model = load_rank(ckpt, 0, "model")
    assert model and all(torch.isfinite(t.float()).all() for t in model.values())
    trainer = load_rank(ckpt, 0, "trainer")
    assert trainer["state"]["step"] == doc["step"]
    return trainer["state"]


# --------------------------------------------------------------------------- a rank is killed


@pytest.mark.slow
def test_killed_rank_fails_the_job_fast_and_relaunch_resumes_exactly(tmp_path):
    """SIGKILL one of two torchrun workers after a checkpoint exists: the job exits non-zero
    within seconds; the same command relaunched resumes from the last checkpoint and logs the
    same losses, step for step, as an uninterrupted run of the same config."""
    import psutil

    stop = 30  # a 200-step schedule; this job's slot ends at step 30 (train.stop_at_step)
    common = [
        "train.steps=200",
        "train.save_every=5",
        "train.eval_every=100",
        "data.micro_batch_size=4",
        f"train.stop_at_step={stop}",
    ]
    run = tmp_path / "killed"
    ckpts = run / "checkpoints"
    cmd = pretrain_cmd(common + [f"run_dir={run}"], nproc=2)
    err = open(tmp_path / "killed.stderr", "w+")
    job = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=err, text=True)
    try:
        deadline = time.monotonic() + 400
        while latest_step(ckpts) < 10:
            assert job.poll() is None, f"job ended early ({job.returncode})"
            assert time.monotonic() < deadline, "no checkpoint at step >= 10 in time"
            time.sleep(0.05)
        # the torchrun workers: descendants of *this* job that carry a RANK
        workers = {}
        for child in psutil.Process(job.pid).children(recursive=True):
            try:
                rank = child.environ().get("RANK")
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            if rank is not None and "aion_train.cli" in child.cmdline():
                workers[int(rank)] = child
        assert sorted(workers) == [0, 1], workers
        killed_at = time.monotonic()
        workers[1].send_signal(signal.SIGKILL)
        rc = job.wait(timeout=120)
        elapsed = time.monotonic() - killed_at
    finally:
        if job.poll() is None:  # only on failure above: stop what we started
            for child in psutil.Process(job.pid).children(recursive=True):
                child.kill()
            job.kill()
            job.wait(timeout=30)
    err.seek(0)
    stderr = err.read()
    err.close()
    assert rc != 0, "the job must fail when a rank dies"
    assert elapsed < 60, f"job took {elapsed:.1f}s to exit after the kill"
    gone = psutil.wait_procs(list(workers.values()), timeout=10)[1]
    assert not gone, f"workers still alive: {gone}"
    resume_from = latest_step(ckpts)
    assert 10 <= resume_from < stop, f"killed too late (latest {resume_from})\n{stderr[-3000:]}"
    assert resume_from % 5 == 0
    assert_loadable(ckpts / f"step_{resume_from:08d}")
    logged_before = metric(run, "train/loss")
    killed_steps = [s for s, _ in logged_before]
    assert killed_steps == list(range(1, len(killed_steps) + 1)) and len(killed_steps) < stop

    relaunch = ok(*pretrain(common + [f"run_dir={run}"], nproc=2))  # the very same command
    assert relaunch["final_step"] == stop
    ref_dir = tmp_path / "reference"
    ref = ok(*pretrain(common + [f"run_dir={ref_dir}"], nproc=2))
    assert ref["final_step"] == stop

    want = dict(metric(ref_dir, "train/loss"))
    assert sorted(want) == list(range(1, stop + 1))
    points = metric(run, "train/loss")
    # every step is logged; steps after the checkpoint were logged by both launches
    assert sorted({s for s, _ in points}) == list(range(1, stop + 1))
    after_resume = points[len(logged_before) :]
    assert [s for s, _ in after_resume] == list(range(resume_from + 1, stop + 1))
    bad = [(s, v, want[s]) for s, v in points if v != want[s]]
    assert not bad, f"losses differ from the uninterrupted run: {bad[:5]}"
    assert relaunch["final_val_ppl"] == ref["final_val_ppl"]
    rows = run_rows(run)
    assert rows == [(relaunch["mlflow_run_id"], "FINISHED")]
    assert_loadable(ckpts / f"step_{stop:08d}")


# --------------------------------------------------------------------------- crash in a checkpoint write


@pytest.mark.parametrize("fault", ["save-raise", "save-kill"])
def test_crash_during_checkpoint_write_keeps_previous_checkpoint(tmp_path, fault):
    run = tmp_path / "run"
    ckpts = run / "checkpoints"
    overrides = SMALL + [f"run_dir={run}"]
    # world size 1 writes 3 payloads per checkpoint (model, optim, trainer): call 8 is the optimizer
    # state of the step-12 checkpoint; the step-4 and step-8 checkpoints were complete
    proc, summary = with_fault(tmp_path, fault, 8, overrides)
    assert summary is None and proc.returncode != 0
    if fault == "save-kill":
        assert proc.returncode == -signal.SIGKILL
    else:
        assert "simulated I/O error" in proc.stderr
    mgr = CheckpointManager(ckpts)
    assert (ckpts / "latest").read_text() == "step_00000008\n"
    assert mgr.latest() == ckpts / "step_00000008"
    assert [s for s, _ in mgr.list_checkpoints()] == [4, 8]
    stale = ckpts / ".tmp-step_00000012"
    assert stale.is_dir() and not (stale / "manifest.json").exists()
    assert sorted(p.name for p in stale.iterdir()) == [
        "model.rank00000.json",
        "model.rank00000.safetensors",
        "optim.rank00000.json",
        "optim.rank00000.safetensors",
    ]
    assert assert_loadable(ckpts / "step_00000008")["step"] == 8
    crashed_losses = metric(run, "train/loss")
    assert [s for s, _ in crashed_losses] == list(range(1, 13))  # step 12 was logged, then its save crashed
    run_id = run_rows(run)[0][0]
    assert run_rows(run) == [(run_id, "FAILED" if fault == "save-raise" else "RUNNING")]

    # the same command resumes from step 8; its next save (step 12) clears the stale temp folder
    resumed = ok(*pretrain(overrides))
    assert resumed["final_step"] == 16 and resumed["mlflow_run_id"] == run_id
    assert not [p.name for p in ckpts.iterdir() if p.name.startswith((".tmp-", ".trash-"))]
    assert [s for s, _ in mgr.list_checkpoints()] == [12, 16]  # keep_last=2
    for step in (12, 16):
        assert_loadable(ckpts / f"step_{step:08d}")
    points = metric(run, "train/loss")
    assert points[:12] == crashed_losses
    # steps 9-12 were trained twice (before the crash and after the resume): same losses, bit for bit
    assert points[12:16] == crashed_losses[8:12]
    assert [s for s, _ in points[16:]] == [13, 14, 15, 16]
    assert run_rows(run) == [(run_id, "FINISHED")]


# --------------------------------------------------------------------------- non-finite losses


def test_diverging_run_skips_counts_and_stops(tmp_path):
    """lr=1e6 without warm-up or clipping: after the first update every gradient overflows;
    DeepSpeed skips those optimizer steps, the trainer counts them and stops at max_bad_steps."""
    run = tmp_path / "run"
    ckpts = run / "checkpoints"
    proc, summary = pretrain(
        [
            "train.steps=16",
            "train.eval_every=0",
            "train.save_every=2",
            "data.micro_batch_size=4",
            "train.lr=1e6",
            "train.warmup_steps=0",
            "train.grad_clip=0",
            "train.max_bad_steps=3",
            f"run_dir={run}",
        ]
    )
    assert proc.returncode != 0 and summary is None, proc.stderr[-3000:]
    stops = [ln for ln in proc.stderr.splitlines() if "ERROR" in ln and "train.max_bad_steps=3" in ln]
    assert len(stops) == 1, proc.stderr[-4000:]
    assert "stopping at step 4: 3 non-finite losses/gradients in a row" in stops[0]
    assert str(ckpts / "step_00000002") in stops[0]
    # steps 2, 3 and 4 were skipped and counted
    assert metric(run, "train/skipped_steps") == [(1, 0.0), (2, 1.0), (3, 2.0), (4, 3.0)]
    loss = metric(run, "train/loss")
    assert [s for s, _ in loss] == [1, 2, 3] and all(math.isfinite(v) for _, v in loss)
    # the last checkpoint (step 2: its weights are those of step 1, the skipped step changed nothing)
    # is intact; the run stopped before saving step 4
    mgr = CheckpointManager(ckpts)
    assert mgr.latest() == ckpts / "step_00000002"
    assert [s for s, _ in mgr.list_checkpoints()] == [2]
    state = assert_loadable(ckpts / "step_00000002")
    assert state["skipped_steps"] == 1 and state["consecutive_bad"] == 1
    assert run_rows(run)[0][1] == "FAILED"


def test_non_finite_loss_skips_micro_batches_and_keeps_last_good_checkpoint(tmp_path):
    """A weight turned NaN right after the step-4 checkpoint: every later loss is NaN, the
    micro-batches are skipped (no backward, no update), counted, and after max_bad_steps the
    run stops; the step-4 checkpoint is intact and a normal run resumes from it."""
    run = tmp_path / "run"
    ckpts = run / "checkpoints"
    overrides = [
        "train.steps=16",
        "train.eval_every=0",
        "train.save_every=4",
        "data.micro_batch_size=4",
        "train.max_bad_steps=4",
        f"run_dir={run}",
    ]
    proc, summary = with_fault(tmp_path, "poison-after-save", 4, overrides)
    assert proc.returncode != 0 and summary is None, proc.stderr[-3000:]
    assert "poisoned after step 4" in proc.stderr
    skipped = [ln for ln in proc.stderr.splitlines() if "non-finite loss: micro-batch skipped" in ln]
    assert len(skipped) == 4 and "(4 in a row, 4 skipped in all)" in skipped[-1], proc.stderr[-4000:]
    stops = [ln for ln in proc.stderr.splitlines() if "ERROR" in ln and "train.max_bad_steps=4" in ln]
    assert len(stops) == 1 and "stopping at step 5: 4 non-finite losses/gradients in a row" in stops[0]
    assert str(ckpts / "step_00000004") in stops[0]
    assert metric(run, "train/skipped_steps")[-1] == (5, 4.0)
    assert [s for s, _ in metric(run, "train/loss")] == [1, 2, 3, 4]
    mgr = CheckpointManager(ckpts)
    assert mgr.latest() == ckpts / "step_00000004"
    state = assert_loadable(ckpts / "step_00000004")
    assert state["skipped_steps"] == 0

    resumed = ok(*pretrain(overrides))  # no fault this time: carries on from step 4
    assert resumed["final_step"] == 16 and resumed["skipped_steps"] == 0
    loss = metric(run, "train/loss")
    assert [s for s, _ in loss] == list(range(1, 17)) and all(math.isfinite(v) for _, v in loss)
