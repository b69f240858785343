"""Reading one policy file defensively, then validating it.

Order of checks, cheapest first, each one bounded in time on hostile input:

1. `stat()`: a regular file of at most `max_bytes` (a 50 MB file is refused without reading
   it); the read itself is capped too, in case the file grows in between.
2. UTF-8 decoding.
3. Bracket depth: one scan over the text with JSON strings skipped (a C-speed regex), so that
   `[[[[...` 100k deep is refused before `json.loads`, which would recurse.
4. `json.loads` with NaN/Infinity and duplicate keys refused.
5. The JSON Schema (draft 2020-12; unknown fields are errors), then rule-level checks:
   unique rule ids, and every pattern compiled with RE2 and checked for nested quantifiers.

Every issue carries the file name and a JSON path.
"""

from __future__ import annotations

import json
import os
import re
import stat
from dataclasses import dataclass
from typing import Any

from .errors import PolicyError, PolicyIssue, json_path
from .patterns import TOO_LARGE_COST, PatternIssue, compile_pattern, compile_terms, is_too_large, program_size
from .schema import (
    MAX_JSON_DEPTH,
    MAX_JSON_VALUES,
    MAX_PATTERNS_PER_POLICY,
    MAX_POLICY_BYTES,
    MAX_PROGRAM_SIZE_PER_POLICY,
    POLICY_SCHEMA,
)

# A JSON string: quote, runs of plain characters or escapes, then the closing quote or the
# end of the input. The branches never overlap and the match cannot fail once the opening
# quote is seen, so the scan is linear even on hostile input like '"\\"\\"\\"...'.
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*(?:"|\\?\Z)', re.DOTALL)
_BRACKETS = bytes.maketrans(b"{}", b"[]")
_NOT_BRACKETS = bytes(c for c in range(256) if c not in b"[]{}")
_MAX_MESSAGE_VALUE = 80
_RULE_PATH = re.compile(r"^\$\.rules\[(\d+)\]")


@dataclass
class PolicyFile:
    """A validated policy document and where it came from."""

    path: str
    doc: dict[str, Any]
    sha256: str  # of the canonical JSON of `doc`

    @property
    def jurisdiction(self) -> str:
        return self.doc["jurisdiction"]

    @property
    def parent(self) -> str | None:
        return self.doc.get("parent")


def read_json_limited(
    path: str | os.PathLike,
    max_bytes: int = MAX_POLICY_BYTES,
    max_depth: int = MAX_JSON_DEPTH,
    max_values: int = MAX_JSON_VALUES,
) -> Any:
    """Steps 1-4 above, plus at most `max_values` JSON values in all (so that the schema
    validation that follows is bounded too); raises PolicyError naming the file (path `$`)."""
    name = str(path)

    def fail(msg: str, where: str = "$"):
        return PolicyError.one(name, where, msg)

    try:
        st = os.stat(path)
    except OSError as e:
        raise fail(f"cannot read file: {e.strerror or e}") from None
    if not stat.S_ISREG(st.st_mode):
        raise fail("not a regular file")
    if st.st_size > max_bytes:
        raise fail(f"file is {st.st_size} bytes, over the {max_bytes}-byte limit")
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as e:
        raise fail(f"cannot read file: {e.strerror or e}") from None
    if len(data) > max_bytes:
        raise fail(f"file is over the {max_bytes}-byte limit")
    return parse_json_limited(data, name, max_depth=max_depth, max_values=max_values)


def parse_json_limited(
    data: bytes, name: str, max_depth: int = MAX_JSON_DEPTH, max_values: int = MAX_JSON_VALUES
) -> Any:
    """Steps 2-4 above on bytes already read (and size-checked) by the caller, e.g. a policy
    pasted into the admin dashboard; raises PolicyError naming `name` (path `$`)."""

    def fail(msg: str, where: str = "$"):
        return PolicyError.one(name, where, msg)

    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise fail(f"not UTF-8 (byte {e.start})") from None
    if text.startswith("\ufeff"):
        text = text[1:]
    depth = json_depth(data)
    if depth > max_depth:
        raise fail(f"JSON nested more than {max_depth} levels deep")
    try:
        doc = json.loads(text, object_pairs_hook=_pairs_hook, parse_constant=_no_constant)
    except json.JSONDecodeError as e:
        raise fail(f"invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except _DuplicateKey as e:
        raise fail(f"duplicate key {_short(e.args[0])} in an object") from None
    except (ValueError, RecursionError) as e:  # NaN/Infinity, huge ints, ...
        raise fail(f"invalid JSON: {e}") from None
    n = count_values(doc, stop_at=max_values)
    if n > max_values:
        raise fail(f"more than {max_values} JSON values")
    return doc


def count_values(doc: Any, stop_at: int) -> int:
    """Number of JSON values in `doc` (iterative; stops once over `stop_at`)."""
    n, stack = 0, [doc]
    while stack and n <= stop_at:
        v = stack.pop()
        n += 1
        if isinstance(v, dict):
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    return n


def json_depth(data: bytes, stop_at: int = MAX_JSON_DEPTH) -> int:
    """Deepest bracket nesting of `data` (strings skipped), without recursion.

    Stops counting once the depth exceeds `stop_at`; an unbalanced `]` ends the scan (the
    JSON parser will report it). Strings are removed by one regex pass, the remaining
    brackets are kept by `bytes.translate`, so the Python loop only sees brackets.
    """
    stripped = _JSON_STRING.sub(b"", data)
    brackets = stripped.translate(_BRACKETS, _NOT_BRACKETS)
    depth = deepest = 0
    for ch in brackets:
        if ch == 0x5B:  # '['
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > stop_at:
                    break
        else:
            depth -= 1
            if depth < 0:
                break
    return deepest


class _DuplicateKey(ValueError):
    pass


def _pairs_hook(pairs: list[tuple[str, Any]]) -> dict:
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


def _no_constant(name: str):
    raise ValueError(f"{name} is not allowed")


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else repr(value)
    return text if len(text) <= _MAX_MESSAGE_VALUE else text[: _MAX_MESSAGE_VALUE - 3] + "..."


def canonical_json(obj: Any) -> bytes:
    """Sorted keys, no whitespace, UTF-8: the input of every content hash."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")


# ------------------------------------------------------------------------ schema checks
_validator = None


def _get_validator():
    global _validator
    if _validator is None:
        from jsonschema import Draft202012Validator

        Draft202012Validator.check_schema(POLICY_SCHEMA)
        _validator = Draft202012Validator(POLICY_SCHEMA)
    return _validator


def schema_issues(doc: Any, name: str) -> list[PolicyIssue]:
    """All schema violations of `doc`, one issue each, sorted by JSON path."""
    issues: list[PolicyIssue] = []
    for err in _get_validator().iter_errors(doc):
        issues.extend(_describe(err, name))
    issues.sort(key=lambda i: i.path)
    seen, out = set(), []
    for i in issues:
        if (i.path, i.message) not in seen:
            seen.add((i.path, i.message))
            out.append(i)
    return out


def _describe(err, name: str) -> list[PolicyIssue]:
    parts = list(err.absolute_path)
    where = json_path(parts)
    v = err.validator
    if v == "additionalProperties" and isinstance(err.instance, dict):
        allowed = sorted(err.schema.get("properties", {}))
        return [
            PolicyIssue(name, json_path(parts + [k]), f"unknown field {_short(k)} (allowed: {', '.join(allowed)})")
            for k in err.instance
            if k not in err.schema.get("properties", {})
        ]
    if v == "required":
        missing = err.validator_value
        have = err.instance if isinstance(err.instance, dict) else {}
        return [PolicyIssue(name, where, f"missing required field {_short(k)}") for k in missing if k not in have]
    if v == "oneOf" and parts and "rules" in parts:
        return [PolicyIssue(name, where, "a rule needs exactly one of 'patterns' or 'terms'")]
    if v == "not" and parts and "rules" in parts:
        return [
            PolicyIssue(
                name, json_path(parts + ["replacement"]), "'replacement' is only allowed on rules with action 'redact'"
            )
        ]
    if v == "enum":
        return [
            PolicyIssue(
                name, where, f"{_short(err.instance)} is not one of {', '.join(map(repr, err.validator_value))}"
            )
        ]
    if v == "type":
        return [
            PolicyIssue(
                name, where, f"expected {err.validator_value}, got {type(err.instance).__name__} {_short(err.instance)}"
            )
        ]
    if v == "pattern":
        what = {
            "jurisdiction": "a jurisdiction id like 'eu', 'eu-de' or 'default'",
            "parent": "a jurisdiction id like 'eu', 'eu-de' or 'default'",
            "version": "a semantic version like '1.2.0'",
            "id": "an id of letters, digits, '_', '.', '-' (at most 64)",
            "category": "a lowercase id like 'pii' or 'self-harm'",
        }
        key = next((p for p in reversed(parts) if isinstance(p, str)), "")
        if key == "terms":
            return [PolicyIssue(name, where, "a term must not start or end with whitespace or contain line breaks")]
        return [PolicyIssue(name, where, f"{_short(err.instance)} is not {what.get(key, 'in the expected format')}")]
    if v in ("maxLength", "minLength", "maxItems", "minItems", "minimum", "maximum"):
        return [PolicyIssue(name, where, f"{_limit_text(v, err.validator_value, err.instance)}")]
    msg = err.message
    if len(msg) > 200:
        msg = msg[:197] + "..."
    return [PolicyIssue(name, where, msg)]


def _limit_text(v: str, limit: Any, inst: Any) -> str:
    if v == "maxLength":
        return f"longer than {limit} characters ({len(inst)})"
    if v == "minLength":
        return f"shorter than {limit} characters"
    if v == "maxItems":
        return f"more than {limit} items ({len(inst)})"
    if v == "minItems":
        return f"fewer than {limit} items"
    if v == "minimum":
        return f"{_short(inst)} is below the minimum {limit}"
    return f"{_short(inst)} is above the maximum {limit}"


def rule_issues(
    doc: dict[str, Any],
    name: str,
    compile_rules: bool = True,
    skip: set[int] | frozenset = frozenset(),
    compiled: dict | None = None,
) -> list[PolicyIssue]:
    """Checks beyond the schema: unique rule ids, RE2 compilation, nested quantifiers, and
    the policy's compile budget (MAX_PATTERNS_PER_POLICY patterns, MAX_PROGRAM_SIZE_PER_POLICY
    RE2 instructions), so that compiling any file takes bounded time.

    `doc` must be schema-valid except for the rules listed in `skip` (their indices). When
    `compiled` is a dict, it receives {(rule index, pattern index or "terms"): regex}."""
    issues: list[PolicyIssue] = []
    seen: dict[str, int] = {}
    n_patterns = program = 0
    over_budget = False
    for r_i, rule in enumerate(doc.get("rules", [])):
        if r_i in skip:
            continue
        rid = rule["id"]
        if rid in seen:
            issues.append(
                PolicyIssue(
                    name, json_path(["rules", r_i, "id"]), f"duplicate rule id {rid!r} (also $.rules[{seen[rid]}])"
                )
            )
        else:
            seen[rid] = r_i
        if not compile_rules or over_budget:
            continue
        items: list[tuple[Any, Any]] = [(p_i, pat) for p_i, pat in enumerate(rule.get("patterns", []))]
        if "terms" in rule:
            items.append(("terms", rule["terms"]))
        for key, value in items:
            where = ["rules", r_i, "patterns", key] if key != "terms" else ["rules", r_i, "terms"]
            n_patterns += 1
            if n_patterns > MAX_PATTERNS_PER_POLICY:
                issues.append(
                    PolicyIssue(
                        name,
                        json_path(where),
                        f"the policy has more than {MAX_PATTERNS_PER_POLICY} patterns and term lists",
                    )
                )
                over_budget = True
                break
            try:
                cf = rule_casefold(rule)
                rx = compile_terms(value, cf) if key == "terms" else compile_pattern(value, cf)
            except PatternIssue as e:
                issues.append(PolicyIssue(name, json_path(where), str(e)))
                program += TOO_LARGE_COST if is_too_large(e) else 0
            else:
                program += program_size(rx)
                if compiled is not None:
                    compiled[(r_i, key)] = rx
            if program > MAX_PROGRAM_SIZE_PER_POLICY:
                issues.append(
                    PolicyIssue(
                        name,
                        json_path(where),
                        "the policy's patterns and "
                        f"terms compile to more than "
                        f"{MAX_PROGRAM_SIZE_PER_POLICY} RE2 instructions; "
                        "split or simplify them",
                    )
                )
                over_budget = True
                break
    if doc.get("jurisdiction") == "default":
        issues.extend(_default_issues(doc, name))
    return issues


def rule_casefold(rule: dict[str, Any]) -> bool:
    """Whether a rule matches the case-folded view: its `casefold` field, by default true for
    term lists (terms have always ignored case) and false for patterns (case-sensitive unless
    the pattern says `(?i)`)."""
    return bool(rule.get("casefold", "terms" in rule))


def _default_issues(doc: dict[str, Any], name: str) -> list[PolicyIssue]:
    """The default policy must leave outputs unchanged."""
    issues = []
    if doc.get("parent"):
        issues.append(PolicyIssue(name, "$.parent", "the default policy cannot have a parent"))
    if doc.get("rules"):
        issues.append(
            PolicyIssue(
                name, "$.rules", "the default policy must have no rules (outputs under it are returned unchanged)"
            )
        )
    if doc.get("required_notices"):
        issues.append(PolicyIssue(name, "$.required_notices", "the default policy must have no notices"))
    if doc.get("max_output_chars") is not None:
        issues.append(PolicyIssue(name, "$.max_output_chars", "the default policy must not truncate outputs"))
    if (doc.get("output_moderation") or {}).get("enabled"):
        issues.append(
            PolicyIssue(name, "$.output_moderation.enabled", "the default policy must not enable output moderation")
        )
    return issues


def validate_policy_doc(doc: Any, name: str) -> None:
    """Schema + rule checks on an already-parsed document; raises PolicyError."""
    issues = schema_issues(doc, name)
    # Rules that passed the schema are still compiled, so one run reports everything.
    if all(_RULE_PATH.match(i.path) for i in issues):
        bad = {int(_RULE_PATH.match(i.path).group(1)) for i in issues}
        issues += rule_issues(doc, name, skip=bad)
    if issues:
        raise PolicyError(sorted(issues, key=lambda i: _natural(i.path)))


def _natural(path: str) -> list:
    """'$.rules[10]' after '$.rules[2]'."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", path)]


def load_policy_file(path: str | os.PathLike, max_bytes: int = MAX_POLICY_BYTES) -> PolicyFile:
    """Read and fully validate one policy file (see the module docstring)."""
    import hashlib

    name = str(path)
    doc = read_json_limited(path, max_bytes=max_bytes)
    validate_policy_doc(doc, name)
    return PolicyFile(path=name, doc=doc, sha256=hashlib.sha256(canonical_json(doc)).hexdigest())
