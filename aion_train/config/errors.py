"""The one error type of the config tree."""
from __future__ import annotations


class ConfigError(ValueError):
    """A config problem; `errors` lists every message, each naming its key."""

    def __init__(self, errors: list[str]):
        self.errors = list(errors)
        super().__init__("invalid config:\n  " + "\n  ".join(self.errors))
