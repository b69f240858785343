"""LoRA / QLoRA: the formula, start-equals-base, merge/unmerge exactness, TP=2 against the
single-process adapter (forward with dropout, loss, adapter gradients), NF4 memory and error."""

import pytest
import torch
from torch import nn

from aion_train.config import load_config
from aion_train.model import build_model
from aion_train.posttrain.lora import (
    LoRAError,
    LoRALinear,
    apply_lora,
    gather_lora_state_dict,
    load_lora_state_dict,
    lora_modules,
    lora_state_dict,
    merge_lora,
    unmerge_lora,
)

OVR = [
    "model.vocab_size=256",
    "model.d_model=64",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "model.d_ff=128",
    "model.moe.every=2",
    "model.moe.n_experts=4",
    "model.moe.d_ff_expert=64",
    "model.kernels=torch",
    "lora.enabled=true",
    "lora.r=4",
    "lora.alpha=8",
    "lora.dropout=0.0",
]


def _cfg(extra=()):
    return load_config("configs/tiny_cpu.yaml", OVR + list(extra))


def _random_adapters(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    sd = {k: torch.randn(v.shape, generator=g) * 0.2 for k, v in lora_state_dict(model).items()}
    load_lora_state_dict(model, sd)
    return sd


def test_lora_linear_is_the_textbook_formula():
    torch.manual_seed(0)
    base = nn.Linear(24, 16, bias=True)
    layer = LoRALinear(base, r=4, alpha=12.0, dropout=0.0, name="x")
    nn.init.normal_(layer.lora_B)
    x = torch.randn(5, 24)
    expected = x @ base.weight.T + base.bias + (12.0 / 4) * (x @ layer.lora_A.T) @ layer.lora_B.T
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-5)
    bound = 1 / 24**0.5  # kaiming_uniform(a=sqrt(5)) on [r, in]: U(-1/sqrt(in), 1/sqrt(in))
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.abs().max() > 0.8 * bound


def test_wrapped_model_starts_equal_merge_unmerge_exact():
    cfg = _cfg()
    model = build_model(cfg.model, seed=1).eval()
    ids = torch.randint(0, 256, (2, 12))
    base = model(ids).logits
    names = apply_lora(model, cfg.lora, seed=5)
    assert names == [n for n, _ in model.named_modules() if isinstance(_, LoRALinear)]
    assert {n.rsplit(".", 1)[-1] for n in names} == set(cfg.lora.targets)  # dense FFN in layer 0, attention in both
    assert all(".experts" not in n for n in names)
    assert torch.equal(model(ids).logits, base)  # B = 0
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.{w}" for n in names for w in ("lora_A", "lora_B")}
    _random_adapters(model)
    adapted = model(ids).logits
    assert (adapted - base).abs().max() > 1e-2
    w0 = {n: m.weight.detach().clone() for n, m in lora_modules(model).items()}
    merge_lora(model)
    torch.testing.assert_close(model(ids).logits, adapted, rtol=0, atol=1e-5)
    unmerge_lora(model)
    assert all(torch.equal(m.weight, w0[n]) for n, m in lora_modules(model).items())
    torch.testing.assert_close(model(ids).logits, adapted, rtol=0, atol=1e-6)


def test_state_dict_roundtrip_and_errors():
    cfg = _cfg()
    a = build_model(cfg.model, seed=1)
    apply_lora(a, cfg.lora, seed=5)
    sd = _random_adapters(a)
    b = build_model(cfg.model, seed=1)
    apply_lora(b, cfg.lora, seed=9)
    load_lora_state_dict(b, lora_state_dict(a))
    assert all(torch.equal(sd[k], v) for k, v in lora_state_dict(b).items())
    with pytest.raises(LoRAError, match="missing"):
        load_lora_state_dict(b, {k: v for k, v in sd.items() if "q_proj" not in k})
    with pytest.raises(LoRAError, match="already"):
        apply_lora(b, cfg.lora)
    with pytest.raises(LoRAError, match=r"q_prj.*named"):
        apply_lora(build_model(cfg.model, seed=1), load_config(None, ["lora.targets=[q_prj]"]).lora)
    bad = load_config(None, ["lora.targets=[experts]"]).lora
    with pytest.raises(LoRAError, match="not a linear"):
        apply_lora(build_model(cfg.model, seed=1), bad)


def _tp_worker(overrides, sp):
    """On each of 2 ranks: the TP=2 LoRA model and the single-process LoRA model (same seed,
    same full adapters, same dropout masks), compared on logits, loss, adapter grads, merge."""
    import torch.distributed as dist

    from aion_train.parallel import build_groups, parallelize
    from aion_train.parallel.collectives import gather_last

    cfg = load_config("configs/tiny_cpu.yaml", overrides)
    torch.manual_seed(0)
    ids = torch.randint(0, cfg.model.vocab_size, (2, 8))
    labels = torch.randint(0, cfg.model.vocab_size, (2, 8))
    ref = build_model(cfg.model, seed=1)
    apply_lora(ref, cfg.lora, seed=5)
    full = _random_adapters(ref)
    groups = build_groups(tp=2)
    tp = parallelize(build_model(cfg.model, seed=1), groups, sequence_parallel=sp)
    apply_lora(tp, cfg.lora, seed=5)
    load_lora_state_dict(tp, full)  # full tensors -> this rank's slices
    out = {"gather_roundtrip": max((gather_lora_state_dict(tp)[k] - v).abs().max().item() for k, v in full.items())}
    ref.train()
    tp.train()  # dropout on: masks must agree
    r = ref(ids, labels=labels)
    t = tp(ids, labels=labels)
    out["logits"] = (gather_last(t.logits, groups.tp_group) - r.logits).abs().max().item()
    out["loss"] = abs(t.lm_loss.item() - r.lm_loss.item())
    r.lm_loss.backward()
    t.lm_loss.backward()
    grads = {}
    for name, m in lora_modules(tp).items():
        for which in ("lora_A", "lora_B"):
            g = getattr(m, which).grad.contiguous()
            dim = m.shard_dim(which)
            if dim is not None:
                parts = [torch.empty_like(g) for _ in range(2)]
                dist.all_gather(parts, g, group=groups.tp_group)
                g = torch.cat(parts, dim)
            grads[f"{name}.{which}"] = g
    ref_grads = {f"{n}.{w}": getattr(m, w).grad for n, m in lora_modules(ref).items() for w in ("lora_A", "lora_B")}
    out["grads"] = max((grads[k] - ref_grads[k]).abs().max().item() for k in ref_grads)
    out["grad_scale"] = max(g.abs().max().item() for g in ref_grads.values())
    ref.eval()
    tp.eval()
    with torch.no_grad():
        before = gather_last(tp(ids).logits, groups.tp_group)
        merge_lora(tp)
        merged = gather_last(tp(ids).logits, groups.tp_group)
        out["merged_vs_adapter"] = (merged - before).abs().max().item()
        out["merged_vs_ref"] = (merged - ref(ids).logits).abs().max().item()
    return out


@pytest.mark.parametrize("sp", [False, True])
def test_tensor_parallel_lora_matches_single_process(sp):
    from aion_train.parallel.spawn import run_ranks

    overrides = OVR + ["lora.dropout=0.2", "lora.targets=[q_proj,k_proj,v_proj,o_proj,w_gate,w_up,w_down,lm_head]"]
    res = run_ranks(_tp_worker, 2, overrides, sp, timeout_s=60)
    assert res["gather_roundtrip"] == 0.0
    for key in ("logits", "loss", "grads", "merged_vs_adapter", "merged_vs_ref"):
        assert res[key] < 1e-5, (key, res)
    assert res["grad_scale"] > 1e-3  # the gradients compared are not all zero


# -- QLoRA -----------------------------------------------------------------------------------
def test_qlora_memory_error_and_forward():
    from aion_train.posttrain.qlora import base_weight_bytes, quantize_base_nf4, reference_nf4_roundtrip

    cfg = _cfg()
    model = build_model(cfg.model, seed=1).eval()
    apply_lora(model, cfg.lora, seed=5)
    _random_adapters(model)
    dense = {n: m.weight.detach().clone() for n, m in lora_modules(model).items()}
    mem = quantize_base_nf4(model, block_size=64)
    print(f"\nNF4 base weights: {mem['nf4_bytes']} bytes vs bf16 {mem['bf16_bytes']} bytes, ratio {mem['ratio']:.4f}")
    assert mem["ratio"] < 0.35 and mem["ratio"] > 0.25  # 4 bits + block scales ~ 0.26 of 16 bits
    assert base_weight_bytes(model)["stored_bytes"] == mem["nf4_bytes"]
    assert not any(k.endswith("attn.q_proj.weight") for k, _ in model.named_parameters())
    for name, m in lora_modules(model).items():
        w = dense[name].float()
        deq = m.nf4.get_original_weight().float()  # torchao's dequantise
        ref = reference_nf4_roundtrip(dense[name].to(torch.bfloat16), 64)
        quant_err = ((deq - w).norm() / w.norm()).item()
        ref_gap = ((deq - ref).norm() / ref.norm()).item()
        assert 0.01 < quant_err < 0.12, (name, quant_err)  # NF4 on a Gaussian: ~0.09
        assert ref_gap < 0.03, (name, ref_gap)  # only the int8 double-quantised scales differ
    # the forward is the dequantised base plus the adapter
    ids = torch.randint(0, 256, (2, 10))
    q_logits = model(ids).logits
    shadow = build_model(cfg.model, seed=1).eval()
    apply_lora(shadow, cfg.lora, seed=5)
    load_lora_state_dict(shadow, lora_state_dict(model))
    with torch.no_grad():
        for name, m in lora_modules(shadow).items():
            m.weight.copy_(lora_modules(model)[name].nf4.get_original_weight().float())
    torch.testing.assert_close(q_logits, shadow(ids).logits, rtol=0, atol=1e-5)
    merge_lora(model)
    torch.testing.assert_close(model(ids).logits, q_logits, rtol=0, atol=1e-5)
    unmerge_lora(model)
    assert all(m.weight is None and m.nf4 is not None for m in lora_modules(model).values())


def test_qlora_trains_only_the_adapters():
    from aion_train.posttrain.qlora import quantize_base_nf4

    cfg = _cfg(["lora.dropout=0.1"])
    model = build_model(cfg.model, seed=1)
    apply_lora(model, cfg.lora, seed=5)
    quantize_base_nf4(model)
    codes = {n: m.nf4.quantized_data.clone() for n, m in lora_modules(model).items()}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 256, (4, 16))
    losses = []
    for _ in range(15):
        out = model(ids[:, :-1], labels=ids[:, 1:])
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.lm_loss.item())
    assert losses[-1] < losses[0] - 0.5, losses
    assert all(torch.equal(m.nf4.quantized_data, codes[n]) for n, m in lora_modules(model).items())
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)
