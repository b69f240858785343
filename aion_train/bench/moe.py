"""bench moe: our MoE layer (router + sort-based dispatch + grouped experts) against a dense
SwiGLU FFN with the same active FLOPs and against DeepSpeed's MoE layer with the same
experts, top-k and capacity; forward + backward, side by side in one process."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from aion_train.model.ffn import DenseFFN
from aion_train.model.moe import MoELayer

from .timing import time_interleaved


def _fwd_bwd(module_fn, x, grad):
    def run():
        x.grad = None
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
    from aion_train.train.ds_comm import init_deepspeed_comm
    init_deepspeed_comm("gloo")
    from deepspeed.moe.layer import MoE
    layer = MoE(d, _DSExpert(d, ff), num_experts=experts, ep_size=1, k=top_k,
                capacity_factor=1.0, drop_tokens=False)  # dropless, like ours
    layer.set_deepspeed_parallelism()
    return lambda x: layer(x)[0]


def measure(tokens: int, d: int, ff: int, experts: int, top_k: int, rounds: int,
            with_deepspeed: bool) -> dict:
    torch.manual_seed(0)
    moe = MoELayer(d, experts, top_k, ff, capacity_factor=None)
    dense = DenseFFN(d, top_k * ff)        # same active FLOPs per token
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
        "moe": _fwd_bwd(lambda t: moe(t)[0], x, grad),
        "dense": _fwd_bwd(dense, x, grad),
        "experts": _fwd_bwd(lambda t: moe.experts(t, counts), perm, perm_grad),
        "dispatch": _fwd_bwd(dispatch_only, x, grad),
    }
    if with_deepspeed:
        fns["deepspeed"] = _fwd_bwd(_deepspeed_moe(d, ff, experts, top_k), x, grad)
    ms = time_interleaved(fns, rounds=rounds)
    return ms


def run_bench(tokens: int = 4096, d_model: int = 512, d_ff: int = 1024, experts: int = 8, top_k: int = 2,
              sweep=(1024, 4096, 16384), rounds: int = 7, deepspeed: bool = True) -> dict:
    torch.set_num_threads(torch.get_num_threads())
    main = measure(tokens, d_model, d_ff, experts, top_k, rounds, deepspeed)
    points = []
    for n in sweep:
        # as many rounds as fit the main point's time budget (small sizes are the noisiest)
        n_rounds = min(25, max(5, rounds * tokens // n))
        ms = main if n == tokens else measure(n, d_model, d_ff, experts, top_k, n_rounds, False)
        points.append({"tokens": n, "moe_ms": round(ms["moe"], 2), "dense_equiv_ms": round(ms["dense"], 2),
                       "ratio": round(ms["moe"] / ms["dense"], 3)})
    return {
        "moe_ms": round(main["moe"], 2),
        "dense_equiv_ms": round(main["dense"], 2),
        "ratio": round(main["moe"] / main["dense"], 3),
        "dispatch_ms": round(main["dispatch"], 2),
        "experts_ms": round(main["experts"], 2),
        "deepspeed_moe_ms": round(main["deepspeed"], 2) if "deepspeed" in main else None,
        "tokens": tokens, "experts": experts, "top_k": top_k, "d_model": d_model, "d_ff_expert": d_ff,
        "capacity": "dropless", "threads": torch.get_num_threads(),
        "sweep": points,
    }
QUICK = {"tokens": 512, "d_model": 64, "d_ff": 128, "sweep": (256, 512), "rounds": 2}
