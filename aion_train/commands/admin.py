"""aion-train admin --bundle DIR [--admin-token-file F] [--audit-log FILE] [--host 127.0.0.1] [--port 8001]

The admin dashboard on its own (the same pages and JSON API as `serve --admin-token-file`,
under /admin): edits, validates and publishes the policies of the bundle folder DIR (what
`build-policy --out DIR` writes). Without a serving process in it, a publish only rewrites
DIR/policy_bundle.json: a server started with `--policy DIR/policy_bundle.json` picks it up
through its file watcher (--policy-poll). Admin actions go to --audit-log (default
DIR/admin/audit.jsonl). The admin token comes from --admin-token-file, $AION_ADMIN_TOKEN_FILE
or $AION_ADMIN_TOKEN; with none the command refuses to start (fails closed).

Exit codes: 0 stopped; 1 the bundle, token file or audit log cannot be used; 2 bad arguments.
"""

from __future__ import annotations

import sys
from pathlib import Path


def add_arguments(p):
    p.add_argument(
        "--bundle", required=True, metavar="DIR", help="the policy bundle folder (or its policy_bundle.json)"
    )
    p.add_argument("--admin-token-file", default=None, metavar="F", help="admin tokens, one a line ([name ]token)")
    p.add_argument("--audit-log", default=None, metavar="FILE", help="hash-chained audit log of admin actions")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8001)


def run(args) -> int:
    if not 0 < args.port < 65536:
        print("admin: --port must be in 1..65535", file=sys.stderr)
        return 2
    from aion_train.admin import AdminSite
    from aion_train.admin.auth import TokenFileError, tokens_from
    from aion_train.policy import PolicyError
    from aion_train.serve.audit import AuditError, AuditLog

    try:
        tokens = tokens_from(args.admin_token_file)
    except (OSError, TokenFileError) as e:
        print(f"admin: {e}", file=sys.stderr)
        return 1
    if not tokens:
        print(
            "admin: no admin token (--admin-token-file, $AION_ADMIN_TOKEN_FILE or $AION_ADMIN_TOKEN)", file=sys.stderr
        )
        return 2
    try:
        site = AdminSite(args.bundle, tokens)
        audit_path = args.audit_log or str(Path(site.store.admin_dir) / "audit.jsonl")
        site.attach(audit=AuditLog(audit_path))
    except (PolicyError, AuditError, OSError) as e:
        print(f"admin: {e}", file=sys.stderr)
        return 1
    import uvicorn

    print(f"admin dashboard on http://{args.host}:{args.port}/admin/ for {site.store.dir}", file=sys.stderr)
    try:
        uvicorn.run(site.app(), host=args.host, port=args.port, log_config=None, access_log=False)
    finally:
        site.audit.close()
    return 0
