"""The pipeline driver: run the phases of `cfg.pipeline` in order on a Ray cluster.

A phase whose `done.json` exists is skipped (its metrics are reused); the others run as a Ray
task (one rank) or as an actor group of N ranks in one placement group (N x num_cpus CPUs,
gang-scheduled) that form a torch.distributed group. A failure stops the pipeline and is
reported with the tail of the phase's log; the next run skips what finished and resumes there.
`emit` receives one dict per phase and a last one with the gathered metrics
({"sft_accuracy", "rm_pair_accuracy", "ppo_accuracy", "ppo_kl", ...}).

Where it runs: `connect=ADDR` joins an existing cluster (inside `ray job submit`, Ray sets
RAY_ADDRESS and the driver joins that cluster); otherwise a private loopback cluster
(local_cluster.LocalCluster) is started when the first phase needs it and stopped by PID.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from aion_train.config.pipeline_schema import Phase, pipeline_phases
from aion_train.process_env import set_env

from .local_cluster import LocalCluster
from .phases import read_done
from .worker import phase_log_path

LOOPBACK_HOSTS = ("127.0.0.1", "localhost")


class PhaseFailed(RuntimeError):
    def __init__(self, phase: Phase, error: str, log: Path | None):
        self.phase, self.error, self.log = phase, error, log
        super().__init__(f"phase {phase.name} failed: {error}")


def log_tail(path: Path | None, lines: int) -> str:
    """The last `lines` lines of a log file ('' when there is none)."""
    if path is None or not path.is_file():
        return ""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - 256 * 1024))
        text = f.read().decode("utf-8", errors="replace")
    return "\n".join(text.splitlines()[-lines:])


def env_address() -> str | None:
    """The cluster a Ray job's driver runs in (Ray sets RAY_ADDRESS to its GCS address)."""
    addr = os.environ.get("RAY_ADDRESS", "").strip()
    return addr if addr and not addr.startswith(("http://", "https://")) else None


def connect(address: str) -> None:
    """ray.init on an existing cluster. On loopback, Ray must not swap 127.0.0.1 for the host's
    routable address (the head listens on 127.0.0.1 only)."""
    host = address.rsplit(":", 1)[0]
    if host in LOOPBACK_HOSTS:
        set_env({"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"})
    import logging

    import ray
    from ray._private import ray_constants

    if host in LOOPBACK_HOSTS:
        ray_constants.ENABLE_RAY_CLUSTER = False  # read at call time; env read at import time
    ray.init(
        address=address,
        namespace="aion-pipeline",
        log_to_driver=False,
        logging_level=logging.WARNING,
        configure_logging=True,
    )


class RaySession:
    """Ray for the pipeline, set up on first use: join `address`, or start a private cluster."""

    def __init__(self, cfg, address: str | None, cluster_env: dict | None = None):
        self.cfg, self.address, self.cluster_env = cfg, address, cluster_env
        self.cluster: LocalCluster | None = None
        self.started = False

    def ensure(self) -> None:
        if self.started:
            return
        self.started = True
        address = self.address
        if address is None:
            p = self.cfg.pipeline
            self.cluster = LocalCluster(
                p.num_cpus or None, p.object_store_mb, env=self.cluster_env, startup_timeout_s=p.startup_timeout_s
            ).start()
            address = self.cluster.gcs_address
        connect(address)

    def close(self) -> list[int]:
        """Disconnect and stop the private cluster; returns PIDs left alive (none expected)."""
        import ray

        if ray.is_initialized():
            ray.shutdown()
        return self.cluster.stop() if self.cluster is not None else []


def _cluster_cpus() -> float:
    import ray

    return float(ray.cluster_resources().get("CPU", 0))


def run_phase(phase: Phase, cfg_dict: dict, cwd: str, timeout_s: float) -> dict:
    """Run one phase on the connected cluster; its metrics, or PhaseFailed."""
    import ray
    from ray.exceptions import GetTimeoutError, RayError
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from .worker import PhaseRank, phase_task

    total = _cluster_cpus()
    if phase.total_cpus > total:
        raise PhaseFailed(
            phase,
            f"needs {phase.world_size} x {phase.num_cpus} CPUs but the cluster has "
            f"{total:g}; lower pipeline.resources.{phase.name}",
            None,
        )
    spec = phase.to_dict()
    if phase.world_size == 1:
        refs = [phase_task.options(num_cpus=phase.num_cpus, name=f"phase:{phase.name}").remote(spec, cfg_dict, cwd)]
        return _wait(phase, refs, [], timeout_s, cfg_dict["run_dir"])[0]

    pg = placement_group([{"CPU": phase.num_cpus}] * phase.world_size, strategy="PACK")
    actors: list = []
    try:
        ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
        if not ready:
            raise PhaseFailed(
                phase, f"could not reserve {phase.world_size} x {phase.num_cpus} CPUs within {timeout_s:.0f} s", None
            )
        actors = [
            PhaseRank.options(
                num_cpus=phase.num_cpus,
                name=None,
                scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=r),
            ).remote()
            for r in range(phase.world_size)
        ]
        try:
            where = ray.get([a.address.remote() for a in actors], timeout=timeout_s)
        except (RayError, GetTimeoutError) as e:
            raise PhaseFailed(phase, f"its actors did not start: {_short_error(e)}", None) from None
        master_addr, master_port = where[0][0], where[0][1]
        nodes = [w[2] for w in where]
        refs = []
        for r, actor in enumerate(actors):
            local = [i for i, n in enumerate(nodes) if n == nodes[r]]
            env = {
                "RANK": r,
                "WORLD_SIZE": phase.world_size,
                "LOCAL_RANK": local.index(r),
                "LOCAL_WORLD_SIZE": len(local),
                "MASTER_ADDR": master_addr,
                "MASTER_PORT": master_port,
            }
            refs.append(actor.run.remote(spec, cfg_dict, cwd, env))
        results = _wait(phase, refs, actors, timeout_s, cfg_dict["run_dir"])
    finally:
        for a in actors:
            ray.kill(a)
        remove_placement_group(pg)
    differ = sorted(
        {
            k
            for r in results[1:]
            for k in set(r) | set(results[0])
            if "seconds" not in k and r.get(k) != results[0].get(k)
        }
    )
    if differ:  # SPMD phases return the same metrics on every rank; timings may differ
        print(
            f"pipeline: warning: the ranks of {phase.name} returned different {', '.join(differ)}; using rank 0's",
            file=sys.stderr,
            flush=True,
        )
    return results[0]


def _wait(phase: Phase, refs: list, actors: list, timeout_s: float, run_dir: str) -> list[dict]:
    """All results in rank order; on the first failure (or the timeout) the other ranks are
    killed at once instead of waiting in a collective for a peer that is gone."""
    import ray
    from ray.exceptions import RayError

    deadline = time.time() + timeout_s
    index = {ref: i for i, ref in enumerate(refs)}
    results: list = [None] * len(refs)
    pending = list(refs)
    while pending:
        left = deadline - time.time()
        done, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, min(left, 5.0)))
        for ref in done:
            try:
                results[index[ref]] = ray.get(ref)
            except RayError as e:
                _kill(pending, actors)
                rank = index[ref]
                raise PhaseFailed(
                    phase, f"rank {rank}: {_short_error(e)}", phase_log_path(run_dir, phase.name, rank)
                ) from None
        if pending and time.time() >= deadline:
            _kill(pending, actors)
            raise PhaseFailed(
                phase,
                f"timed out after {timeout_s:.0f} s (pipeline.phase_timeout_s)",
                phase_log_path(run_dir, phase.name, 0),
            )
    return results


def _kill(refs: list, actors: list) -> None:
    import ray

    for a in actors:
        ray.kill(a)
    for ref in refs:
        try:
            ray.cancel(ref, force=True)
        except Exception:  # noqa: BLE001 - already finished or gone
            pass


def _short_error(e: BaseException) -> str:
    """The last line of a Ray error (the original exception), not its whole traceback."""
    cause = getattr(e, "cause", None)
    if cause is not None and not isinstance(cause, type(e)):
        return f"{type(cause).__name__}: {cause}".strip().splitlines()[-1][:500]
    lines = [x for x in str(e).strip().splitlines() if x.strip()]
    return (lines[-1] if lines else type(e).__name__)[:500]


def summarize(phases: list[Phase], metrics: dict, statuses: dict, run_dir: str, seconds: float) -> dict:
    """The last line: every phase's scalar metrics (and lists of scalars, e.g. `modalities`)
    in phase order (a later phase's value wins, so PPO's re-measured sft_accuracy on its
    held-out prompts is the one compared with ppo_accuracy), then the pipeline's own keys."""
    scalar = lambda v: isinstance(v, (int, float, str, bool)) or v is None  # noqa: E731
    out: dict = {}
    for ph in phases:
        for k, v in (metrics.get(ph.name) or {}).items():
            if k != "seconds" and (scalar(v) or (isinstance(v, list) and all(scalar(x) for x in v))):
                out[k] = v
    ok = all(s in ("done", "skipped") for s in statuses.values()) and len(statuses) == len(phases)
    out.update(
        {
            "status": "ok" if ok else "failed",
            "phases": statuses,
            "run_dir": run_dir,
            "pipeline_seconds": round(seconds, 1),
        }
    )
    return out


def run_pipeline(
    cfg, connect_address: str | None = None, emit: Callable[[dict], None] = print, cluster_env: dict | None = None
) -> int:
    """Run (or resume) the pipeline; 0 when every phase finished, 1 when one failed."""
    from aion_train.config import config_to_dict

    t_start = time.time()
    cfg.run_dir = str(Path(cfg.run_dir).resolve())
    phases = pipeline_phases(cfg)
    cfg_dict = config_to_dict(cfg)
    cwd = os.getcwd()
    tail_lines = cfg.pipeline.log_tail_lines
    session = RaySession(cfg, connect_address or env_address(), cluster_env)
    metrics: dict = {}
    statuses: dict = {}
    try:
        for ph in phases:
            base = {"phase": ph.name, "world_size": ph.world_size, "num_cpus": ph.num_cpus}
            done = read_done(ph, cfg.run_dir)
            if done is not None:
                metrics[ph.name], statuses[ph.name] = done, "skipped"
                emit({**base, "status": "skipped", "seconds": 0.0, "metrics": done})
                continue
            t0 = time.time()
            try:
                try:
                    session.ensure()
                except (RuntimeError, TimeoutError, OSError, ConnectionError) as e:
                    raise PhaseFailed(ph, f"could not start or join the Ray cluster: {e}", None) from None
                run_phase(ph, cfg_dict, cwd, cfg.pipeline.phase_timeout_s)
                done = read_done(ph, cfg.run_dir)
                if done is None:
                    raise PhaseFailed(
                        ph,
                        f"returned without writing {ph.done_path(cfg.run_dir)}",
                        phase_log_path(cfg.run_dir, ph.name),
                    )
            except PhaseFailed as e:
                statuses[ph.name] = "failed"
                emit(
                    {
                        **base,
                        "status": "failed",
                        "seconds": round(time.time() - t0, 1),
                        "error": e.error,
                        "log": str(e.log) if e.log else None,
                        "log_tail": log_tail(e.log, tail_lines),
                    }
                )
                break
            metrics[ph.name], statuses[ph.name] = done, "done"
            emit({**base, "status": "done", "seconds": round(time.time() - t0, 1), "metrics": done})
    finally:
        left = session.close()
        if left:
            emit({"warning": f"processes of the private Ray cluster still alive: {left}"})
    summary = summarize(phases, metrics, statuses, cfg.run_dir, time.time() - t_start)
    emit(summary)
    return 0 if summary["status"] == "ok" else 1
