"""verify-parallel: N real ranks run forward+backward of the configured model on a fixed
batch; logits, loss and every gradient are compared with the same model in one process."""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist

from aion_train.config import Config
from aion_train.model import build_model

from .collectives import all_reduce_, gather_last, group_size
from .device import comm_device
from .grad_sync import average_gradients
from .groups import build_groups
from .parallelize import full_slice, parallelize
from .plan import ParallelPlan


def fixed_batch(cfg: Config, n_shards: int, per_shard: int = 2, seq_len: int = 32, seed: int = 7):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.model.vocab_size, (n_shards * per_shard, seq_len + 1), generator=g)
    return ids[:, :-1].contiguous(), ids[:, 1:].contiguous()


def reference(model, inputs, labels, n_shards):
    """The single-process model on each data-parallel shard, losses averaged (exactly what the
    DP ranks compute together: routing, capacity and the balance loss are per-rank)."""
    model.zero_grad()
    logits, total = [], 0.0
    for x, y in zip(inputs.chunk(n_shards), labels.chunk(n_shards)):
        out = model(x, labels=y)
        (out.loss / n_shards).backward()
        logits.append(out.logits.detach())
        total += out.loss.item() / n_shards
    return torch.cat(logits), total, {n: p.grad for n, p in model.named_parameters()}


def verify_worker(cfg: Config, tp: int, ep: int) -> dict:
    sp = cfg.parallel.sequence_parallel
    torch.use_deterministic_algorithms(True, warn_only=True)
    groups = build_groups(tp, ep, cfg.parallel.timeout_s)
    device = comm_device()  # the ranks' device: a GPU each under NCCL, else the CPU
    full = build_model(cfg.model, seed=cfg.seed).float().to(device)
    inputs, labels = (t.to(device) for t in fixed_batch(cfg, groups.dp))
    ref_logits, ref_loss, ref_grads = reference(copy.deepcopy(full), inputs, labels, groups.dp)

    model = parallelize(full, groups, sequence_parallel=sp)
    plan = ParallelPlan.from_config(cfg.model, tp, ep, sp)
    spec = plan.shard_spec(groups.tp_rank, groups.ep_rank)
    x = inputs.chunk(groups.dp)[groups.dp_rank]
    y = labels.chunk(groups.dp)[groups.dp_rank]
    out = model(x, labels=y)
    out.loss.backward()
    average_gradients(model, groups, plan)

    logits = gather_last(out.logits.detach(), groups.tp_group if groups.tp > 1 else None)
    my_ref = ref_logits.chunk(groups.dp)[groups.dp_rank]
    logit_diff = (logits - my_ref).abs().max()
    loss = out.loss.detach().clone()
    if group_size(groups.dp_group) > 1:
        all_reduce_(loss, group=groups.dp_group)
    loss_diff = torch.tensor(abs(loss.item() / groups.dp - ref_loss), device=device)
    grad_diff = torch.zeros((), device=device)
    rel = torch.zeros((), device=device)
    for name, p in model.named_parameters():
        want = full_slice(ref_grads[name], spec.get(name, []))
        d = (p.grad - want).abs().max()
        grad_diff = torch.maximum(grad_diff, d)
        rel = torch.maximum(rel, d / want.abs().max().clamp(min=1e-12))
    stats = torch.stack([logit_diff, grad_diff, loss_diff, rel]).double()
    all_reduce_(stats, op=dist.ReduceOp.MAX)
    return {
        "max_logit_diff": stats[0].item(),
        "max_grad_diff": stats[1].item(),
        "loss_diff": stats[2].item(),
        "max_grad_rel_diff": stats[3].item(),
        "tp": tp,
        "ep": ep,
        "world": groups.world,
        "sequence_parallel": sp,
        "n_params_checked": len(list(model.parameters())),
    }
