"""Per-jurisdiction output policies: versioned artifacts enforced apart from the weights.

A policy file (JSON, see `schema.POLICY_SCHEMA`) lists block/redact/flag rules (RE2 patterns
or case-insensitive terms, matched on a normalised view of the output: NFKC, default-ignorable
characters removed, case-folded per rule; see normalize.py), a length limit, required notices
and output-moderation settings
for one jurisdiction, optionally inheriting from a parent jurisdiction. `aion-train
build-policy` validates files, resolves inheritance and writes one hashed bundle; at
inference `PolicySet` applies the bundle to model outputs. Changing a policy never changes
or retrains the model, and the default policy has no rules, so outputs under it are
unchanged.

    from aion_train.policy import PolicySet, enforce, generate_with_policy
    policies = PolicySet.load("artifacts/policy/policy_bundle.json")
    res = generate_with_policy(generate_fn, prompt, policies, "eu-de")
    res.text, res.blocked, res.flags, res.redactions, res.policy_hash

Needs the `google-re2` package (import name `re2`).
"""

from .bundle import (
    BUNDLE_FILE,
    ResolvedPolicy,
    build_bundle,
    bundle_hash,
    content_hash,
    make_bundle,
    resolve_policies,
    write_bundle,
)
from .enforce import (
    DEFAULT_POLICY,
    REFUSAL_NOTICE,
    CompiledRule,
    EnforcementResult,
    Flag,
    Policy,
    PolicySet,
    enforce,
    generate_with_policy,
)
from .errors import ModerationUnavailable, PolicyError, PolicyIssue, UnknownJurisdiction
from .loader import PolicyFile, canonical_json, json_depth, load_policy_file, read_json_limited, validate_policy_doc
from .patterns import PatternIssue, check_pattern, compile_pattern, compile_terms
from .schema import (
    DEFAULT_JURISDICTION,
    MAX_JSON_DEPTH,
    MAX_POLICY_BYTES,
    POLICY_SCHEMA,
    SCHEMA_VERSION,
    default_policy,
    policy_schema,
)

__all__ = [
    "BUNDLE_FILE",
    "CompiledRule",
    "DEFAULT_JURISDICTION",
    "DEFAULT_POLICY",
    "EnforcementResult",
    "Flag",
    "MAX_JSON_DEPTH",
    "MAX_POLICY_BYTES",
    "ModerationUnavailable",
    "POLICY_SCHEMA",
    "PatternIssue",
    "Policy",
    "PolicyError",
    "PolicyFile",
    "PolicyIssue",
    "PolicySet",
    "REFUSAL_NOTICE",
    "ResolvedPolicy",
    "SCHEMA_VERSION",
    "UnknownJurisdiction",
    "build_bundle",
    "bundle_hash",
    "canonical_json",
    "check_pattern",
    "compile_pattern",
    "compile_terms",
    "content_hash",
    "default_policy",
    "enforce",
    "generate_with_policy",
    "json_depth",
    "load_policy_file",
    "make_bundle",
    "policy_schema",
    "read_json_limited",
    "resolve_policies",
    "validate_policy_doc",
    "write_bundle",
]
