"""aion-train build-policy FILES... --out DIR [--run-dir R] [--tracking-uri U]

Validates every policy file (all problems are reported, one `file: $.json.path: message`
line each), resolves inheritance, compiles the patterns, and writes one bundle artifact
`DIR/policy_bundle.json` atomically. `--fallback J` declares the policy that an unknown
jurisdiction gets (covered by the bundle hash); without it, unknown jurisdictions are refused. With --run-dir or --tracking-uri the bundle is also
logged to MLflow (params: bundle hash, schema version, each jurisdiction's version and hash;
artifact: policy/policy_bundle.json). A directory among FILES means its *.json files.

Exit codes: 0 bundle written; 2 invalid policy files (nothing written); 1 the bundle could
not be written or logged.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .output_dirs import add_overwrite_argument


def add_arguments(p):
    p.add_argument(
        "files", nargs="*", metavar="FILE", help="policy JSON files (or folders of them), e.g. configs/policies/*.json"
    )
    p.add_argument("--out", metavar="DIR", help="folder for policy_bundle.json")
    p.add_argument(
        "--run-dir",
        default=None,
        metavar="R",
        help="log the bundle to MLflow for this run folder "
        "(store: --tracking-uri, $MLFLOW_TRACKING_URI or R/mlflow.db)",
    )
    p.add_argument("--tracking-uri", default=None, metavar="URI", help="log the bundle to this MLflow tracking URI")
    p.add_argument(
        "--fallback",
        default=None,
        metavar="J",
        help="the jurisdiction whose policy an unknown jurisdiction gets (default: "
        "none, unknown jurisdictions are refused)",
    )
    p.add_argument("--print-schema", action="store_true", help="print the policy JSON Schema and exit")
    add_overwrite_argument(p)


def _expand(paths: list[str]) -> list[str]:
    out: list[str] = []
    for p in paths:
        path = Path(p)
        if path.is_dir():
            out.extend(str(x) for x in sorted(path.glob("*.json")))
        else:
            out.append(p)
    return out


def run(args) -> int:
    # Imported here: `aion-train --help` must not pay for re2/jsonschema.
    try:
        from aion_train.policy import PolicyError, build_bundle, policy_schema, write_bundle
    except ImportError as e:
        print(f"build-policy: {e}", file=sys.stderr)
        return 1

    if args.print_schema:
        print(json.dumps(policy_schema(), indent=1))
        return 0
    if not args.files or not args.out:
        print("build-policy: need FILE... and --out DIR", file=sys.stderr)
        return 2
    files = _expand(args.files)
    if not files:
        print("build-policy: no policy files found in " + " ".join(args.files), file=sys.stderr)
        return 2
    try:
        bundle = build_bundle(files, fallback=args.fallback)
    except PolicyError as e:
        for issue in e.issues:
            print(str(issue), file=sys.stderr)
        bad = len({i.file for i in e.issues})
        print(f"build-policy: {len(e.issues)} error(s) in {bad} file(s); no bundle written", file=sys.stderr)
        return 2
    from aion_train.ownership import ForeignFolderError

    try:
        path = write_bundle(bundle, args.out, overwrite=args.overwrite)
    except ForeignFolderError as e:
        print(f"build-policy: {e}; no bundle written", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"build-policy: cannot write the bundle to {args.out}: {e}", file=sys.stderr)
        return 1
    summary = {
        "bundle": str(path),
        "bundle_sha256": bundle["bundle_sha256"],
        "schema_version": bundle["schema_version"],
        "fallback_jurisdiction": bundle.get("fallback_jurisdiction"),
        "jurisdictions": {
            j: {"version": e["policy"]["version"], "sha256": e["sha256"], "rules": len(e["policy"]["rules"])}
            for j, e in bundle["jurisdictions"].items()
        },
    }
    if args.run_dir or args.tracking_uri:
        try:
            summary["mlflow_run_id"] = _log_to_mlflow(bundle, path, args)
        except Exception as e:  # noqa: BLE001 - report any tracking failure, bundle is kept
            print(
                f"build-policy: bundle written to {path}, but logging it to MLflow failed: {type(e).__name__}: {e}",
                file=sys.stderr,
            )
            return 1
    print(json.dumps(summary, sort_keys=True))
    return 0


def _log_to_mlflow(bundle: dict, path: Path, args) -> str | None:
    from aion_train.config import TrackingConfig
    from aion_train.tracking import Tracker

    cfg = TrackingConfig()
    if args.tracking_uri:
        cfg.uri = args.tracking_uri
    cfg.run_name = f"policy-bundle-{bundle['bundle_sha256'][:12]}"
    run_dir = args.run_dir or args.out
    params = {
        "policy.bundle_sha256": bundle["bundle_sha256"],
        "policy.schema_version": bundle["schema_version"],
        "policy.jurisdictions": sorted(bundle["jurisdictions"]),
    }
    for j, e in bundle["jurisdictions"].items():
        params[f"policy.{j}.version"] = e["policy"]["version"]
        params[f"policy.{j}.sha256"] = e["sha256"]
    tracker = Tracker(cfg, run_dir, active=True, strict=True)
    run_id = tracker.start(
        params, tags={"aion.artifact": "policy_bundle", "aion.policy.bundle_sha256": bundle["bundle_sha256"]}
    )
    try:
        tracker.log_artifact(path, subdir="policy")
    except BaseException:
        tracker.end("FAILED")
        raise
    tracker.end("FINISHED")
    return run_id
