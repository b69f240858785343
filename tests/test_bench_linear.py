"""bench linear --quick: the JSON's medians, bandwidths and speedups follow from the rounds it
reports, and the kernel's products are timed only where it runs."""

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from aion_train.bench.timing import paired_ratio
from aion_train.kernels import bf16_linear

REPO = Path(__file__).resolve().parents[1]


def test_quick_bench_fields_follow_from_the_rounds():
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, "-m", "aion_train.cli", "bench", "linear", "--quick", "--json"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout
    r = json.loads(lines[0])
    assert r["kernel"] is bf16_linear.available() and r["read_gb_s"] > 0 and r["rounds"] == 2
    (shape,) = r["shapes"]
    assert (shape["name"], shape["out_features"], shape["in_features"]) == ("w13", 256, 128)
    assert shape["weight_mb"] == round(256 * 128 * 2 / 1e6, 2)
    assert sorted(shape["rows"]) == ["1", "8"]
    for entry in shape["rows"].values():
        rounds = entry["rounds_us"]
        assert "plain" in rounds and ("kernel" in rounds) is r["kernel"]
        for c, v in rounds.items():
            assert len(v) == 2
            assert abs(entry[f"{c}_us"] - statistics.median(v)) <= 0.1
            assert (
                abs(entry[f"{c}_gb_s"] - 256 * 128 * 2 / 1e3 / statistics.median(v)) <= 0.1 + 0.01 * entry[f"{c}_gb_s"]
            )
        if "kernel" in rounds and "onednn" in rounds:
            # the rounds are printed to 0.01 us, the speedup from the unrounded times
            want = paired_ratio(rounds["onednn"], rounds["kernel"])
            assert abs(entry["speedup_vs_onednn"] - want) <= 1e-3 + 0.01 * want
