"""The same FastAPI app as a Ray Serve deployment (`aion-train serve --ray --replicas N`).

`application(args, replicas, num_cpus)` is a Ray Serve application whose ingress is built on
each replica by `serve.ingress` from a builder function: the replica loads the checkpoint,
the policy bundle, the API keys and its audit log with `build_server` from the same
arguments as a single-process server, starts its engine (and policy watcher), and serves
`create_app`'s routes unchanged behind Ray Serve's HTTP proxy. Every response carries
`x-aion-replica` (the Ray Serve replica id).

Per replica, not shared: the engine and its batches, `/metrics` (the proxy picks a replica
per request), the policy watcher (each polls the same bundle file, so a changed file reaches
every replica within one poll interval; `POST /admin/reload` reaches the one replica the proxy
picks), and the audit log: one hash chain per file, so replica r writes `LOG` with its id
before the suffix (`audit.<replica>.jsonl`), each verified on its own.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

# the `serve` arguments a replica needs (everything but where and how to listen)
SERVER_FIELDS = (
    "checkpoint",
    "tokenizer",
    "dtype",
    "model_name",
    "policy",
    "api_key_file",
    "audit_log",
    "index",
    "k",
    "max_batch",
    "threads",
    "engine",
    "max_body_bytes",
    "policy_poll",
    "allow_unauthenticated_admin",
)


def replica_log_path(path: str, replica: str) -> str:
    p = Path(path)
    safe = "".join(c if c.isalnum() or c in "-_" else "-" for c in replica)
    return str(p.with_name(f"{p.stem}.{safe}{p.suffix or '.jsonl'}"))


def _replica_id() -> str:
    from ray import serve

    try:
        return str(serve.get_replica_context().replica_tag)
    except Exception:  # noqa: BLE001 - outside a replica (tests of the builder)
        return f"pid{os.getpid()}"


def application(args, replicas: int, num_cpus: float):
    """A bound Ray Serve application of `replicas` replicas, `num_cpus` CPUs each."""
    from ray import serve

    fields = {k: getattr(args, k, None) for k in SERVER_FIELDS}
    for k, v in (("k", 3), ("max_batch", 8), ("max_body_bytes", 1 << 20), ("policy_poll", 2.0)):
        if fields[k] is None:
            fields[k] = v

    def build_app():
        from aion_train.serve.server import build_server

        replica = _replica_id()
        ns = argparse.Namespace(**fields)
        if ns.audit_log:
            ns.audit_log = replica_log_path(ns.audit_log, replica)
        app, service, audit = build_server(ns)
        service.start()

        @app.middleware("http")
        async def _replica_header(request, call_next):
            resp = await call_next(request)
            resp.headers["x-aion-replica"] = replica
            return resp

        def _stop():
            service.stop()
            if audit is not None:
                audit.close()

        app.router.add_event_handler("shutdown", _stop)
        return app

    ingress = serve.ingress(build_app)()
    dep = serve.deployment(
        ingress,
        name="aion-serve",
        num_replicas=int(replicas),
        ray_actor_options={"num_cpus": float(num_cpus)},
        max_ongoing_requests=64,
    )
    return dep.bind()
