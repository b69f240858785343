"""The `runtime` config section and the process environment: validated up front, applied once,
never overriding what the user set."""

from __future__ import annotations

import os
import sys

import pytest

from aion_train.config import ConfigError, load_config
from aion_train.config.schema import RuntimeConfig
from aion_train.process_env import BASE_ENV, set_env, start_process
from aion_train.runtime import apply_runtime, show_progress_bar


@pytest.mark.parametrize(
    "key,value",
    [("runtime.grouped_mm", "sometimes"), ("runtime.cpu_allocator", "jemalloc"), ("runtime.progress_bar", "sometimes")],
)
def test_bad_runtime_values_are_named(key, value):
    with pytest.raises(ConfigError, match=f"{key}='{value}': must be one of"):
        load_config(overrides=[f"{key}={value}"])


def test_a_yaml_boolean_where_a_word_is_expected_is_named():
    with pytest.raises(ConfigError, match="runtime.progress_bar: expected a string, got the boolean True"):
        load_config(overrides=["runtime.progress_bar=on"])


def test_apply_runtime_sets_the_allocator_and_logs_once(monkeypatch, caplog):
    from aion_train.parallel import device

    monkeypatch.setattr(device, "_cpu_allocator", "keep")
    with caplog.at_level("INFO", logger="aion_train.runtime"):
        apply_runtime(load_config(overrides=["runtime.grouped_mm=per_expert", "runtime.cpu_allocator=system"]).runtime)
    assert device._cpu_allocator == "system"
    lines = [r.getMessage() for r in caplog.records if r.name == "aion_train.runtime"]
    assert len(lines) == 1 and "grouped_mm=per_expert" in lines[0] and "cpu_allocator=system" in lines[0]


def test_the_models_modules_get_one_execution_policy():
    import torch

    from aion_train.model import build_model
    from aion_train.runtime import apply_model_execution

    cfg = load_config(overrides=["runtime.grouped_mm=per_expert", "model.moe.every=1"])
    model = apply_model_execution(build_model(cfg.model, seed=0), torch.device("cpu"), cfg.runtime)
    holders = [m for m in model.modules() if hasattr(m, "execution")]
    holders += [m.dispatcher for m in model.modules() if hasattr(getattr(m, "dispatcher", None), "execution")]
    kinds = {type(h).__name__ for h in holders}
    assert {"Attention", "GroupedExperts", "LocalDispatcher"} <= kinds, kinds
    policies = {h.execution for h in holders}
    assert len(policies) == 1
    (policy,) = policies
    assert policy.grouped_mm == "per_expert" and policy.pad_expert_groups and policy.attention_fp32


class _Stream:
    def __init__(self, tty):
        self.tty = tty

    def isatty(self):
        return self.tty


@pytest.mark.parametrize(
    "setting,tty,shown", [("auto", True, True), ("auto", False, False), ("always", False, True), ("never", True, False)]
)
def test_progress_bar_follows_the_terminal_unless_told(monkeypatch, setting, tty, shown):
    monkeypatch.setattr(sys, "stderr", _Stream(tty))
    assert show_progress_bar(RuntimeConfig(progress_bar=setting)) is shown


def test_start_process_keeps_what_the_user_set_and_applies_updates(monkeypatch):
    for key in BASE_ENV:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # the user's choice stays
    monkeypatch.setenv("AION_TEST_GONE", "x")
    monkeypatch.setenv("AION_TEST_KEEP", "user")
    monkeypatch.delenv("AION_TEST_NEW", raising=False)
    start_process({"AION_TEST_GONE": None, "AION_TEST_NEW": "1"})
    assert os.environ["HF_HUB_OFFLINE"] == "0"
    assert os.environ["TRANSFORMERS_OFFLINE"] == "1" and os.environ["MLFLOW_DISABLE_TELEMETRY"] == "true"
    assert "AION_TEST_GONE" not in os.environ and os.environ["AION_TEST_NEW"] == "1"
    set_env(defaults={"AION_TEST_KEEP": "default"})
    assert os.environ["AION_TEST_KEEP"] == "user"
    monkeypatch.delenv("AION_TEST_NEW")
