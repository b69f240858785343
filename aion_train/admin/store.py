"""The policy store behind the dashboard: files stay the source of truth.

    DIR/policy_bundle.json                    the bundle served (what `build-policy --out DIR` writes)
    DIR/admin/versions/<j>/<version>-<sha12>.json   every own policy document ever published
                                              or seen in a bundle (immutable)
    DIR/admin/bundles/<seq>-<sha12>.json      every bundle published (previous ones kept)
    DIR/admin/history.jsonl                   one line per publish / rollback / import

A publish validates the jurisdiction's new own document with the same loader and validator
as `build-policy`, writes it under versions/, builds the bundle with `build_bundle` from the
current version files of every jurisdiction (so the bundle is byte for byte what
`build-policy` gives for the same files, bar the `sources` paths, and has the same
`bundle_sha256`), keeps a copy under bundles/ and replaces policy_bundle.json atomically.

A bundle written by `build-policy` on the command line is picked up on the next read (the
file's signature changed): each jurisdiction's own document is taken from the source file the
bundle names (when it still hashes the same), else reconstructed from the resolved policy so
that it resolves to exactly the same policy; it is recorded as an `import` in the history.
"""

from __future__ import annotations

import copy
import difflib
import json
import os
import re
import threading
from pathlib import Path
from typing import Any

from aion_train.fsutil import atomic_write_text
from aion_train.policy import (
    BUNDLE_FILE,
    PolicyError,
    PolicyIssue,
    PolicySet,
    build_bundle,
    content_hash,
    make_bundle,
    resolve_policies,
    write_bundle,
)
from aion_train.policy.bundle import check_resolved
from aion_train.policy.loader import PolicyFile, validate_policy_doc
from aion_train.serve.audit import utc_now
from aion_train.serve.policy_reload import file_signature

_BUILTIN = "<built-in default>"
_SEMVER3 = re.compile(r"^(\d+)\.(\d+)\.(\d+)")


class StoreError(Exception):
    def __init__(self, status: int, message: str, code: str):
        super().__init__(message)
        self.status, self.code = status, code


def version_key(v: str) -> tuple[int, int, int, int]:
    """Semver order on major.minor.patch; a pre-release sorts before its release."""
    m = _SEMVER3.match(v)
    if not m:
        return (0, 0, 0, 0)
    return (int(m[1]), int(m[2]), int(m[3]), 0 if "-" in v.split("+")[0] else 1)


def next_patch(v: str) -> str:
    m = _SEMVER3.match(v)
    major, minor, patch = (int(m[1]), int(m[2]), int(m[3])) if m else (1, 0, 0)
    return f"{major}.{minor}.{patch + 1}"


def pretty(doc: Any) -> str:
    return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"


class PolicyStore:
    def __init__(self, bundle_dir: str | os.PathLike):
        d = Path(bundle_dir).resolve()  # the bundle's `sources` name files by absolute path
        if d.name == BUNDLE_FILE:
            d = d.parent
        self.dir = d
        self.bundle_path = d / BUNDLE_FILE
        self.admin_dir = d / "admin"
        self.versions_dir = self.admin_dir / "versions"
        self.bundles_dir = self.admin_dir / "bundles"
        self.history_path = self.admin_dir / "history.jsonl"
        self._lock = threading.RLock()
        self._seen_sig = None
        self._bundle: dict | None = None
        if not self.bundle_path.is_file():
            raise FileNotFoundError(f"{self.bundle_path}: no policy bundle (write one with `aion-train build-policy`)")
        self.refresh()

    # ------------------------------------------------------------------ reading
    def refresh(self) -> dict:
        """The bundle on disk; a new one (from the command line) is imported into the history."""
        with self._lock:
            sig = file_signature(self.bundle_path)
            if sig != self._seen_sig or self._bundle is None:
                PolicySet.load(self.bundle_path)  # refuses a broken bundle before it is shown
                bundle = json.loads(self.bundle_path.read_text(encoding="utf-8"))
                self._bundle, self._seen_sig = bundle, sig
                self._import(bundle)
            return self._bundle

    @property
    def bundle(self) -> dict:
        return self.refresh()

    def history(self, j: str | None = None) -> list[dict]:
        if not self.history_path.exists():
            return []
        out = []
        with open(self.history_path, encoding="utf-8") as f:
            for ln in f:
                if ln.strip():
                    e = json.loads(ln)
                    if j is None or e["jurisdiction"] == j:
                        out.append(e)
        return out

    def _version_file(self, j: str, version: str, sha: str) -> Path:
        return self.versions_dir / j / f"{version}-{sha[:12]}.json"

    def own_doc(self, j: str) -> dict | None:
        """The jurisdiction's own document as served now (None: the built-in default)."""
        entry = self.bundle["jurisdictions"].get(j)
        if entry is None:
            return None
        if entry["sources"][-1] == _BUILTIN:
            return None
        last = entry["lineage"][-1]
        p = self._version_file(j, last["version"], last["sha256"])
        return json.loads(p.read_text(encoding="utf-8"))

    def doc_at(self, j: str, version: str) -> dict:
        for e in reversed(self.history(j)):
            if e["version"] == version:
                return json.loads(Path(self.admin_dir / e["file"]).read_text(encoding="utf-8"))
        raise StoreError(404, f"{j}: no version {version!r} in the history", "unknown_version")

    def diff(self, j: str, a: str, b: str) -> str:
        da, db = pretty(self.doc_at(j, a)).splitlines(True), pretty(self.doc_at(j, b)).splitlines(True)
        return "".join(difflib.unified_diff(da, db, f"{j} {a}", f"{j} {b}"))

    # ------------------------------------------------------------------ import
    def _import(self, bundle: dict) -> None:
        """Record every jurisdiction's own document of `bundle` that the store has not seen."""
        known = {(e["jurisdiction"], e["sha256"]) for e in self.history()}
        new_entries = []
        for j, entry in bundle["jurisdictions"].items():
            if entry["sources"][-1] == _BUILTIN:
                continue
            last = entry["lineage"][-1]
            p = self._version_file(j, last["version"], last["sha256"])
            if not p.exists():
                doc = self._source_doc(entry) or self._reconstruct(bundle, j)
                p.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_text(p, pretty(doc))
            if (j, last["sha256"]) not in known:
                new_entries.append(
                    {
                        "action": "import",
                        "jurisdiction": j,
                        "version": last["version"],
                        "sha256": last["sha256"],
                        "policy_sha256": entry["sha256"],
                        "bundle_sha256": bundle["bundle_sha256"],
                        "file": str(p.relative_to(self.admin_dir)),
                        "who": "build-policy (bundle file)",
                    }
                )
        if new_entries:
            self._keep_bundle(bundle)
            for e in new_entries:
                self._append_history(e)

    @staticmethod
    def _source_doc(entry: dict) -> dict | None:
        src = entry["sources"][-1]
        try:
            from aion_train.policy import load_policy_file

            f = load_policy_file(src)
        except (PolicyError, OSError):
            return None
        return f.doc if f.sha256 == entry["lineage"][-1]["sha256"] else None

    @staticmethod
    def _reconstruct(bundle: dict, j: str) -> dict:
        """An own document that resolves to exactly the bundle's policy for j."""
        entry = bundle["jurisdictions"][j]
        pol = copy.deepcopy(entry["policy"])
        own_ids = entry["lineage"][-1]["rules"]
        doc: dict[str, Any] = {"jurisdiction": j, "version": pol["version"]}
        if len(entry["lineage"]) > 1:
            doc["parent"] = entry["lineage"][-2]["jurisdiction"]
        if "description" in pol:
            doc["description"] = pol["description"]
        doc["rules"] = [r for r in pol["rules"] if r["id"] in own_ids]
        doc["max_output_chars"] = pol["max_output_chars"]
        doc["required_notices"] = pol["required_notices"]
        doc["output_moderation"] = pol["output_moderation"]
        return doc

    def _keep_bundle(self, bundle: dict) -> Path:
        self.bundles_dir.mkdir(parents=True, exist_ok=True)
        seq = len(list(self.bundles_dir.glob("*.json"))) + 1
        p = self.bundles_dir / f"{seq:06d}-{bundle['bundle_sha256'][:12]}.json"
        atomic_write_text(p, json.dumps(bundle, indent=1, sort_keys=True, ensure_ascii=False) + "\n")
        return p

    def _append_history(self, entry: dict) -> dict:
        self.admin_dir.mkdir(parents=True, exist_ok=True)
        entry = {"seq": len(self.history()) + 1, "time": utc_now(), **entry}
        with open(self.history_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry, sort_keys=True, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        return entry

    # ------------------------------------------------------------------ validation
    def _current_files(self, bundle: dict, skip: str | None = None) -> list[Path]:
        out = []
        for j, entry in bundle["jurisdictions"].items():
            if j == skip or entry["sources"][-1] == _BUILTIN:
                continue
            last = entry["lineage"][-1]
            out.append(self._version_file(j, last["version"], last["sha256"]))
        return out

    def validate(self, doc: Any, j: str | None = None) -> list[PolicyIssue]:
        """Every problem of `doc` as jurisdiction j's own policy: the build-policy checks of the
        file on its own, then in the context of the other jurisdictions (parent, inherited rules)."""
        name = f"{j or 'policy'}.json"
        try:
            validate_policy_doc(doc, name)
        except PolicyError as e:
            return e.issues
        if j is not None and doc["jurisdiction"] != j:
            return [PolicyIssue(name, "$.jurisdiction", f"this is the policy of {j!r}, not {doc['jurisdiction']!r}")]
        try:
            self._resolve_with(doc)
        except PolicyError as e:
            return e.issues
        return []

    def _resolve_with(self, doc: dict) -> dict:
        from aion_train.policy import load_policy_file

        bundle = self.bundle
        j = doc["jurisdiction"]
        files = [load_policy_file(p) for p in self._current_files(bundle, skip=j)]
        files.append(PolicyFile(path=f"{j}.json", doc=doc, sha256=content_hash(doc)))
        resolved = resolve_policies(files)
        check_resolved(resolved)
        return resolved

    def draft_policy_set(self, doc: dict) -> PolicySet:
        """The bundle as it would be with `doc` published (for trying a draft)."""
        resolved = self._resolve_with(doc)
        return PolicySet(make_bundle(resolved, fallback=self.bundle.get("fallback_jurisdiction")))

    # ------------------------------------------------------------------ publishing
    def publish(self, j: str, doc: Any, who: str, action: str = "publish", extra: dict | None = None) -> dict:
        with self._lock:
            bundle = self.refresh()
            issues = self.validate(doc, j)
            if issues:
                raise PolicyError(issues)
            versions = [e["version"] for e in self.history(j)]
            if j in bundle["jurisdictions"]:
                versions.append(bundle["jurisdictions"][j]["policy"]["version"])
            top = max(versions, key=version_key) if versions else None
            if top is not None and version_key(doc["version"]) <= version_key(top):
                raise StoreError(
                    409,
                    f"{j}: version {doc['version']!r} is not above the latest one ({top!r}); raise $.version",
                    "version_not_increased",
                )
            sha = content_hash(doc)
            p = self._version_file(j, doc["version"], sha)
            p.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(p, pretty(doc))
            files = self._current_files(bundle, skip=j) + [p]
            new = build_bundle(files, fallback=bundle.get("fallback_jurisdiction"))
            kept = self._keep_bundle(new)
            write_bundle(new, self.dir, overwrite=True)
            self._bundle, self._seen_sig = new, file_signature(self.bundle_path)
            entry = self._append_history(
                {
                    "action": action,
                    "jurisdiction": j,
                    "version": doc["version"],
                    "sha256": sha,
                    "policy_sha256": new["jurisdictions"][j]["sha256"],
                    "bundle_sha256": new["bundle_sha256"],
                    "previous_bundle_sha256": bundle["bundle_sha256"],
                    "file": str(p.relative_to(self.admin_dir)),
                    "bundle_file": str(kept.relative_to(self.admin_dir)),
                    "who": who,
                    **(extra or {}),
                }
            )
            return entry

    def rollback(self, j: str, version: str, who: str) -> dict:
        with self._lock:
            doc = copy.deepcopy(self.doc_at(j, version))
            versions = [e["version"] for e in self.history(j)]
            doc["version"] = next_patch(max(versions, key=version_key))
            return self.publish(j, doc, who, action="rollback", extra={"rollback_of": version})
