"""LoRA adapters on our (tensor-parallel) linear layers: W' = W0 + (alpha / r) B A.

A [r, in] starts kaiming-uniform, B [out, r] starts at zero, so a wrapped model starts equal
to its base. Dropout acts on the adapter's input only. Targets are picked by module-name
suffix (`q_proj`, `k_proj`, `v_proj`, `o_proj`, `w_gate`, `w_up`, `w_down`, `lm_head`):
attention and dense FFNs (an MoE layer's shared expert too). The routed experts are fused
[E, in, out] tensors, not linears, and get no adapters: adapting attention and the dense FFNs
is the usual LoRA recipe and is enough for the post-training tasks here.

Tensor parallelism (Megatron's split, applied to the adapter):
  ColumnParallelLinear (W rows split):  B's rows are split the same way, A is replicated.
      Every rank computes h = A x from the same input; its gradient is a partial sum over
      the ranks' B shards, so A's gradient is all-reduced over the TP group (a grad hook).
  RowParallelLinear (W columns split):  A's columns are split the same way, B is replicated;
      the rank-r intermediate h = sum_ranks A_r x_r is all-reduced before B.
Full A is drawn from a generator seeded by the module name, so a TP rank holds exactly the
slice of the single-process adapter; dropout masks come from the same kind of generator,
drawn at full width and sliced, so TP ranks agree with each other and with one process.

`LoRALinear` keeps the base's `weight` / `bias` under their old names (base checkpoints
still load after wrapping) and adds `lora_A` / `lora_B`. Apply it after `parallelize`."""

from __future__ import annotations

import math
import zlib

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from aion_train.parallel.collectives import (
    copy_to,
    gather_last,
    gather_seq,
    group_size,
    reduce_from,
    reduce_scatter_seq,
    scatter_seq,
)
from aion_train.parallel.layers import ColumnParallelLinear, RowParallelLinear

KNOWN_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "w_gate", "w_up", "w_down", "lm_head")


class LoRAError(ValueError):
    """Bad LoRA targets or adapter weights; the message names the problem."""


def _rank(group) -> int:
    return 0 if group_size(group) == 1 else dist.get_rank(group)


def _seed_of(name: str, seed: int) -> int:
    return (zlib.crc32(name.encode()) + 1_000_003 * int(seed)) % (2**63)


class LoRALinear(nn.Module):
    """A dense / column-parallel / row-parallel linear with a LoRA adapter (see module doc)."""

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0, name: str = "", seed: int = 0):
        super().__init__()
        if isinstance(base, ColumnParallelLinear):
            self.kind = "column"
        elif isinstance(base, RowParallelLinear):
            self.kind = "row"
        elif isinstance(base, nn.Linear):
            self.kind = "dense"
        else:
            raise LoRAError(
                f"{name}: LoRA wraps nn.Linear / ColumnParallelLinear / RowParallelLinear, not {type(base).__name__}"
            )
        self.group = getattr(base, "group", None)
        self.sequence_parallel = bool(getattr(base, "sequence_parallel", False))
        self.gather_output = bool(getattr(base, "gather_output", False))
        self.weight, self.bias = base.weight, base.bias
        self.nf4 = None  # the NF4 base weight under QLoRA (see qlora.py)
        self.r, self.alpha, self.scaling = int(r), float(alpha), float(alpha) / int(r)
        self.dropout_p, self.name, self._seed = float(dropout), name, _seed_of(name, seed)
        self._dropout_gen = None
        self.merged, self._w0 = False, None
        self.train(base.training)
        self.tp, self.tp_rank = group_size(self.group), _rank(self.group)
        out_local, in_local = base.weight.shape
        self.in_features = in_local * (self.tp if self.kind == "row" else 1)
        self.out_features = out_local * (self.tp if self.kind == "column" else 1)
        dev = base.weight.device
        gen = torch.Generator(device="cpu").manual_seed(self._seed)
        a_full = torch.empty(self.r, self.in_features)
        nn.init.kaiming_uniform_(a_full, a=math.sqrt(5), generator=gen)
        a = a_full.chunk(self.tp, dim=1)[self.tp_rank] if self.kind == "row" else a_full
        b = torch.zeros(out_local if self.kind == "column" else self.out_features, self.r)
        self.lora_A = nn.Parameter(a.contiguous().to(dev))
        self.lora_B = nn.Parameter(b.to(dev))
        if self.tp > 1:
            sharded = self.lora_B if self.kind == "column" else self.lora_A if self.kind == "row" else None
            if sharded is not None:
                sharded.tensor_model_parallel = True
                sharded.model_parallel = True
            if self.kind == "column":  # A sees partial gradients (one per B shard): sum them
                group = self.group

                def _sum_over_tp(grad):
                    grad = grad.clone()
                    dist.all_reduce(grad, group=group)
                    return grad

                self.lora_A.register_hook(_sum_over_tp)

    # -- pieces -------------------------------------------------------------------------
    def full_shape(self, which: str) -> tuple[int, int]:
        return (self.r, self.in_features) if which == "lora_A" else (self.out_features, self.r)

    def shard_dim(self, which: str) -> int | None:
        """The dimension along which this rank holds a slice of the full adapter tensor."""
        if self.tp == 1:
            return None
        if self.kind == "column" and which == "lora_B":
            return 0
        if self.kind == "row" and which == "lora_A":
            return 1
        return None

    def base_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The base weight as a dense tensor (NF4 dequantised under QLoRA)."""
        if self.weight is not None:
            return self.weight if dtype is None else self.weight.to(dtype)
        w = self.nf4.get_original_weight()
        return w if dtype is None else w.to(dtype)

    def delta_weight(self) -> torch.Tensor:
        """(alpha / r) B A for this rank's slice of the weight."""
        return self.scaling * (self.lora_B.float() @ self.lora_A.float())

    def _dropout(self, x: torch.Tensor) -> torch.Tensor:
        """Dropout with a mask drawn at the full input width from this module's generator
        (the same on every rank), sliced to this rank's columns for a row-parallel layer."""
        if not self.training or self.dropout_p == 0.0:
            return x
        if self._dropout_gen is None or self._dropout_gen.device != x.device:
            self._dropout_gen = torch.Generator(device=x.device).manual_seed(self._seed + 1)
        shape = list(x.shape)
        shape[-1] = self.in_features
        keep = torch.rand(shape, generator=self._dropout_gen, device=x.device) >= self.dropout_p
        if self.kind == "row" and self.tp > 1:
            keep = keep.chunk(self.tp, dim=-1)[self.tp_rank]
        return x * keep.to(x.dtype) / (1.0 - self.dropout_p)

    def _adapter(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self._dropout(x), self.lora_A.to(x.dtype))

    # -- forward ------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.base_weight(x.dtype)
        if self.kind == "dense":
            y = F.linear(x, w, self.bias)
            if not self.merged:
                y = y + self.scaling * F.linear(self._adapter(x), self.lora_B.to(x.dtype))
            return y
        if self.kind == "column":
            x = gather_seq(x, self.group) if self.sequence_parallel else copy_to(x, self.group)
            y = F.linear(x, w, self.bias)
            if not self.merged:
                y = y + self.scaling * F.linear(self._adapter(x), self.lora_B.to(x.dtype))
            return gather_last(y, self.group) if self.gather_output else y
        y = F.linear(x, w)
        y = reduce_scatter_seq(y, self.group) if self.sequence_parallel else reduce_from(y, self.group)
        if not self.merged:
            h = reduce_from(self._adapter(x), self.group)  # the rank-r intermediate, summed over TP
            delta = self.scaling * F.linear(h, self.lora_B.to(x.dtype))
            y = y + (scatter_seq(delta, self.group) if self.sequence_parallel else delta)
        return y + self.bias if self.bias is not None else y

    # -- merge / unmerge ----------------------------------------------------------------
    @torch.no_grad()
    def merge(self) -> None:
        """Fold (alpha / r) B A into the base weight. The original W0 is kept aside so that
        `unmerge` restores it bit for bit (an NF4 base gets a dense merged weight)."""
        if self.merged:
            return
        if self.weight is None:  # QLoRA: dense dequantised copy + delta; the NF4 tensor stays
            w = self.nf4.get_original_weight().float() + self.delta_weight()
            self.weight = nn.Parameter(w, requires_grad=False)  # fp32: no rounding of the sum
        else:
            self._w0 = self.weight.detach().clone()
            self.weight.add_(self.delta_weight().to(self.weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        if self.nf4 is not None:
            self.weight = None
        else:
            self.weight.copy_(self._w0)
            self._w0 = None
        self.merged = False

    def _apply(self, fn, recurse=True):
        """Move the NF4 base with the module (device only: a dtype cast must not dequantise it)."""
        super()._apply(fn, recurse)
        if self.nf4 is not None:
            device = fn(torch.empty(0, device=self.nf4.device)).device
            if device != self.nf4.device:
                self.nf4 = self.nf4.to(device)
        return self

    def extra_repr(self) -> str:
        return (
            f"{self.kind}, in={self.in_features}, out={self.out_features}, r={self.r}, alpha={self.alpha}, "
            f"dropout={self.dropout_p}, tp={self.tp}, nf4={self.nf4 is not None}, merged={self.merged}"
        )


def _unwrap(model: nn.Module) -> nn.Module:
    """A DeepSpeed engine -> the model it wraps."""
    while type(model).__name__ == "DeepSpeedEngine":
        model = model.module
    return model


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in _unwrap(model).named_modules() if isinstance(m, LoRALinear)}


def apply_lora(model: nn.Module, lora_cfg, seed: int = 0) -> list[str]:
    """Wrap every linear whose name ends with one of `lora_cfg.targets` in a LoRALinear (in
    place; after `parallelize`) and freeze everything but the adapters. Returns the wrapped
    module names. Raises LoRAError when a target matches nothing or is not a linear."""
    model = _unwrap(model)
    if lora_modules(model):
        raise LoRAError("apply_lora: the model already has LoRA adapters")
    targets = list(lora_cfg.targets)
    linear_types = (nn.Linear, ColumnParallelLinear, RowParallelLinear)
    chosen, hits = [], {t: 0 for t in targets}
    for name, mod in list(model.named_modules()):
        leaf = name.rsplit(".", 1)[-1]
        matched = [t for t in targets if name == t or name.endswith("." + t) or leaf == t]
        if not matched:
            continue
        for t in matched:
            hits[t] += 1
        if not isinstance(mod, linear_types):
            raise LoRAError(
                f"lora.targets {matched}: {name} is a {type(mod).__name__}, not a linear layer "
                "(MoE experts are fused tensors and take no adapters)"
            )
        chosen.append(name)
    # a known layer name this model lacks (w_gate in an all-MoE model) is fine; a typo is not
    missing = [t for t, n in hits.items() if n == 0 and t not in KNOWN_LINEARS]
    if missing or not chosen:
        missing = missing or targets
        names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, linear_types)})
        raise LoRAError(f"lora.targets {missing} match no module; linear layers here are named {names}")
    for p in model.parameters():
        p.requires_grad_(False)
    for name in chosen:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(
            parent,
            leaf,
            LoRALinear(getattr(parent, leaf), lora_cfg.r, lora_cfg.alpha, lora_cfg.dropout, name=name, seed=seed),
        )
    model.lora_targets = chosen
    return chosen


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """This rank's adapter tensors: {'<module>.lora_A': [r, in(/tp)], '<module>.lora_B': [out(/tp), r]}."""
    out = {}
    for name, m in lora_modules(model).items():
        out[f"{name}.lora_A"] = m.lora_A.detach().clone()
        out[f"{name}.lora_B"] = m.lora_B.detach().clone()
    return out


def gather_lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full (unsharded) adapters on every rank: TP shards all-gathered (a collective)."""
    out = {}
    for name, m in lora_modules(model).items():
        for which in ("lora_A", "lora_B"):
            t = getattr(m, which).detach().contiguous()
            dim = m.shard_dim(which)
            if dim is not None:
                parts = [torch.empty_like(t) for _ in range(m.tp)]
                dist.all_gather(parts, t, group=m.group)
                t = torch.cat(parts, dim=dim)
            out[f"{name}.{which}"] = t.clone()
    return out


@torch.no_grad()
def load_lora_state_dict(model: nn.Module, sd: dict[str, torch.Tensor]) -> None:
    """Load adapters saved by `lora_state_dict` (same layout) or `gather_lora_state_dict`
    (full tensors: this rank's slice is cut out). Every key must match, both ways."""
    mods = lora_modules(model)
    if not mods:
        raise LoRAError("load_lora_state_dict: the model has no LoRA adapters (call apply_lora first)")
    expected = {f"{n}.{w}" for n in mods for w in ("lora_A", "lora_B")}
    missing, unexpected = sorted(expected - set(sd)), sorted(set(sd) - expected)
    if missing or unexpected:
        raise LoRAError(f"adapter keys do not match the model: missing {missing[:6]}, unexpected {unexpected[:6]}")
    for name, m in mods.items():
        for which in ("lora_A", "lora_B"):
            param, t = getattr(m, which), sd[f"{name}.{which}"]
            if tuple(t.shape) == tuple(param.shape):
                src = t
            elif tuple(t.shape) == m.full_shape(which) and m.shard_dim(which) is not None:
                src = t.chunk(m.tp, dim=m.shard_dim(which))[m.tp_rank]
            else:
                raise LoRAError(
                    f"{name}.{which}: shape {tuple(t.shape)} fits neither this rank's "
                    f"{tuple(param.shape)} nor the full {m.full_shape(which)} (another lora.r?)"
                )
            param.copy_(src.to(param.dtype))


def merge_lora(model: nn.Module) -> None:
    """W <- W0 + (alpha / r) B A in every adapted layer; the forward then skips the adapters."""
    for m in lora_modules(model).values():
        m.merge()


def unmerge_lora(model: nn.Module) -> None:
    """Restore W0 exactly and use the adapters in the forward again."""
    for m in lora_modules(model).values():
        m.unmerge()


@torch.no_grad()
def merge_into_state_dict(full_sd: dict, adapters: dict, scaling: float) -> dict:
    """Full base weights + full adapters -> full weights W0 + scaling * B A (a new dict; the
    plain model loads it, no wrappers). `adapters` as from `gather_lora_state_dict`."""
    out = dict(full_sd)
    for key, a in adapters.items():
        if not key.endswith(".lora_A"):
            continue
        module = key[: -len(".lora_A")]
        w = full_sd.get(f"{module}.weight")
        if w is None:
            raise LoRAError(f"adapter {module}: the base state dict has no {module}.weight")
        b = adapters[f"{module}.lora_B"]
        out[f"{module}.weight"] = (w.float() + scaling * (b.float() @ a.float())).to(w.dtype)
    return out


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in _unwrap(model).named_parameters() if p.requires_grad]
