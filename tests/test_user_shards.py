"""`make-shards --from`: the user's corpus in every format, duplicates, the seeded split, resume,
the output-folder rule, bad inputs named, and memory that does not grow with the corpus."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from aion_train import cli
from aion_train.data import user_shards
from aion_train.data.shards import iter_shard_samples, manifest_shards, read_manifest, verify_manifest
from aion_train.data.user_shards import BuildArgs, build_user_shards

REPO = Path(__file__).resolve().parents[1]


def texts_of(out: Path, split: str) -> list[str]:
    return [s["txt"].decode() for p in manifest_shards(str(out), split) for s in iter_shard_samples(p)]


def docs(n: int, start: int = 0) -> list[str]:
    return [
        f"Document {i}: the quick brown fox {i * 7919 % 1000} jumps over {i % 13} lazy dogs."
        for i in range(start, start + n)
    ]


def test_every_format_dedup_and_exact_contents(tmp_path):
    pytest.importorskip("pyarrow")
    datasets = pytest.importorskip("datasets")
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = docs(60)
    src = tmp_path / "src"
    (src / "txt").mkdir(parents=True)
    for i in range(10):
        (src / "txt" / f"f{i}.txt").write_text(d[i] + "\n")
    with gzip.open(src / "txt" / "g.txt.gz", "wt") as f:
        f.write(d[10])
    (src / "txt" / "blob.bin").write_bytes(b"\0\1\2binary")
    (src / "txt" / "dup.md").write_text("  " + d[0] + "\n\n")  # same text once stripped
    with open(src / "a.jsonl", "w") as f:
        for t in d[11:25] + [d[11]]:
            f.write(json.dumps({"text": t, "meta": 1}) + "\n")
        f.write("{broken\n" + json.dumps({"meta": 2}) + "\n" + json.dumps({"text": "   "}) + "\n")
    pq.write_table(pa.table({"text": d[25:40], "n": list(range(15))}), src / "b.parquet")
    with open(src / "c.csv", "w") as f:
        f.write("id,text\n" + "".join(f'{i},"{t}"\n' for i, t in enumerate(d[40:50])))
    datasets.Dataset.from_dict({"text": d[50:60] + [d[20]]}).save_to_disk(str(src / "hfds"))

    out = tmp_path / "out"
    b = build_user_shards(
        BuildArgs(
            [str(src / "txt"), str(src / "a.jsonl"), str(src / "b.parquet"), str(src / "c.csv"), str(src / "hfds")],
            str(out),
            val_fraction=0.2,
            samples_per_shard=7,
        )
    )
    c = b["counts"]
    assert c["documents"] == 60 and c["duplicates"] == 3  # dup.md, the repeated JSONL line, the HF row
    assert (c["binary"], c["bad_json"], c["missing_field"], c["empty"]) == (1, 1, 1, 1)
    assert c["records"] == 13 + 18 + 15 + 10 + 11
    train, val = texts_of(out, "train"), texts_of(out, "val")
    assert sorted(train + val) == sorted(d) and not set(train) & set(val)
    assert 0.05 < len(val) / 60 < 0.4
    m = read_manifest(str(out))
    assert [e["num_samples"] for e in m["splits"]["train"]["shards"]][:-1] == [7] * (
        len(train) // 7 - (len(train) % 7 == 0)
    )
    assert verify_manifest(str(out)) == [] and len(m["build"]["inputs"]) == 17  # 13 files in txt/, 3 files, 1 HF folder
    assert all(len(i["sha256"]) == 64 for i in m["build"]["inputs"])


def _bytes_of(out: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))}


def test_split_is_seeded_and_independent_of_workers(tmp_path):
    f = tmp_path / "c.jsonl"
    f.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs(3000)))
    one = build_user_shards(BuildArgs([str(f)], str(tmp_path / "w1"), samples_per_shard=400))
    two = build_user_shards(BuildArgs([str(f)], str(tmp_path / "w2"), samples_per_shard=400, workers=2))
    assert one["counts"] == two["counts"]
    assert _bytes_of(tmp_path / "w1") == _bytes_of(tmp_path / "w2")
    other = build_user_shards(BuildArgs([str(f)], str(tmp_path / "s"), samples_per_shard=400, seed=7))
    assert set(texts_of(tmp_path / "s", "val")) != set(texts_of(tmp_path / "w1", "val"))
    # same documents in another order: the same validation set
    g = tmp_path / "rev.jsonl"
    g.write_text("".join(json.dumps({"text": t}) + "\n" for t in reversed(docs(3000))))
    build_user_shards(BuildArgs([str(g)], str(tmp_path / "r"), samples_per_shard=400))
    assert set(texts_of(tmp_path / "r", "val")) == set(texts_of(tmp_path / "w1", "val"))
    assert other["counts"]["documents"] == 3000


def test_interrupted_build_resumes_to_the_same_bytes(tmp_path, monkeypatch):
    f = tmp_path / "c.jsonl"
    f.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs(2500) + docs(300)))
    ref = tmp_path / "ref"
    build_user_shards(BuildArgs([str(f)], str(ref), samples_per_shard=200))
    real, calls = user_shards._write_shard, []

    def crashing(out, st, state, split):
        calls.append(split)
        if len(calls) == 6:
            raise KeyboardInterrupt  # the user presses Ctrl-C in the middle of the build
        return real(out, st, state, split)

    monkeypatch.setattr(user_shards, "_write_shard", crashing)
    monkeypatch.setattr(user_shards, "CHECKPOINT_RECORDS", 150)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        build_user_shards(BuildArgs([str(f)], str(out), samples_per_shard=200))
    assert not (out / "manifest.json").exists() and (out / user_shards.STATE_FILE).exists()
    monkeypatch.setattr(user_shards, "_write_shard", real)
    again = build_user_shards(BuildArgs([str(f)], str(out), samples_per_shard=200))
    assert again["resumed"] and again["counts"]["documents"] == 2500 and again["counts"]["duplicates"] == 300
    assert _bytes_of(out) == _bytes_of(ref) and not (out / user_shards.STATE_FILE).exists()
    assert build_user_shards(BuildArgs([str(f)], str(out), samples_per_shard=200))["up_to_date"]
    # other arguments: rebuilt, and the shards of the larger build are gone
    build_user_shards(BuildArgs([str(f)], str(out), samples_per_shard=1000))
    assert sorted(p.name for p in out.glob("*.tar")) == [
        "train-00000.tar",
        "train-00001.tar",
        "train-00002.tar",
        "val-00000.tar",
    ]


def test_command_refuses_a_foreign_folder_and_names_bad_inputs(tmp_path, capsys):
    f = tmp_path / "c.jsonl"
    f.write_text("".join(json.dumps({"body": t}) + "\n" for t in docs(20)))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert cli.main(["make-shards", "--from", str(f), "--out", str(foreign), "--text-field", "body"]) == 2
    assert "not written by aion-train" in capsys.readouterr().err and os.listdir(foreign) == ["notes.txt"]
    assert cli.main(["make-shards", "--from", str(f), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "no field 'text'" in err and "body" in err and str(f) in err and not (tmp_path / "o").exists()
    assert cli.main(["make-shards", "--from", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "o")]) == 2
    assert "nope.jsonl: no such file" in capsys.readouterr().err
    assert cli.main(["make-shards", "--from", str(f), "--out", str(tmp_path / "o"), "--val-fraction", "1.5"]) == 1
    assert "--val-fraction 1.5" in capsys.readouterr().err
    argv = ["make-shards", "--from", str(f), "--out", str(tmp_path / "o"), "--text-field", "body", "--verify"]
    assert cli.main(argv) == 0
    assert "20 documents" in capsys.readouterr().out
    assert cli.main([*argv[:4], str(foreign), *argv[5:], "--overwrite"]) == 0
    assert (foreign / "notes.txt").read_text() == "mine" and (foreign / "manifest.json").is_file()


_PEAK = """
import json, resource, sys
from aion_train.data.user_shards import BuildArgs, build_user_shards
build_user_shards(BuildArgs([sys.argv[1]], sys.argv[2], samples_per_shard=256))
print(json.dumps({"peak_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_the_corpus(tmp_path):
    """The demo corpus is ~0.57 MB of text; 1x vs 24x of that (unique documents): the build's
    peak RSS stays within 1.15x (it is the interpreter plus one batch, not the corpus)."""
    peaks = {}
    for scale in (1, 24):
        f = tmp_path / f"c{scale}.jsonl"
        with open(f, "w") as fh:
            for i in range(600 * scale):  # ~950 chars a document
                fh.write(
                    json.dumps({"text": f"doc {i} " + " ".join(f"w{(i * 31 + j) % 9973}" for j in range(160))}) + "\n"
                )
        env = dict(os.environ, PYTHONPATH=str(REPO))
        p = subprocess.run(
            [sys.executable, "-c", _PEAK, str(f), str(tmp_path / f"o{scale}")],
            capture_output=True,
            text=True,
            env=env,
            timeout=600,
        )
        assert p.returncode == 0, p.stderr[-2000:]
        peaks[scale] = json.loads(p.stdout.strip().splitlines()[-1])["peak_kb"]
        assert read_manifest(str(tmp_path / f"o{scale}"))["build"]["counts"]["documents"] == 600 * scale
    assert os.path.getsize(tmp_path / "c24.jsonl") > 20 * 570_000
    assert peaks[24] < 1.15 * peaks[1], peaks
