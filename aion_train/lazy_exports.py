"""Package exports imported on first use (PEP 562), so that importing a package does not
import every heavy library its modules use."""

from __future__ import annotations

import importlib


def lazy_exports(package: str, exports: dict[str, str], namespace: dict):
    """(`__getattr__`, `__dir__`) for the package `package` whose names `exports` maps to
    the submodule defining each; a name is imported once, then kept in `namespace`."""

    def __getattr__(name: str):
        if name in exports:
            value = getattr(importlib.import_module(f".{exports[name]}", package), name)
            namespace[name] = value
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__():
        return sorted(set(namespace) | set(exports))

    return __getattr__, __dir__
