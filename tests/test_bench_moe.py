"""bench moe --quick: the printed ratios and medians follow from the per-round timings the
same JSON reports (run as the CLI runs it, in its own process: DeepSpeed's MoE layer starts a
process group)."""

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # ~40-80 s on two shared cores (DeepSpeed's import and MoE layer)


@pytest.fixture(scope="module")
def result():
    from aion_train.bench import moe

    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, "-m", "aion_train.cli", "bench", "moe", "--quick", "--json"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout  # --json: one line (DeepSpeed's notices go to stderr)
    r = json.loads(lines[0])
    assert r["tokens"] == moe.QUICK["tokens"] and r["d_model"] == moe.QUICK["d_model"]
    return r


def _check_point(p, ratio_key="ratio", moe_key="moe_ms", dense_key="dense_equiv_ms", rounds=None):
    moe_ms, dense_ms = p["rounds_ms"]["moe"], p["rounds_ms"]["dense"]
    assert len(moe_ms) == len(dense_ms) >= (rounds or 1)
    assert all(isinstance(t, float) and t > 0 for t in moe_ms + dense_ms)
    assert p[ratio_key] == round(statistics.median(a / b for a, b in zip(moe_ms, dense_ms)), 3)
    assert p[moe_key] == round(statistics.median(moe_ms), 2)
    assert p[dense_key] == round(statistics.median(dense_ms), 2)


def test_ratios_are_computed_from_the_reported_rounds(result):
    from aion_train.bench import moe

    _check_point(result, rounds=moe.QUICK["rounds"])
    assert [p["tokens"] for p in result["sweep"]] == list(moe.QUICK["sweep"])
    for p in result["sweep"]:
        _check_point(p)
    main = next(p for p in result["sweep"] if p["tokens"] == result["tokens"])
    assert main["rounds_ms"] == result["rounds_ms"]  # the same measurement


def test_fields_have_their_names_and_types(result):
    for k in ("moe_ms", "dense_equiv_ms", "ratio", "dispatch_ms", "experts_ms", "deepspeed_moe_ms"):
        assert isinstance(result[k], float) and result[k] > 0, k
    for k in ("tokens", "experts", "top_k", "d_model", "d_ff_expert", "threads"):
        assert isinstance(result[k], int) and result[k] > 0, k
    assert result["capacity"] == "dropless"
