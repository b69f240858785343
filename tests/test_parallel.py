"""Real multi-rank tests on gloo: every parallel result is compared with the single-process model."""

import json
import os
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from aion_train.config import load_config
from aion_train.parallel import build_groups, global_grad_norm, layout, parallelize, run_ranks
from aion_train.parallel.plan import ParallelPlan
from aion_train.parallel.verify import verify_worker

CFG = "configs/tiny_cpu.yaml"


def cfg_for(tp, ep, world, *extra):
    return load_config(CFG, [f"parallel.tp={tp}", f"parallel.ep={ep}", *extra], world_size=world)


def test_layout_matches_megatron_order():
    lay = layout(8, tp=2, ep=2)
    assert lay["tp"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert lay["dp"] == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert lay["ep"] == [[0, 2], [4, 6], [1, 3], [5, 7]]
    assert lay["edp"] == [[0, 4], [2, 6], [1, 5], [3, 7]]
    with pytest.raises(ValueError, match="parallel.ep=3"):
        layout(4, tp=1, ep=3)


@pytest.mark.parametrize(
    "tp, ep, world, extra",
    [
        (2, 1, 2, ()),  # TP=2
        (1, 2, 2, ()),  # EP=2 over DP=2
        (2, 2, 4, ()),  # TP=2 x DP=2, EP=2
        (
            2,
            2,
            4,
            (
                "model.moe.capacity_factor=1.0",
                "model.moe.shared_expert_d_ff=64",
                "model.tie_embeddings=true",
                "model.moe.top_k=1",
            ),
        ),
        (2, 1, 2, ("parallel.sequence_parallel=true", "model.moe.every=2")),  # SP: dense + MoE layers
        (2, 2, 4, ("parallel.sequence_parallel=true",)),
    ],
)
def test_parallel_matches_single_process(tp, ep, world, extra):
    r = run_ranks(verify_worker, world, cfg_for(tp, ep, world, *extra), tp, ep, timeout_s=60)
    assert r["world"] == world
    assert r["max_grad_rel_diff"] < 1e-5
    assert r["max_logit_diff"] < 1e-5 and r["loss_diff"] < 1e-5


def _vocab_ce_worker():
    from aion_train.parallel.cross_entropy import VocabParallelCrossEntropy

    groups = build_groups(tp=2)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 10, generator=g, dtype=torch.float64) * 3
    labels = torch.tensor([0, 9, 4, 5, -100, 7])
    full = logits.clone().requires_grad_(True)
    ref = F.cross_entropy(full, labels, ignore_index=-100)
    ref.backward()
    local = logits.chunk(2, dim=1)[groups.tp_rank].clone().requires_grad_(True)
    loss = VocabParallelCrossEntropy(groups.tp_group, 5 * groups.tp_rank)(local, labels)
    loss.backward()
    want_grad = full.grad.chunk(2, dim=1)[groups.tp_rank]
    return abs(loss.item() - ref.item()), (local.grad - want_grad).abs().max().item()


def test_vocab_parallel_cross_entropy_matches_full():
    loss_diff, grad_diff = run_ranks(_vocab_ce_worker, 2, timeout_s=60)
    assert loss_diff < 1e-12 and grad_diff < 1e-12


def _grad_norm_worker(cfg, tp, ep):
    import copy

    from aion_train.model import build_model
    from aion_train.parallel.grad_sync import average_gradients
    from aion_train.parallel.verify import fixed_batch, reference

    groups = build_groups(tp, ep)
    full = build_model(cfg.model, seed=cfg.seed)
    inputs, labels = fixed_batch(cfg, groups.dp)
    _, _, ref_grads = reference(copy.deepcopy(full), inputs, labels, groups.dp)
    ref_norm = torch.sqrt(sum(g.double().pow(2).sum() for g in ref_grads.values()))
    model = parallelize(full, groups)
    model(inputs.chunk(groups.dp)[groups.dp_rank], labels=labels.chunk(groups.dp)[groups.dp_rank]).loss.backward()
    plan = ParallelPlan.from_config(cfg.model, tp, ep)
    average_gradients(model, groups, plan)
    return global_grad_norm(model, groups, plan).item(), ref_norm.item()


def test_global_grad_norm_across_tp_and_ep_shards():
    norm, ref = run_ranks(_grad_norm_worker, 4, cfg_for(2, 2, 4), 2, 2, timeout_s=60)
    assert norm == pytest.approx(ref, rel=1e-6)


def _dispatch_worker():
    from aion_train.model.moe import LocalDispatcher
    from aion_train.parallel.expert_parallel import AllToAllDispatcher

    groups = build_groups(tp=1, ep=2)
    g = torch.Generator().manual_seed(1)
    # every rank makes both ranks' inputs, so it can compute the whole reference
    xs = [torch.randn(10, 3, generator=g) for _ in range(2)]
    idx = [torch.randint(0, 4, (10, 2), generator=g) for _ in range(2)]
    gates = [torch.rand(10, 2, generator=g) for _ in range(2)]
    scale = torch.tensor([1.0, 2.0, 3.0, 4.0])  # expert e multiplies by e+1
    me = groups.ep_rank
    disp = AllToAllDispatcher(4, capacity_factor=0.75, ep_group=groups.ep_group)
    tokens, counts, state = disp.dispatch(xs[me], idx[me], gates[me])
    local_scale = torch.repeat_interleave(scale[2 * me : 2 * me + 2], counts)
    out = disp.combine(tokens * local_scale[:, None], state)
    ref_disp = LocalDispatcher(4, capacity_factor=0.75)
    t2, c2, s2 = ref_disp.dispatch(xs[me], idx[me], gates[me])
    ref = ref_disp.combine(t2 * torch.repeat_interleave(scale, c2)[:, None], s2)
    return (out - ref).abs().max().item(), int(counts.sum()), state.dropped


def test_all_to_all_dispatcher_matches_local():
    diff, _, dropped = run_ranks(_dispatch_worker, 2, timeout_s=60)
    assert diff < 1e-6
    assert dropped > 0  # capacity 0.75 really drops some copies


def _dying_worker():
    if dist.get_rank() == 1:
        os._exit(9)
    t = torch.ones(1)
    dist.all_reduce(t)
    return t.item()


def test_dead_rank_fails_fast():
    t0 = time.time()
    with pytest.raises(RuntimeError):
        run_ranks(_dying_worker, 2, timeout_s=10)
    assert time.time() - t0 < 45


def test_verify_parallel_cli_bar():
    """The issue's bar: --tp 2 --ep 2 --nproc 4 on the tiny config, diffs < 1e-4, exit 0."""
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "aion_train.cli",
            "verify-parallel",
            "--config",
            CFG,
            "--tp",
            "2",
            "--ep",
            "2",
            "--nproc",
            "4",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    r = json.loads(p.stdout.strip().splitlines()[-1])
    assert r["max_logit_diff"] < 1e-4 and r["max_grad_diff"] < 1e-4
    assert (r["tp"], r["ep"], r["world"]) == (2, 2, 4)
