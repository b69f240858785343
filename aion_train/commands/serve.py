"""aion-train serve --checkpoint C [--policy BUNDLE] [--host 127.0.0.1] [--port 8000]
    [--api-key-file F] [--audit-log FILE] [--max-batch N] [--json-logs]
    [--policy-poll SECONDS] [--allow-unauthenticated-admin] [--admin-token-file F]
    [--ray --replicas N [--num-cpus-per-replica X] [--ray-address HOST:PORT]]

An OpenAI-compatible HTTP server (FastAPI + uvicorn) for one checkpoint: GET /v1/models,
POST /v1/completions, POST /v1/chat/completions (streaming as server-sent events),
GET /health, GET /metrics. See aion_train/serve/openai_api.py for the API. A multimodal
checkpoint takes image / audio / video content parts in chat (serve/mm_prompt.py; base64 data
only, nothing is fetched); each item is encoded once per content hash (serve/media.py).

Binds 127.0.0.1 unless --host says otherwise. --api-key-file: one key per line (blank lines
and lines starting with # skipped); every request but /health then needs
`Authorization: Bearer KEY`. --policy: the bundle of `aion-train build-policy`; requests
pick a jurisdiction with the `jurisdiction` field or the X-Jurisdiction header, none means
the default policy, an unknown one is refused with 400. --audit-log: one hash-chained JSONL
record per request (`aion-train audit verify FILE` checks it).

--index DIR: an index folder (build-index) or a continual-memory folder (its memory.json);
requests may set `retrieval: {"k", "alpha", "mmr_lambda", "rerank"}` (rerank: the served
model's mean per-token log-likelihood of the prompt given each chunk reorders the best 2k).
A memory takes `POST /admin/ingest` (`{"documents": [{"id", "text", "meta"}], "delete": [ids]}`,
the admin route's API-key rule) while serving; each request reads one committed state.

Policy hot reload (serve/policy_reload.py): the bundle file is polled every --policy-poll
seconds (default 2; 0: off) and `POST /admin/reload` re-reads it on demand; a new bundle is
validated before it is served, a broken one is refused and the running one stays. The admin
route needs an API key; without --api-key-file it is refused unless
--allow-unauthenticated-admin.

--admin-token-file F (or $AION_ADMIN_TOKEN_FILE / $AION_ADMIN_TOKEN): the admin dashboard under
/admin (aion_train/admin: its own sessions and CSRF tokens; the API keys do not open it), which
publishes into the --policy bundle's folder and hot-reloads what it publishes.

--ray: the same app as a Ray Serve deployment of --replicas replicas (serve/ray_deployment.py),
each with --num-cpus-per-replica CPUs, behind Ray Serve's HTTP proxy on --host/--port. It runs
on the Ray cluster at --ray-address, or else on a private head on loopback started (and
stopped, by PID) the way `aion-train pipeline` starts its own (pipeline/local_cluster.py).
Stops on SIGINT/SIGTERM.

Exit codes: 0 stopped cleanly; 1 the checkpoint, bundle, key file or audit log cannot be
used; 2 bad arguments.
"""

from __future__ import annotations

import json
import logging
import sys
import time

from aion_train.serve.server import build_server, read_api_keys  # noqa: F401 - build_server: used by tests

from .generate import add_model_arguments


def add_arguments(p):
    add_model_arguments(p)
    p.add_argument("--policy", default=None, metavar="BUNDLE", help="policy_bundle.json (or its folder)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key-file", default=None, metavar="F", help="file of accepted API keys, one a line")
    p.add_argument("--audit-log", default=None, metavar="FILE", help="append-only hash-chained JSONL log")
    p.add_argument(
        "--index",
        default=None,
        metavar="DIR",
        help="retrieval index (build-index) or continual-memory folder: each text prompt gets its best --k "
        "chunks as <CTX> ... </CTX>; a memory also takes POST /admin/ingest (API key) while serving",
    )
    p.add_argument("--k", type=int, default=3, metavar="K", help="chunks to retrieve with --index (default 3)")
    p.add_argument("--max-batch", type=int, default=8, metavar="N", help="rows per engine batch (default 8)")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        metavar="N",
        help="intra-op threads of the engine (default on the CPU: every core in --engine process, one "
        "fewer in --engine thread, leaving a core to the HTTP side)",
    )
    p.add_argument(
        "--engine",
        choices=("process", "thread"),
        default=None,
        help="run the engine in a process of its own or in a thread of the server (default: process on "
        "the CPU, thread on CUDA)",
    )
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, metavar="B", help="request body limit")
    p.add_argument(
        "--policy-poll",
        type=float,
        default=2.0,
        metavar="SECONDS",
        help="re-read the --policy bundle when its file changes, polled this often (default 2; 0: off)",
    )
    p.add_argument(
        "--allow-unauthenticated-admin",
        action="store_true",
        help="serve POST /admin/reload without an API key (refused by default when no --api-key-file)",
    )
    p.add_argument(
        "--admin-token-file",
        default=None,
        metavar="F",
        help="turn on the admin dashboard under /admin (needs --policy): admin tokens, one a line "
        "(or $AION_ADMIN_TOKEN_FILE / $AION_ADMIN_TOKEN)",
    )
    p.add_argument("--ray", action="store_true", help="serve as a Ray Serve deployment (see --replicas)")
    p.add_argument("--replicas", type=int, default=1, metavar="N", help="with --ray: replicas (default 1)")
    p.add_argument(
        "--num-cpus-per-replica", type=float, default=1.0, metavar="X", help="with --ray: CPUs per replica (default 1)"
    )
    p.add_argument(
        "--ray-address",
        default=None,
        metavar="HOST:PORT",
        help="with --ray: an existing cluster's GCS address (default: a private head on loopback)",
    )
    p.add_argument("--json-logs", action="store_true", help="log one JSON object a line (access log too)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        extra = getattr(record, "aion", None)
        if isinstance(extra, dict):
            out.update(extra)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def setup_logging(json_logs: bool, level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter() if json_logs else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        lg = logging.getLogger(name)
        lg.handlers[:] = []
        lg.propagate = True
    logging.getLogger("uvicorn.access").disabled = True  # our access log has the request id


def run(args) -> int:
    if args.max_batch < 1 or not 0 < args.port < 65536 or args.policy_poll < 0:
        print("serve: --max-batch must be >= 1, --port in 1..65535 and --policy-poll >= 0", file=sys.stderr)
        return 2
    if getattr(args, "ray", False) and (args.replicas < 1 or args.num_cpus_per_replica <= 0):
        print("serve: --replicas must be >= 1 and --num-cpus-per-replica > 0", file=sys.stderr)
        return 2
    if getattr(args, "ray", False) and getattr(args, "admin_token_file", None):
        print(
            "serve: the admin dashboard is not served under --ray (run `aion-train admin --bundle DIR`)",
            file=sys.stderr,
        )
        return 2
    if getattr(args, "ray", False) and args.index:
        from aion_train.retrieval.continual import is_memory_dir

        if is_memory_dir(args.index):
            print(
                "serve: a continual memory has one writer; it is not served under --ray (each replica would write)",
                file=sys.stderr,
            )
            return 2
    setup_logging(args.json_logs, args.log_level)
    log = logging.getLogger("aion_train.serve")
    if getattr(args, "ray", False):
        from .serve_ray import run_ray

        return run_ray(args, log)
    from aion_train.policy import PolicyError
    from aion_train.serve.audit import AuditError
    from aion_train.serve.loading import LoadError

    try:
        app, service, audit = build_server(args)
    except (PolicyError, LoadError, AuditError, OSError, ValueError) as e:
        print(f"serve: {e}", file=sys.stderr)
        return 1
    import uvicorn

    service.start()
    log.info(
        "serving %s (%s, %s) on http://%s:%d; jurisdictions: %s",
        service.loaded.model_id,
        service.loaded.kind,
        service.loaded.dtype,
        args.host,
        args.port,
        ", ".join(service.policy.jurisdictions),
        extra={
            "aion": {
                "model": service.loaded.model_id,
                "host": args.host,
                "port": args.port,
                "bundle_sha256": service.policies.bundle_sha256,
            }
        },
    )
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_config=None, access_log=False, log_level=args.log_level)
    finally:
        service.stop()
        if audit is not None:
            audit.close()
    return 0
