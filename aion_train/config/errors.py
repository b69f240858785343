"""The one error type of the config tree."""

from __future__ import annotations


class ConfigError(ValueError):
    """A config problem; `errors` lists every message, each naming its key."""

    def __init__(self, errors: list[str]):
        self.errors = list(errors)
        super().__init__("invalid config:\n  " + "\n  ".join(self.errors))


def require_divisible(errors: list[str], key: str, value: int, by_key: str, by: int, why: str = "") -> None:
    """Append "KEY=V is not divisible by BY_KEY=B[ (why)]" unless `by` divides `value`."""
    if value % by:
        errors.append(f"{key}={value} is not divisible by {by_key}={by}" + (f" ({why})" if why else ""))
