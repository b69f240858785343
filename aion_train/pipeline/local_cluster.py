"""A private Ray head node on loopback, started and stopped by PID.

`aion-train pipeline` without `--address` runs on a cluster of its own: `ray start --head
--block` in a new session (so the head and every daemon it forks share one process group),
bound to 127.0.0.1 with free ports for every listener, a small object store (Ray's default is
~30% of RAM in /dev/shm), usage stats off, a private temp dir, and `RAY_AUTH_MODE=disabled` so
the jobs API on the loopback dashboard needs no token. It is stopped by signalling that
process group (SIGTERM, then SIGKILL after a grace period) and every process recorded as
belonging to it; never with `ray stop`, which kills every Ray process on the machine.

A watchdog process (`python -m aion_train.pipeline.local_cluster watch ...`) also stops the
cluster if the process that started it dies without cleaning up (SIGKILL, OOM kill), so a
killed pipeline never leaves a head node behind.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

LOOPBACK = "127.0.0.1"


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port that is free on `host` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _group_members(pgid: int) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(p.pid) == pgid:
                out.append(p)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return out


def _members_and_descendants(pid: int) -> list[psutil.Process]:
    """The process group led by `pid` plus every descendant of `pid` (Ray may move workers
    into process groups of their own)."""
    found = {p.pid: p for p in _group_members(pid)}
    try:
        found.update({p.pid: p for p in psutil.Process(pid).children(recursive=True)})
    except psutil.Error:
        pass
    return list(found.values())


def kill_tree(pgid: int, tracked: list[psutil.Process], grace_s: float = 5.0) -> list[int]:
    """SIGTERM the process group `pgid` and the `tracked` processes, SIGKILL what is left after
    `grace_s`. Returns the PIDs that are still alive afterwards (should be empty)."""
    procs = {p.pid: p for p in tracked}
    procs.update({p.pid: p for p in _group_members(pgid)})
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        for p in procs.values():
            try:
                if _alive(p):
                    p.send_signal(sig)
            except psutil.Error:
                pass
        deadline = time.time() + (grace_s if sig == signal.SIGTERM else 5.0)
        while time.time() < deadline and any(_alive(p) for p in procs.values()):
            time.sleep(0.1)
        if not any(_alive(p) for p in procs.values()):
            break
    return [pid for pid, p in procs.items() if _alive(p)]


class LocalCluster:
    """A private single-node Ray cluster. Use as a context manager or call start()/stop().

    Attributes once started: `gcs_address` ("127.0.0.1:PORT", for `ray.init`),
    `dashboard_url` ("http://127.0.0.1:PORT", for the jobs API), `pid` (of `ray start`),
    `temp_dir`, and `pids()` (every process of the cluster seen so far)."""

    def __init__(
        self,
        num_cpus: int | None = None,
        object_store_mb: int = 256,
        env: dict | None = None,
        startup_timeout_s: float = 120.0,
        watch_pid: int | None = None,
    ):
        self.num_cpus = int(num_cpus or os.cpu_count() or 1)
        self.object_store_mb = int(object_store_mb)
        self.env = dict(env or {})
        self.startup_timeout_s = startup_timeout_s
        self.watch_pid = os.getpid() if watch_pid is None else watch_pid
        self.proc: subprocess.Popen | None = None
        self.watchdog: subprocess.Popen | None = None
        self._seen: dict[int, psutil.Process] = {}
        self.temp_dir = ""
        self.gcs_address = ""
        self.dashboard_url = ""

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    # -- start ------------------------------------------------------------------------------
    def command(self, port: int, dashboard_port: int) -> list[str]:
        ports = {
            "--ray-client-server-port": free_port(),
            "--dashboard-agent-listen-port": free_port(),
            "--dashboard-agent-grpc-port": free_port(),
            "--runtime-env-agent-port": free_port(),
            "--metrics-export-port": free_port(),
            "--node-manager-port": free_port(),
            "--object-manager-port": free_port(),
        }
        cmd = [
            shutil.which("ray") or "ray",
            "start",
            "--head",
            "--block",
            "--port",
            str(port),
            "--node-ip-address",
            LOOPBACK,
            "--num-cpus",
            str(self.num_cpus),
            "--object-store-memory",
            str(self.object_store_mb * 1024 * 1024),
            "--disable-usage-stats",
            "--temp-dir",
            self.temp_dir,
            "--include-dashboard",
            "true",
            "--dashboard-host",
            LOOPBACK,
            "--dashboard-port",
            str(dashboard_port),
            # workers bind random free ports (not 10002-19999, shared with other clusters)
            "--min-worker-port",
            "0",
            "--max-worker-port",
            "0",
        ]
        for flag, value in ports.items():
            cmd += [flag, str(value)]
        return cmd

    def start(self) -> LocalCluster:
        if self.proc is not None:
            raise RuntimeError("this LocalCluster is already started")
        # Short path: Ray puts Unix sockets under it (107-byte limit).
        self.temp_dir = tempfile.mkdtemp(prefix="aion-ray-", dir="/tmp")
        port, dashboard_port = free_port(), free_port()
        env = dict(os.environ)
        env.update(
            {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
        )
        env.pop("RAY_ADDRESS", None)
        env.update(self.env)
        log = open(Path(self.temp_dir) / "ray_start.log", "wb")
        self.proc = subprocess.Popen(
            self.command(port, dashboard_port),
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()
        self.gcs_address = f"{LOOPBACK}:{port}"
        self.dashboard_url = f"http://{LOOPBACK}:{dashboard_port}"
        self._start_watchdog()
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _start_watchdog(self) -> None:
        if not self.watch_pid:
            return
        cmd = [
            sys.executable,
            "-m",
            "aion_train.pipeline.local_cluster",
            "watch",
            str(self.watch_pid),
            str(self.proc.pid),
            self.temp_dir,
        ]
        self.watchdog = subprocess.Popen(
            cmd, start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

    def _wait_ready(self) -> None:
        """Ready when the dashboard's job API answers (the GCS and raylet come up before it)."""
        import urllib.request

        deadline = time.time() + self.startup_timeout_s
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited with code {self.proc.returncode}:\n" + self.start_log()[-3000:])
            self.pids()
            try:
                with urllib.request.urlopen(self.dashboard_url + "/api/version", timeout=2) as r:
                    if r.status == 200 and self._raylet_up():
                        return
            except OSError:
                pass
            time.sleep(0.5)
        raise TimeoutError(
            f"the Ray head did not come up within {self.startup_timeout_s:.0f} s:\n" + self.start_log()[-3000:]
        )

    def _raylet_up(self) -> bool:
        for pid in self.pids():
            try:
                if psutil.Process(pid).name() == "raylet":
                    return True
            except psutil.Error:
                continue
        return False

    def start_log(self) -> str:
        try:
            return (Path(self.temp_dir) / "ray_start.log").read_text(errors="replace")
        except OSError:
            return ""

    # -- bookkeeping ----------------------------------------------------------------------
    def pids(self) -> list[int]:
        """Every live process of this cluster: the `ray start` process group and its
        descendants (workers included). Also remembered, so that stop() can check them."""
        if self.proc is None:
            return []
        found = _members_and_descendants(self.proc.pid)
        for p in found:
            self._seen.setdefault(p.pid, p)
        return sorted(p.pid for p in found if _alive(p))

    def seen_pids(self) -> list[int]:
        return sorted(self._seen)

    # -- stop -----------------------------------------------------------------------------
    def stop(self, grace_s: float = 5.0) -> list[int]:
        """Stop every process of the cluster by PID; returns the PIDs still alive (none)."""
        if self.proc is None:
            return []
        self.pids()
        left = kill_tree(self.proc.pid, list(self._seen.values()), grace_s)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        if self.watchdog is not None:
            if self.watchdog.poll() is None:
                self.watchdog.kill()
            self.watchdog.wait(timeout=10)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        return left

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def watch(owner_pid: int, head_pid: int, temp_dir: str, poll_s: float = 0.5) -> int:
    """Stop the cluster whose `ray start` has PID `head_pid` (and remove its `temp_dir`) once
    `owner_pid` is gone, or exit quietly when the cluster is already gone (its owner stopped
    it)."""
    try:
        owner = psutil.Process(owner_pid)
        head = psutil.Process(head_pid)
    except psutil.NoSuchProcess:
        return 0
    tracked: dict[int, psutil.Process] = {}
    while _alive(head):
        for p in _members_and_descendants(head_pid):
            tracked.setdefault(p.pid, p)
        if not _alive(owner):
            kill_tree(head_pid, list(tracked.values()))
            shutil.rmtree(temp_dir, ignore_errors=True)
            return 0
        time.sleep(poll_s)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "watch":
        sys.exit(watch(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]))
    print("usage: python -m aion_train.pipeline.local_cluster watch OWNER_PID HEAD_PID TEMP_DIR", file=sys.stderr)
    sys.exit(2)
