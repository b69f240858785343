import subprocess
import sys

import pytest

from aion_train.config import ConfigError, config_from_dict, config_to_dict, load_config
from aion_train.config.load import parse_overrides

CFG = "configs/tiny_cpu.yaml"


def errors_of(overrides, world_size=None):
    with pytest.raises(ConfigError) as e:
        load_config(CFG, overrides, world_size=world_size)
    return "\n".join(e.value.errors)


def test_defaults_and_overrides_apply():
    cfg = load_config(CFG, ["model.n_layers=4", "train.lr=1e-3", "model.moe.capacity_factor=1.25"])
    assert cfg.model.n_layers == 4 and cfg.train.lr == pytest.approx(1e-3)
    assert cfg.model.moe.capacity_factor == 1.25
    assert cfg.model.d_model == 128  # from the YAML
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_unknown_key_suggests_nearest():
    msg = errors_of(["model.n_layrs=3"])
    assert "model.n_layrs" in msg and "did you mean 'n_layers'" in msg
    msg = errors_of(["trian.lr=3"])
    assert "did you mean 'train'" in msg


def test_type_errors_name_the_key():
    msg = errors_of(["model.n_layers=two"])
    assert "model.n_layers" in msg and "integer" in msg


def test_experts_not_divisible_by_ep_names_both_keys():
    msg = errors_of(["model.moe.n_experts=6", "parallel.ep=4"], world_size=4)
    assert "model.moe.n_experts=6" in msg and "parallel.ep=4" in msg


@pytest.mark.parametrize(
    "override, keys",
    [
        ("model.n_heads=3", ["model.n_heads", "parallel.tp"]),
        ("model.vocab_size=2047", ["model.vocab_size", "parallel.tp"]),
        ("model.d_ff=511", ["model.d_ff", "parallel.tp"]),
        ("model.moe.d_ff_expert=255", ["model.moe.d_ff_expert", "parallel.tp"]),
    ],
)
def test_tp_divisibility(override, keys):
    msg = errors_of([override, "parallel.tp=2"], world_size=2)
    for k in keys:
        assert k in msg


def test_ep_must_divide_data_parallel_size():
    msg = errors_of(["parallel.ep=4", "parallel.tp=2"], world_size=4)  # dp = 2
    assert "parallel.ep=4" in msg and "data-parallel size 2" in msg


def test_world_size_must_equal_tp_times_dp():
    msg = errors_of(["parallel.tp=2", "parallel.dp=3"], world_size=4)
    assert "parallel.world_size=4" in msg and "2 x 3" in msg


def test_zero3_with_moe_is_refused():
    msg = errors_of(["train.zero_stage=3"])
    assert "train.zero_stage=3" in msg and "MoE" in msg
    load_config(CFG, ["train.zero_stage=3", "model.moe.every=0"])  # dense model: fine


def test_overrides_parse_yaml_scalars():
    assert parse_overrides(["a.b=1", "a.c=null", "d=true", "e=x"]) == {"a": {"b": 1, "c": None}, "d": True, "e": "x"}


def test_check_config_cli():
    ok = subprocess.run(
        [sys.executable, "-m", "aion_train.cli", "check-config", "--config", CFG, "model.n_layers=3"],
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0 and "n_layers: 3" in ok.stdout
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "aion_train.cli",
            "check-config",
            "--config",
            CFG,
            "model.moe.n_experts=6",
            "parallel.ep=4",
            "--world-size",
            "4",
        ],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2
    assert "model.moe.n_experts" in bad.stderr and "parallel.ep" in bad.stderr


def test_sequence_parallel_needs_seq_len_divisible_by_tp():
    msg = errors_of(["parallel.tp=2", "parallel.sequence_parallel=true", "data.seq_len=127"], world_size=2)
    assert "data.seq_len=127" in msg and "parallel.tp=2" in msg


def test_run_dir_in_file_lists_follows_the_run_dir_override(tmp_path):
    """The RAG pipeline names the files its open-book-data phase writes as {run_dir}/...: a run
    moved with run_dir=... reads its own, not the default run's."""
    cfg = load_config("configs/pipeline_rag_tiny.yaml", [f"run_dir={tmp_path}"])
    assert cfg.sft.train_files == [f"{tmp_path}/open-book-data/sft_train.jsonl"]
    assert cfg.ppo.prompt_files == [f"{tmp_path}/open-book-data/ppo_prompts.jsonl"]
    cfg = load_config("configs/pipeline_rag_tiny.yaml", ["sft.train_files=[data/a.jsonl]"])
    assert cfg.sft.train_files == ["data/a.jsonl"] and cfg.ppo.prompt_files[0].startswith("runs/pipeline_rag_tiny/")
    assert config_from_dict(config_to_dict(cfg)) == cfg
