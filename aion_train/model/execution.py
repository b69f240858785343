"""How the model's modules compute on a device: one value, chosen once, injected.

The choices change speed, never what is computed (up to float rounding in the order of
sums): on the CPU, ragged expert groups are padded to equal ones and run as one batched
GEMM, and bf16/fp16 attention runs in fp32; everywhere, the MoE expert matmul is torch's
grouped GEMM or one matmul per expert (`runtime.grouped_mm`), and training may run the
transformer blocks through torch.compile (`train.compile`, model/compile.py). `ExecutionPolicy.for_device`
is the one place that decides them; `apply_execution_policy` hands a policy to every module
of a model, and a module without one uses its tensors' device's policy. The measurements
behind the CPU choices are in docs/notes.md (bench moe, bench train)."""

from __future__ import annotations

import dataclasses
import functools
import logging
from dataclasses import dataclass

import torch
from torch import nn

from .compile import COMPILE_MODES, compile_blocks

log = logging.getLogger("aion_train.model")

GROUPED_MM_MODES = ("auto", "grouped", "per_expert")
ALL_ROWS = 1 << 62  # sparse_expert_rows: every step


@dataclass(frozen=True)
class ExecutionPolicy:
    pad_expert_groups: bool  # pad ragged expert groups to the largest when that adds at most
    pad_max_waste: float  #   this fraction of rows, and groups have at most
    pad_max_rows: int  #   this many rows: equal groups then run as one batched GEMM
    batched_equal_groups: bool  # equal expert groups as one torch.bmm per projection
    attention_fp32: bool  # bf16/fp16 attention computed in fp32 (its output cast back)
    grouped_mm: str = "auto"  # auto | grouped | per_expert (experts.grouped_linear)
    # generation (serving): the router's balance / z losses and per-layer stats are skipped
    # (nothing trains on them), and at most this many expert rows (decode steps) run one matmul
    # per expert that has rows, skipping the empty ones and the group padding (0: never)
    routing_stats: bool = True
    sparse_expert_rows: int = 0
    packed_weights: bool = False  # bf16 CPU weights packed once for oneDNN (packed_weights.py)
    # a server's engine runs in its own process (serve/engine_process.py): the HTTP side's
    # Python then never holds the engine's interpreter lock, whose waits stall every parallel
    # region of the model at its barrier; else in a thread of the server (serving_threads)
    serving_process: bool = False
    compile: str = "eager"  # eager | blocks: each transformer block through torch.compile (train.compile)

    def __post_init__(self):
        if self.grouped_mm not in GROUPED_MM_MODES:
            raise ValueError(f"runtime.grouped_mm={self.grouped_mm!r}: must be one of {', '.join(GROUPED_MM_MODES)}")
        if self.compile not in COMPILE_MODES:
            raise ValueError(f"train.compile={self.compile!r}: must be one of {', '.join(COMPILE_MODES)}")

    @classmethod
    def for_device(cls, device_type: str, grouped_mm: str = "auto", compile: str = "eager") -> ExecutionPolicy:
        """On the CPU MKL splits a batched GEMM over the threads by whole experts, which beats
        per-expert GEMMs up to a few hundred rows per expert; CUDA takes ragged groups as
        they are and runs bf16 attention natively."""
        cpu = device_type == "cpu"
        return cls(
            pad_expert_groups=cpu,
            pad_max_waste=0.15,
            pad_max_rows=384,
            batched_equal_groups=cpu,
            attention_fp32=cpu,
            grouped_mm=grouped_mm,
            compile=compile,
        )

    def for_generation(self) -> ExecutionPolicy:
        """The same device choices for serving / `generate`: no routing losses or stats, decode
        steps run only the experts their tokens picked, and on the CPU (where equal expert
        groups are batched) the bf16 weights are packed once (packed_weights.py) and a server's
        engine runs in its own process (serving_process)."""
        cpu = self.batched_equal_groups
        return dataclasses.replace(
            self,
            serving_process=cpu,
            routing_stats=False,
            # on the CPU every step (prefill too) takes one matmul per expert with rows, on the
            # packed weights; CUDA keeps the grouped GEMM for prefills
            sparse_expert_rows=ALL_ROWS if cpu else 256,
            packed_weights=cpu,
            compile="eager",  # decode steps change shape every step; serving stays eager
        )

    def serving_threads(self, in_process: bool) -> int:
        """Intra-op threads of a server's engine (0: leave the count alone). On the CPU: every
        core the process has when the engine has its own process; one fewer in a thread of the
        server, leaving a core to the HTTP side (docs/notes.md, bench serve)."""
        if not self.batched_equal_groups:  # CUDA
            return 0
        n = torch.get_num_threads()
        return n if in_process else max(1, n - 1)


@functools.cache
def _default(device_type: str) -> ExecutionPolicy:
    return ExecutionPolicy.for_device(device_type)


def policy_for(execution: ExecutionPolicy | None, device: torch.device) -> ExecutionPolicy:
    """A module's policy: the one it was given, else its tensors' device's default."""
    return execution if execution is not None else _default(device.type)


def apply_execution_policy(model: nn.Module, policy: ExecutionPolicy) -> nn.Module:
    """Give `policy` to every module of `model` that takes one (and to MoE dispatchers); logged once."""
    n = 0
    for m in model.modules():
        for obj in (m, getattr(m, "dispatcher", None)):
            if obj is not None and hasattr(obj, "execution"):
                obj.execution = policy
                n += 1
    log.info("execution policy for %d modules: %s", n, policy)
    if policy.compile == "blocks":
        compile_blocks(model)
    return model
