"""bench data: the JSON fields are real, positive rates measured on a small multimodal set, and
the headroom is the ratio of the two rates it reports."""

from __future__ import annotations

import argparse
import json

import pytest

from aion_train.bench import data as bench_data
from aion_train.commands import bench as bench_cmd
from aion_train.data.multimodal.build import build_multimodal_demo

pytestmark = pytest.mark.requires_binary("espeak-ng")  # the set's speech clips (tests/conftest.py)

SIZES = {
    "vqa_train": 60,
    "vqa_val": 4,
    "digits_train": 20,
    "digits_val": 4,
    "photo_crops": 1,
    "speech_train": 6,
    "speech_val": 2,
    "video_train": 8,
    "video_val": 2,
    "text_train": 30,
    "text_val": 4,
}


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("bench") / "multimodal")
    build_multimodal_demo(out, 400, seed=1, sizes=SIZES, samples_per_shard=16)
    return out


def test_bench_data_fields_are_positive_and_consistent(small_set):
    r = bench_data.run_bench(batches=3, train_steps=1, data_dir=small_set)
    for k in ("loader_samples_per_s", "raw_read_samples_per_s", "train_samples_per_s", "headroom"):
        assert isinstance(r[k], float) and r[k] > 0, (k, r)
    assert r["headroom"] == round(r["loader_samples_per_s"] / r["train_samples_per_s"], 2)
    assert r["loader_workers"] == 2 and r["samples_per_batch"] >= r["batch"][0]
    assert isinstance(r["samples_per_batch"], int) and all(isinstance(b, int) for b in r["batch"])
    # reading bytes without decoding is faster than decoding them
    assert r["raw_read_samples_per_s"] > r["loader_samples_per_s"]
    assert r["train_model"] in ("multimodal", "stand-in: text transformer")


def test_bench_command_prints_one_json_line(small_set, capsys, monkeypatch):
    parser = argparse.ArgumentParser()
    bench_cmd.add_arguments(parser)
    args = parser.parse_args(["data", "--json", "--quick"])
    real = bench_data.run_bench
    monkeypatch.setattr(
        bench_data, "run_bench", lambda **kw: real(data_dir=small_set, **{**kw, "batches": 2, "train_steps": 1})
    )
    assert bench_cmd.run(args) == 0
    line = capsys.readouterr().out.strip().splitlines()
    assert len(line) == 1 and json.loads(line[0])["loader_samples_per_s"] > 0
