"""aion-train audit verify LOG [--json]
aion-train audit repair LOG [--json]

verify: checks the hash chain of an `aion-train serve --audit-log` file: every record must
match its own sha256 and carry the sha256 of the record before it. Prints the number of
records and the head hash (keep a copy elsewhere: cutting records off the end leaves a valid
chain). A torn tail (an incomplete last line: a machine crash during a write) is reported as
such, with the count of good records before it (`torn_tail` in --json).

repair: cuts a torn tail off (the cut bytes are kept in LOG.torn-<time>) so that the server
can append again; any other damage is refused and left as it is.

Exit codes: 0 the chain is intact (repair: intact now); 1 it is not (the first bad line
number is printed; repair: not a torn tail, nothing changed); 2 the file cannot be read.
"""

from __future__ import annotations

import json
import sys


def add_arguments(p):
    sub = p.add_subparsers(dest="audit_command", required=True, metavar="ACTION")
    v = sub.add_parser("verify", help="check the hash chain of an audit log")
    v.add_argument("log", metavar="LOG")
    v.add_argument("--json", action="store_true", help="print one JSON object")
    r = sub.add_parser("repair", help="cut a torn tail (a crash mid-write) off an audit log")
    r.add_argument("log", metavar="LOG")
    r.add_argument("--json", action="store_true", help="print one JSON object")


def run(args) -> int:
    return _repair(args) if args.audit_command == "repair" else _verify(args)


def _verify(args) -> int:
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
                    "torn_tail": res.torn_tail,
                }
            )
        )
    elif res.ok:
        print(f"ok: {res.records} records, head sha256 {res.head}")
    else:
        print(f"{args.log}: line {res.bad_line}: {res.reason} ({res.records} good records before it)", file=sys.stderr)
    return 0 if res.ok else 1


def _repair(args) -> int:
    from aion_train.serve.audit import AuditError, repair

    try:
        res = repair(args.log)
    except OSError as e:
        print(f"audit repair: cannot read {args.log}: {e.strerror or e}", file=sys.stderr)
        return 2
    except AuditError as e:
        print(f"audit repair: {e}", file=sys.stderr)
        return 1
    if args.json:
        out = {"records": res.records, "head_sha256": res.head, "torn_bytes": res.torn_bytes}
        print(json.dumps({**out, "saved_to": str(res.saved_to) if res.saved_to else None}))
    elif res.torn_bytes:
        print(
            f"cut {res.torn_bytes} torn bytes off (kept in {res.saved_to}); "
            f"ok: {res.records} records, head sha256 {res.head}"
        )
    else:
        print(f"nothing to repair; ok: {res.records} records, head sha256 {res.head}")
    return 0
