"""Applying a policy to model outputs at inference, apart from the model.

    policies = PolicySet.load("artifacts/policy/policy_bundle.json")
    result = generate_with_policy(generate_fn, prompt, policies, jurisdiction="eu-de")
    result.text, result.blocked, result.flags, result.redactions, result.policy_hash

Nothing here imports or touches a model: a policy only sees the text a model produced, so
changing or reloading a policy never changes the weights. `PolicySet.reload()` re-reads the
bundle and swaps it in atomically; a request holds on to the `Policy` it selected.

`enforce(text, policy)` does, in order:

1. output moderation (when enabled): `moderator(text) -> {category: score}`; a listed
   category (all categories when the list is empty) scoring >= threshold blocks the output.
   Without a moderator it raises `ModerationUnavailable` (fails closed);
2. block rules, on the raw text: a match replaces the whole output with a refusal notice;
3. flag rules, on the raw text: recorded in `flags`, the text is unchanged;
4. redact rules, in order: every match replaced by the rule's `replacement`;
5. `max_output_chars`: the (redacted) output is cut to that many characters;
6. `required_notices` appended, each after a blank line (never truncated).

Under the default policy (no rules, no notices, no limit, moderation off) the text comes back
unchanged, character for character. Patterns and term lists match, with RE2 (linear time),
the UTF-8 bytes of a normalised view of the text (normalize.py: NFKC, default-ignorable
characters removed, case-folded when the rule asks), so a term in fullwidth letters or with
a zero-width space inside is still found; a redaction replaces exactly the original
characters the match came from. Lone surrogates, which have no UTF-8 form, become U+FFFD
first (only when the policy has rules).
"""

from __future__ import annotations

import functools
import os
import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .bundle import bundle_hash, content_hash, normalize_policy
from .errors import ModerationUnavailable, PolicyError, PolicyIssue, UnknownJurisdiction, json_path
from .loader import read_json_limited, rule_casefold, rule_issues, schema_issues
from .normalize import View, normalized_view
from .patterns import holds_whole_output, pattern_spans, term_spans
from .schema import (
    BUNDLE_FORMAT,
    DEFAULT_JURISDICTION,
    DEFAULT_REDACTION,
    MAX_BUNDLE_BYTES,
    MAX_BUNDLE_VALUES,
    SCHEMA_VERSION,
    default_policy,
)

REFUSAL_NOTICE = "[This response was withheld under the {jurisdiction} content policy.]"
NOTICE_SEPARATOR = "\n\n"
_SURROGATES = re.compile("[\ud800-\udfff]")

Moderator = Callable[[str], Mapping[str, float]]


@dataclass(frozen=True)
class Flag:
    rule_id: str  # the rule id, or "moderation:<category>"
    category: str | None
    matches: int


@dataclass(frozen=True)
class EnforcementResult:
    text: str
    blocked: bool
    flags: list[Flag]
    redactions: int
    policy_hash: str
    jurisdiction: str = DEFAULT_JURISDICTION
    blocked_by: str | None = None  # rule id or "moderation:<category>"
    truncated: bool = False


@dataclass(frozen=True)
class CompiledRule:
    id: str
    action: str
    category: str | None
    replacement: str
    regexes: tuple  # RE2 regexes (patterns)
    terms_regex: Any  # RE2 regex of the term list, or None
    casefold: bool = False  # matched on the case-folded view

    def passes(self):
        """(kind, regex) in the order matching and redaction run them."""
        if self.terms_regex is not None:
            yield "terms", self.terms_regex
        for rx in self.regexes:
            yield "pattern", rx

    def view_spans(self, view: View):
        """Byte spans of the matches in `view.data`, pass by pass."""
        for kind, rx in self.passes():
            yield from pass_spans(kind, rx, view.data)

    def spans(self, text: str | bytes):
        """Spans of the matches (found on the normalised view) in the original: character
        spans of a str; byte spans of UTF-8 `bytes` (as before matching was normalised)."""
        if isinstance(text, (bytes, bytearray)):
            t = _SURROGATES.sub("\ufffd", bytes(text).decode("utf-8", "replace"))
            for s, e in self.spans(t):
                yield len(t[:s].encode("utf-8")), len(t[:e].encode("utf-8"))
            return
        view = normalized_view(_SURROGATES.sub("\ufffd", text), self.casefold)
        for s, e in self.view_spans(view):
            yield view.orig_span(s, e)

    def matches(self, text: str | bytes) -> bool:
        return next(iter(self.spans(text)), None) is not None


def pass_spans(kind: str, rx, data: bytes):
    return term_spans(rx, data) if kind == "terms" else pattern_spans(rx, data)


@dataclass(frozen=True)
class Policy:
    """One resolved, compiled jurisdiction policy (immutable)."""

    jurisdiction: str
    version: str
    sha256: str
    rules: tuple[CompiledRule, ...]
    max_output_chars: int | None
    required_notices: tuple[str, ...]
    moderation: Mapping[str, Any]
    lineage: tuple = ()
    document: Mapping[str, Any] = field(default_factory=dict, repr=False)

    @functools.cached_property
    def holds_whole_output(self) -> bool:
        """Whether streaming under this policy holds the whole output to the end (see
        `patterns.holds_whole_output`; the bundle records it per jurisdiction)."""
        return holds_whole_output(self.document)

    @property
    def is_identity(self) -> bool:
        """True when enforcing returns every text unchanged."""
        return (
            not self.rules
            and not self.required_notices
            and self.max_output_chars is None
            and not self.moderation.get("enabled", False)
        )

    @classmethod
    def from_document(cls, doc: Mapping[str, Any], lineage: tuple = (), name: str = "<policy>") -> Policy:
        """Compile a resolved (parent-free) policy document; validates it first."""
        doc = normalize_policy(dict(doc))
        compiled: dict = {}
        issues = schema_issues(doc, name) or rule_issues(doc, name, compiled=compiled)
        if issues:
            raise PolicyError(issues)
        rules = []
        for i, r in enumerate(doc["rules"]):
            rules.append(
                CompiledRule(
                    id=r["id"],
                    action=r["action"],
                    category=r.get("category"),
                    replacement=r.get("replacement", DEFAULT_REDACTION),
                    regexes=tuple(compiled[(i, k)] for k in range(len(r.get("patterns", [])))),
                    terms_regex=compiled[(i, "terms")] if "terms" in r else None,
                    casefold=rule_casefold(r),
                )
            )
        return cls(
            jurisdiction=doc["jurisdiction"],
            version=doc["version"],
            sha256=content_hash(doc),
            rules=tuple(rules),
            max_output_chars=doc["max_output_chars"],
            required_notices=tuple(doc["required_notices"]),
            moderation=dict(doc["output_moderation"]),
            lineage=tuple(lineage),
            document=doc,
        )


DEFAULT_POLICY = Policy.from_document(default_policy(), name="<built-in default>")


def enforce(text: str, policy: Policy | None = None, *, moderator: Moderator | None = None) -> EnforcementResult:
    """Apply `policy` (default: the built-in default policy) to one model output."""
    policy = DEFAULT_POLICY if policy is None else policy
    if not isinstance(text, str):
        raise TypeError(f"enforce() needs the output as str, got {type(text).__name__}")
    if policy.is_identity:
        return EnforcementResult(
            text=text,
            blocked=False,
            flags=[],
            redactions=0,
            policy_hash=policy.sha256,
            jurisdiction=policy.jurisdiction,
        )

    flags: list[Flag] = []
    blocked_by: str | None = None
    mod = policy.moderation
    if mod.get("enabled"):
        if moderator is None:
            raise ModerationUnavailable(
                [
                    PolicyIssue(
                        policy.jurisdiction,
                        "$.output_moderation",
                        "output moderation is enabled but no moderator was supplied",
                    )
                ]
            )
        scores = dict(moderator(text))
        wanted = mod.get("categories") or sorted(scores)
        threshold = float(mod.get("threshold", 0.5))
        for cat in wanted:
            score = scores.get(cat)
            if score is not None and float(score) >= threshold:
                flags.append(Flag(f"moderation:{cat}", cat, 1))
                if blocked_by is None:
                    blocked_by = f"moderation:{cat}"

    if policy.rules:
        text = _SURROGATES.sub("\ufffd", text)
    views: dict = {}  # {casefold: (text, its view)}, reused while the text is unchanged

    def view(rule: CompiledRule) -> View:
        return view_of(text, rule.casefold, views)

    for rule in policy.rules:
        if rule.action == "block" and blocked_by is None:
            if next(iter(rule.view_spans(view(rule))), None) is not None:
                blocked_by = rule.id
        elif rule.action == "flag":
            n = sum(1 for _ in rule.view_spans(view(rule)))
            if n:
                flags.append(Flag(rule.id, rule.category, n))

    redactions = 0
    truncated = False
    if blocked_by is not None:
        body = REFUSAL_NOTICE.format(jurisdiction=policy.jurisdiction)
    else:
        body = text
        for rule in policy.rules:
            if rule.action != "redact":
                continue
            body, n = redact_rule(rule, body, views)
            redactions += n
        limit = policy.max_output_chars
        if limit is not None and len(body) > limit:
            body = body[:limit]
            truncated = True
    if policy.required_notices:
        body = NOTICE_SEPARATOR.join([body, *policy.required_notices])
    return EnforcementResult(
        text=body,
        blocked=blocked_by is not None,
        flags=flags,
        redactions=redactions,
        policy_hash=policy.sha256,
        jurisdiction=policy.jurisdiction,
        blocked_by=blocked_by,
        truncated=truncated,
    )


def view_of(text: str, casefold: bool, cache: dict | None = None) -> View:
    """normalized_view(text, casefold), taken from / kept in `cache` ({casefold: (text,
    view)}) while the text is the same object (a pass without matches returns its input)."""
    hit = cache.get(casefold) if cache is not None else None
    if hit is not None and hit[0] is text:
        return hit[1]
    view = normalized_view(text, casefold)
    if cache is not None:
        cache[casefold] = (text, view)
    return view


def redact_rule(rule: CompiledRule, text: str, views: dict | None = None) -> tuple[str, int]:
    """`text` with every match of `rule` replaced, pass by pass (its term list, then each
    pattern, each pass on the output of the one before); (new text, number of matches).
    `views`: a cache for `view_of`."""
    n = 0
    for kind, rx in rule.passes():
        view = view_of(text, rule.casefold, views)
        spans = (view.orig_span(s, e) for s, e in pass_spans(kind, rx, view.data))
        text, k = splice(text, spans, rule.replacement)
        n += k
    return text, n


def splice(text: str, spans, repl: str) -> tuple[str, int]:
    """Replace the original-character spans (left to right; one starting inside the one
    before is skipped)."""
    out, last, n = [], 0, 0
    for s, e in spans:
        if s < last:
            continue
        out.append(text[last:s])
        out.append(repl)
        last = e
        n += 1
    if not n:
        return text, 0
    out.append(text[last:])
    return "".join(out), n


# ---------------------------------------------------------------------------- PolicySet
@dataclass(frozen=True)
class _Snapshot:
    policies: Mapping[str, Policy]
    bundle_sha256: str
    default: Policy
    fallback: Policy | None = None  # what an unknown jurisdiction gets; None: refused

    def lookup(self, jurisdiction: str, where: str) -> Policy:
        pol = self.policies.get(jurisdiction) if isinstance(jurisdiction, str) else None
        if pol is not None:
            return pol
        if self.fallback is not None:
            return self.fallback
        raise UnknownJurisdiction(
            [
                PolicyIssue(
                    where,
                    json_path(["jurisdictions", str(jurisdiction)[:90]]),
                    f"unknown jurisdiction {str(jurisdiction)[:90]!r} (known: {', '.join(self.policies)})",
                )
            ]
        )


class PolicySet:
    """The compiled policies of one bundle, selected per request by jurisdiction.

    `policy_set[j]` returns j's policy. An unknown (or misspelt) j fails closed: it raises
    `UnknownJurisdiction`, whose message names the known jurisdictions, unless the bundle
    declares an explicit `fallback_jurisdiction` (then j gets that policy). It never silently
    returns the unrestricted default. `get(None)` (no jurisdiction asked for) is the default
    policy. `reload()` re-reads the bundle file and swaps the whole set in one assignment
    under a lock; readers never lock and never see a mix of old and new policies.
    `snapshot()` returns that immutable set, so that one request resolves every lookup in
    the same version of the bundle.
    """

    def __init__(self, bundle: Mapping[str, Any], path: str | os.PathLike | None = None):
        self.path = Path(path) if path is not None else None
        self._lock = threading.Lock()
        self._snap = _compile_bundle(bundle, str(path) if path else "<bundle>")

    @classmethod
    def load(cls, bundle_path: str | os.PathLike) -> PolicySet:
        path = Path(bundle_path)
        if path.is_dir():
            from .bundle import BUNDLE_FILE

            path = path / BUNDLE_FILE
        return cls(_read_bundle(path), path=path)

    @classmethod
    def default_only(cls) -> PolicySet:
        """A set with only the built-in default policy (outputs unchanged)."""
        from .bundle import make_bundle, resolve_policies

        return cls(make_bundle(resolve_policies([])))

    def reload(self) -> bool:
        """Re-read the bundle file; returns True when its content changed.

        Everything is validated and compiled before the swap, so a broken file raises
        PolicyError and leaves the current policies in place. No model is involved."""
        if self.path is None:
            raise PolicyError("this PolicySet was not loaded from a file")
        with self._lock:
            new = _compile_bundle(_read_bundle(self.path), str(self.path))
            if new.bundle_sha256 == self._snap.bundle_sha256:
                return False
            self._snap = new
            return True

    def __getitem__(self, jurisdiction: str) -> Policy:
        return self._snap.lookup(jurisdiction, str(self.path or "<bundle>"))

    def get(self, jurisdiction: str | None) -> Policy:
        snap = self._snap
        return snap.default if jurisdiction is None else snap.lookup(jurisdiction, str(self.path or "<bundle>"))

    def snapshot(self) -> _Snapshot:
        """The current immutable set (policies, default, fallback, bundle hash)."""
        return self._snap

    @property
    def fallback_jurisdiction(self) -> str | None:
        fb = self._snap.fallback
        return None if fb is None else fb.jurisdiction

    def __contains__(self, jurisdiction: object) -> bool:
        return jurisdiction in self._snap.policies

    def __len__(self) -> int:
        return len(self._snap.policies)

    @property
    def jurisdictions(self) -> list[str]:
        return list(self._snap.policies)

    @property
    def bundle_sha256(self) -> str:
        return self._snap.bundle_sha256

    @property
    def default(self) -> Policy:
        return self._snap.default

    def enforce(self, text: str, jurisdiction: str | None, *, moderator: Moderator | None = None) -> EnforcementResult:
        return enforce(text, self.get(jurisdiction), moderator=moderator)

    def __repr__(self) -> str:
        return (
            f"PolicySet(path={str(self.path) if self.path else None!r}, "
            f"jurisdictions={self.jurisdictions}, bundle_sha256={self.bundle_sha256[:12]})"
        )


def generate_with_policy(
    generate_fn: Callable[[Any], str],
    prompt: Any,
    policy_set: PolicySet,
    jurisdiction: str | None,
    *,
    moderator: Moderator | None = None,
) -> EnforcementResult:
    """`enforce(generate_fn(prompt), policy_set[jurisdiction])`.

    The policy is selected before generating, so a concurrent `reload()` cannot change the
    policy in the middle of a request."""
    policy = policy_set.get(jurisdiction)
    return enforce(generate_fn(prompt), policy, moderator=moderator)


# ------------------------------------------------------------------------------ loading
def _read_bundle(path: Path) -> dict[str, Any]:
    return read_json_limited(path, max_bytes=MAX_BUNDLE_BYTES, max_values=MAX_BUNDLE_VALUES)


def _compile_bundle(bundle: Any, name: str) -> _Snapshot:
    def fail(where: list, msg: str) -> PolicyError:
        return PolicyError.one(name, json_path(where), msg)

    if not isinstance(bundle, Mapping) or bundle.get("format") != BUNDLE_FORMAT:
        raise fail([], f"not a policy bundle (expected format {BUNDLE_FORMAT!r})")
    if bundle.get("schema_version") != SCHEMA_VERSION:
        raise fail(
            ["schema_version"],
            f"bundle schema version {bundle.get('schema_version')!r}; this code reads {SCHEMA_VERSION}",
        )
    entries = bundle.get("jurisdictions")
    if not isinstance(entries, Mapping):
        raise fail(["jurisdictions"], "expected an object")
    issues: list[PolicyIssue] = []
    policies: dict[str, Policy] = {}
    hashes: dict[str, str] = {}
    holds: dict[str, bool] = {}
    for j, entry in entries.items():
        where = ["jurisdictions", j]
        if not isinstance(entry, Mapping) or not isinstance(entry.get("policy"), Mapping):
            issues.append(PolicyIssue(name, json_path(where), "expected {sha256, policy, ...}"))
            continue
        doc = entry["policy"]
        if doc.get("jurisdiction") != j:
            issues.append(
                PolicyIssue(name, json_path(where + ["policy", "jurisdiction"]), f"does not match the key {j!r}")
            )
            continue
        try:
            pol = Policy.from_document(doc, lineage=tuple(entry.get("lineage", ())), name=name)
        except PolicyError as e:
            prefix = json_path(where + ["policy"])
            issues.extend(PolicyIssue(i.file, prefix + i.path[1:], i.message) for i in e.issues)
            continue
        if pol.sha256 != entry.get("sha256"):
            issues.append(
                PolicyIssue(
                    name,
                    json_path(where + ["sha256"]),
                    f"hash mismatch: content hashes to {pol.sha256}, the bundle says " + repr(entry.get("sha256")),
                )
            )
            continue
        if "holds_whole_output" in entry:
            if entry["holds_whole_output"] is not pol.holds_whole_output:
                issues.append(
                    PolicyIssue(
                        name,
                        json_path(where + ["holds_whole_output"]),
                        f"says {entry['holds_whole_output']!r}, but the policy's rules give "
                        f"{pol.holds_whole_output!r} (a block rule, output moderation or a redact rule of "
                        "unbounded width holds the whole output)",
                    )
                )
                continue
            holds[j] = pol.holds_whole_output
        policies[j] = pol
        hashes[j] = pol.sha256
    if issues:
        raise PolicyError(issues)
    fallback_j = bundle.get("fallback_jurisdiction")
    if fallback_j is not None and (not isinstance(fallback_j, str) or fallback_j not in policies):
        raise fail(
            ["fallback_jurisdiction"],
            f"fallback jurisdiction {fallback_j!r} is not one of the bundle's jurisdictions ({', '.join(policies)})",
        )
    if holds and len(holds) != len(policies):
        missing = [j for j in policies if j not in holds]
        raise fail(
            ["jurisdictions", missing[0], "holds_whole_output"],
            "missing (every jurisdiction of a bundle has it, or none does, as in older bundles)",
        )
    expected = bundle_hash(hashes, SCHEMA_VERSION, fallback=fallback_j, holds=holds or None)
    if bundle.get("bundle_sha256") != expected:
        raise fail(["bundle_sha256"], f"bundle hash mismatch: content hashes to {expected}")
    default_j = bundle.get("default_jurisdiction", DEFAULT_JURISDICTION)
    default = policies.get(default_j, DEFAULT_POLICY)
    if not default.is_identity:
        raise fail(
            ["jurisdictions", default_j],
            "the default policy must leave outputs unchanged (no rules, notices, limit or moderation)",
        )
    return _Snapshot(
        policies=policies,
        bundle_sha256=expected,
        default=default,
        fallback=policies[fallback_j] if fallback_j is not None else None,
    )
