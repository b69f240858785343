"""bench serve --quick: a real server on loopback and transformers' generate on the same
weights; the printed medians and ratios follow from the per-round throughputs the same JSON
reports, and the fields are the ones the serving issue names."""

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # ~20-40 s: a tokenizer, a server, a client process, HF generate


@pytest.fixture(scope="module")
def result():
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, "-m", "aion_train.cli", "bench", "serve", "--quick", "--json"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout
    return json.loads(lines[0])


def test_fields_and_ratios_follow_from_the_rounds(result):
    from aion_train.bench import serve

    clients = [str(c) for c in serve.QUICK["clients"]]
    for key in ("tokens_per_s", "hf_tokens_per_s", "ratio_vs_hf", "ttft_ms_p50", "ttft_ms_p99", "itl_ms_p50"):
        assert sorted(result[key]) == sorted(clients), key
    rounds = result["rounds_tokens_per_s"]
    for c in clients:
        ours, hf = rounds["ours"][c], rounds["hf"][c]
        assert len(ours) == len(hf) == serve.QUICK["rounds"]
        assert all(x > 0 for x in ours + hf)
        assert result["tokens_per_s"][c] == round(statistics.median(ours), 1)
        assert result["hf_tokens_per_s"][c] == round(statistics.median(hf), 1)
        assert result["ratio_vs_hf"][c] == round(statistics.median(a / b for a, b in zip(ours, hf)), 3)
        hf32 = rounds["hf_fp32"][c]
        assert result["ratio_vs_hf_fp32"][c] == round(statistics.median(a / b for a, b in zip(ours, hf32)), 3)
        assert 0 < result["ttft_ms_p50"][c] <= result["ttft_ms_p99"][c]
        assert result["itl_ms_p50"][c] > 0
    pol = rounds["policy"]
    assert result["policy_overhead"] == round(
        statistics.median(a / b for a, b in zip(pol[serve.POLICY_JURISDICTION], pol["default"])), 3
    )
    assert result["new_tokens"] == serve.QUICK["new_tokens"]


def test_params_are_the_configs_model(result):
    from aion_train.config import load_config
    from aion_train.model import build_model

    cfg = load_config(str(REPO / "configs/tiny_cpu.yaml"))
    assert result["params"] == sum(p.numel() for p in build_model(cfg.model).parameters())
