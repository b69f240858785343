"""The process environment: the one place in the package that writes `os.environ`.

It is written at the command-line entry (`aion_train.cli.main`), in every rank that
`parallel.spawn.run_ranks` or a pipeline worker starts (their launcher variables), and where
DeepSpeed needs launcher variables that a one-process run lacks. Everything else reads."""

from __future__ import annotations

import os
from collections.abc import Mapping

# An offline platform: no hub downloads at run time, no telemetry.
BASE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}


def set_env(updates: Mapping[str, str | None] | None = None, defaults: Mapping[str, str] | None = None) -> None:
    """Set `defaults` where unset, then `updates` (a value None removes the variable)."""
    for key, value in (defaults or {}).items():
        os.environ.setdefault(key, str(value))
    for key, value in (updates or {}).items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = str(value)


def start_process(updates: Mapping[str, str | None] | None = None) -> None:
    """At a process's start: the platform's base environment where the user has not set it
    (BASE_ENV), then `updates` (a rank's launcher variables)."""
    set_env(updates, defaults=BASE_ENV)
