"""aion-train audit verify LOG [--json]

Checks the hash chain of an `aion-train serve --audit-log` file: every record must match its
own sha256 and carry the sha256 of the record before it. Prints the number of records and
the head hash (keep a copy elsewhere: cutting records off the end leaves a valid chain).

Exit codes: 0 the chain is intact; 1 it is not (the first bad line number is printed);
2 the file cannot be read.
"""

from __future__ import annotations

import json
import sys


def add_arguments(p):
    sub = p.add_subparsers(dest="audit_command", required=True, metavar="ACTION")
    v = sub.add_parser("verify", help="check the hash chain of an audit log")
    v.add_argument("log", metavar="LOG")
    v.add_argument("--json", action="store_true", help="print one JSON object")


def run(args) -> int:
    from aion_train.serve.audit import verify

    try:
        res = verify(args.log)
    except OSError as e:
        print(f"audit verify: cannot read {args.log}: {e.strerror or e}", file=sys.stderr)
        return 2
    if args.json:
        print(
            json.dumps(
                {
                    "ok": res.ok,
                    "records": res.records,
                    "head_sha256": res.head,
                    "bad_line": res.bad_line,
                    "reason": res.reason or None,
                }
            )
        )
    elif res.ok:
        print(f"ok: {res.records} records, head sha256 {res.head}")
    else:
        print(f"{args.log}: line {res.bad_line}: {res.reason} ({res.records} good records before it)", file=sys.stderr)
    return 0 if res.ok else 1
