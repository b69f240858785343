"""No command deletes what it did not write (aion_train.ownership and every writing command).

Each writing command is pointed at a folder holding a user's files: it must refuse before
touching anything (exit status 2, a message naming the folder and --overwrite), and the
files must be unchanged afterwards."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from aion_train import cli
from aion_train.data.demo import ensure_demo_data
from aion_train.data.shards import read_manifest, write_shards
from aion_train.ownership import MARKER, ForeignFolderError, claim_dir, is_ours, publish_dir, read_marker

REPO = Path(__file__).resolve().parents[1]


def _user_folder(path: Path) -> dict[str, str]:
    """A user's folder: a notes file and a tar shard of their own (named like ours)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "notes.txt").write_text("my experiment notes\n")
    (path / "train-00000.tar").write_bytes(os.urandom(4096))
    return _digest(path)


def _digest(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir()) if p.is_file()}


def _refused(capsys, argv: list[str], folder: Path) -> str:
    rc = cli.main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert str(folder) in err and "--overwrite" in err and "not written by aion-train" in err, err
    return err


# -- the rule itself ---------------------------------------------------------------------


def test_claim_dir_absent_empty_ours_foreign(tmp_path):
    assert claim_dir(tmp_path / "new", "pretrain") == tmp_path / "new"
    assert read_marker(tmp_path / "new")["kinds"] == ["pretrain"]
    (tmp_path / "empty").mkdir()
    claim_dir(tmp_path / "empty", "sft")
    claim_dir(tmp_path / "new", "sft")  # ours: claimed again, both commands recorded
    assert read_marker(tmp_path / "new")["kinds"] == ["pretrain", "sft"]
    before = _user_folder(tmp_path / "user")
    with pytest.raises(ForeignFolderError, match="--overwrite"):
        claim_dir(tmp_path / "user", "pretrain")
    assert _digest(tmp_path / "user") == before and not (tmp_path / "user" / MARKER).exists()
    claim_dir(tmp_path / "user", "pretrain", overwrite=True)
    assert {k: v for k, v in _digest(tmp_path / "user").items() if k != MARKER} == before
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ForeignFolderError, match="not a folder"):
        claim_dir(tmp_path / "afile", "pretrain")


def test_publish_dir_replaces_only_its_own_entries(tmp_path):
    final = tmp_path / "out"

    def build(names):
        tmp = tmp_path / f".out.tmp-{len(list(tmp_path.iterdir()))}"
        tmp.mkdir()
        for n in names:
            (tmp / n).write_text(f"{n} v{len(names)}")
        return tmp

    publish_dir(build(["a", "b", "c", "manifest.json"]), final, "make-shards", last=("manifest.json",))
    assert read_marker(final)["files"] == ["a", "b", "c", "manifest.json"]
    (final / "user.txt").write_text("mine")  # a user's file inside our folder
    publish_dir(build(["a", "manifest.json"]), final, "make-shards", last=("manifest.json",))
    assert sorted(p.name for p in final.iterdir()) == sorted([MARKER, "a", "manifest.json", "user.txt"])
    assert (final / "a").read_text() == "a v2" and (final / "user.txt").read_text() == "mine"
    assert read_marker(final)["files"] == ["a", "manifest.json"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # no temp left over
    foreign = tmp_path / "foreign"
    before = _user_folder(foreign)
    with pytest.raises(ForeignFolderError):
        publish_dir(build(["a"]), foreign, "make-shards")
    assert _digest(foreign) == before


def test_folder_of_our_folders_is_ours(tmp_path):
    claim_dir(tmp_path / "demo" / "multimodal", "make-shards")
    assert is_ours(tmp_path / "demo")
    (tmp_path / "demo" / "notes.txt").write_text("x")
    assert not is_ours(tmp_path / "demo")


def test_write_shards_removes_only_the_shards_its_manifest_lists(tmp_path):
    write_shards(({"__key__": f"k{i}", "txt": "x" * 10} for i in range(6)), str(tmp_path), "train", 2)
    assert len(read_manifest(str(tmp_path))["splits"]["train"]["shards"]) == 3
    (tmp_path / "train-00009.tar").write_bytes(b"user's own")  # not in the manifest
    write_shards(({"__key__": f"k{i}", "txt": "x"} for i in range(2)), str(tmp_path), "train", 2)
    names = sorted(p.name for p in tmp_path.glob("train-*.tar"))
    assert names == ["train-00000.tar", "train-00009.tar"]
    assert (tmp_path / "train-00009.tar").read_bytes() == b"user's own"


# -- the demo data ----------------------------------------------------------------------


def test_demo_data_is_never_built_over_a_foreign_folder(tmp_path):
    before = _user_folder(tmp_path / "mine")
    with pytest.raises(ForeignFolderError, match="mine"):
        ensure_demo_data(str(tmp_path / "mine"), 1024)
    assert _digest(tmp_path / "mine") == before


def test_demo_folder_with_a_bad_checksum_is_rebuilt_and_user_files_stay(tmp_path):
    d = tmp_path / "demo"
    paths = ensure_demo_data(str(d), 1024)
    (d / "notes.txt").write_text("kept")
    shard = Path(paths["train"][0])
    good = shard.read_bytes()
    shard.write_bytes(bytes(b ^ 0xFF for b in good[:512]) + good[512:])  # same size, other bytes
    ensure_demo_data(str(d), 1024)
    assert shard.read_bytes() == good
    assert (d / "notes.txt").read_text() == "kept"


def test_demo_folder_written_before_markers_is_recognised(tmp_path):
    d = tmp_path / "demo"
    ensure_demo_data(str(d), 1024)
    (d / MARKER).unlink()
    ensure_demo_data(str(d), 1024, seed=7)  # other settings: rebuilt, not refused
    assert read_manifest(str(d))["demo"]["seed"] == 7


# -- every writing command refuses a user's folder, and --overwrite writes beside them ----


def test_make_shards_refuses_then_overwrites_keeping_user_files(tmp_path, capsys):
    out = tmp_path / "existing"
    before = _user_folder(out)
    _refused(capsys, ["make-shards", "--out", str(out), "--modality", "text", "--vocab-size", "1024"], out)
    assert _digest(out) == before
    _refused(capsys, ["make-shards", "--out", str(out), "--modality", "multimodal", "--vocab-size", "1024"], out)
    assert _digest(out) == before and not (out / "multimodal").exists()
    assert (
        cli.main(["make-shards", "--out", str(out), "--modality", "text", "--vocab-size", "1024", "--overwrite"]) == 0
    )
    capsys.readouterr()
    assert (out / "notes.txt").read_text() == "my experiment notes\n"
    assert read_manifest(str(out))["demo"]["complete"]


def test_pretrain_refuses_a_foreign_data_dir_and_run_dir(tmp_path, capsys):
    cfg = str(REPO / "configs" / "tiny_cpu.yaml")
    data = tmp_path / "my_folder"
    before = _user_folder(data)
    _refused(
        capsys, ["pretrain", "--config", cfg, f"data.dir={data}", f"run_dir={tmp_path / 'run'}", "train.steps=5"], data
    )
    assert _digest(data) == before and not (tmp_path / "run").exists()
    run = tmp_path / "my_run"
    before_run = _user_folder(run)
    _refused(
        capsys, ["pretrain", "--config", cfg, f"data.dir={tmp_path / 'demo'}", f"run_dir={run}", "train.steps=5"], run
    )
    assert _digest(run) == before_run and not (tmp_path / "demo").exists()


@pytest.mark.parametrize(
    "command,config",
    [("sft", "sft_tiny.yaml"), ("rm", "sft_tiny.yaml"), ("ppo", "rlhf_tiny.yaml"), ("pipeline", "pipeline_tiny.yaml")],
)
def test_posttraining_commands_refuse_a_foreign_run_dir(tmp_path, capsys, command, config):
    run = tmp_path / "run"
    before = _user_folder(run)
    _refused(capsys, [command, "--config", str(REPO / "configs" / config), f"run_dir={run}"], run)
    assert _digest(run) == before


def test_build_policy_refuses_a_foreign_folder(tmp_path, capsys):
    out = tmp_path / "out"
    before = _user_folder(out)
    _refused(capsys, ["build-policy", str(REPO / "configs" / "policies"), "--out", str(out)], out)
    assert _digest(out) == before
    assert cli.main(["build-policy", str(REPO / "configs" / "policies"), "--out", str(out), "--overwrite"]) == 0
    assert json.loads(capsys.readouterr().out)["bundle"] == str(out / "policy_bundle.json")
    assert {k: v for k, v in _digest(out).items() if k in before} == before


def test_build_index_refuses_a_foreign_folder(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("some text about the platform\n\n" * 20)
    out = tmp_path / "index"
    before = _user_folder(out)
    _refused(
        capsys,
        [
            "build-index",
            "--corpus",
            str(corpus),
            "--out",
            str(out),
            "--embedder",
            "hash-32",
            "--factory",
            "Flat",
            "--no-cache",
        ],
        out,
    )
    assert _digest(out) == before
    assert (
        cli.main(
            [
                "build-index",
                "--corpus",
                str(corpus),
                "--out",
                str(out),
                "--embedder",
                "hash-32",
                "--factory",
                "Flat",
                "--no-cache",
                "--overwrite",
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert (out / "manifest.json").is_file() and (out / "notes.txt").read_text() == "my experiment notes\n"


def test_export_and_import_hf_refuse_foreign_folders(tmp_path, capsys):
    out = tmp_path / "export"
    before = _user_folder(out)
    _refused(capsys, ["export-hf", "--checkpoint", str(tmp_path / "nowhere"), "--out", str(out)], out)
    assert _digest(out) == before
    run = tmp_path / "run"
    before_run = _user_folder(run)
    _refused(capsys, ["import-hf", "--hf", str(tmp_path / "nowhere"), "--out", str(run)], run)
    assert _digest(run) == before_run


def test_runs_of_other_seeds_share_the_demo_folder_instead_of_rebuilding_it(tmp_path):
    """The demo set is built with data.demo_seed, not the run's seed: a second seed's run must not
    rebuild (and so re-tokenise) the folder that the first run's checkpoints were trained on."""
    from aion_train.commands.output_dirs import claim_training_dirs
    from aion_train.config import load_config
    from aion_train.posttrain.common import tokenizer_sha256

    data = tmp_path / "demo"
    shas = []
    for seed in (1234, 99):
        cfg = load_config(
            "configs/tiny_cpu.yaml", [f"seed={seed}", f"run_dir={tmp_path}/run{seed}", f"data.dir={data}"]
        )
        claim_training_dirs(cfg, "pretrain", overwrite=False)
        manifest = read_manifest(str(data))
        assert manifest["demo"]["seed"] == cfg.data.demo_seed == 1234
        shas.append((tokenizer_sha256(data / "tokenizer.model"), (data / "manifest.json").stat().st_mtime_ns))
    assert shas[0] == shas[1]  # same tokenizer, manifest not rewritten
