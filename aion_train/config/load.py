"""YAML + dotted overrides -> typed `Config`, with errors that name the key."""

from __future__ import annotations

import dataclasses
import difflib
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError
from .schema import Config
from .validate import validate_config


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _suggest(key: str, valid: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _coerce(value: Any, hint, path: str, errors: list[str]):
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        inner = [a for a in args if a is not type(None)][0]
        return _coerce(value, inner, path, errors)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            errors.append(f"{path}: expected a mapping, got {type(value).__name__}")
            return hint()
        return _build(hint, value, path, errors)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        errors.append(f"{path}: expected true/false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            errors.append(f"{path}: expected an integer, got {value!r}")
            return value
        try:
            return int(value)
        except ValueError:
            errors.append(f"{path}: expected an integer, got {value!r}")
            return value
    if hint is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            errors.append(f"{path}: expected a number, got {value!r}")
            return value
    if hint is str:
        if isinstance(value, bool):  # YAML 1.1 reads on/off/yes/no as booleans
            errors.append(
                f"{path}: expected a string, got the boolean {value!r} (YAML reads on/off/yes/no "
                "as booleans: quote the value)"
            )
        return str(value)
    if hint is tuple or origin is tuple:
        if isinstance(value, (list, tuple)):
            return tuple(float(v) for v in value)
        errors.append(f"{path}: expected a list, got {value!r}")
        return value
    if hint is dict or origin is dict:
        if not isinstance(value, dict):
            errors.append(f"{path}: expected a mapping, got {value!r}")
        return value
    return value


def _build(cls, data: dict, prefix: str, errors: list[str]):
    hints = _hints(cls)
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else key
        if key not in hints:
            errors.append(f"{path}: unknown key{_suggest(key, hints)}")
            continue
        kwargs[key] = _coerce(value, hints[key], path, errors)
    return cls(**kwargs)


def parse_overrides(overrides: Iterable[str]) -> dict:
    """['model.n_layers=4', 'train.lr=1e-3'] -> nested dict (values parsed as YAML scalars)."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError([f"{item}: an override must look like section.key=value"])
        dotted, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else ""
        node = tree
        parts = dotted.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError([f"{dotted}: '{part}' is both a value and a section"])
        node[parts[-1]] = value
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def load_config(
    path: str | Path | None = None, overrides: Iterable[str] = (), world_size: int | None = None, validate: bool = True
) -> Config:
    """Load YAML (or defaults), apply dotted overrides, build and validate the tree."""
    data: dict = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError([f"config file {p} does not exist"])
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError([f"{p}: not valid YAML: {e}"]) from None
        if not isinstance(data, dict):
            raise ConfigError([f"{p}: the top level must be a mapping"])
    data = _merge(data, parse_overrides(overrides))
    errors: list[str] = []
    cfg = _build(Config, data, "", errors)
    if errors:
        raise ConfigError(errors)
    if world_size is not None:
        cfg.parallel.world_size = world_size
    resolve_run_dir(cfg)
    if validate:
        validate_config(cfg)
    return cfg


RUN_DIR_FILE_KEYS = (
    ("sft", "data_files"),
    ("sft", "train_files"),
    ("sft", "eval_files"),
    ("rm", "train_files"),
    ("rm", "eval_files"),
    ("ppo", "prompt_files"),
)


def resolve_run_dir(cfg) -> None:
    """`{run_dir}` in a file list (the files an earlier pipeline phase writes) is the run's
    `run_dir`, so that `run_dir=...` on the command line moves them with the run."""
    for section, key in RUN_DIR_FILE_KEYS:
        owner = getattr(cfg, section)
        files = getattr(owner, key)
        if isinstance(files, list):
            setattr(owner, key, [f.replace("{run_dir}", str(cfg.run_dir)) if isinstance(f, str) else f for f in files])


def config_to_dict(cfg) -> dict:
    def conv(v):
        if isinstance(v, tuple):
            return list(v)
        return v

    d = dataclasses.asdict(cfg)

    def walk(x):
        if isinstance(x, dict):
            return {k: walk(v) for k, v in x.items()}
        return conv(x)

    return walk(d)


def config_from_dict(data: dict) -> Config:
    errors: list[str] = []
    cfg = _build(Config, data, "", errors)
    if errors:
        raise ConfigError(errors)
    return cfg


def flatten(d, prefix: str = "") -> dict:
    """Nested mappings -> {"a.b.c": leaf} (non-empty mappings are walked)."""
    from collections.abc import Mapping

    out = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def dump_yaml(cfg) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
