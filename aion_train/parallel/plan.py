"""The parallel plan: how a model is split over TP and EP, as a value.

`ParallelPlan.from_config(model_cfg, tp, ep, sequence_parallel)` says, for every parameter of
the full model, along which dimensions and mesh axes it is split (tp, ep), which group
reduces its gradient (dp, or edp for experts), and whether its gradient is summed over TP
(norm weights under sequence parallelism, applied to a slice of the sequence); and, for every
module that `parallelize` replaces, which parallel module takes its place. It is pure: built
from the config on the meta device, it can be checked without ranks. `parallelize` applies it;
resharding, export/import, the checkpoint manifest, the optimizer's groups and the DeepSpeed
adapter read it (`plan.shard_spec(tp_rank, ep_rank)` is what a rank holds)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from aion_train.model.ffn import DenseFFN
from aion_train.model.moe import MoELayer
from aion_train.model.norms import RMSNorm

# what replaces a module
COLUMN, ROW, VOCAB_EMBEDDING, LM_HEAD, TIED_LM_HEAD, EXPERTS, ALL_TO_ALL_DISPATCH = (
    "column",
    "row",
    "vocab_embedding",
    "lm_head",
    "tied_lm_head",
    "experts",
    "all_to_all_dispatch",
)
NORMS = (RMSNorm, nn.LayerNorm)

Spec = dict[str, list[tuple[int, int, int]]]


@dataclass(frozen=True)
class ParamPlan:
    splits: tuple[tuple[int, str], ...] = ()  # (dim, mesh axis "ep" | "tp"), applied in order
    grad_group: str = "dp"  # dp | edp (expert weights)
    grad_sum_over_tp: bool = False  # a replicated weight applied to a sequence slice

    @property
    def is_expert(self) -> bool:
        return self.grad_group == "edp"


@dataclass(frozen=True)
class ParallelPlan:
    tp: int = 1
    ep: int = 1
    sequence_parallel: bool = False
    modules: dict[str, str] = field(default_factory=dict)  # module path -> COLUMN | ROW | ...
    params: dict[str, ParamPlan] = field(default_factory=dict)  # every parameter of the full model

    @classmethod
    def from_config(cls, model_cfg, tp: int = 1, ep: int = 1, sequence_parallel: bool = False) -> ParallelPlan:
        """The plan of the model of `model_cfg` (its trunk built on the meta device: no
        weights). A multimodal model's trunk is its `lm`: names carry the "lm." prefix, the
        encoders stay replicated."""
        from aion_train.model import Transformer

        with torch.device("meta"):
            plan = cls.from_model(Transformer(model_cfg), tp, ep, sequence_parallel)
        multimodal = getattr(model_cfg, "multimodal", None)
        return plan.prefixed("lm.") if multimodal is not None and multimodal.enabled else plan

    @classmethod
    def for_model(cls, model, model_cfg, tp: int = 1, ep: int = 1, sequence_parallel: bool = False) -> ParallelPlan:
        """The plan of `model_cfg`'s trunk named as the trunk sits inside `model`: the model
        itself, a multimodal model's `lm`, a reward model's or critic's `backbone`. A model
        without a trunk splits nothing."""
        from aion_train.model import Transformer

        path = next((p for p, m in model.named_modules() if isinstance(m, Transformer)), None)
        if path is None:
            return cls(tp, ep, sequence_parallel and tp > 1)
        with torch.device("meta"):
            plan = cls.from_model(Transformer(model_cfg), tp, ep, sequence_parallel)
        return plan.prefixed(f"{path}.") if path else plan

    @classmethod
    def from_model(cls, model, tp: int = 1, ep: int = 1, sequence_parallel: bool = False) -> ParallelPlan:
        """The plan of a full (unsharded) Transformer, read from its module tree."""
        sp = sequence_parallel and tp > 1
        modules: dict[str, str] = {}
        splits: dict[str, tuple[tuple[int, str], ...]] = {}
        experts: set[str] = set()

        def linear(path: str, style: str) -> None:
            if tp > 1:
                modules[path] = style
                splits[f"{path}.weight"] = ((0 if style == COLUMN else 1, "tp"),)

        def dense_ffn(ffn: DenseFFN, path: str) -> None:
            for name in ("w_gate", "w_up"):
                if getattr(ffn, name) is not None:
                    linear(f"{path}.{name}", COLUMN)
            linear(f"{path}.w_down", ROW)

        for i, block in enumerate(model.blocks):
            pre = f"blocks.{i}"
            for name in ("q_proj", "k_proj", "v_proj"):
                linear(f"{pre}.attn.{name}", COLUMN)
            linear(f"{pre}.attn.o_proj", ROW)
            if isinstance(block.ffn, MoELayer):
                moe = block.ffn
                names = [f"{pre}.ffn.experts.{n}" for n, p in moe.experts.named_parameters(recurse=False)]
                experts.update(names)
                if tp > 1 or ep > 1:
                    modules[f"{pre}.ffn.experts"] = EXPERTS
                    for n in names:  # [E, d, ff] for w1 / w3, [E, ff, d] for w2
                        splits[n] = ((0, "ep"), (1 if n.endswith(".w2") else 2, "tp"))
                if ep > 1:
                    modules[f"{pre}.ffn"] = ALL_TO_ALL_DISPATCH
                if moe.shared_expert is not None:
                    dense_ffn(moe.shared_expert, f"{pre}.ffn.shared_expert")
            else:
                dense_ffn(block.ffn, f"{pre}.ffn")
        if tp > 1:
            tied = model.lm_head.weight is model.embed.weight
            modules["embed"], modules["lm_head"] = VOCAB_EMBEDDING, TIED_LM_HEAD if tied else LM_HEAD
            splits["embed.weight"] = splits["lm_head.weight"] = ((0, "tp"),)
        norm_params = {
            f"{path}.{n}"
            for path, m in model.named_modules()
            if isinstance(m, NORMS)
            for n, _ in m.named_parameters(recurse=False)
        }
        params = {
            name: ParamPlan(splits.get(name, ()), "edp" if name in experts else "dp", sp and name in norm_params)
            for name, _ in model.named_parameters(remove_duplicate=False)
        }  # tied names too
        return cls(tp, ep, sp, modules, params)

    def prefixed(self, prefix: str) -> ParallelPlan:
        """The same plan for a model holding this one's as a submodule (names under `prefix`)."""
        return ParallelPlan(
            self.tp,
            self.ep,
            self.sequence_parallel,
            {prefix + k: v for k, v in self.modules.items()},
            {prefix + k: v for k, v in self.params.items()},
        )

    def layout(self) -> dict:
        """What the plan derives from (stored in checkpoint manifests)."""
        return {"tp": self.tp, "ep": self.ep, "sequence_parallel": self.sequence_parallel}

    def shard_spec(self, tp_rank: int = 0, ep_rank: int = 0) -> Spec:
        """{parameter name: [(dim, rank, n_parts), ...]} for every parameter the rank
        (tp_rank, ep_rank) holds a slice of; absent = the whole tensor."""
        rank, size = {"tp": tp_rank, "ep": ep_rank}, {"tp": self.tp, "ep": self.ep}
        return {
            name: [(dim, rank[axis], size[axis]) for dim, axis in p.splits]
            for name, p in self.params.items()
            if p.splits
        }

    def is_expert(self, name: str) -> bool:
        p = self.params.get(name)
        return p is not None and p.is_expert

    def tp_sharded(self, name: str) -> bool:
        """Split over TP on this layout (so its gradient norm is summed over TP)."""
        p = self.params.get(name)
        return p is not None and self.tp > 1 and any(axis == "tp" for _, axis in p.splits)
