"""Interop: resharding between TP/EP layouts, HF Mixtral export/import, PEFT LoRA adapters.
Every check compares real forward passes (logits or losses), not just tensor names."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from aion_train.checkpoint import (
    load_full_state_dict,
    model_config_from_dict,
    save_sharded_checkpoint,
    shard_spec_for,
    shard_state_dict,
)
from aion_train.cli import main as cli
from aion_train.config import load_config
from aion_train.interop.hf_mixtral import NotExpressibleError, check_exportable, halves_to_interleaved
from aion_train.interop.peft_lora import export_lora_adapter
from aion_train.model import build_model
from aion_train.parallel import full_slice, run_ranks

REPO = Path(__file__).resolve().parents[1]
CFG = str(REPO / "configs" / "tiny_cpu.yaml")


def tiny(*overrides):
    return load_config(CFG, list(overrides), validate=False).model


def make_model(cfg, seed=0):
    """A tiny model with every weight random (norm weights too, so that a swapped or dropped
    norm shows in the logits)."""
    m = build_model(cfg, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            elif "router" in name:  # well separated routing: no near-ties between implementations
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return m.eval()


def batch(vocab, b=2, t=48, seed=0):
    ids = torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(seed))
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = ids[:, 1:]
    return ids, labels


def hf_logits(path, ids):
    from transformers import MixtralForCausalLM

    hf, info = MixtralForCausalLM.from_pretrained(str(path), dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    with torch.no_grad():
        return hf.eval()(ids).logits, hf


# ----------------------------------------------------------------------------- resharding (in process)


@pytest.mark.parametrize(
    "extra, layouts",
    [
        ((), [(2, 2), (1, 4), (2, 1)]),
        (("model.tie_embeddings=true", "model.moe.every=2", "model.moe.shared_expert_d_ff=64"), [(2, 2), (2, 1)]),
    ],
)
def test_reshard_round_trip_on_disk(tmp_path, extra, layouts):
    cfg = tiny(*extra)
    ref = make_model(cfg).state_dict()
    for tp, ep in layouts:
        run = tmp_path / f"tp{tp}ep{ep}"
        folder = save_sharded_checkpoint(run, cfg, ref, tp, ep)
        manifest = json.loads((folder / "manifest.json").read_text())
        assert manifest["layout"] == {"tp": tp, "ep": ep, "world": tp * ep, "zero_stage": 1}
        assert manifest["optimizer_state"] is False
        cfg_dict, full = load_full_state_dict(run)
        assert model_config_from_dict(cfg_dict) == cfg
        assert set(full) == set(ref) and all(torch.equal(full[k], ref[k]) for k in ref)
        if cfg.tie_embeddings:
            assert full["lm_head.weight"] is full["embed.weight"]
        # a rank's shard is exactly what parallelize would hand it
        piece = shard_state_dict(full, spec=shard_spec_for(cfg, tp, ep, tp - 1, ep - 1))
        assert piece["blocks.1.attn.q_proj.weight"].shape[0] == cfg.d_model // tp


def test_bf16_checkpoint_keeps_dtype(tmp_path):
    cfg = tiny()
    ref = {k: v.to(torch.bfloat16) for k, v in make_model(cfg).state_dict().items()}
    save_sharded_checkpoint(tmp_path / "run", cfg, ref, 2, 2)
    _, full = load_full_state_dict(tmp_path / "run")
    assert all(full[k].dtype == torch.bfloat16 and torch.equal(full[k], ref[k]) for k in ref)
    assert cli(["export-hf", "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == "bfloat16"
    assert cli(["import-hf", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "back"), "--tp", "2"]) == 0
    _, back = load_full_state_dict(tmp_path / "back")
    assert all(back[k].dtype == torch.bfloat16 and torch.equal(back[k], ref[k]) for k in ref)


# ----------------------------------------------------------------------------- HF Mixtral


@pytest.mark.parametrize("layout, tied", [("per-expert", False), ("fused", True)])
def test_hf_round_trip_logits(tmp_path, layout, tied):
    cfg = tiny(f"model.tie_embeddings={str(tied).lower()}")
    model = make_model(cfg)
    ids, _ = batch(cfg.vocab_size)
    with torch.no_grad():
        ours = model(ids).logits
    save_sharded_checkpoint(tmp_path / "run", cfg, model.state_dict(), 2, 2)
    out = tmp_path / "hf"
    assert cli(["export-hf", "--checkpoint", str(tmp_path / "run"), "--out", str(out), "--expert-layout", layout]) == 0
    theirs, hf = hf_logits(out, ids)
    diff = (theirs - ours).abs().max().item()
    assert diff < 1e-4, diff
    assert ours.std() > 0.1  # the comparison is not between near-constant logits

    # negative control: the same weights without the RoPE row permutation do not match
    with torch.no_grad():
        for layer in hf.model.layers:
            a = layer.self_attn
            a.q_proj.weight.copy_(halves_to_interleaved(a.q_proj.weight, cfg.n_heads))
            a.k_proj.weight.copy_(halves_to_interleaved(a.k_proj.weight, cfg.n_kv_heads))
        assert (hf(ids).logits - ours).abs().max() > 1e-2

    # import back (into another layout) gives the identical model
    assert (
        cli(
            [
                "import-hf",
                "--hf",
                str(out),
                "--out",
                str(tmp_path / "back"),
                "--tp",
                "2",
                "--ep",
                "4",
                "--config",
                CFG,
                f"model.tie_embeddings={str(tied).lower()}",
            ]
        )
        == 0
    )
    cfg_dict, full = load_full_state_dict(tmp_path / "back")
    assert model_config_from_dict(cfg_dict) == cfg  # training-only keys came from --config
    again = build_model(cfg)
    again.load_state_dict(full)
    with torch.no_grad():
        assert torch.equal(again.eval()(ids).logits, ours)


def test_refuses_configs_mixtral_cannot_express(tmp_path, capsys):
    cfg = tiny("model.moe.every=2", "model.activation=gelu", "model.moe.shared_expert_d_ff=64")
    with pytest.raises(NotExpressibleError) as e:
        check_exportable(cfg)
    for key in ("model.moe.every=2", "model.activation='gelu'", "model.moe.shared_expert_d_ff=64"):
        assert key in str(e.value)
    with pytest.raises(NotExpressibleError, match="model.moe.top_k=1"):
        check_exportable(tiny("model.moe.top_k=1"))
    with pytest.raises(NotExpressibleError, match="model.norm='layernorm'"):
        check_exportable(tiny("model.norm=layernorm"))
    # through the command: exit code 2 and the keys on stderr
    save_sharded_checkpoint(tmp_path / "run", cfg, build_model(cfg, seed=0).state_dict(), 1, 1)
    assert cli(["export-hf", "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert "model.moe.every=2" in err and "model.activation" in err and "shared_expert_d_ff" in err
    assert not (tmp_path / "hf").exists()
    # capacity dropping is exportable, with a note
    assert any("capacity_factor" in n for n in check_exportable(tiny("model.moe.capacity_factor=1.25")))


def test_import_refuses_what_we_cannot_run(tmp_path):
    from aion_train.interop.hf_mixtral import from_hf_config, to_hf_config

    hc = to_hf_config(tiny()).to_dict()
    cfg, notes = from_hf_config(hc)
    assert cfg.moe.n_experts == 4 and cfg.n_kv_heads == 2 and not notes
    with pytest.raises(NotExpressibleError, match="head_dim"):
        from_hf_config(dict(hc, head_dim=64))
    with pytest.raises(NotExpressibleError, match="rope_type"):
        from_hf_config(dict(hc, rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}))
    cfg, notes = from_hf_config(dict(hc, sliding_window=64))
    assert cfg.max_seq_len == 64 and "sliding_window" in notes[0]


# ----------------------------------------------------------------------------- PEFT LoRA


def test_peft_adapter_loads_and_matches_hand_merge(tmp_path):
    pytest.importorskip("peft", reason="peft is not installed (pip install peft)")
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import MixtralForCausalLM

    cfg = tiny()
    model = make_model(cfg)
    save_sharded_checkpoint(tmp_path / "run", cfg, model.state_dict(), 1, 1)
    assert cli(["export-hf", "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) == 0
    ids, _ = batch(cfg.vocab_size)
    r, alpha = 4, 16.0
    g = torch.Generator().manual_seed(7)
    sd = model.state_dict()
    lora = {}
    for i in range(cfg.n_layers):
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out_f, in_f = sd[f"blocks.{i}.attn.{proj}.weight"].shape
            lora[f"blocks.{i}.attn.{proj}"] = (
                torch.randn(r, in_f, generator=g) * 0.05,
                torch.randn(out_f, r, generator=g) * 0.05,
            )
    export_lora_adapter(lora, r, alpha, ["q_proj", "k_proj", "v_proj", "o_proj"], tmp_path / "adapter", model_cfg=cfg)
    ad = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    keys = set(ad)
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys and len(keys) == 16

    base = MixtralForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    with torch.no_grad():
        base_logits = base(ids).logits
    peft_model = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        active = peft_model(ids).logits
    merged = peft_model.merge_and_unload().eval()
    with torch.no_grad():
        merged_logits = merged(ids).logits

    # by hand, in HF's layout: W += (alpha / r) B A, with q/k B rows RoPE-permuted by the exporter
    hand_hf = MixtralForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    with torch.no_grad():
        for i, layer in enumerate(hand_hf.model.layers):
            for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                pre = f"base_model.model.model.layers.{i}.self_attn.{proj}"
                delta = ad[pre + ".lora_B.weight"] @ ad[pre + ".lora_A.weight"]
                getattr(layer.self_attn, proj).weight += (alpha / r) * delta
        hand_hf_logits = hand_hf(ids).logits
    # by hand, in our layout and our model: the adapter means the same thing on both sides
    with torch.no_grad():
        for name, (a, b) in lora.items():
            sd[name + ".weight"] += (alpha / r) * b @ a
        ours = build_model(cfg)
        ours.load_state_dict(sd)
        ours_logits = ours.eval()(ids).logits

    assert (active - base_logits).abs().max() > 1e-2  # the adapter does something
    for got in (active, merged_logits, hand_hf_logits):
        assert (got - ours_logits).abs().max() < 1e-4
    assert (merged_logits - hand_hf_logits).abs().max() < 1e-4


def test_lora_rejects_unmappable_modules(tmp_path):
    a, b = torch.zeros(2, 8), torch.zeros(8, 2)
    with pytest.raises(ValueError, match="experts"):
        export_lora_adapter({"blocks.0.ffn.experts.w1": (a, b)}, 2, 4, ["q_proj"], tmp_path)
    with pytest.raises(ValueError, match="rank r=4"):
        export_lora_adapter({"blocks.0.attn.v_proj": (a, b)}, 4, 4, ["v_proj"], tmp_path)


# ----------------------------------------------------------------------------- multi-rank (slow)


def _loss_worker(jobs, ids, labels):
    """For each job (checkpoint, tp, ep, full_from): every rank builds the model, shards it
    with `parallelize`, loads its own payload of the checkpoint (written in this layout) and
    computes the loss; with `full_from` it also cuts its shard out of the full state dict of
    that other checkpoint and computes the loss again."""
    from aion_train.checkpoint import find_checkpoint, load_rank, read_manifest, saver_rank
    from aion_train.parallel import build_groups, parallelize

    results = []
    for ckpt, tp, ep, full_from in jobs:
        groups = build_groups(tp, ep)
        folder = find_checkpoint(ckpt)
        cfg = model_config_from_dict(read_manifest(folder)["model_config"])
        model = parallelize(build_model(cfg, seed=99), groups).eval()
        full_shapes = {n: p.shape for n, p in build_model(cfg, seed=0).state_dict().items()}
        spec = shard_spec_for(cfg, tp, ep, groups.tp_rank, groups.ep_rank)
        spec_ok = all(
            tuple(p.shape) == tuple(full_slice(torch.empty(full_shapes[n], device="meta"), spec.get(n, [])).shape)
            for n, p in model.state_dict().items()
        )
        own = load_rank(folder, saver_rank(groups.tp, groups.tp_rank, groups.ep_rank), "model")
        model.load_state_dict(own)
        with torch.no_grad():
            out = model(ids, labels=labels)
        result = {"spec_ok": spec_ok, "loss": out.loss.item(), "lm_loss": out.lm_loss.item()}
        if full_from is not None:
            _, full = load_full_state_dict(full_from)
            mine = shard_state_dict(full, model, groups)
            result["same_shard"] = all(torch.equal(mine[k], own[k]) for k in own)
            model.load_state_dict(mine)
            with torch.no_grad():
                result["loss_from_full"] = model(ids, labels=labels).loss.item()
        results.append(result)
    return results


@pytest.fixture(scope="module")
def trained_tp2_ep2(tmp_path_factory):
    run = tmp_path_factory.mktemp("interop") / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [
        sys.executable,
        "-m",
        "aion_train.cli",
        "pretrain",
        "--nproc",
        "4",
        "parallel.tp=2",
        "parallel.ep=2",
        "train.steps=4",
        "train.save_every=4",
        "train.precision=fp32",
        "train.eval_every=0",
        "train.warmup_steps=1",
        "tracking.enabled=false",
        f"run_dir={run}",
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run


@pytest.mark.slow
def test_reshard_trained_checkpoint_same_loss(trained_tp2_ep2, tmp_path):
    run = trained_tp2_ep2
    cfg_dict, full = load_full_state_dict(run)
    cfg = model_config_from_dict(cfg_dict)
    assert json.loads((run / "checkpoints" / "step_00000004" / "manifest.json").read_text())["layout"]["tp"] == 2
    ids, labels = batch(cfg.vocab_size, b=4, t=64)
    single = build_model(cfg)
    single.load_state_dict(full)
    with torch.no_grad():
        ref = single.eval()(ids, labels=labels)
    ref_loss, ref_lm = ref.loss.item(), ref.lm_loss.item()

    # the 4-rank TP=2/EP=2 model on its own shards, and on shards cut from the full state dict
    [r4] = run_ranks(_loss_worker, 4, [(str(run), 2, 2, str(run))], ids, labels, timeout_s=180)
    assert r4["spec_ok"] and r4["same_shard"]
    assert abs(r4["loss"] - ref_loss) < 1e-5 and abs(r4["lm_loss"] - ref_lm) < 1e-5
    assert abs(r4["loss_from_full"] - ref_loss) < 1e-5

    # full -> TP=1/EP=1 checkpoint, run with DP=2; and full -> TP=1/EP=2 cut by the ranks
    save_sharded_checkpoint(tmp_path / "dp2", cfg_dict, full, 1, 1, world=2)
    save_sharded_checkpoint(tmp_path / "ep2", cfg_dict, full, 1, 2)
    r2, r2e = run_ranks(
        _loss_worker,
        2,
        [(str(tmp_path / "dp2"), 1, 1, str(run)), (str(tmp_path / "ep2"), 1, 2, None)],
        ids,
        labels,
        timeout_s=180,
    )
    assert r2["spec_ok"] and r2["same_shard"]
    assert abs(r2["loss"] - ref_loss) < 1e-5 and abs(r2["loss_from_full"] - ref_loss) < 1e-5
    assert r2e["spec_ok"] and abs(r2e["loss"] - ref_loss) < 1e-5

    # the trained model through HF Mixtral: same logits
    out = tmp_path / "hf"
    assert cli(["export-hf", "--checkpoint", str(run), "--out", str(out)]) == 0
    theirs, _ = hf_logits(out, ids)
    with torch.no_grad():
        assert (theirs - single(ids).logits).abs().max() < 1e-4
    print(f"\nloss single={ref_loss:.7f} tp2/ep2={r4['loss']:.7f} dp2={r2['loss']:.7f} ep2={r2e['loss']:.7f}")


def test_lora_hf_names_are_not_permuted(tmp_path):
    from safetensors.torch import load_file

    cfg = tiny()
    a, b = torch.randn(2, cfg.d_model), torch.randn(cfg.d_model, 2)
    export_lora_adapter({"model.layers.1.self_attn.q_proj": (a, b)}, 2, 4, ["q_proj"], tmp_path / "hf_names")
    export_lora_adapter({"blocks.1.attn.q_proj": (a, b)}, 2, 4, ["q_proj"], tmp_path / "ours", model_cfg=cfg)
    key = "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"
    as_given = load_file(str(tmp_path / "hf_names" / "adapter_model.safetensors"))[key]
    permuted = load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))[key]
    assert torch.equal(as_given, b) and torch.equal(halves_to_interleaved(permuted, cfg.n_heads), b)
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["r"] == 2


def test_pretrain_starts_from_imported_weights(tmp_path):
    """Train, export to Mixtral, import into a new run folder (another TP layout), then
    `pretrain` from it: the new run's first held-out perplexity is the trained model's last one
    (far below a fresh model's), with a fresh optimizer at step 0."""
    import json
    import os
    import subprocess
    import sys

    env = dict(os.environ)
    common = ["--config", "configs/tiny_cpu.yaml", "train.eval_every=12", "train.save_every=12", "train.warmup_steps=2"]

    def cli(*args):
        p = subprocess.run(
            [sys.executable, "-m", "aion_train.cli", *args], capture_output=True, text=True, env=env, timeout=600
        )
        assert p.returncode == 0, p.stderr[-3000:]
        return p.stdout

    a = json.loads(
        cli("pretrain", *common, "train.steps=12", f"run_dir={tmp_path / 'a'}", "--json").strip().splitlines()[-1]
    )
    cli("export-hf", "--checkpoint", str(tmp_path / "a"), "--out", str(tmp_path / "hf"))
    cli("import-hf", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "b"), "--config", "configs/tiny_cpu.yaml")
    b = json.loads(
        cli("pretrain", *common, "train.steps=2", f"run_dir={tmp_path / 'b'}", "--json").strip().splitlines()[-1]
    )
    assert a["final_val_ppl"] < 0.5 * a["initial_val_ppl"]
    assert b["initial_val_ppl"] == pytest.approx(a["final_val_ppl"], rel=1e-3)
    assert b["final_step"] == 2
