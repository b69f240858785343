"""Start and stop a lean local `mlflow server` (used by `aion-train ui` and the tests).

Lean settings: one worker and no job runner (a fraction of the default server's memory;
docs/notes.md), bound to 127.0.0.1, telemetry off. The server runs in
its own process group so that `stop_server` stops it and its worker together, by PID.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

# urllib without any proxy: the server is always on loopback.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the usual bind-to-0 trick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def server_env(base: dict | None = None) -> dict:
    env = dict(os.environ if base is None else base)
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    # A client-side tracking URI would not affect the server, but keep the child clean.
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def server_command(
    backend_uri: str, port: int, artifacts_dir: str | Path | None, host: str = "127.0.0.1", workers: int = 1
) -> list[str]:
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        backend_uri,
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        str(workers),
    ]
    if artifacts_dir is not None:
        cmd += ["--serve-artifacts", "--artifacts-destination", str(Path(artifacts_dir).resolve())]
    return cmd


def _tail(path: str | None, n: int = 4000) -> str:
    if not path:
        return ""
    try:
        return Path(path).read_text(errors="replace")[-n:]
    except OSError:
        return ""


def wait_for_health(url: str, timeout: float = 90.0, proc: subprocess.Popen | None = None) -> None:
    """Poll `<url>/health` until it answers 200; raise if `proc` dies or time runs out."""
    deadline = time.monotonic() + timeout
    last_err: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(
                f"mlflow server exited with code {proc.returncode} before it was ready:\n"
                + _tail(getattr(proc, "aion_log_path", None))
            )
        try:
            with _OPENER.open(url.rstrip("/") + "/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError) as e:  # not listening yet
            last_err = e
        time.sleep(0.3)
    raise TimeoutError(
        f"mlflow server at {url} not healthy after {timeout:.0f}s ({last_err})\n"
        + _tail(getattr(proc, "aion_log_path", None))
    )


def start_mlflow_server(
    backend_uri: str,
    port: int = 0,
    artifacts_dir: str | Path | None = None,
    host: str = "127.0.0.1",
    timeout: float = 90.0,
    workers: int = 1,
    log_path: str | Path | None = None,
    foreground_output: bool = False,
) -> tuple[subprocess.Popen, str]:
    """Start `mlflow server` and wait until `/health` answers. Returns (process, base URL).

    port=0 picks a free port. `artifacts_dir` turns on proxied artifact serving into that
    folder (clients then upload over HTTP). Server output goes to `log_path` (default: a
    temp file, path kept on `proc.aion_log_path`) unless `foreground_output` passes it
    through to this terminal. Stop it with `stop_server(proc)`.
    """
    if port == 0:
        port = free_port(host)
    elif port_in_use(port, host):
        raise RuntimeError(f"port {port} on {host} is already in use; pick another with --port")
    if artifacts_dir is not None:
        Path(artifacts_dir).mkdir(parents=True, exist_ok=True)
    if backend_uri.startswith("sqlite:///"):
        Path(backend_uri[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
    cmd = server_command(backend_uri, port, artifacts_dir, host=host, workers=workers)
    log_file = None
    if foreground_output:
        stdout = stderr = None
        log_name = None
    else:
        if log_path is None:
            fd, log_name = tempfile.mkstemp(prefix="mlflow-server-", suffix=".log")
            os.close(fd)
        else:
            log_name = str(log_path)
            Path(log_name).parent.mkdir(parents=True, exist_ok=True)
        log_file = open(log_name, "ab")
        stdout, stderr = log_file, subprocess.STDOUT
    try:
        proc = subprocess.Popen(
            cmd, env=server_env(), stdout=stdout, stderr=stderr, stdin=subprocess.DEVNULL, start_new_session=True
        )
    finally:
        if log_file is not None:
            log_file.close()  # the child holds its own descriptor
    proc.aion_log_path = log_name  # type: ignore[attr-defined]
    url = f"http://{host}:{port}"
    try:
        wait_for_health(url, timeout=timeout, proc=proc)
    except BaseException:
        stop_server(proc)
        raise
    return proc, url


def stop_server(proc: subprocess.Popen | None, timeout: float = 15.0) -> int | None:
    """SIGTERM the server's process group, SIGKILL it after `timeout`. Returns the exit code."""
    if proc is None:
        return None
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)  # start_new_session: pgid == pid
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=timeout)
    return proc.returncode
