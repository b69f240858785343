"""slurm/pretrain.sh on a real one-node Slurm cluster (slurm/local_cluster.sh).

The module fixture starts munged + slurmctld + slurmd from Debian's packages (apt-installed
by the script when missing; needs root), on free ports and in a private LOCAL_SLURM_DIR.
Each test submits `sbatch --wait slurm/pretrain.sh` for a 2-rank, 30-step CPU run of
configs/tiny_cpu.yaml and checks the job, the checkpoint and the MLflow loss history.
"""

from __future__ import annotations

import json
import os
import re
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "slurm" / "local_cluster.sh"
SCRIPT = REPO / "slurm" / "pretrain.sh"
STEPS = 30
NPROC = 2
SLURM_BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "sinfo", "scontrol")
# Debian's slurmctld slurmd slurm-client munge (`make install` as root installs them)
pytestmark.append(pytest.mark.requires_binary(*SLURM_BINARIES))


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _clean_env() -> dict[str, str]:
    """The caller's environment without anything that would leak into the job's ranks
    (an outer Slurm job, an outer torchrun)."""
    drop = {
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "LOCAL_WORLD_SIZE",
        "MASTER_ADDR",
        "MASTER_PORT",
        "GROUP_RANK",
        "NODE_RANK",
        "OMP_NUM_THREADS",
        "CONFIG",
        "RUN_DIR",
        "EXTRA",
        "NPROC_PER_NODE",
        "GPUS_PER_NODE",
        "LAUNCHER",
        "PYTHON",
        "REPO_DIR",
        "JSON",
    }
    return {
        k: v
        for k, v in os.environ.items()
        if k not in drop
        and not (
            k.startswith("SLURM_") or k.startswith("SBATCH_") or k.startswith("SRUN_") or k.startswith("LOCAL_SLURM_")
        )
    }


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("the local Slurm cluster runs its daemons as root (and may apt-get install them)")

    d = tmp_path_factory.mktemp("slurm")  # 0700 parents: the script puts munged's socket in /tmp
    ctld_port, d_port = _free_ports(2)
    env = _clean_env()
    env.update(
        LOCAL_SLURM_DIR=str(d),
        LOCAL_SLURM_CTLD_PORT=str(ctld_port),
        LOCAL_SLURM_D_PORT=str(d_port),
        LOCAL_SLURM_TIMEOUT="90",
    )
    start = subprocess.run(
        ["bash", str(CLUSTER), "start"], env=env, cwd=REPO, capture_output=True, text=True, timeout=600
    )
    if start.returncode != 0:
        stop = subprocess.run(
            ["bash", str(CLUSTER), "stop"], env=env, cwd=REPO, capture_output=True, text=True, timeout=120
        )
        pytest.fail(
            f"slurm/local_cluster.sh start failed (rc {start.returncode}):\n"
            f"{start.stdout}\n{start.stderr[-4000:]}\n{stop.stderr}"
        )
    env["SLURM_CONF"] = str(d / "slurm.conf")
    status = subprocess.run(
        ["bash", str(CLUSTER), "status"], env=env, cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert status.returncode == 0, status.stdout + status.stderr
    try:
        yield {"dir": d, "env": env}
    finally:
        stop = subprocess.run(
            ["bash", str(CLUSTER), "stop"], env=env, cwd=REPO, capture_output=True, text=True, timeout=120
        )
        assert stop.returncode == 0, stop.stderr
        after = subprocess.run(
            ["bash", str(CLUSTER), "status"], env=env, cwd=REPO, capture_output=True, text=True, timeout=60
        )
        assert after.returncode == 3, after.stdout  # all three daemons gone


def _job_state(cluster, job_id: str, timeout_s: float = 20.0) -> str:
    """Final state from jobcomp.txt (no sacct without slurmdbd), else from scontrol."""
    jobcomp = cluster["dir"] / "log" / "jobcomp.txt"
    deadline = time.monotonic() + timeout_s
    while True:
        if jobcomp.is_file():
            for line in jobcomp.read_text().splitlines():
                if re.search(rf"\bJobId={job_id}\b", line):
                    m = re.search(r"\bJobState=(\S+)", line)
                    if m:
                        return m.group(1)
        out = subprocess.run(
            ["scontrol", "show", "job", "-o", job_id], env=cluster["env"], capture_output=True, text=True, timeout=30
        ).stdout
        m = re.search(r"\bJobState=(\S+)", out)
        if m and m.group(1) not in ("PENDING", "RUNNING", "COMPLETING", "CONFIGURING"):
            return m.group(1)
        if time.monotonic() > deadline:
            return m.group(1) if m else "UNKNOWN"
        time.sleep(0.5)


@pytest.mark.parametrize("launcher", ["torchrun", "srun"])
def test_sbatch_pretrain(slurm_cluster, tmp_path, launcher):
    run_dir = tmp_path / "run"
    out_file = tmp_path / "slurm-%j.out"
    extra = f"train.steps={STEPS} train.eval_every=15 train.save_every=15"
    export = ",".join(
        [
            "ALL",
            "CONFIG=configs/tiny_cpu.yaml",
            f"NPROC_PER_NODE={NPROC}",
            f"RUN_DIR={run_dir}",
            f"PYTHON={sys.executable}",
            f"LAUNCHER={launcher}",
            f"MASTER_PORT={_free_ports(1)[0]}",  # not the job-id default: other clusters may share the host
            f"EXTRA={extra}",
        ]
    )
    cmd = [
        "timeout",
        "600",
        "sbatch",
        "--wait",
        "--parsable",
        # the #SBATCH defaults are for 2 GPU nodes; this cluster is one 2-core CPU node
        "--nodes=1",
        "--gpus-per-node=0",
        "--cpus-per-task=2",
        "--time=00:10:00",
        f"--job-name=aion-ci-{launcher}",
        f"--output={out_file}",
        f"--chdir={REPO}",
        f"--export={export}",
        str(SCRIPT),
    ]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, env=slurm_cluster["env"], cwd=REPO, capture_output=True, text=True, timeout=660)
    elapsed = time.monotonic() - t0
    job_id = proc.stdout.strip().split(";")[0].splitlines()[-1] if proc.stdout.strip() else ""
    log_path = Path(str(out_file).replace("%j", job_id)) if job_id else None
    log = log_path.read_text() if log_path and log_path.is_file() else "(no job output file)"
    if proc.returncode != 0 and job_id:
        subprocess.run(["scancel", job_id], env=slurm_cluster["env"], capture_output=True, timeout=30)
    assert proc.returncode == 0, (
        f"sbatch rc {proc.returncode} after {elapsed:.0f}s\n"
        f"{proc.stdout}\n{proc.stderr}\n--- job output ---\n{log[-6000:]}"
    )
    assert job_id.isdigit(), proc.stdout

    assert _job_state(slurm_cluster, job_id) == "COMPLETED", log[-6000:]
    assert f"1 node(s) x {NPROC} rank(s) = {NPROC}, launcher {launcher}" in log, log[-3000:]

    # rank 0's --json summary line
    summaries = [json.loads(line) for line in log.splitlines() if line.startswith('{"final_step"')]
    assert len(summaries) == 1, log[-3000:]  # printed by rank 0 only
    summary = summaries[0]
    assert summary["final_step"] == STEPS
    assert summary["final_val_ppl"] < summary["initial_val_ppl"]

    # checkpoint: latest -> step_00000030 (a pointer file or a symlink), with per-rank shards
    latest = run_dir / "checkpoints" / "latest"
    assert latest.exists(), sorted(p.name for p in (run_dir / "checkpoints").glob("*"))
    target = os.readlink(latest) if latest.is_symlink() else latest.read_text().strip()
    assert Path(target).name == f"step_{STEPS:08d}"
    step_dir = run_dir / "checkpoints" / f"step_{STEPS:08d}"
    manifest = json.loads((step_dir / "manifest.json").read_text())
    assert manifest["step"] == STEPS
    assert {f"optim.rank{r:05d}.safetensors" for r in range(NPROC)} <= set(manifest["files"])

    # MLflow sqlite store: 30 points of train/loss, clearly decreasing
    db = run_dir / "mlflow.db"
    assert db.is_file()
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
        rows = con.execute(
            "SELECT step, value FROM metrics WHERE key = 'train/loss' AND run_uuid = ? ORDER BY step, timestamp",
            (summary["mlflow_run_id"],),
        ).fetchall()
    steps = [s for s, _ in rows]
    losses = [v for _, v in rows]
    assert len(rows) == STEPS and steps == sorted(set(steps)), steps  # one point per step
    assert losses[-1] < 0.9 * losses[0], losses
    print(
        f"\n[{launcher}] job {job_id} COMPLETED in {elapsed:.0f}s; "
        f"train/loss {losses[0]:.3f} -> {losses[-1]:.3f}; "
        f"val ppl {summary['initial_val_ppl']:.0f} -> {summary['final_val_ppl']:.0f}"
    )
