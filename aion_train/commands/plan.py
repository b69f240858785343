"""aion-train plan --flops C [--json]
aion-train plan --config F --gpus G --gpu-mem-gb M [--zero S] [--tp T] [--ep E] [--json] [key=value ...]

The first form: compute-optimal parameters and tokens for C training FLOPs (Chinchilla, Kaplan).
The second: per-GPU memory (parameters, gradients, optimizer states, activations) for the
config's model and micro batch, and the layouts that fit. Exit status 1 when none fits."""

from __future__ import annotations

import json
import sys

from aion_train.commands.check_config import add_config_arguments
from aion_train.config import ConfigError, load_config


def add_arguments(p):
    add_config_arguments(p)
    p.add_argument("--flops", type=float, default=None, help="training compute budget C in FLOPs")
    p.add_argument("--gpus", type=int, default=None, help="number of GPUs")
    p.add_argument(
        "--gpu-mem-gb", type=float, default=None, help="memory per GPU in GiB (an '80 GB' H100 has about 79.6 GiB)"
    )
    p.add_argument(
        "--zero",
        type=int,
        default=None,
        choices=(0, 1, 2, 3),
        help="ZeRO stage to evaluate (default: train.zero_stage)",
    )
    p.add_argument("--tp", type=int, default=None, help="tensor-parallel size (default: parallel.tp)")
    p.add_argument("--ep", type=int, default=None, help="expert-parallel size (default: parallel.ep)")
    p.add_argument("--headroom", type=float, default=0.10, help="fraction of memory kept free")
    p.add_argument(
        "--attention-scores",
        action="store_true",
        help="count the a*s^2 attention scores (an eager, non-fused attention kernel)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _fmt(x: float) -> str:
    return f"{x:.3g}"


def _print_compute(r: dict) -> None:
    print(f"compute budget        {r['flops']:.3g} FLOPs ({r['pf_days']:.3g} PF-days), C = 6 N D")
    print(
        f"Chinchilla approach 3 N = {_fmt(r['params_opt'])} params, D = {_fmt(r['tokens_opt'])} tokens "
        f"({r['tokens_per_param']:.1f} tokens/param), loss {r['chinchilla_loss']:.3f}"
    )
    rr, t3 = r["rule_20x"], r["table3"]
    print(
        f"20 tokens/param rule  N = {_fmt(rr['params'])} params, D = {_fmt(rr['tokens'])} tokens, "
        f"Chinchilla loss {rr['chinchilla_loss']:.3f}"
    )
    print(f"Chinchilla Table 3    N = {_fmt(t3['params'])} params, D = {_fmt(t3['tokens'])} tokens")
    print(f"Kaplan L(C_min)       {r['kaplan_loss']:.3f} nats (L(N_opt) = {r['kaplan_loss_at_params_opt']:.3f})")
    print(f"note: {r['notes']}")


def _row(e: dict) -> str:
    g = e["memory_gib"]
    return (
        f"tp={e['tp']} dp={e['dp']} ep={e['ep']} zero={e['zero_stage']} "
        f"ckpt={'on ' if e['activation_checkpointing'] else 'off'} sp={'on ' if e['sequence_parallel'] else 'off'}"
        f" | params {g['params']:.2f} grads {g['grads']:.2f} optim {g['optimizer']:.2f} "
        f"act {g['activations']:.2f} = {g['total']:.2f} GiB"
    )


def _print_memory(r: dict) -> None:
    p = r["params"]
    print(
        f"model: {p['total']:,} params ({p['expert']:,} in experts, {p['active_per_token']:,} active/token); "
        f"{r['precision']}, micro batch {r['micro_batch_size']} x {r['seq_len']} tokens"
    )
    print(
        f"GPUs: {r['gpus']} x {r['gpu_mem_gib']:g} GiB, usable {r['usable_gib']:.2f} GiB ({r['headroom']:.0%} headroom)"
    )
    req = r["requested"]
    if req["errors"]:
        print("requested layout is not valid:\n  " + "\n  ".join(req["errors"]))
    else:
        print(f"requested  {_row(req)}  {'fits' if req['fits'] else 'DOES NOT FIT'}")
    for i, s in enumerate(r["suggestions"][:8]):
        print(f"{'suggested' if i == 0 else '          '}  {_row(s)}")
    if len(r["suggestions"]) > 8:
        print(f"            ... {len(r['suggestions']) - 8} more fitting layouts (--json lists all)")
    print(r["message"])


def run(args) -> int:
    from aion_train.planner import plan_compute, plan_memory

    if args.flops is None and args.gpus is None:
        print("plan: give --flops C, or --gpus G --gpu-mem-gb M (with --config F)", file=sys.stderr)
        return 2
    result: dict = {}
    rc = 0
    if args.flops is not None:
        try:
            result = plan_compute(args.flops)
        except ValueError as e:
            print(f"plan: {e}", file=sys.stderr)
            return 2
    if args.gpus is not None:
        if args.gpu_mem_gb is None:
            print("plan: --gpus needs --gpu-mem-gb", file=sys.stderr)
            return 2
        try:
            cfg = load_config(args.config, args.overrides)
            mem = plan_memory(
                cfg,
                args.gpus,
                args.gpu_mem_gb,
                tp=args.tp,
                ep=args.ep,
                zero=args.zero,
                headroom=args.headroom,
                attention_scores=args.attention_scores,
            )
        except ConfigError as e:
            print(str(e), file=sys.stderr)
            return 2
        except ValueError as e:
            print(f"plan: {e}", file=sys.stderr)
            return 2
        mem["config"] = args.config
        rc = 0 if mem["fits"] else 1
        if not mem["fits"]:
            print(mem["message"], file=sys.stderr)
        result = {**result, "memory": mem} if result else mem
    if args.json:
        print(json.dumps(result))
    else:
        if "params_opt" in result:
            _print_compute(result)
        mem = result.get("memory", result if "suggestions" in result else None)
        if mem is not None:
            _print_memory(mem)
    return rc
