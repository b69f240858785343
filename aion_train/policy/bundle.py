"""Resolving inheritance and writing the policy bundle artifact.

    files = [load_policy_file(p) for p in paths]
    resolved = resolve_policies(files)            # {jurisdiction: ResolvedPolicy}
    bundle = make_bundle(resolved)                # dict, see below
    write_bundle(bundle, out_dir)                 # out_dir/policy_bundle.json, atomically

Inheritance: a policy with `parent` starts from its parent's *resolved* policy; the child's
rules are appended after the parent's (a child reusing a parent's rule id is an error),
`required_notices` are appended (duplicates dropped), `output_moderation` is merged key by
key, and the scalar fields (`version`, `max_output_chars`, `description`) are overridden.
Missing parents and cycles are errors that name the files involved.

Bundle layout (`policy_bundle.json`):

    {"format": "aion-policy-bundle", "schema_version": 1, "policy_schema": <$id>,
     "bundle_sha256": sha256 of canonical {"schema_version", "policies": {j: sha256},
                                           "holds_whole_output": {j: bool}},
     "default_jurisdiction": "default",
     ["fallback_jurisdiction": j,]   only when declared (make_bundle(..., fallback=j)): the
                                     policy applied to a jurisdiction the bundle does not have
     "jurisdictions": {j: {"sha256": sha256 of canonical(policy),
                           "holds_whole_output": bool, whether streaming must hold the
                                     whole output to the end (a block rule or output
                                     moderation can withdraw everything; a redact rule of
                                     unbounded width can reach back over any text);
                                     derived from the policy, checked when loading,
                                     covered by bundle_sha256,
                           "policy": <resolved policy, valid against the policy schema>,
                           "lineage": [{"jurisdiction", "version", "sha256", "rules"}, ...],
                           "sources": [file, ...]}}}

Hashes cover content only (no timestamps, no file paths), so rebuilding the same policies
gives the same hashes. The built-in default policy is added when no file defines "default".

Unknown jurisdictions fail closed: `PolicySet[j]` raises `UnknownJurisdiction` for a j the
bundle does not define, unless the bundle declares `fallback_jurisdiction` (which must name
one of its jurisdictions). The fallback is covered by `bundle_sha256` (a bundle without one
hashes exactly as before), so it cannot be switched on by editing the file. A bundle written
before `holds_whole_output` existed (no entry has it) still loads and hashes as it did.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aion_train.fsutil import atomic_write_text
from aion_train.ownership import claim_dir

from .errors import PolicyError, PolicyIssue
from .loader import PolicyFile, canonical_json
from .patterns import holds_whole_output
from .schema import (
    BUNDLE_FORMAT,
    DEFAULT_JURISDICTION,
    DEFAULT_MODERATION,
    MAX_INHERITANCE_DEPTH,
    POLICY_SCHEMA_ID,
    SCHEMA_VERSION,
    default_policy,
)

BUNDLE_FILE = "policy_bundle.json"
_BUILTIN = "<built-in default>"


def content_hash(obj: Any) -> str:
    """sha256 hex of the canonical JSON of `obj`."""
    return hashlib.sha256(canonical_json(obj)).hexdigest()


@dataclass
class ResolvedPolicy:
    policy: dict[str, Any]  # no parent; every field present
    lineage: list[dict[str, Any]] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)

    @property
    def jurisdiction(self) -> str:
        return self.policy["jurisdiction"]

    @property
    def sha256(self) -> str:
        return content_hash(self.policy)

    @property
    def holds_whole_output(self) -> bool:
        return holds_whole_output(self.policy)

    def to_entry(self) -> dict[str, Any]:
        return {
            "sha256": self.sha256,
            "holds_whole_output": self.holds_whole_output,
            "policy": self.policy,
            "lineage": self.lineage,
            "sources": self.sources,
        }


def normalize_policy(doc: dict[str, Any]) -> dict[str, Any]:
    """Every optional field filled in with its default (parent dropped)."""
    out: dict[str, Any] = {
        "jurisdiction": doc["jurisdiction"],
        "version": doc["version"],
        "rules": copy.deepcopy(doc.get("rules", [])),
        "max_output_chars": doc.get("max_output_chars"),
        "required_notices": list(doc.get("required_notices", [])),
        "output_moderation": {**DEFAULT_MODERATION, **copy.deepcopy(doc.get("output_moderation", {}))},
    }
    if "description" in doc:
        out["description"] = doc["description"]
    return out


def _lineage_entry(f: PolicyFile) -> dict[str, Any]:
    return {
        "jurisdiction": f.jurisdiction,
        "version": f.doc["version"],
        "sha256": f.sha256,
        "rules": [r["id"] for r in f.doc.get("rules", [])],
    }


def resolve_policies(files: Iterable[PolicyFile], add_default: bool = True) -> dict[str, ResolvedPolicy]:
    """Resolve every file's inheritance; raises PolicyError listing every problem."""
    files = list(files)
    by_j: dict[str, PolicyFile] = {}
    issues: list[PolicyIssue] = []
    for f in files:
        other = by_j.get(f.jurisdiction)
        if other is not None:
            issues.append(
                PolicyIssue(
                    f.path, "$.jurisdiction", f"jurisdiction {f.jurisdiction!r} is also defined by {other.path}"
                )
            )
            continue
        by_j[f.jurisdiction] = f
    if issues:
        raise PolicyError(issues)

    resolved: dict[str, ResolvedPolicy] = {}
    failed: set[str] = set()
    for j in by_j:
        _resolve_one(j, by_j, resolved, failed, issues)
    if issues:
        raise PolicyError(issues)
    if add_default and DEFAULT_JURISDICTION not in resolved:
        pol = default_policy()
        resolved[DEFAULT_JURISDICTION] = ResolvedPolicy(
            policy=pol,
            lineage=[
                {
                    "jurisdiction": DEFAULT_JURISDICTION,
                    "version": pol["version"],
                    "sha256": content_hash(pol),
                    "rules": [],
                }
            ],
            sources=[_BUILTIN],
        )
    return dict(sorted(resolved.items()))


def _resolve_one(
    j: str,
    by_j: dict[str, PolicyFile],
    resolved: dict[str, ResolvedPolicy],
    failed: set[str],
    issues: list[PolicyIssue],
) -> None:
    if j in resolved or j in failed:
        return
    # Walk up the parent chain iteratively (no recursion), detecting cycles and gaps.
    chain: list[PolicyFile] = []
    seen: dict[str, int] = {}
    cur: str | None = j
    while cur is not None and cur not in resolved:
        f = by_j.get(cur)
        if f is None:
            child = chain[-1]
            issues.append(
                PolicyIssue(
                    child.path, "$.parent", f"parent jurisdiction {cur!r} is not defined by any of the input files"
                )
            )
            failed.update(c.jurisdiction for c in chain)
            return
        if cur in seen:
            cyc = chain[seen[cur] :] + [f]
            desc = " -> ".join(f"{c.jurisdiction} ({c.path})" for c in cyc)
            for c in chain[: seen[cur]]:
                issues.append(
                    PolicyIssue(c.path, "$.parent", f"the parent chain leads into an inheritance cycle: {desc}")
                )
            for c in chain[seen[cur] :]:
                issues.append(PolicyIssue(c.path, "$.parent", f"inheritance cycle: {desc}"))
            failed.update(c.jurisdiction for c in chain)
            return
        if cur in failed:
            for c in chain:
                issues.append(
                    PolicyIssue(c.path, "$.parent", f"parent chain goes through {cur!r} ({f.path}), which has errors")
                )
            failed.update(c.jurisdiction for c in chain)
            return
        seen[cur] = len(chain)
        chain.append(f)
        if len(chain) > MAX_INHERITANCE_DEPTH:
            issues.append(
                PolicyIssue(
                    f.path,
                    "$.parent",
                    f"inheritance chain longer than "
                    f"{MAX_INHERITANCE_DEPTH}: " + " -> ".join(c.jurisdiction for c in chain),
                )
            )
            failed.update(c.jurisdiction for c in chain)
            return
        cur = f.parent
    # chain[-1]'s parent is resolved already (or it has none); build downwards.
    for f in reversed(chain):
        parent = resolved.get(f.parent) if f.parent else None
        if parent is None:
            resolved[f.jurisdiction] = ResolvedPolicy(
                policy=normalize_policy(f.doc), lineage=[_lineage_entry(f)], sources=[f.path]
            )
            continue
        merged, problems = _merge(parent, f)
        if problems:
            issues.extend(problems)
            failed.add(f.jurisdiction)
            for g in chain[: chain.index(f)]:
                failed.add(g.jurisdiction)
            return
        resolved[f.jurisdiction] = merged


def _merge(parent: ResolvedPolicy, child: PolicyFile) -> tuple[ResolvedPolicy, list[PolicyIssue]]:
    doc = child.doc
    base = parent.policy
    problems: list[PolicyIssue] = []
    parent_ids = {r["id"]: _rule_origin(parent, r["id"]) for r in base["rules"]}
    for i, rule in enumerate(doc.get("rules", [])):
        if rule["id"] in parent_ids:
            problems.append(
                PolicyIssue(
                    child.path,
                    f"$.rules[{i}].id",
                    f"rule id {rule['id']!r} is already defined by {parent_ids[rule['id']]}; "
                    "child rules are appended after the parent's, so use a new id",
                )
            )
    notices = list(base["required_notices"])
    for n in doc.get("required_notices", []):
        if n not in notices:
            notices.append(n)
    policy: dict[str, Any] = {
        "jurisdiction": doc["jurisdiction"],
        "version": doc["version"],
        "rules": copy.deepcopy(base["rules"]) + copy.deepcopy(doc.get("rules", [])),
        "max_output_chars": doc.get("max_output_chars", base["max_output_chars"]),
        "required_notices": notices,
        "output_moderation": {**base["output_moderation"], **copy.deepcopy(doc.get("output_moderation", {}))},
    }
    if "description" in doc or "description" in base:
        policy["description"] = doc.get("description", base.get("description"))
    res = ResolvedPolicy(
        policy=policy, lineage=parent.lineage + [_lineage_entry(child)], sources=parent.sources + [child.path]
    )
    return res, problems


def _rule_origin(parent: ResolvedPolicy, rule_id: str) -> str:
    for entry, src in zip(parent.lineage, parent.sources):
        if rule_id in entry["rules"]:
            return f"{entry['jurisdiction']} ({src})"
    return parent.jurisdiction


# ----------------------------------------------------------------------------- bundle
def bundle_hash(
    policy_hashes: dict[str, str],
    schema_version: int = SCHEMA_VERSION,
    fallback: str | None = None,
    holds: dict[str, bool] | None = None,
) -> str:
    """`holds`: {j: holds_whole_output} (None: a bundle from before that field)."""
    doc: dict[str, Any] = {"schema_version": schema_version, "policies": policy_hashes}
    if fallback is not None:
        doc["fallback_jurisdiction"] = fallback
    if holds is not None:
        doc["holds_whole_output"] = holds
    return content_hash(doc)


def make_bundle(resolved: dict[str, ResolvedPolicy], fallback: str | None = None) -> dict[str, Any]:
    """The bundle dict. `fallback`: the jurisdiction whose policy an unknown jurisdiction gets
    (None, the default: unknown jurisdictions are refused)."""
    entries = {j: r.to_entry() for j, r in sorted(resolved.items())}
    hashes = {j: e["sha256"] for j, e in entries.items()}
    holds = {j: e["holds_whole_output"] for j, e in entries.items()}
    if fallback is not None and fallback not in entries:
        raise PolicyError.one(
            "<bundle>",
            "$.fallback_jurisdiction",
            f"fallback jurisdiction {fallback!r} is not defined (have: {', '.join(entries)})",
        )
    bundle = {
        "format": BUNDLE_FORMAT,
        "schema_version": SCHEMA_VERSION,
        "policy_schema": POLICY_SCHEMA_ID,
        "bundle_sha256": bundle_hash(hashes, fallback=fallback, holds=holds),
        "default_jurisdiction": DEFAULT_JURISDICTION,
        "jurisdictions": entries,
    }
    if fallback is not None:
        bundle["fallback_jurisdiction"] = fallback
    return bundle


def write_bundle(bundle: dict[str, Any], out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write `out_dir/policy_bundle.json` atomically (temp file + fsync + rename). A non-empty
    `out_dir` that aion-train did not write is refused unless `overwrite`."""
    out = claim_dir(
        out_dir,
        "build-policy",
        overwrite,
        recognise=lambda p: (p / BUNDLE_FILE).is_file() and _is_bundle_file(p / BUNDLE_FILE),
    )
    final = out / BUNDLE_FILE
    text = json.dumps(bundle, indent=1, sort_keys=True, ensure_ascii=False) + "\n"
    atomic_write_text(final, text)
    return final


def _is_bundle_file(path: Path) -> bool:
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("format") == BUNDLE_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def build_bundle(paths: Iterable[str | os.PathLike], fallback: str | None = None) -> dict[str, Any]:
    """Validate every file (collecting all issues), resolve, and return the bundle dict
    (`fallback`: see make_bundle)."""
    from .loader import load_policy_file

    files: list[PolicyFile] = []
    issues: list[PolicyIssue] = []
    for p in paths:
        try:
            files.append(load_policy_file(p))
        except PolicyError as e:
            issues.extend(e.issues)
    if issues:
        raise PolicyError(issues)
    resolved = resolve_policies(files)
    check_resolved(resolved)
    return make_bundle(resolved, fallback=fallback)


def check_resolved(resolved: dict[str, ResolvedPolicy]) -> None:
    """Each file passed on its own; a child with its inherited rules must also fit the
    compile budget, or the bundle would build but fail to load at inference."""
    from .loader import rule_issues

    issues: list[PolicyIssue] = []
    for r in resolved.values():
        if len(r.sources) < 2:
            continue
        for i in rule_issues(r.policy, r.sources[-1]):
            issues.append(
                PolicyIssue(
                    i.file, "$.parent", f"with the rules inherited from {', '.join(r.sources[:-1])}: {i.message}"
                )
            )
    if issues:
        raise PolicyError(issues)
