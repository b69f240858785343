"""JSON Schema (draft 2020-12) of a per-jurisdiction policy file, and the built-in default.

A policy is a versioned artifact applied to a model's *outputs* at inference; it never
touches the weights. Fields:

    jurisdiction       "default" or an id like "eu", "eu-de", "br", "us-ca"
    version            semver of this policy file, e.g. "1.2.0"
    parent             optional jurisdiction to inherit from (child rules are appended after
                       the parent's; scalar fields override; notices are appended)
    rules              [{id, action: block|redact|flag, patterns: [RE2 regex] | terms: [str],
                         category?, replacement? (redact only), casefold?}]
                       Patterns and terms match a normalised view of the output (NFKC,
                       default-ignorable characters such as zero-width spaces and soft
                       hyphens removed); a redaction removes the original characters.
                       `casefold` (boolean, optional): also case-fold the view (and ignore
                       case in the pattern); default true for terms, false for patterns.
                       Write patterns in NFKC form (a decomposed "e" + U+0301 in a pattern
                       never matches, the view has the composed character).
    max_output_chars   null (no limit) or the most characters of model output kept
    required_notices   strings appended to every output
    output_moderation  {"enabled": bool, "categories": [str], "threshold": 0..1}

Every object has `additionalProperties: false`, so a misspelt field is an error, not a
silently ignored setting. The schema's own `pattern`s are simple (no nested quantifiers) so
that validating a hostile file stays fast.
"""

from __future__ import annotations

import copy
from typing import Any

POLICY_SCHEMA_ID = "https://aion-train.local/schemas/policy/v1.json"
#: Bumped when the policy file format or the bundle layout changes incompatibly.
SCHEMA_VERSION = 1
BUNDLE_FORMAT = "aion-policy-bundle"
DEFAULT_JURISDICTION = "default"

# Hostile-input limits (checked before or while parsing).
MAX_POLICY_BYTES = 1 << 20  # 1 MiB per policy file, checked with stat() first
MAX_BUNDLE_BYTES = 64 << 20  # a bundle holds many resolved policies
MAX_JSON_DEPTH = 32  # brackets nesting; a policy needs 4
MAX_JSON_VALUES = 50_000  # values in one policy file (bounds schema validation time)
MAX_BUNDLE_VALUES = 5_000_000
MAX_RULES = 1000
MAX_PATTERNS_PER_RULE = 100
MAX_PATTERN_CHARS = 1000
MAX_TERMS_PER_RULE = 1000
MAX_TERM_CHARS = 200
MAX_INHERITANCE_DEPTH = 16
# Compile budget of one (resolved) policy: bounds the time to compile a hostile file.
MAX_PATTERNS_PER_POLICY = 5000
MAX_PROGRAM_SIZE_PER_POLICY = 2_000_000  # RE2 instructions, all patterns and term lists

_ID = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
_CATEGORY = r"^[a-z][a-z0-9_-]{0,63}$"
_JURISDICTION = r"^(default|[a-z]{2}(-[a-z0-9]{1,16}){0,4})$"
_SEMVER = (
    r"^(0|[1-9][0-9]{0,8})\.(0|[1-9][0-9]{0,8})\.(0|[1-9][0-9]{0,8})"
    r"(-[0-9A-Za-z.-]{1,64})?(\+[0-9A-Za-z.-]{1,64})?$"
)

POLICY_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": POLICY_SCHEMA_ID,
    "title": "aion-train output policy (one jurisdiction)",
    "type": "object",
    "additionalProperties": False,
    "required": ["jurisdiction", "version"],
    "properties": {
        "$schema": {"type": "string", "maxLength": 200},
        "jurisdiction": {"type": "string", "maxLength": 90, "pattern": _JURISDICTION},
        "version": {"type": "string", "maxLength": 160, "pattern": _SEMVER},
        "parent": {"type": "string", "maxLength": 90, "pattern": _JURISDICTION},
        "description": {"type": "string", "maxLength": 2000},
        "rules": {
            "type": "array",
            "maxItems": MAX_RULES,
            "items": {"$ref": "#/$defs/rule"},
        },
        "max_output_chars": {
            "anyOf": [{"type": "null"}, {"type": "integer", "minimum": 1, "maximum": 10_000_000}],
        },
        "required_notices": {
            "type": "array",
            "maxItems": 20,
            "items": {"type": "string", "minLength": 1, "maxLength": 2000},
        },
        "output_moderation": {"$ref": "#/$defs/moderation"},
    },
    "$defs": {
        "rule": {
            "type": "object",
            "additionalProperties": False,
            "required": ["id", "action"],
            "properties": {
                "id": {"type": "string", "maxLength": 64, "pattern": _ID},
                "action": {"enum": ["block", "redact", "flag"]},
                "category": {"type": "string", "maxLength": 64, "pattern": _CATEGORY},
                "description": {"type": "string", "maxLength": 2000},
                "patterns": {
                    "type": "array",
                    "minItems": 1,
                    "maxItems": MAX_PATTERNS_PER_RULE,
                    "items": {"type": "string", "minLength": 1, "maxLength": MAX_PATTERN_CHARS},
                },
                "terms": {
                    "type": "array",
                    "minItems": 1,
                    "maxItems": MAX_TERMS_PER_RULE,
                    "items": {
                        "type": "string",
                        "minLength": 1,
                        "maxLength": MAX_TERM_CHARS,
                        "pattern": r"^\S(?:.{0,198}\S)?$",
                    },
                },
                "replacement": {"type": "string", "maxLength": 200},
                # match the case-folded view; default true for terms, false for patterns
                "casefold": {"type": "boolean"},
            },
            # exactly one of patterns / terms
            "oneOf": [{"required": ["patterns"]}, {"required": ["terms"]}],
            # replacement only makes sense for redact
            "if": {"properties": {"action": {"const": "redact"}}},
            "else": {"not": {"required": ["replacement"]}},
        },
        "moderation": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "enabled": {"type": "boolean"},
                "categories": {
                    "type": "array",
                    "maxItems": 64,
                    "uniqueItems": True,
                    "items": {"type": "string", "maxLength": 64, "pattern": _CATEGORY},
                },
                "threshold": {"type": "number", "minimum": 0, "maximum": 1},
            },
        },
    },
}

DEFAULT_MODERATION: dict[str, Any] = {"enabled": False, "categories": [], "threshold": 0.5}
DEFAULT_REDACTION = "[REDACTED]"

#: The built-in default policy: no rules, no notices, no limit, moderation off, so that
#: `enforce(x, default).text == x` for every string x.
DEFAULT_POLICY_DOC: dict[str, Any] = {
    "jurisdiction": DEFAULT_JURISDICTION,
    "version": "1.0.0",
    "rules": [],
    "max_output_chars": None,
    "required_notices": [],
    "output_moderation": DEFAULT_MODERATION,
}


def policy_schema() -> dict[str, Any]:
    """A deep copy of POLICY_SCHEMA (safe to modify or dump)."""
    return copy.deepcopy(POLICY_SCHEMA)


def default_policy() -> dict[str, Any]:
    return copy.deepcopy(DEFAULT_POLICY_DOC)
