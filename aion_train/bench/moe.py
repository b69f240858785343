"""bench moe: our MoE layer (router + sort-based dispatch + grouped experts) against a dense
SwiGLU FFN with the same active FLOPs and against DeepSpeed's MoE layer with the same
experts, top-k and capacity; forward + backward, side by side in one process.

Each call is a training step's forward + backward: input and parameter gradients start empty
(as after `zero_grad(set_to_none=True)`), with the CPU allocator as the trainer sets it
(`tune_cpu_allocator`). A ratio is the median over rounds of moe_ms / dense_ms of one round
(`paired_ratio`); the *_ms fields are medians; `rounds_ms` has the moe and dense time of
every round (the main point's and each sweep point's) that the ratio and medians come from."""

from __future__ import annotations

import statistics

import torch
import torch.nn.functional as F
from torch import nn

from aion_train.model.ffn import DenseFFN
from aion_train.model.moe import MoELayer
from aion_train.parallel.device import tune_cpu_allocator

from .timing import interleaved_samples, paired_ratio


def _fwd_bwd(module_fn, x, grad, params=()):
    """One forward + backward as a training step runs it: the input's and the parameters'
    gradients start empty (the optimizer's zero_grad(set_to_none=True)), so no call pays for
    accumulating into the previous call's gradients."""
    params = list(params)

    def run():
        x.grad = None
        for p in params:
            p.grad = None
        out = module_fn(x)
        out.backward(grad)

    return run


class _DSExpert(nn.Module):
    """One SwiGLU expert in DeepSpeed's per-expert module form."""

    def __init__(self, d, ff):
        super().__init__()
        self.w1 = nn.Linear(d, ff, bias=False)
        self.w3 = nn.Linear(d, ff, bias=False)
        self.w2 = nn.Linear(ff, d, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def _deepspeed_moe(d, ff, experts, top_k):
    from aion_train.parallel.deepspeed_adapter import init_comm

    init_comm("gloo")
    from deepspeed.moe.layer import MoE

    layer = MoE(
        d, _DSExpert(d, ff), num_experts=experts, ep_size=1, k=top_k, capacity_factor=1.0, drop_tokens=False
    )  # dropless, like ours
    layer.set_deepspeed_parallelism()
    return (lambda x: layer(x)[0]), layer.parameters()


def measure(tokens: int, d: int, ff: int, experts: int, top_k: int, rounds: int, with_deepspeed: bool) -> dict:
    torch.manual_seed(0)
    moe = MoELayer(d, experts, top_k, ff, capacity_factor=None)
    dense = DenseFFN(d, top_k * ff)  # same active FLOPs per token
    x = torch.randn(1, tokens, d, requires_grad=True)
    grad = torch.randn(1, tokens, d)
    with torch.no_grad():
        routing = moe.router(x.detach().reshape(-1, d))
        perm, counts, _ = moe.dispatcher.dispatch(x.detach().reshape(-1, d), routing.indices, routing.gates)
    perm.requires_grad_(True)
    perm_grad = torch.randn_like(perm)

    def dispatch_only(t):
        """Everything but the expert matmuls: router, permute, unpermute (experts = identity)."""
        flat = t.reshape(-1, d)
        r = moe.router(flat)
        tokens, _, state = moe.dispatcher.dispatch(flat, r.indices, r.gates)
        return moe.dispatcher.combine(tokens, state).reshape(t.shape) + r.aux_loss

    fns = {
        "moe": _fwd_bwd(lambda t: moe(t)[0], x, grad, moe.parameters()),
        "dense": _fwd_bwd(dense, x, grad, dense.parameters()),
        "experts": _fwd_bwd(lambda t: moe.experts(t, counts), perm, perm_grad, moe.parameters()),
        "dispatch": _fwd_bwd(dispatch_only, x, grad, moe.parameters()),
    }
    if with_deepspeed:
        ds_layer, ds_params = _deepspeed_moe(d, ff, experts, top_k)
        fns["deepspeed"] = _fwd_bwd(ds_layer, x, grad, ds_params)
    # rounded as reported (`rounds_ms`), so the medians and the ratio follow from the output
    samples = {k: [round(t, 4) for t in v] for k, v in interleaved_samples(fns, rounds=rounds).items()}
    ms = {k: statistics.median(v) for k, v in samples.items()}
    ms["ratio"] = paired_ratio(samples["moe"], samples["dense"])
    ms["rounds_ms"] = {k: samples[k] for k in ("moe", "dense")}
    return ms


def run_bench(
    tokens: int = 4096,
    d_model: int = 512,
    d_ff: int = 1024,
    experts: int = 8,
    top_k: int = 2,
    sweep=(1024, 4096, 16384),
    rounds: int = 7,
    deepspeed: bool = True,
) -> dict:
    tune_cpu_allocator()  # as the trainer runs (aion_train.parallel.device)
    main = measure(tokens, d_model, d_ff, experts, top_k, rounds, deepspeed)
    points = []
    for n in sweep:
        # about twice the main point's time budget per point (small sizes are the noisiest)
        n_rounds = min(60, max(5, 2 * rounds * tokens // n))
        ms = main if n == tokens else measure(n, d_model, d_ff, experts, top_k, n_rounds, False)
        points.append(
            {
                "tokens": n,
                "moe_ms": round(ms["moe"], 2),
                "dense_equiv_ms": round(ms["dense"], 2),
                "ratio": round(ms["ratio"], 3),
                "rounds_ms": ms["rounds_ms"],
            }
        )
    return {
        "moe_ms": round(main["moe"], 2),
        "dense_equiv_ms": round(main["dense"], 2),
        "ratio": round(main["ratio"], 3),  # median of the per-round moe/dense ratios
        "rounds_ms": main["rounds_ms"],  # every round's moe and dense milliseconds
        "dispatch_ms": round(main["dispatch"], 2),
        "experts_ms": round(main["experts"], 2),
        "deepspeed_moe_ms": round(main["deepspeed"], 2) if "deepspeed" in main else None,
        "tokens": tokens,
        "experts": experts,
        "top_k": top_k,
        "d_model": d_model,
        "d_ff_expert": d_ff,
        "capacity": "dropless",
        "threads": torch.get_num_threads(),
        "sweep": points,
    }


QUICK = {"tokens": 512, "d_model": 64, "d_ff": 128, "sweep": (256, 512), "rounds": 2}
