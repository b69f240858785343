"""The Ray pipeline on a real local head node: phase order and resource requests, a 2-rank
torch.distributed phase inside Ray actors, failure reports with the log tail, resume after a
failure and after killing the driver, job submission through the jobs API and `ray job
submit`, and the private cluster's processes all gone afterwards (checked by PID).

The phase functions below are this module's own (imported by dotted path inside the Ray
workers, which find this folder through PYTHONPATH); the real SFT/RM/PPO phases are tested
by their owners. Each records what it saw (PID, granted CPUs, thread count, times) so the
tests check the runner against what actually ran."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import psutil
import pytest
import yaml

pytest.importorskip("ray")

from aion_train.config import ConfigError, load_config  # noqa: E402
from aion_train.config.pipeline_schema import pipeline_phases  # noqa: E402
from aion_train.pipeline.local_cluster import LocalCluster  # noqa: E402
from aion_train.pipeline.runner import run_pipeline  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MOD = Path(__file__).stem
ENV = {"PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}


# -- phase functions run inside Ray workers ------------------------------------------------------
def _phase_dir(cfg) -> Path:
    d = Path(cfg.run_dir) / os.environ["AION_PIPELINE_PHASE"]
    d.mkdir(parents=True, exist_ok=True)
    return d


def _finish(cfg, metrics: dict) -> dict:
    from aion_train.fsutil import atomic_write_text

    atomic_write_text(_phase_dir(cfg) / "done.json", json.dumps(metrics))
    return metrics


def _count_call(cfg) -> None:
    with open(Path(cfg.run_dir) / "calls.txt", "a") as f:
        f.write(os.environ["AION_PIPELINE_PHASE"] + "\n")


def record_phase(cfg) -> dict:
    """Records its process, the CPUs Ray granted it, its torch thread count and its times."""
    import logging

    import ray
    import torch

    _count_call(cfg)
    name = os.environ["AION_PIPELINE_PHASE"]
    logging.getLogger("aion_train.train").info("PROGRESS-LINE-%s", name)  # reaches the phase log
    t0 = time.time()
    time.sleep(0.3)
    return _finish(
        cfg,
        {
            f"{name}_pid": os.getpid(),
            f"{name}_start": t0,
            f"{name}_end": time.time(),
            f"{name}_cpus": ray.get_runtime_context().get_assigned_resources().get("CPU"),
            f"{name}_threads": torch.get_num_threads(),
            f"{name}_cwd": os.getcwd(),
            f"{name}_gcs": ray.get_runtime_context().gcs_address,
        },
    )


def allreduce_phase(cfg) -> dict:
    """2 gloo ranks: all-reduce (rank + 1) and all-gather the PIDs; rank 0 writes done.json."""
    import torch
    import torch.distributed as dist

    _count_call(cfg)
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    try:
        t = torch.tensor([float(dist.get_rank() + 1)])
        dist.all_reduce(t)
        pids = [None] * dist.get_world_size()
        dist.all_gather_object(pids, (os.getpid(), int(os.environ["LOCAL_RANK"])))
        out = {"allreduce_sum": t.item(), "allreduce_world": dist.get_world_size(), "allreduce_pids": pids}
        if dist.get_rank() == 0:
            _finish(cfg, out)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    return out


def flaky_phase(cfg) -> dict:
    """Fails with a marker in its log until {run_dir}/fixed exists."""
    _count_call(cfg)
    print("flaky phase: checking the fixed marker", flush=True)
    if not (Path(cfg.run_dir) / "fixed").exists():
        print("DIAGNOSTIC-LINE-7f3a the input is not ready", flush=True)
        raise ValueError("boom-7f3a: input not ready")
    return _finish(cfg, {"flaky_ok": True})


def blocking_phase(cfg) -> dict:
    """Marks that it started, then waits until {run_dir}/release exists."""
    _count_call(cfg)
    (Path(cfg.run_dir) / f"started.{os.getpid()}").write_text("")
    while not (Path(cfg.run_dir) / "release").exists():
        time.sleep(0.2)
    return _finish(cfg, {"blocking_ok": True})


# -- helpers -------------------------------------------------------------------------------------
def _cfg(run_dir: Path, phases: list[str], extra: dict, **pipeline):
    return load_config(
        None,
        [
            f"run_dir={run_dir}",
            f"pipeline.phases={json.dumps(phases)}",
            f"pipeline.extra={json.dumps(extra)}",
            "pipeline.log_tail_lines=10",
        ]
        + [f"pipeline.{k}={json.dumps(v)}" for k, v in pipeline.items()],
    )


def _fn(name: str) -> str:
    return f"{MOD}:{name}"


def _calls(run_dir: Path) -> list[str]:
    p = run_dir / "calls.txt"
    return p.read_text().split() if p.exists() else []


def _alive(pids) -> list[int]:
    out = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.NoSuchProcess:
            pass
    return out


def _wait_gone(pids, timeout_s: float = 40.0) -> list[int]:
    deadline = time.time() + timeout_s
    while _alive(pids) and time.time() < deadline:
        time.sleep(0.2)
    return _alive(pids)


class Descendants(threading.Thread):
    """Collects every descendant PID of a process while it runs (the private cluster's)."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.pids, self.stop = pid, set(), threading.Event()

    def run(self):
        while not self.stop.is_set():
            try:
                self.pids.update(c.pid for c in psutil.Process(self.pid).children(recursive=True))
            except psutil.Error:
                pass
            time.sleep(0.1)


@pytest.fixture(scope="module")
def cluster():
    c = LocalCluster(num_cpus=2, object_store_mb=128, env=ENV).start()
    yield c
    left = c.stop()
    assert left == [] and _wait_gone(c.seen_pids(), 10) == []


# -- tests ---------------------------------------------------------------------------------------
def test_config_errors_name_the_key():
    with pytest.raises(ConfigError) as e:
        _cfg(
            Path("/tmp/x"),
            ["sft", "nope"],
            {"bad": {"fn": "no_colon", "world_size": 0}},
            resources={"rm": {"num_cpus": -1, "gpus": 1}},
        )
    msg = "\n".join(e.value.errors)
    for needle in (
        "pipeline.phases: unknown phase 'nope'",
        "pipeline.extra.bad.fn='no_colon'",
        "pipeline.extra.bad.world_size=0",
        "pipeline.resources.rm.num_cpus=-1",
        "pipeline.resources.rm.gpus: unknown key",
    ):
        assert needle in msg, msg
    with pytest.raises(ConfigError, match=r"pipeline.resources.sft: 2 rank\(s\) x 1 CPUs exceed .*num_cpus=1"):
        _cfg(Path("/tmp/x"), ["sft"], {}, num_cpus=1, resources={"sft": {"num_cpus": 1, "world_size": 2}})
    assert [(ph.name, ph.world_size) for ph in pipeline_phases(load_config("configs/pipeline_tiny.yaml"))] == [
        ("sft", 2),
        ("rm", 2),
        ("ppo", 2),
        ("build-index", 1),
        ("build-policy", 1),
    ]


def test_the_rag_pipeline_config_and_its_file_writing_phase(tmp_path):
    """configs/pipeline_rag_tiny.yaml: its phases in order; the SFT / PPO files it names are
    written by its open-book-data phase, so they are checked when those phases start (and the
    same files are checked up front without that phase); bad open-book keys are named."""
    from aion_train.posttrain.user_data import UserDataError, check_phase_files, checkable_now

    cfg = load_config("configs/pipeline_rag_tiny.yaml")
    assert [ph.name for ph in pipeline_phases(cfg)] == ["build-index", "open-book-data", "sft", "ppo", "eval-open-book"]
    assert checkable_now(cfg, ("sft", "ppo")) == ()
    check_phase_files(cfg, checkable_now(cfg, ("sft", "ppo")))  # nothing to read yet: no error
    alone = load_config(
        "configs/pipeline_rag_tiny.yaml",
        [
            "pipeline.phases=[sft,ppo]",
            f"sft.train_files=[{tmp_path}/sft.jsonl]",
            f"ppo.prompt_files=[{tmp_path}/p.jsonl]",
        ],
    )
    assert checkable_now(alone, ("sft", "ppo")) == ("sft", "ppo")
    with pytest.raises(UserDataError, match="sft.train_files: .* matches no file"):
        check_phase_files(alone, checkable_now(alone, ("sft", "ppo")))
    with pytest.raises(ConfigError) as e:
        load_config(
            "configs/pipeline_rag_tiny.yaml",
            ["pipeline.index_chunk_overlap=300", "pipeline.open_book_k=0", "pipeline.open_book_models=[rm]"],
        )
    msg = "\n".join(e.value.errors)
    for needle in (
        "pipeline.index_chunk_chars=200, index_chunk_overlap=300",
        "open_book_k=0",
        "open_book_models=['rm']",
    ):
        assert needle in msg, msg


def test_job_entrypoint(tmp_path):
    import shlex

    from aion_train.pipeline.submit import build_entrypoint

    conf = tmp_path / "my dir" / "p.yaml"
    cmd = build_entrypoint(str(conf), ["sft.steps=3"], True, cwd=str(tmp_path))
    assert shlex.split(cmd) == [
        "cd",
        str(tmp_path),
        "&&",
        "aion-train",
        "pipeline",
        "--config",
        str(conf),
        "--json",
        "sft.steps=3",
    ]
    cmd = build_entrypoint(str(conf), [], False, working_dir=str(tmp_path))
    assert shlex.split(cmd) == ["aion-train", "pipeline", "--config", os.path.join("my dir", "p.yaml")]
    with pytest.raises(ValueError, match="outside --working-dir"):
        build_entrypoint("/etc/p.yaml", [], False, working_dir=str(tmp_path))


def test_phases_run_in_order_with_their_resources(cluster, tmp_path):
    extra = {
        "first": {"fn": _fn("record_phase"), "num_cpus": 2},
        "second": {"fn": _fn("record_phase"), "num_cpus": 1},
        "dist": {"fn": _fn("allreduce_phase"), "num_cpus": 1, "world_size": 2},
    }
    lines: list[dict] = []
    code = run_pipeline(_cfg(tmp_path, ["first", "second", "dist"], extra), cluster.gcs_address, lines.append)
    assert code == 0, lines
    assert [x.get("phase") for x in lines] == ["first", "second", "dist", None]
    m = lines[-1]
    assert m["status"] == "ok" and m["phases"] == {"first": "done", "second": "done", "dist": "done"}
    # order, own worker processes, the CPUs Ray granted and the threads torch was given
    assert m["first_end"] <= m["second_start"]
    assert len({m["first_pid"], m["second_pid"], os.getpid()}) == 3
    assert (m["first_cpus"], m["first_threads"]) == (2.0, 2)
    assert (m["second_cpus"], m["second_threads"]) == (1.0, 1)
    assert m["first_cwd"] == os.getcwd() and m["first_gcs"] == cluster.gcs_address
    # torch.distributed across two Ray actors: 1 + 2 = 3, two distinct processes
    dist_line = lines[2]["metrics"]
    assert dist_line["allreduce_sum"] == 3.0 and dist_line["allreduce_world"] == 2
    pids = [p for p, _ in dist_line["allreduce_pids"]]
    assert len(set(pids)) == 2 and os.getpid() not in pids
    assert sorted(lr for _, lr in dist_line["allreduce_pids"]) == [0, 1]
    assert (tmp_path / "logs" / "dist.log").is_file() and (tmp_path / "logs" / "dist.rank1.log").is_file()
    assert "aion_train.train PROGRESS-LINE-first" in (tmp_path / "logs" / "first.log").read_text()
    # a rerun skips every finished phase without running anything
    lines2: list[dict] = []
    assert run_pipeline(_cfg(tmp_path, ["first", "second", "dist"], extra), cluster.gcs_address, lines2.append) == 0
    assert [x["status"] for x in lines2[:-1]] == ["skipped"] * 3
    assert sorted(_calls(tmp_path)) == ["dist", "dist", "first", "second"]


def test_failure_reports_log_tail_and_rerun_resumes(cluster, tmp_path):
    extra = {"a": {"fn": _fn("record_phase")}, "flaky": {"fn": _fn("flaky_phase")}, "c": {"fn": _fn("record_phase")}}
    cfg = _cfg(tmp_path, ["a", "flaky", "c"], extra)
    lines: list[dict] = []
    assert run_pipeline(cfg, cluster.gcs_address, lines.append) == 1
    failed = lines[1]
    assert failed["phase"] == "flaky" and failed["status"] == "failed"
    assert "ValueError: boom-7f3a" in failed["error"]
    assert "DIAGNOSTIC-LINE-7f3a" in failed["log_tail"] and "Traceback" in failed["log_tail"]
    assert failed["log"] == str(tmp_path / "logs" / "flaky.log")
    assert lines[-1]["status"] == "failed" and lines[-1]["phases"] == {"a": "done", "flaky": "failed"}
    assert _calls(tmp_path) == ["a", "flaky"]  # c never started
    (tmp_path / "fixed").write_text("")
    lines = []
    assert run_pipeline(_cfg(tmp_path, ["a", "flaky", "c"], extra), cluster.gcs_address, lines.append) == 0
    assert [x["status"] for x in lines[:-1]] == ["skipped", "done", "done"]
    assert _calls(tmp_path) == ["a", "flaky", "flaky", "c"]


def test_local_cluster_processes_are_gone_after_stop():
    c = LocalCluster(num_cpus=1, object_store_mb=100, env=ENV).start()
    try:
        import ray

        from aion_train.pipeline.runner import connect

        connect(c.gcs_address)
        worker_pid = ray.get(ray.remote(lambda: os.getpid()).remote())
        assert ray.nodes()[0]["NodeManagerAddress"] == "127.0.0.1"
        pids = c.pids()
        ray.shutdown()
        assert worker_pid in pids and c.proc.pid in pids and len(pids) > 5
    finally:
        assert c.stop() == []
    assert _wait_gone(c.seen_pids(), 10) == []
    assert not Path(c.temp_dir).exists()


def _write_yaml(path: Path, run_dir: Path, phases: list[str], extra: dict, **pipeline) -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "run_dir": str(run_dir),
                "pipeline": {"phases": phases, "extra": extra, "num_cpus": 2, "object_store_mb": 128, **pipeline},
            }
        )
    )
    return path


def _cli(*args) -> list[str]:
    return [sys.executable, "-m", "aion_train.cli", "pipeline", *args]


@pytest.mark.slow
def test_killed_driver_resumes_without_rerunning_finished_phases(tmp_path):
    """SIGTERM, then SIGKILL, to the driver while a phase runs: the private cluster's processes
    are all gone each time (by PID), and the rerun redoes neither finished phase."""
    extra = {"a": {"fn": _fn("record_phase")}, "block": {"fn": _fn("blocking_phase")}, "c": {"fn": _fn("record_phase")}}
    conf = _write_yaml(tmp_path / "p.yaml", tmp_path / "run", ["a", "block", "c"], extra)
    run = tmp_path / "run"
    env = {**os.environ, **ENV}
    for sig in (signal.SIGTERM, signal.SIGKILL):
        proc = subprocess.Popen(
            _cli("--config", str(conf), "--json"),
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        watch = Descendants(proc.pid)
        watch.start()
        deadline = time.time() + 120
        n_started = _calls(run).count("block")
        while _calls(run).count("block") == n_started and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert _calls(run).count("block") == n_started + 1, proc.communicate()
        time.sleep(0.5)
        proc.send_signal(sig)
        proc.wait(timeout=60)
        watch.stop.set()
        watch.join()
        assert len(watch.pids) > 5
        assert _wait_gone(watch.pids) == [], f"after {sig.name}"
    assert _calls(run) == ["a", "block", "block"]
    (run / "release").write_text("")
    out = subprocess.run(
        _cli("--config", str(conf), "--json"), env=env, cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [json.loads(x) for x in out.stdout.splitlines()]
    assert [x.get("status") for x in lines] == ["skipped", "done", "done", "ok"]
    assert _calls(run) == ["a", "block", "block", "block", "c"]


@pytest.mark.slow
def test_submit_with_address_and_ray_job_submit(cluster, tmp_path):
    """`aion-train pipeline --address URL` (JobSubmissionClient) against the test's head node
    runs the phases as a Ray job; `ray job submit -- aion-train pipeline ...` reruns it and
    skips them all."""
    extra = {"a": {"fn": _fn("record_phase")}, "dist": {"fn": _fn("allreduce_phase"), "num_cpus": 1, "world_size": 2}}
    run = tmp_path / "run"
    conf = _write_yaml(tmp_path / "p.yaml", run, ["a", "dist"], extra)
    env = {**os.environ, **ENV}
    out = subprocess.run(
        _cli("--config", str(conf), "--json", "--address", cluster.dashboard_url),
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [json.loads(x) for x in out.stdout.splitlines()]
    assert [x.get("phase") for x in lines] == ["a", "dist", None]
    assert lines[-1]["status"] == "ok" and lines[-1]["allreduce_sum"] == 3.0
    assert "submitted Ray job" in out.stderr
    # the job's driver joined the head node instead of starting a cluster of its own
    assert lines[0]["metrics"]["a_gcs"] == cluster.gcs_address
    cli = subprocess.run(
        [
            "ray",
            "job",
            "submit",
            "--address",
            cluster.dashboard_url,
            "--",
            "aion-train",
            "pipeline",
            "--config",
            str(conf),
            "--json",
        ],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert cli.returncode == 0, cli.stdout[-3000:] + cli.stderr[-3000:]
    rerun = [json.loads(x) for x in cli.stdout.splitlines() if x.startswith('{"')]
    assert [x.get("status") for x in rerun] == ["skipped", "skipped", "ok"]
    assert _calls(run) == ["a", "dist", "dist"]
