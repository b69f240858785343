"""bench train: one full training step (forward + backward + AdamW) of our MoE transformer
against transformers' MixtralForCausalLM with identical dimensions, and ZeRO 0/1/2/3 per-rank
memory on 2 real gloo ranks next to the theory of Rajbhandari et al. (ZeRO, SC'20).

Throughput: the model `configs/tiny_cpu.yaml` builds, at the config's precision (the tiny
config trains in bf16), and a `MixtralConfig` with the same vocab, width, layers, heads, KV
heads, expert width, experts, top-k, positions, RoPE theta, RMSNorm eps, untied head and the
balance loss on (`output_router_logits=True`, `router_aux_loss_coef = balance_coef`). Same
batch, same threads, same process, both trained the same way: in bf16 both models hold bf16
parameters (what DeepSpeed's bf16 mode does to any module, ours in the trainer or a
`transformers` one) and one shared optimizer keeps fp32 master weights and steps them with
`torch.optim.AdamW(fused=True)` (the `transformers` Trainer's default and our engine's); in fp32
the same AdamW steps the parameters. (`transformers`' own CPU bf16 route, autocast over fp32
weights, is slower than its bf16-parameter step: docs/notes.md.) Our step is
the trainer's (`return_logits=False`: head + loss without stored logits,
kernels/linear_cross_entropy.py). Timed interleaved (wall clock, `interleaved_samples`);
speedup_vs_hf is the median of the per-round ratios (`step_ms_rounds` has every round's step
times); `fp32` repeats the comparison in fp32.
The machines are shared, so the same two steps are also timed in thread-CPU time with one
intra-op thread (`cpu_ms_1thread`, `speedup_vs_hf_1thread_cpu`), which time spent preempted by
other processes does not inflate.
With `engine=True` the same step through our DeepSpeed engine (`build_engine`, one rank) is
timed alongside; that run happens in one spawned process so this one keeps no process group.

ZeRO: a dense variant of the model (`model.moe.every=0`; DeepSpeed refuses MoE under ZeRO-3),
one DeepSpeed engine per stage on the same 2 ranks, one step each, and the bytes each rank
really holds, read from DeepSpeed's own buffers (on CPU sharding shows in tensor sizes, not RSS):

- param_bytes: stage 3 the partition `param.ds_tensor`, else numel * itemsize of every param.
- grad_bytes: stage 0 the full `param.grad` after backward; stage 1 the full gradients held
  until DeepSpeed's end-of-backward reduce (measured on entry to `reduce_ipg_grads`); stages 2/3
  the storage behind the ZeRO optimizer's `averaged_gradients` partition after backward.
- optim_bytes: the Adam moments (exp_avg, exp_avg_sq) in the wrapped optimizer's state.
- master_bytes: DeepSpeed's fp32 master partition when it is a separate copy of the parameter
  partition (stages 1-3 keep one even in fp32 training; stage 3 means to reuse the partition but
  its check `tensor.device == "cpu"` compares a torch.device with a str). Not part of the
  theory's 8N for fp32 training, so reported on its own; optim_bytes_with_master adds it.
- grad_peak_bytes: the most full-size gradient bytes seen in flight at DeepSpeed's reduce calls
  (with the default reduce_bucket_size of 5e8 elements a small model's whole gradient waits in
  the bucket), and ipg_bucket_bytes the reduce bucket DeepSpeed allocated.
"""

from __future__ import annotations

import copy
import statistics
import time
from pathlib import Path

import torch

from .timing import interleaved_samples, paired_ratio

DEFAULT_CONFIG = "configs/tiny_cpu.yaml"


# ------------------------------------------------------------------------------------------
# config and models
# ------------------------------------------------------------------------------------------


def _config_path(config: str | None) -> str:
    """`config`, or the default; a relative path missing here is looked up in the source tree."""
    path = Path(config or DEFAULT_CONFIG)
    if path.is_file() or path.is_absolute():
        return str(path)
    return str(Path(__file__).resolve().parents[2] / path)


def load_bench_config(
    config: str | None = None,
    micro_batch_size: int | None = None,
    seq_len: int | None = None,
    tokens: int | None = None,
    precision: str | None = None,
):
    from aion_train.config import load_config

    overrides = [f"train.precision={precision}"] if precision else []
    if seq_len:
        overrides.append(f"data.seq_len={seq_len}")
    if micro_batch_size:
        overrides.append(f"data.micro_batch_size={micro_batch_size}")
    cfg = load_config(_config_path(config), overrides)
    if tokens:
        cfg.data.micro_batch_size = max(1, tokens // cfg.data.seq_len)
    return cfg


def mixtral_config(model_cfg):
    """A MixtralConfig with our model's dimensions (the export's), returning router logits for
    the balance loss, without a KV cache (training)."""
    from aion_train.interop.hf_mixtral import to_hf_config

    m = model_cfg
    if m.activation != "swiglu" or m.norm != "rmsnorm" or m.moe.every != 1 or m.moe.shared_expert_d_ff:
        raise ValueError("the Mixtral reference needs swiglu, rmsnorm and an MoE FFN in every layer")
    hc = to_hf_config(m)
    hc.output_router_logits = True
    hc.use_cache = False
    return hc


def build_hf_model(model_cfg, seed: int = 0, dtype: torch.dtype = torch.float32):
    from transformers import MixtralForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MixtralForCausalLM._from_config(
            mixtral_config(model_cfg), attn_implementation="sdpa", dtype=torch.float32
        )
    return model.to(dtype)


def param_count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _adamw(params, t):
    # fused: the `transformers` Trainer's default (optim="adamw_torch_fused") and our engine's
    return torch.optim.AdamW(params, lr=t.lr, betas=tuple(t.betas), eps=t.eps, weight_decay=t.weight_decay, fused=True)


class MasterWeightAdamW:
    """AdamW on fp32 master copies of low-precision parameters, as DeepSpeed's bf16 optimizer
    runs it: gradients cast up, one fused AdamW step on the masters, parameters copied back."""

    def __init__(self, params, t):
        self.params = [p for p in params if p.requires_grad]
        self.master = [p.detach().float().clone().requires_grad_() for p in self.params]
        self.opt = _adamw(self.master, t)

    def step(self):
        live = [(p, m) for p, m in zip(self.params, self.master) if p.grad is not None]
        for p, m in live:
            m.grad = p.grad.float()
        self.opt.step()
        with torch.no_grad():
            torch._foreach_copy_([p for p, _ in live], [m for _, m in live])

    def zero_grad(self, set_to_none: bool = True):
        for p, m in zip(self.params, self.master):
            p.grad = m.grad = None


def make_optimizer(model, t):
    low = any(p.dtype != torch.float32 for p in model.parameters())
    return MasterWeightAdamW(model.parameters(), t) if low else _adamw(model.parameters(), t)


def precision_dtype(precision: str) -> torch.dtype:
    if precision == "fp16":
        raise ValueError("bench train runs fp32 or bf16 (fp16 needs a GPU and loss scaling)")
    return torch.bfloat16 if precision == "bf16" else torch.float32


# ------------------------------------------------------------------------------------------
# throughput
# ------------------------------------------------------------------------------------------


def _phase_ms(models: dict, rounds: int) -> dict:
    """Median forward / backward / optimizer milliseconds per model, interleaved."""
    samples = {k: {"forward": [], "backward": [], "optimizer": []} for k in models}
    for _ in range(rounds):
        for name, (fwd, opt) in models.items():
            t0 = time.perf_counter()
            loss = fwd()
            t1 = time.perf_counter()
            loss.backward()
            t2 = time.perf_counter()
            opt.step()
            opt.zero_grad(set_to_none=True)
            t3 = time.perf_counter()
            for key, dt in (("forward", t1 - t0), ("backward", t2 - t1), ("optimizer", t3 - t2)):
                samples[name][key].append(dt * 1e3)
    return {k: {p: round(statistics.median(v), 2) for p, v in d.items()} for k, d in samples.items()}


def _thread_cpu_ms(fns: dict, rounds: int) -> dict:
    """Median thread-CPU milliseconds per call with ONE intra-op thread: all work runs on this
    thread, so time spent preempted by other processes is not counted (robust on a shared box)."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for fn in fns.values():
            fn()
        samples: dict[str, list[float]] = {k: [] for k in fns}
        for _ in range(rounds):
            for name, fn in fns.items():
                t0 = time.thread_time_ns()
                fn()
                samples[name].append((time.thread_time_ns() - t0) / 1e6)
    finally:
        torch.set_num_threads(prev)
    return {k: round(statistics.median(v), 2) for k, v in samples.items()}


def _top_ops(fn, steps: int = 3, limit: int = 15) -> list:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            fn()
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:limit]
    return [
        {
            "op": e.key,
            "self_ms_per_step": round(e.self_cpu_time_total / 1e3 / steps, 3),
            "calls_per_step": e.count // steps,
        }
        for e in rows
    ]


def measure_throughput(
    cfg,
    rounds: int = 10,
    warmup: int = 3,
    threads: int | None = None,
    engine: bool = False,
    profile: bool = False,
    details: bool = True,
    compiled: bool = False,
) -> dict:
    """Our training step vs Mixtral's on the same tokens, at cfg.train.precision; returns
    milliseconds and counts (`details`: also per-phase and one-thread CPU times; `compiled`:
    also our step with `train.compile=blocks`, as `ours_compiled`, its first step's time as
    `compile_s`)."""
    if threads:
        torch.set_num_threads(threads)
    from aion_train.model import build_model
    from aion_train.parallel.device import tune_cpu_allocator

    tune_cpu_allocator()  # as the trainer does on CPU (both models run in this process)
    b, t, v = cfg.data.micro_batch_size, cfg.data.seq_len, cfg.model.vocab_size
    gen = torch.Generator().manual_seed(cfg.seed)
    ids = torch.randint(0, v, (b, t), generator=gen)
    # HF shifts labels inside; ours takes them shifted: the same T-1 predicted tokens per row
    shifted = torch.full_like(ids, -100)
    shifted[:, :-1] = ids[:, 1:]

    dtype = precision_dtype(cfg.train.precision)
    ours = build_model(cfg.model, seed=cfg.seed).train().to(dtype)
    hf = build_hf_model(cfg.model, seed=cfg.seed, dtype=dtype).train()
    opt_ours, opt_hf = make_optimizer(ours, cfg.train), make_optimizer(hf, cfg.train)

    def ours_loss():  # as the trainer's step calls it: head + loss fused, no logits kept
        return ours(ids, labels=shifted, return_logits=False).loss

    def hf_loss():
        return hf(input_ids=ids, labels=ids).loss

    def step(loss_fn, opt):
        def run():
            loss_fn().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return run

    fns = {"ours": step(ours_loss, opt_ours), "hf": step(hf_loss, opt_hf)}
    losses = {"ours": ours_loss, "hf": hf_loss}
    compile_s = None
    if compiled:
        from aion_train.model.execution import ExecutionPolicy, apply_execution_policy

        policy = ExecutionPolicy.for_device("cpu", compile="blocks")
        ours_c = apply_execution_policy(build_model(cfg.model, seed=cfg.seed).train().to(dtype), policy)
        opt_c = make_optimizer(ours_c, cfg.train)

        def compiled_loss():
            return ours_c(ids, labels=shifted, return_logits=False).loss

        fns["ours_compiled"], losses["ours_compiled"] = step(compiled_loss, opt_c), compiled_loss
        t0 = time.perf_counter()
        fns["ours_compiled"]()  # compiles (or loads the cached graphs): timed apart from the steps
        compile_s = time.perf_counter() - t0
        ours_c.load_state_dict(ours.state_dict())  # back to the shared start (the step moved it)
        opt_c = make_optimizer(ours_c, cfg.train)
        fns["ours_compiled"] = step(compiled_loss, opt_c)
    if engine:
        from aion_train.parallel import build_groups, parallelize
        from aion_train.parallel.deepspeed_adapter import init_comm
        from aion_train.train.engine import build_engine

        ecfg = copy.deepcopy(cfg)
        init_comm("gloo", ecfg.parallel.timeout_s)  # a 1-rank group (a spawned process)
        groups = build_groups(1, 1, ecfg.parallel.timeout_s)
        # as the Trainer does: parallelize (tags the expert params for DeepSpeed), then the engine
        eng, _ = build_engine(parallelize(build_model(ecfg.model, seed=cfg.seed), groups), ecfg, groups)

        def engine_step():
            eng.backward(eng(ids, labels=shifted, return_logits=False).loss)
            eng.step()

        fns["ours_engine"] = engine_step
    with torch.no_grad():
        first = {k: float(fn()) for k, fn in losses.items()}
    # rounded as reported (`step_ms_rounds`), so the medians and the speedup follow from the output
    samples = {k: [round(t, 4) for t in v] for k, v in interleaved_samples(fns, rounds=rounds, warmup=warmup).items()}
    ms = {k: statistics.median(v) for k, v in samples.items()}
    out = {
        "ms": ms,
        "speedup_paired": paired_ratio(samples["hf"], samples["ours"]),
        "rounds_ms": samples,
        "tokens_per_step": b * t,
        "threads": torch.get_num_threads(),
        "params": param_count(ours),
        "hf_params": param_count(hf),
        "initial_loss": first,
        "hf_experts_implementation": hf.config._experts_implementation,
        "hf_attn_implementation": hf.config._attn_implementation,
        "dtype": str(dtype).split(".")[-1],
    }
    if compiled:
        out["compile_s"] = round(compile_s, 2)
        out["speedup_compiled_paired"] = paired_ratio(samples["hf"], samples["ours_compiled"])
    if details:
        out["phases_ms"] = _phase_ms({"ours": (ours_loss, opt_ours), "hf": (hf_loss, opt_hf)}, max(3, rounds // 2))
        out["cpu_ms_1thread"] = _thread_cpu_ms({k: fns[k] for k in ("ours", "hf")}, max(3, rounds))
    if profile:
        out["top_ops"] = {k: _top_ops(fn) for k, fn in fns.items() if k != "ours_engine"}
    return out


def _throughput_rank(cfg, rounds, warmup, threads, engine, profile):
    """Entry for the one spawned rank that also times the DeepSpeed engine."""
    return measure_throughput(cfg, rounds, warmup, threads, engine, profile)


# ------------------------------------------------------------------------------------------
# ZeRO memory
# ------------------------------------------------------------------------------------------


def _nbytes(t) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def _storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (views of one buffer count once)."""
    seen = {}
    for t in tensors:
        if t is None or not isinstance(t, torch.Tensor) or t.numel() == 0:
            continue
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def _bucket_bytes(zero_opt) -> int:
    """The reduce ("ipg") bucket buffers DeepSpeed holds right now."""
    total = 0
    for b in getattr(zero_opt, "ipg_buckets", {}).values():
        buf = getattr(b, "buffer", None)
        total += _storage_bytes(buf if isinstance(buf, (list, tuple)) else [buf])
    return total


def _watch_reduces(zero_opt, params) -> dict:
    """On each entry to DeepSpeed's bucket reduce, record the full-size gradient bytes alive
    (gradients waiting in the bucket are views of it) and the bucket buffers allocated."""
    seen: dict[str, list[int]] = {"grads": [], "bucket": []}
    from aion_train.parallel.deepspeed_adapter import ZERO_REDUCE_METHODS

    for name in ZERO_REDUCE_METHODS:
        fn = getattr(zero_opt, name, None)
        if fn is None:
            continue

        def wrapped(*args, _fn=fn, **kwargs):
            seen["grads"].append(sum(_nbytes(p.grad) for p in params if p.grad is not None))
            seen["bucket"].append(_bucket_bytes(zero_opt))
            return _fn(*args, **kwargs)

        setattr(zero_opt, name, wrapped)
    return seen


def _zero_stage_bytes(cfg, stage: int, groups) -> dict:
    from aion_train.model import build_model
    from aion_train.parallel import parallelize
    from aion_train.train.engine import build_engine

    scfg = copy.deepcopy(cfg)
    scfg.train.zero_stage = stage
    model = parallelize(build_model(scfg.model, seed=scfg.seed), groups)
    n = param_count(model)
    params = list(model.parameters())
    eng, _ = build_engine(model, scfg, groups)
    zopt = eng.optimizer
    inner = getattr(zopt, "optimizer", zopt) if stage > 0 else zopt
    seen = _watch_reduces(zopt, params) if stage > 0 else {"grads": [], "bucket": []}
    bucket = _bucket_bytes(zopt)

    gen = torch.Generator().manual_seed(scfg.seed + groups.rank)
    ids = torch.randint(0, scfg.model.vocab_size, (scfg.data.micro_batch_size, scfg.data.seq_len), generator=gen)
    loss = eng(ids, labels=ids).loss
    eng.backward(loss)
    bucket = max([bucket, _bucket_bytes(zopt)] + seen["bucket"])  # stages 1/2: per backward
    reduces = seen["grads"]

    if stage == 3:
        param_bytes = sum(_nbytes(p.ds_tensor) for p in params)
    else:
        param_bytes = sum(p.numel() * p.element_size() for p in params)
    full_grads = sum(_nbytes(p.grad) for p in params)
    partition = [t for v in getattr(zopt, "averaged_gradients", {}).values() for t in (v or [])]
    if stage == 0:
        grad_bytes = full_grads
    elif stage == 1:
        grad_bytes = max(reduces + [full_grads])
    else:
        grad_bytes = _storage_bytes(partition)
    grad_partition_bytes = _storage_bytes(partition) if stage > 0 else full_grads
    grad_peak = max(reduces + [full_grads, grad_bytes])

    eng.step()
    optim_bytes = 0
    for state in inner.state.values():
        for key, val in state.items():
            if isinstance(val, torch.Tensor) and key != "step":
                optim_bytes += _nbytes(val)
    if stage in (1, 2):
        master = sum(_nbytes(t) for t in zopt.single_partition_of_fp32_groups)
    elif stage == 3:
        lp = {t.data_ptr() for t in zopt.fp16_partitioned_groups_flat}
        master = sum(_nbytes(t) for t in zopt.fp32_partitioned_groups_flat if t.data_ptr() not in lp)
    else:
        master = 0
    world = groups.dp
    theory = {
        "param_bytes": 4 * n // (world if stage >= 3 else 1),
        "grad_bytes": 4 * n // (world if stage >= 2 else 1),
        "optim_bytes": 8 * n // (world if stage >= 1 else 1),
    }
    result = {
        "param_bytes": param_bytes,
        "grad_bytes": grad_bytes,
        "optim_bytes": optim_bytes,
        "master_bytes": master,
        "optim_bytes_with_master": optim_bytes + master,
        "grad_partition_bytes": grad_partition_bytes,
        "grad_peak_bytes": grad_peak,
        "ipg_bucket_bytes": bucket,
        "optimizer": type(zopt).__name__,
        "params": n,
        "loss": float(loss.detach()),
        "theory": theory,
    }
    if hasattr(eng, "destroy"):
        eng.destroy()
    return result


def _zero_rank(cfg, stages):
    """Runs on each of the spawned ranks: every stage on the same process group."""
    import torch.distributed as dist

    from aion_train.parallel import build_groups
    from aion_train.parallel.deepspeed_adapter import init_comm

    init_comm("gloo", cfg.parallel.timeout_s)
    groups = build_groups(1, 1, cfg.parallel.timeout_s)
    out = {}
    for stage in stages:
        mine = _zero_stage_bytes(cfg, stage, groups)
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, {k: mine[k] for k in ("param_bytes", "grad_bytes", "optim_bytes")})
        mine["per_rank"] = everyone
        out[str(stage)] = mine
    return out


def measure_zero(cfg, stages=(0, 1, 2, 3), nproc: int = 2, timeout_s: float = 300.0) -> dict:
    zcfg = copy.deepcopy(cfg)
    zcfg.model.moe.every = 0
    zcfg.train.precision = "fp32"
    zcfg.parallel.world_size = nproc
    zcfg.parallel.timeout_s = min(zcfg.parallel.timeout_s, 60.0)
    from aion_train.parallel.spawn import run_ranks

    res = run_ranks(_zero_rank, nproc, zcfg, tuple(stages), timeout_s=timeout_s)
    if "0" in res and "1" in res and res["0"]["optim_bytes"]:
        res["zero1_optim_ratio"] = round(res["1"]["optim_bytes"] / res["0"]["optim_bytes"], 4)
    if "0" in res and "2" in res and res["0"]["grad_bytes"]:
        res["zero2_grad_ratio"] = round(res["2"]["grad_bytes"] / res["0"]["grad_bytes"], 4)
    if "0" in res and "3" in res and res["0"]["param_bytes"]:
        res["zero3_param_ratio"] = round(res["3"]["param_bytes"] / res["0"]["param_bytes"], 4)
    res["ranks"] = nproc
    return res


# ------------------------------------------------------------------------------------------
# the bench
# ------------------------------------------------------------------------------------------


def _in_process(cfg, rounds, warmup, threads, profile=False, details=True, compiled=False) -> dict:
    prev = torch.get_num_threads()
    try:
        return measure_throughput(cfg, rounds, warmup, threads, False, profile, details, compiled)
    finally:
        torch.set_num_threads(prev)


def _tokens_per_s(tp: dict) -> tuple[float, float]:
    tok, ms = tp["tokens_per_step"], tp["ms"]
    return tok / ms["ours"] * 1e3, tok / ms["hf"] * 1e3


def run_bench(
    config: str | None = None,
    rounds: int = 10,
    warmup: int = 3,
    tokens: int | None = None,
    micro_batch_size: int | None = None,
    seq_len: int | None = None,
    threads: int | None = None,
    precision: str | None = None,
    fp32: bool = True,
    engine: bool = True,
    profile: bool = False,
    zero: bool = True,
    zero_stages=(0, 1, 2, 3),
    zero_micro_batch_size: int = 2,
    sizes=("mid",),
    size_rounds: int = 6,
    compiled: bool = True,
) -> dict:
    from aion_train.train.metrics import flops_per_token, peak_flops

    cfg = load_bench_config(config, micro_batch_size, seq_len, tokens, precision)
    dtype = precision_dtype(cfg.train.precision)
    threads = threads or torch.get_num_threads()
    if engine:
        from aion_train.parallel.spawn import run_ranks

        tp = run_ranks(_throughput_rank, 1, cfg, rounds, warmup, threads, True, profile, timeout_s=600.0)
    else:
        tp = _in_process(cfg, rounds, warmup, threads, profile)
    ms = tp["ms"]
    tok = tp["tokens_per_step"]
    ours_tps, hf_tps = _tokens_per_s(tp)
    prev = torch.get_num_threads()
    torch.set_num_threads(tp["threads"])
    try:
        peak = peak_flops("cpu", dtype)  # the measured matmul rate in the step's dtype
    finally:
        torch.set_num_threads(prev)
    fpt = flops_per_token(cfg.model, cfg.data.seq_len)
    result = {
        "tokens_per_s": round(ours_tps, 1),
        "mfu": round(fpt * ours_tps / peak, 4),
        "hf_tokens_per_s": round(hf_tps, 1),
        # median over rounds of hf_ms / ours_ms (the two steps of a round ran back to back)
        "speedup_vs_hf": round(tp["speedup_paired"], 3),
        "speedup_vs_hf_of_medians": round(ours_tps / hf_tps, 3),
        "dtype": tp["dtype"],
        "engine_tokens_per_s": round(tok / ms["ours_engine"] * 1e3, 1) if "ours_engine" in ms else None,
        "step_ms": {k: round(v, 2) for k, v in ms.items()},
        "step_ms_rounds": tp["rounds_ms"],  # every round's step time: the medians and speedup come from these
        "phases_ms": tp["phases_ms"],
        "cpu_ms_1thread": tp["cpu_ms_1thread"],
        "speedup_vs_hf_1thread_cpu": round(tp["cpu_ms_1thread"]["hf"] / tp["cpu_ms_1thread"]["ours"], 3),
        "hf_mfu": round(fpt * hf_tps / peak, 4),
        "flops_per_token": fpt,
        "peak_flops": peak,
        "params": tp["params"],
        "hf_params": tp["hf_params"],
        "initial_loss": tp["initial_loss"],
        "micro_batch_size": cfg.data.micro_batch_size,
        "seq_len": cfg.data.seq_len,
        "tokens_per_step": tok,
        "threads": tp["threads"],
        "rounds": rounds,
        "hf_experts_implementation": tp["hf_experts_implementation"],
        "hf_attn_implementation": tp["hf_attn_implementation"],
    }
    if fp32 and dtype != torch.float32:  # the same comparison in fp32, side by side
        fcfg = copy.deepcopy(cfg)
        fcfg.train.precision = "fp32"
        f = _in_process(fcfg, rounds, warmup, threads, details=False)
        f_ours, f_hf = _tokens_per_s(f)
        result["fp32"] = {
            "speedup_vs_hf": round(f["speedup_paired"], 3),
            "tokens_per_s": round(f_ours, 1),
            "hf_tokens_per_s": round(f_hf, 1),
            "step_ms": {k: round(v, 2) for k, v in f["ms"].items()},
            "step_ms_rounds": f["rounds_ms"],
        }
    if profile:
        result["top_ops"] = tp["top_ops"]
    result["peak"] = measured_peaks(tp["threads"])
    tiny = {"name": "tiny", "params": tp["params"], "tokens_per_step": tok}
    tiny[_precision_key(dtype)] = _size_entry(result, fpt, peak)
    if "fp32" in result:
        tiny["fp32"] = _size_entry(result["fp32"], fpt, peak_flops_at(torch.float32, tp["threads"]))
    result["sizes"] = [tiny] + [measure_size(name, size_rounds, warmup, threads, compiled) for name in sizes]
    if zero:
        zcfg = copy.deepcopy(cfg)
        zcfg.data.micro_batch_size = zero_micro_batch_size
        result["zero"] = measure_zero(zcfg, zero_stages)
    return result


SIZE_CONFIGS = {"mid": "configs/mid_cpu.yaml"}  # the sweep's other sizes, next to the tiny default


def _precision_key(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float32: "fp32", torch.float16: "fp16"}[dtype]


def peak_flops_at(dtype: torch.dtype, threads: int) -> float:
    """The MFU denominator at `dtype` on `threads` CPU threads (train.metrics.peak_flops)."""
    from aion_train.train.metrics import peak_flops

    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return peak_flops("cpu", dtype)
    finally:
        torch.set_num_threads(prev)


def measured_peaks(threads: int) -> dict:
    """The matmul rates behind every MFU of the report, and how they were measured."""
    from aion_train.train.metrics import _cpu_matmul_rate

    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        rates = {
            k: round(_cpu_matmul_rate(d) / 1e12, 4) for k, d in (("bf16", torch.bfloat16), ("fp32", torch.float32))
        }
    finally:
        torch.set_num_threads(prev)
    return {
        "tflops": rates,
        "method": f"1024x1024 @ 1024x1024 matmul repeated for 0.3 s on {threads} threads, 2*n^3 flops each; "
        "the MFU of a precision divides by the better of its rate and fp32's",
    }


def _size_entry(r: dict, fpt: float, peak: float) -> dict:
    tokens_per_s = r["tokens_per_s"]
    return {
        "speedup_vs_hf": r["speedup_vs_hf"],
        "tokens_per_s": tokens_per_s,
        "hf_tokens_per_s": r["hf_tokens_per_s"],
        "mfu": round(fpt * tokens_per_s / peak, 4),
        "hf_mfu": round(fpt * r["hf_tokens_per_s"] / peak, 4),
        "flops_per_token": fpt,
        "peak_flops": peak,
        "step_ms": r["step_ms"],
        "step_ms_rounds": r["step_ms_rounds"],
    }


def measure_size(name: str, rounds: int, warmup: int, threads: int | None, compiled: bool = False) -> dict:
    """One size of the sweep: our step and Mixtral's of identical size, in bf16 and in fp32,
    in this process (the DeepSpeed engine is timed for the tiny size only); `compiled`: our
    step with `train.compile=blocks` too, in the same rounds (`compiled` of each precision)."""
    from aion_train.train.metrics import flops_per_token

    out: dict = {"name": name}
    for precision in ("bf16", "fp32"):
        cfg = load_bench_config(SIZE_CONFIGS[name], precision=precision)
        tp = _in_process(cfg, rounds, warmup, threads, details=False, compiled=compiled)
        ours_tps, hf_tps = _tokens_per_s(tp)
        fpt = flops_per_token(cfg.model, cfg.data.seq_len)
        r = {
            "speedup_vs_hf": round(tp["speedup_paired"], 3),
            "tokens_per_s": round(ours_tps, 1),
            "hf_tokens_per_s": round(hf_tps, 1),
            "step_ms": {k: round(v, 2) for k, v in tp["ms"].items()},
            "step_ms_rounds": tp["rounds_ms"],
        }
        out.update(params=tp["params"], tokens_per_step=tp["tokens_per_step"])
        peak = peak_flops_at(precision_dtype(precision), tp["threads"])
        out[precision] = _size_entry(r, fpt, peak)
        if compiled:
            tps = tp["tokens_per_step"] / tp["ms"]["ours_compiled"] * 1e3
            out[precision]["compiled"] = {
                "speedup_vs_hf": round(tp["speedup_compiled_paired"], 3),
                "tokens_per_s": round(tps, 1),
                "mfu": round(fpt * tps / peak, 4),
                "compile_s": tp["compile_s"],
                "initial_loss": tp["initial_loss"]["ours_compiled"],
                "eager_initial_loss": tp["initial_loss"]["ours"],
            }
    return out


QUICK = {
    "sizes": (),
    "rounds": 3,
    "warmup": 1,
    "micro_batch_size": 2,
    "seq_len": 64,
    "engine": False,
    "zero_micro_batch_size": 1,
}
