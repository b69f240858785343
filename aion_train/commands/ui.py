"""aion-train ui [--run-dir DIR | --backend-store-uri URI] [--port 5000]

Starts a lean `mlflow server` (1 worker, no job runner, telemetry off) bound to
127.0.0.1 on a run folder's store and keeps it in the foreground until Ctrl-C.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path


def add_arguments(p):
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--run-dir",
        default=None,
        help="run folder whose sqlite store (<run-dir>/mlflow.db) to show "
        "(default: $MLFLOW_TRACKING_URI if it is a database, else runs/default)",
    )
    src.add_argument(
        "--backend-store-uri", default=None, help="any MLflow backend store URI, e.g. sqlite:////abs/path/mlflow.db"
    )
    p.add_argument("--port", type=int, default=5000, help="port on 127.0.0.1 (default 5000)")
    p.add_argument(
        "--artifacts-dir", default=None, help="where uploads through this server go (default: next to the store)"
    )
    p.add_argument(
        "--startup-timeout", type=float, default=120.0, help="seconds to wait for the server to answer /health"
    )


def resolve_backend(args) -> tuple[str, Path]:
    """(backend store URI, artifacts folder) from the arguments."""
    if args.backend_store_uri:
        uri = args.backend_store_uri
    elif args.run_dir:
        uri = f"sqlite:///{Path(args.run_dir).resolve() / 'mlflow.db'}"
    else:
        env = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
        if env and not env.startswith(("http://", "https://", "databricks")):
            uri = env
        else:
            uri = f"sqlite:///{Path('runs/default').resolve() / 'mlflow.db'}"
    if args.artifacts_dir:
        artifacts = Path(args.artifacts_dir).resolve()
    elif uri.startswith("sqlite:///"):
        artifacts = Path(uri[len("sqlite:///") :].split("?", 1)[0]).resolve().parent / "mlartifacts"
    else:
        artifacts = Path("mlartifacts").resolve()
    return uri, artifacts


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def run(args) -> int:
    from aion_train.tracking.server import start_mlflow_server, stop_server

    uri, artifacts = resolve_backend(args)
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///") :].split("?", 1)[0])
        if not db.exists():
            print(f"note: {db} does not exist yet; MLflow will create an empty store", file=sys.stderr)
    print(f"starting mlflow server on 127.0.0.1:{args.port} (store {uri}) ...", flush=True)
    try:
        proc, url = start_mlflow_server(
            uri,
            port=args.port,
            artifacts_dir=artifacts,
            host="127.0.0.1",
            timeout=args.startup_timeout,
            foreground_output=True,
        )
    except (RuntimeError, TimeoutError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"MLflow UI: {url}   (Ctrl-C to stop)", flush=True)
    # SIGTERM to us (e.g. from a job scheduler) should stop the server too.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        return int(proc.wait() or 0)
    except KeyboardInterrupt:
        print("\nstopping mlflow server ...", flush=True)
        stop_server(proc)
        return 0
    finally:
        if proc.poll() is None:
            stop_server(proc)
