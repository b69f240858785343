"""Policies at serving time: one snapshot of the bundle per request, a fail-closed
jurisdiction lookup, and streaming that never shows text the final enforcement would change.

`PolicyRuntime.resolve(j)` picks the policy of jurisdiction j from one immutable snapshot of
the loaded `PolicySet` (no jurisdiction: the default policy; an unknown one raises
`UnknownJurisdiction`, naming the known ones, unless the bundle declares a fallback). A
policy that turns output moderation on is refused up front (`ModerationUnavailable`): this
server has no moderator, and serving such a jurisdiction without one would fail open.

Streaming. The non-streamed output of a choice is `enforce(raw, policy)` of its full raw
text. A stream shows prefixes of that same string and, once generation ends, the rest of it,
so the concatenated stream equals the non-streamed output byte for byte. What may be shown
before the end, by the kind of policy (`StreamEnforcer.mode`):

* "passthrough": the policy leaves text unchanged (the default policy): the raw text as it
  becomes stable (see text.py).
* "window": every rule is a redact or flag rule whose patterns/terms match at most W bytes
  (a bounded width, computed from the pattern). Redaction passes run left to right (as in
  `policy.enforce`: per rule, its term list then each pattern); a match that starts more than
  W + 8 bytes before the end of the text known so far depends only on known bytes (the match
  itself plus one character of context either side for boundaries), so it and everything
  before it are final. The settled prefix of each pass is the input of the next; the shown
  text is the settled prefix of the last pass (cut to `max_output_chars`). Flags only count
  (they are reported at the end); notices come at the end.
* "hold": anything else (a block rule: a later match replaces the whole output; a pattern or
  multi-word term of unbounded width such as `[0-9]+` or `a b` with `\\s+` between):
  nothing is shown until the enforcement of the full text is known, then all of it at once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from aion_train.policy import EnforcementResult, ModerationUnavailable, Policy, PolicyIssue, PolicySet, enforce
from aion_train.policy.patterns import pattern_spans, term_spans

log = logging.getLogger(__name__)

MARGIN_BYTES = 8  # context bytes either side of a match (one UTF-8 character and more)
UNBOUNDED = 10_000  # a width over this many characters counts as unbounded


@dataclass(frozen=True)
class RequestPolicy:
    """What one request is enforced with (all from one bundle snapshot)."""

    policy: Policy
    requested: str | None  # the jurisdiction the client asked for (None: none)
    bundle_sha256: str
    fallback: bool = False  # an unknown jurisdiction served under the bundle's fallback

    @property
    def jurisdiction(self) -> str:
        return self.policy.jurisdiction

    @property
    def is_identity(self) -> bool:
        return self.policy.is_identity

    def describe(self) -> dict:
        return {
            "jurisdiction": self.policy.jurisdiction,
            "policy_version": self.policy.version,
            "policy_sha256": self.policy.sha256,
            "bundle_sha256": self.bundle_sha256,
            **({"requested_jurisdiction": self.requested, "fallback": True} if self.fallback else {}),
        }

    def stream(self) -> StreamEnforcer:
        return StreamEnforcer(self.policy)


class PolicyRuntime:
    def __init__(self, policy_set: PolicySet):
        self.policy_set = policy_set

    @property
    def jurisdictions(self) -> list[str]:
        return self.policy_set.jurisdictions

    def resolve(self, jurisdiction: str | None) -> RequestPolicy:
        snap = self.policy_set.snapshot()
        where = str(self.policy_set.path or "<bundle>")
        if jurisdiction is None:
            pol = snap.default
        else:
            pol = snap.lookup(jurisdiction, where)  # raises UnknownJurisdiction
        if pol.moderation.get("enabled"):
            raise ModerationUnavailable(
                [
                    PolicyIssue(
                        where,
                        "$.output_moderation",
                        f"jurisdiction {pol.jurisdiction!r} requires output "
                        "moderation, and this server has no moderator: refused rather than served unmoderated",
                    )
                ]
            )
        fallback = jurisdiction is not None and jurisdiction not in snap.policies
        return RequestPolicy(policy=pol, requested=jurisdiction, bundle_sha256=snap.bundle_sha256, fallback=fallback)


# ------------------------------------------------------------------------ rule actions
def rule_actions(policy: Policy, raw: str, res: EnforcementResult) -> dict[str, dict]:
    """{rule id: {"action", "matches"}} of what the policy did to `raw` (for the audit log and
    metrics; counts only, no text)."""
    out: dict[str, dict] = {}
    for f in res.flags:
        out[f.rule_id] = {"action": "flag", "matches": int(f.matches)}
    if res.blocked:
        out[str(res.blocked_by)] = {"action": "block", "matches": 1}
    elif policy.rules:
        data = raw.encode("utf-8", "replace")
        for rule in policy.rules:
            if rule.action != "redact":
                continue
            n = 0
            for kind, rx in _rule_passes(rule):
                data, k = _splice_all(data, _spans(kind, rx, data), rule.replacement.encode("utf-8"))
                n += k
            if n:
                out[rule.id] = {"action": "redact", "matches": n}
    if res.truncated:
        out["max_output_chars"] = {"action": "truncate", "matches": 1}
    return out


def _rule_passes(rule):
    if rule.terms_regex is not None:
        yield "terms", rule.terms_regex
    for rx in rule.regexes:
        yield "pattern", rx


def _spans(kind: str, rx, data: bytes):
    return term_spans(rx, data) if kind == "terms" else pattern_spans(rx, data)


def _splice_all(data: bytes, spans, repl: bytes) -> tuple[bytes, int]:
    out, last, n = [], 0, 0
    for s, e in spans:
        if s < last:
            continue
        out += [data[last:s], repl]
        last, n = e, n + 1
    if not n:
        return data, 0
    out.append(data[last:])
    return b"".join(out), n


# ------------------------------------------------------------------------ widths
def pattern_width(pattern: str) -> int | None:
    """Most characters a policy pattern can match (None: unbounded or unknown)."""
    from aion_train.policy.patterns import _P, _translate_re2

    try:
        translated, _ = _translate_re2(pattern)
        hi = _P.parse(translated).getwidth()[1]
    except Exception:  # noqa: BLE001 - anything the parser cannot read counts as unbounded
        return None
    return None if hi > UNBOUNDED else int(hi)


def terms_width(terms) -> int | None:
    """A term list's regex consumes a boundary character either side of the term; a term of
    several words matches any run of whitespace between them (unbounded)."""
    if any(len(t.split()) > 1 for t in terms):
        return None
    return max(len(t) for t in terms) + 2


def _passes(policy: Policy) -> list[tuple[str, object, int, bytes]] | None:
    """[(kind, regex, width in bytes, replacement)] of the redaction passes, in the order
    enforce() runs them; None when the policy cannot be streamed before the end."""
    if policy.moderation.get("enabled"):
        return None
    docs = policy.document.get("rules", [])
    passes = []
    for rule, doc in zip(policy.rules, docs):
        if rule.action == "block":
            return None
        if rule.action != "redact":
            continue
        repl = rule.replacement.encode("utf-8")
        if rule.terms_regex is not None:
            w = terms_width(doc.get("terms", []))
            if w is None:
                return None
            passes.append(("terms", rule.terms_regex, 4 * w, repl))
        for rx, pat in zip(rule.regexes, doc.get("patterns", [])):
            w = pattern_width(pat)
            if w is None:
                return None
            passes.append(("pattern", rx, 4 * w, repl))
    return passes


class StreamEnforcer:
    """Enforcement of one choice while its raw text grows; see the module docstring."""

    def __init__(self, policy: Policy):
        self.policy = policy
        self.emitted = ""
        self._passes = None
        if policy.is_identity:
            self.mode = "passthrough"
        else:
            self._passes = _passes(policy)
            self.mode = "hold" if self._passes is None else "window"

    def settled(self, raw: str) -> str:
        """The longest prefix of enforce(raw + x) body that is the same for every x."""
        if self.mode == "passthrough":
            return raw
        if self.mode == "hold":
            return ""
        data = raw.encode("utf-8", "replace")
        settled = len(data)
        for kind, rx, width, repl in self._passes:
            cut = settled - width - MARGIN_BYTES
            out: list[bytes] = []
            out_len = last = 0
            new_settled = None
            for s, e in _spans(kind, rx, data):
                if s < last:
                    continue
                if new_settled is None and s >= cut:
                    new_settled = out_len + max(0, max(cut, last) - last)
                out += [data[last:s], repl]
                out_len += (s - last) + len(repl)
                last = e
            if new_settled is None:
                new_settled = out_len + max(0, max(cut, last) - last)
            out.append(data[last:])
            data = b"".join(out)
            settled = min(new_settled, len(data))
        while settled > 0 and settled < len(data) and (data[settled] & 0xC0) == 0x80:
            settled -= 1  # not inside a UTF-8 character
        body = data[:settled].decode("utf-8", "replace")
        limit = self.policy.max_output_chars
        return body[:limit] if limit is not None else body

    def feed(self, raw_prefix: str) -> str:
        """New text that can be shown, given that the raw output starts with `raw_prefix`."""
        s = self.settled(raw_prefix)
        if len(s) > len(self.emitted) and s.startswith(self.emitted):
            delta = s[len(self.emitted) :]
            self.emitted = s
            return delta
        return ""

    def finish(self, raw: str) -> tuple[str, EnforcementResult]:
        """(the rest of the output, the enforcement of the full raw text)."""
        res = enforce(raw, self.policy)
        if not res.text.startswith(self.emitted):  # would be a bug in `settled`
            log.error(
                "streamed text is not a prefix of the enforced output (policy %s %s)",
                self.policy.jurisdiction,
                self.policy.sha256[:12],
            )
            raise AssertionError("stream enforcement diverged from the enforced output")
        delta = res.text[len(self.emitted) :]
        self.emitted = res.text
        return delta, res
