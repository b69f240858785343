"""The experts' weights as stacked tensors and one grouped matmul per projection."""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F
from torch import nn

from aion_train.kernels import select

from ..execution import ExecutionPolicy, policy_for
from ..packed_weights import packed_linear

GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Which expert matmul runs where groups are unequal (`ExecutionPolicy.grouped_mm`, from config
# `runtime.grouped_mm`; not part of the model config: the math is the same): `auto` torch's
# grouped GEMM when a probe (forward + backward against per-expert matmuls) passes on the
# device and dtype, else one matmul per expert; `grouped` the grouped GEMM or an error saying
# why it cannot run; `per_expert` one matmul per expert. Each choice is logged once per
# (device, dtype).
GROUPED_MM_KEY = "runtime.grouped_mm"

log = logging.getLogger("aion_train.model")
_logged: set = set()


def _log_once(key, msg: str, *args) -> None:
    if key not in _logged:
        _logged.add(key)
        log.info(msg, *args)


@functools.cache
def grouped_mm_status(device_type: str, dtype: torch.dtype = torch.float32) -> tuple[bool, str]:
    """(torch's grouped GEMM works on this device and dtype, forward and backward; why not)."""
    if not hasattr(F, "grouped_mm"):
        return False, f"torch {torch.__version__} has no torch.nn.functional.grouped_mm"
    if dtype not in GROUPED_MM_DTYPES:
        return False, f"dtype {dtype} is not one of {GROUPED_MM_DTYPES}"
    try:
        with torch.inference_mode(False), torch.enable_grad():  # the first call may come from generate()
            if _probe_grouped_mm(device_type, dtype):
                return True, "probe passed"
            return False, "the probe's result differs from per-expert matmuls"
    except Exception as e:
        return False, f"the probe raised {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def _grouped_mm_works(device_type: str, dtype: torch.dtype = torch.float32, mode: str = "auto") -> bool:
    """Whether grouped_linear takes torch's grouped GEMM on this device and dtype (see
    GROUPED_MM_KEY); logs the choice and its reason once; `grouped` that cannot run raises."""
    if mode == "per_expert":
        _log_once(
            ("per_expert", device_type, dtype),
            "MoE experts on %s %s: one matmul per expert (%s=per_expert)",
            device_type,
            dtype,
            GROUPED_MM_KEY,
        )
        return False
    ok, why = grouped_mm_status(device_type, dtype)
    if not ok and mode == "grouped":
        raise RuntimeError(
            f"{GROUPED_MM_KEY}=grouped but torch's grouped GEMM cannot run on {device_type} {dtype}: {why}"
        )
    if ok:
        _log_once(
            (mode, device_type, dtype, True), "MoE experts on %s %s: torch grouped GEMM (%s)", device_type, dtype, why
        )
    else:
        _log_once(
            (mode, device_type, dtype, False),
            "MoE experts on %s %s: one matmul per expert (grouped GEMM unavailable: %s)",
            device_type,
            dtype,
            why,
        )
    return ok


def _probe_grouped_mm(device_type: str, dtype: torch.dtype) -> bool:
    a = torch.randn(5, 8, device=device_type).to(dtype).requires_grad_()
    b = torch.randn(2, 8, 8, device=device_type).to(dtype).requires_grad_()
    offs = torch.tensor([2, 5], dtype=torch.int32, device=device_type)
    y = F.grouped_mm(a, b, offs=offs)
    y.backward(torch.ones_like(y))
    ref = torch.cat([a[:2] @ b[0], a[2:] @ b[1]])
    return bool(torch.allclose(y.float(), ref.float(), atol=1e-5, rtol=1e-2))


def _aligned(t: torch.Tensor) -> bool:
    """grouped GEMM needs 16-byte aligned row strides."""
    return (t.shape[-1] * t.element_size()) % 16 == 0


def grouped_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    counts: torch.Tensor,
    counts_list: list[int] | None = None,
    mode: str = "auto",
) -> torch.Tensor:
    """x: [M, in] rows grouped by expert (counts[E] rows each); weight: [E, in, out]; `mode`
    the grouped GEMM choice (GROUPED_MM_KEY)."""
    fits = x.dtype == weight.dtype and _aligned(x) and _aligned(weight)
    if not fits and mode == "grouped":
        raise RuntimeError(
            f"{GROUPED_MM_KEY}=grouped but these experts cannot take the grouped GEMM: x {x.dtype} "
            f"[{x.shape[-1]}] and weight {weight.dtype} [{weight.shape[-1]}] need one dtype and "
            "16-byte aligned rows"
        )
    if fits and _grouped_mm_works(x.device.type, x.dtype, mode):
        offs = torch.cumsum(counts, 0).to(torch.int32)
        out = F.grouped_mm(x.contiguous(), weight, offs=offs)
        if out.requires_grad:  # its backward needs a dense incoming gradient
            out.register_hook(lambda g: g.contiguous())
        return out
    counts_list = counts.tolist() if counts_list is None else counts_list
    chunks = torch.split(x, counts_list)
    return torch.cat([c @ weight[e] for e, c in enumerate(chunks)], dim=0)


def _nonempty_expert_linear(x: torch.Tensor, weight: torch.Tensor, counts_list: list[int]) -> torch.Tensor:
    """grouped_linear's result from one matmul per expert with rows (x grouped by expert)."""
    outs, start = [], 0
    for e, n in enumerate(counts_list):
        if n:
            outs.append(x[start : start + n] @ weight[e])
            start += n
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=0) if outs else x.new_empty(0, weight.shape[-1])


class GroupedExperts(nn.Module):
    """E SwiGLU (or GeLU/ReLU) experts: w1/w3 [E, d, ff], w2 [E, ff, d]."""

    compile_role = "eager"  # stays eager inside a compiled block (model/compile.py)

    def __init__(
        self,
        n_experts: int,
        d_model: int,
        d_ff: int,
        activation: str = "swiglu",
        init_std: float = 0.02,
        kernels: str = "auto",
    ):
        super().__init__()
        self.activation = activation
        self.execution: ExecutionPolicy | None = None  # apply_execution_policy; None: the device's
        self._swiglu = select("swiglu", kernels)
        self.w1 = nn.Parameter(torch.randn(n_experts, d_model, d_ff) * init_std)
        self.w2 = nn.Parameter(torch.randn(n_experts, d_ff, d_model) * init_std)
        self.w3 = nn.Parameter(torch.randn(n_experts, d_model, d_ff) * init_std) if activation == "swiglu" else None
        self.packed_experts: dict[str, list[torch.Tensor]] | None = None  # packed_weights.pack_weights

    @property
    def n_local_experts(self) -> int:
        return self.w1.shape[0]

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x: [M, d] rows grouped by expert, counts[e] rows each."""
        counts_list = counts.tolist()
        policy = policy_for(self.execution, x.device)
        if x.shape[0] <= policy.sparse_expert_rows:
            # a few rows (decode): one matmul per expert that has rows, the empty ones skipped
            packed = None if torch.is_grad_enabled() else self.packed_experts
            if packed is not None and x.dtype == self.w1.dtype:
                return self._packed_mlp(x, counts_list, packed)
            return self._mlp(x, lambda a, name: _nonempty_expert_linear(a, getattr(self, name), counts_list))
        if policy.batched_equal_groups and x.shape[0] and len(set(counts_list)) == 1:
            # equal groups (padded by the dispatcher, or all at capacity): one batched GEMM per
            # projection, which MKL splits over the threads by whole experts
            groups = x.reshape(len(counts_list), counts_list[0], x.shape[-1])
            return self._mlp(groups, lambda a, name: torch.bmm(a, getattr(self, name))).reshape(x.shape[0], -1)
        return self._mlp(
            x, lambda a, name: grouped_linear(a, getattr(self, name), counts, counts_list, policy.grouped_mm)
        )

    def _packed_mlp(self, x: torch.Tensor, counts_list: list[int], packed: dict) -> torch.Tensor:
        """The experts with rows, one after the other, on their packed weights (generation):
        SwiGLU's two input projections as one matmul ([w1; w3])."""
        outs, start = [], 0
        for e, n in enumerate(counts_list):
            if not n:
                continue
            rows = x[start : start + n]
            start += n
            if "w13" in packed:
                h = packed_linear(rows, packed["w13"][e])
                half = h.shape[-1] // 2
                h = self._swiglu(h[:, :half], h[:, half:])
            else:
                h = packed_linear(rows, packed["w1"][e])
                h = F.gelu(h) if self.activation == "gelu" else F.relu(h)
            outs.append(packed_linear(h, packed["w2"][e]))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=0) if outs else x.new_empty(0, self.w2.shape[-1])

    def _mlp(self, x: torch.Tensor, linear) -> torch.Tensor:
        """linear(rows, projection name) -> rows through that projection."""
        h = linear(x, "w1")
        if self.w3 is not None:
            h = self._swiglu(h, linear(x, "w3"))
        else:
            h = F.gelu(h) if self.activation == "gelu" else F.relu(h)
        return linear(h, "w2")
