"""Errors raised while reading, resolving or enforcing policies.

Every problem found in a file is one `PolicyIssue` that names the file and the JSON path
inside it (`$` for the document itself), so that a message reads like

    configs/policies/br.json: $.rules[2].patterns[0]: nested quantifier ...
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class PolicyIssue:
    file: str
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}: {self.path}: {self.message}"


class PolicyError(Exception):
    """One or more `PolicyIssue`s; `str(err)` is one issue per line."""

    def __init__(self, issues: Iterable[PolicyIssue] | str):
        if isinstance(issues, str):
            issues = [PolicyIssue("<policy>", "$", issues)]
        self.issues: list[PolicyIssue] = list(issues)
        super().__init__("\n".join(str(i) for i in self.issues))

    @classmethod
    def one(cls, file: str, path: str, message: str) -> PolicyError:
        return cls([PolicyIssue(str(file), path, message)])


class UnknownJurisdiction(PolicyError, KeyError):
    """`PolicySet[j]` for a jurisdiction that the bundle does not have and no declared
    fallback covers (fails closed; the message names the known jurisdictions)."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return "\n".join(str(i) for i in self.issues)


class ModerationUnavailable(PolicyError):
    """The policy turns output moderation on but no moderator was supplied (fails closed)."""


def json_path(parts: Sequence[str | int]) -> str:
    """('rules', 2, 'patterns', 0) -> '$.rules[2].patterns[0]'; odd keys as $['a b']."""
    out = ["$"]
    for p in parts:
        if isinstance(p, int):
            out.append(f"[{p}]")
        elif p.isidentifier():
            out.append(f".{p}")
        else:
            out.append("[" + _quote(p) + "]")
    return "".join(out)


def _quote(key: str) -> str:
    if len(key) > 60:
        key = key[:57] + "..."
    return "'" + key.replace("\\", "\\\\").replace("'", "\\'") + "'"
