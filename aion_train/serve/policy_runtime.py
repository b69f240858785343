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
* "window": every rule is a redact or flag rule whose patterns/terms match at most W characters
  (a bounded width, computed from the pattern). Redaction passes run left to right (as in
  `policy.enforce`: per rule, its term list then each pattern); a match that starts more than
  W + 2 characters before the end of the text known so far depends only on known text (the
  match itself plus one character of context either side for boundaries), so it and everything
  before it are final. Matching runs on the normalised view (NFKC, ignorables removed,
  case-folded per rule; aion_train.policy.normalize), and W is counted in view characters: only
  the view of the segments before the last one that starts in the final text is final (a
  character still to come may compose with that segment), and the original text before the
  segment holding the cut is final too, so the hold-back stays exact. The settled prefix of
  each pass is the input of the next; the shown
  text is the settled prefix of the last pass (cut to `max_output_chars`). Flags only count
  (they are reported at the end); notices come at the end.
* "hold": anything else (a block rule: a later match replaces the whole output; a pattern or
  multi-word term of unbounded width such as `[0-9]+` or `a b` with `\\s+` between):
  nothing is shown until the enforcement of the full text is known, then all of it at once.
  The bundle records this per jurisdiction (`holds_whole_output`, from
  `aion_train.policy.patterns.holds_whole_output`, the same test as here).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from aion_train.policy import EnforcementResult, ModerationUnavailable, Policy, PolicyIssue, PolicySet, enforce
from aion_train.policy.enforce import _SURROGATES, pass_spans, redact_rule, view_of
from aion_train.policy.normalize import warm_up
from aion_train.policy.patterns import holds_whole_output, pattern_width, rule_widths, terms_width  # noqa: F401

log = logging.getLogger(__name__)

MARGIN_CHARS = 2  # context characters after a match (one for a boundary, and one more)


def _chars_back(data: bytes, end: int, n: int) -> int:
    """The byte offset n UTF-8 characters before `end` in `data` (can be negative)."""
    i = end
    while n > 0 and i > 0:
        i -= 1
        if (data[i] & 0xC0) != 0x80:
            n -= 1
    return i - n


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
        warm_up()  # the normalisation tables, before the first request rather than during it

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
        text = _SURROGATES.sub("\ufffd", raw)
        for rule in policy.rules:
            if rule.action != "redact":
                continue
            text, n = redact_rule(rule, text)
            if n:
                out[rule.id] = {"action": "redact", "matches": n}
    if res.truncated:
        out["max_output_chars"] = {"action": "truncate", "matches": 1}
    return out


# ------------------------------------------------------------------------ streaming
def _passes(policy: Policy) -> list[tuple[str, object, int, str, bool]] | None:
    """[(kind, regex, width in view characters, replacement, casefold)] of the redaction passes,
    in the order enforce() runs them; None when the policy holds the whole output."""
    if holds_whole_output(policy.document):
        return None
    docs = policy.document.get("rules", [])
    passes = []
    for rule, doc in zip(policy.rules, docs):
        if rule.action != "redact":
            continue
        widths = rule_widths(doc)
        for (kind, rx), w in zip(rule.passes(), widths):
            passes.append((kind, rx, w, rule.replacement, rule.casefold))
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
        text = _SURROGATES.sub("\ufffd", raw)
        settled = len(text)  # text[:settled] is the same whatever follows
        views: dict = {}
        for kind, rx, width, repl, casefold in self._passes:
            view = view_of(text, casefold, views)
            # view bytes before `known` are final; a match starting before `cut` is final
            cut = _chars_back(view.data, view.final_bytes(settled), width + MARGIN_CHARS)
            keep = view.orig_at(cut)  # the original text before it is final too
            out: list[str] = []
            out_len = last = 0
            new_settled = None
            for bs, be in pass_spans(kind, rx, view.data):
                s, e = view.orig_span(bs, be)
                if s < last:
                    continue
                if new_settled is None and bs >= cut:
                    new_settled = out_len + max(0, keep - last)
                out += [text[last:s], repl]
                out_len += (s - last) + len(repl)
                last = e
            if new_settled is None:
                new_settled = out_len + max(0, keep - last)
            if out:
                out.append(text[last:])
                text = "".join(out)
            settled = min(new_settled, len(text))
        body = text[:settled]
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
