"""A training config naming a Hugging Face folder as its starting weights (`train.init_from`,
`sft.init_from`): a tiny random LlamaForCausalLM made here with `transformers`; the architecture
and tokenizer come from the folder, our model's logits equal transformers' (fp32, 1e-4),
continued pretraining equals the import-hf-then-pretrain path step for step, and SFT on chat
JSONL starts from the folder's weights with the role tokens added."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from test_hf_tokenizer_serving import V, corpus, make_hf_tokenizer  # noqa: E402

from aion_train.config import ConfigError, config_to_dict, load_config  # noqa: E402
from aion_train.interop.hf_init import apply_hf_init, load_init_weights  # noqa: E402
from aion_train.model import build_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("llama")
    make_hf_tokenizer(out, corpus())
    torch.manual_seed(0)
    hc = transformers.LlamaConfig(
        vocab_size=V,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.1,
        bos_token_id=1,
        eos_token_id=2,
    )
    transformers.LlamaForCausalLM(hc).eval().save_pretrained(str(out))
    return out


def hf_logits(hf_dir, ids: torch.Tensor) -> torch.Tensor:
    model = transformers.LlamaForCausalLM.from_pretrained(str(hf_dir), torch_dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_config_takes_the_architecture_and_tokenizer_from_the_folder(hf_llama, tmp_path, capsys):
    over = [f"train.init_from={hf_llama}", "model.max_seq_len=128", "data.seq_len=64"]
    cfg = apply_hf_init(load_config("configs/tiny_cpu.yaml", over), "pretrain")
    m = cfg.model
    assert (m.vocab_size, m.d_model, m.n_layers, m.n_heads, m.n_kv_heads, m.d_ff) == (V, 64, 2, 4, 2, 96)
    assert m.moe.every == 0 and m.max_seq_len == 128  # dense; the config's context (128) caps the folder's 256
    assert cfg.data.tokenizer == str(hf_llama / "tokenizer.json")
    assert config_to_dict(apply_hf_init(cfg, "pretrain")) == config_to_dict(cfg)  # idempotent
    sft = apply_hf_init(load_config("configs/sft_tiny.yaml", [f"sft.init_from={hf_llama}"]), "posttrain")
    assert sft.model.vocab_size == V + 4 and sft.sft.tokenizer == str(hf_llama / "tokenizer.json")  # role tokens
    # our model on the folder's weights gives transformers' logits
    _, sd = load_init_weights(str(hf_llama), cfg.model)
    ours = build_model(cfg.model)
    ours.load_state_dict(sd)
    ids = torch.randint(0, V, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        mine = ours.eval()(ids).logits
    theirs = hf_logits(hf_llama, ids)
    assert float(theirs.std()) > 0.3 and float((mine - theirs).abs().max()) < 1e-4
    with pytest.raises(ConfigError, match="train.init_from='/no/such': no such folder"):
        load_config("configs/tiny_cpu.yaml", ["train.init_from=/no/such"])
    # what our model cannot express is named before anything runs
    scaled = tmp_path / "scaled"
    scaled.mkdir()
    for f in hf_llama.iterdir():
        (scaled / f.name).write_bytes(f.read_bytes())
    hc = json.loads((scaled / "config.json").read_text())
    hc["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0}
    (scaled / "config.json").write_text(json.dumps(hc))
    from aion_train.cli import main

    capsys.readouterr()
    assert main(["check-config", "--config", "configs/tiny_cpu.yaml", f"train.init_from={scaled}"]) == 2
    assert "rope_scaling = ['llama3']: only plain RoPE is supported" in capsys.readouterr().err


def cli(*args) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), MLFLOW_DISABLE_TELEMETRY="true", OMP_NUM_THREADS="1")
    p = subprocess.run(
        [sys.executable, "-m", "aion_train.cli", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert p.returncode == 0, f"{args[0]}: {p.stderr[-3000:]}"
    lines = [x for x in p.stdout.splitlines() if x.startswith("{")]
    return json.loads(lines[-1]) if lines else {}


@pytest.mark.slow
def test_continued_pretraining_from_an_hf_folder_equals_import_then_pretrain(hf_llama, tmp_path):
    from aion_train.cli import main
    from aion_train.config.load import flatten

    texts = corpus()
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    shards = tmp_path / "shards"
    assert (
        main(["make-shards", "--from", str(tmp_path / "c.jsonl"), "--out", str(shards), "--val-fraction", "0.1"]) == 0
    )
    common = [
        "--config",
        "configs/tiny_cpu.yaml",
        f"data.train_shards={shards}/train-*.tar",
        f"data.val_shards={shards}/val-*.tar",
        "train.steps=3",
        "train.warmup_steps=1",
        "train.eval_every=3",
        "train.save_every=3",
        "train.eval_batches=2",
        "data.micro_batch_size=4",
        "train.precision=fp32",
        "tracking.enabled=false",
        "--json",
    ]
    direct = cli("pretrain", *common, f"run_dir={tmp_path / 'direct'}", f"train.init_from={hf_llama}")
    # the reference: import-hf first, then pretrain on that run with the same (now explicit) model keys
    filled = apply_hf_init(load_config("configs/tiny_cpu.yaml", [f"train.init_from={hf_llama}"]), "pretrain")
    model_keys = [f"model.{k}={json.dumps(v)}" for k, v in flatten(config_to_dict(filled)["model"]).items()]
    cli("import-hf", "--hf", str(hf_llama), "--out", str(tmp_path / "imported"), "--max-seq-len", str(filled.model.max_seq_len),
        "--config", "configs/tiny_cpu.yaml", *model_keys, "--json")  # fmt: skip
    ref = cli(
        "pretrain",
        *common,
        f"run_dir={tmp_path / 'imported'}",
        f"data.tokenizer={hf_llama / 'tokenizer.json'}",
        *model_keys,
    )
    assert direct["final_step"] == ref["final_step"] == 3
    # the same starting weights (the folder's) and the same three steps with a fresh optimizer
    assert direct["initial_val_ppl"] == pytest.approx(ref["initial_val_ppl"], rel=1e-6)
    assert direct["final_val_ppl"] == pytest.approx(ref["final_val_ppl"], rel=1e-5)
    assert direct["final_val_ppl"] < direct["initial_val_ppl"]
    saved = yaml_model(tmp_path / "direct")
    assert saved["d_model"] == 64 and saved["moe"]["every"] == 0


def yaml_model(run: Path) -> dict:
    import yaml

    return yaml.safe_load((run / "config.yaml").read_text())["model"]


@pytest.mark.slow
def test_sft_on_chat_jsonl_from_an_hf_folder(hf_llama, tmp_path, capsys):
    from test_posttrain_files import write_files

    from aion_train.checkpoint import load_full_state_dict
    from aion_train.cli import main
    from aion_train.interop.hf_init import hf_model_config, hf_state_dict

    files = write_files(tmp_path)
    run = tmp_path / "run"
    over = [
        f"run_dir={run}",
        f"sft.init_from={hf_llama}",
        f"sft.train_files=[{files['chat']}]",
        f"sft.eval_files=[{files['chat']}]",
        "sft.steps=30",
        "sft.batch_size=8",
        "sft.lr=1e-2",
        "tracking.enabled=false",
    ]
    assert main(["sft", "--config", "configs/sft_tiny.yaml", "--json", *over]) == 0
    sft = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "base_loss" not in sft and sft["tokenizer"] == str(hf_llama / "tokenizer.json")
    assert sft["sft_eval_loss"] < sft["base_eval_loss"] - 0.5, sft
    # the SFT base is the folder's weights, with the four role rows appended
    cfg_dict, base = load_full_state_dict(sft["base_checkpoint"])
    hf_cfg, _ = hf_model_config(hf_llama)
    hf = hf_state_dict(hf_llama, hf_cfg)
    assert cfg_dict["vocab_size"] == V + 4 and base["embed.weight"].shape[0] == V + 4
    for k, v in hf.items():
        torch.testing.assert_close(base[k][: v.shape[0]], v, rtol=0, atol=0)
    # served as a chat model with the folder's tokenizer (found through done.json)
    from aion_train.serve.loading import load_for_serving

    loaded = load_for_serving(str(run))
    assert loaded.chat and loaded.tokenizer.sp.file == str(hf_llama / "tokenizer.json")
    assert main(["generate", "--checkpoint", str(run), "what colour is ann's cat?", "--chat",
                 "--temperature", "0", "--max-tokens", "4", "--json"]) == 0  # fmt: skip
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert isinstance(out["text"], str) and 1 <= len(out["token_ids"]) <= 4
