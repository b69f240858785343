"""L_mem: the model's own mean-pooled embedder distilled towards a memory's embeddings.

    L_mem = mean_d || normalize(P . mean_t h_theta(d)_t) - e_d ||^2

`h_theta` is the trained transformer's last hidden state with LoRA adapters on its linear
layers (the base weights frozen), `P` a linear head from `d_model` to the memory's dimension
(the memory's encoder, MiniLM, is 384-d; the tiny models are 128-d), `e_d` the unit vector the
continual memory stores for document `d`. Only the adapters and `P` are trained. `P` starts
at the least-squares fit of the frozen model's pooled states to the targets, so that the
number before training is already the best linear read-out of the untouched model and the
gain measured after it is the adapters'.

Because `P` is linear, `P . mean(h) = mean(P . h)`: the distilled encoder is a
:class:`~aion_train.retrieval.embedders.ModelEmbedder` over `P . h` (same padding and pooling
as the model's plain embedder), which is how it is evaluated and used.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .adapter_training import adam_steps
from .lora import apply_lora, lora_state_dict


class ProjectedModel(nn.Module):
    """`model` whose `return_hidden=True` output is `head(hidden)` (what ModelEmbedder pools)."""

    def __init__(self, model: nn.Module, dim: int):
        super().__init__()
        self.model = model
        self.cfg = model.cfg
        self.head = nn.Linear(int(model.cfg.d_model), int(dim), bias=False)

    def forward(self, ids, return_hidden: bool = True):
        out = self.model(ids, return_hidden=True, logits_to_keep=1)
        out.hidden = self.head(out.hidden)
        return out


def token_batch(embedder, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [B, T], mask [B, T]) exactly as `embedder` (a ModelEmbedder) pads them."""
    seqs = [embedder._ids(t) for t in texts]
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), int(getattr(embedder.tokenizer, "pad_id", 0)), dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.float32)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1.0
    return ids, mask


def pooled(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    h = model(ids, return_hidden=True).hidden.float()
    return (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1.0)


def l_mem(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over rows of ||normalize(pred) - target||^2 (targets are unit vectors)."""
    return (F.normalize(pred, dim=-1) - target).pow(2).sum(-1).mean()


@torch.no_grad()
def least_squares_head(model: nn.Module, embedder, texts, targets: np.ndarray, ridge: float = 1e-3, batch_size=64):
    """P^T = argmin ||X P^T - E||^2 + ridge ||P||^2 over the frozen model's pooled states X."""
    feats = []
    for s in range(0, len(texts), batch_size):
        ids, mask = token_batch(embedder, texts[s : s + batch_size])
        feats.append(pooled(model, ids, mask))
    x = torch.cat(feats).double()
    e = torch.as_tensor(targets, dtype=torch.float64)
    gram = x.T @ x + ridge * len(x) * torch.eye(x.shape[1], dtype=torch.float64)
    return torch.linalg.solve(gram, x.T @ e).T.float()  # [dim, d_model]


@dataclass
class DistillResult:
    losses: list
    l_mem_before: float
    l_mem_after: float


@torch.no_grad()
def mean_l_mem(encoder: ProjectedModel, embedder, texts, targets: np.ndarray, batch_size: int = 64) -> float:
    total, n = 0.0, 0
    for s in range(0, len(texts), batch_size):
        ids, mask = token_batch(embedder, texts[s : s + batch_size])
        t = torch.as_tensor(targets[s : s + batch_size])
        total += float(l_mem(pooled(encoder, ids, mask), t)) * len(t)
        n += len(t)
    return total / max(n, 1)


def distill(
    encoder: ProjectedModel,
    embedder,
    texts: Sequence[str],
    targets: np.ndarray,
    lora_cfg,
    steps: int,
    lr: float,
    batch_size: int = 32,
    seed: int = 0,
) -> DistillResult:
    """LoRA adapters on `encoder.model` plus `encoder.head` trained on L_mem (`adam_steps`);
    the base weights stay frozen. `encoder.head` must already hold its initial value."""
    if len(texts) != len(targets) or not len(texts):
        raise ValueError(f"{len(texts)} texts and {len(targets)} target vectors: need the same, non-zero count")
    texts = list(texts)
    before = mean_l_mem(encoder.eval(), embedder, texts, targets)
    apply_lora(encoder.model, lora_cfg, seed=seed)
    encoder.head.weight.requires_grad_(True)
    rng = random.Random(seed)
    encoder.eval()  # routed as at inference: no MoE token dropping, no dropout

    def loss_at(step: int) -> torch.Tensor:
        pick = [rng.randrange(len(texts)) for _ in range(batch_size)]
        ids, mask = token_batch(embedder, [texts[i] for i in pick])
        return l_mem(pooled(encoder, ids, mask), torch.as_tensor(targets[pick]))

    losses = adam_steps(encoder, steps, lr, loss_at)
    return DistillResult(losses, before, mean_l_mem(encoder, embedder, texts, targets))


def encoder_state(encoder: ProjectedModel) -> dict[str, torch.Tensor]:
    """The trained tensors: the adapters (`model.`-prefixed names as in lora_state_dict) and the head."""
    return {**{f"model.{k}": v for k, v in lora_state_dict(encoder.model).items()}, "head.weight": encoder.head.weight}


def mrr_at_10(queries: np.ndarray, docs: np.ndarray, relevant: Sequence[int]) -> float:
    """Mean reciprocal rank (cut at 10) of each query's relevant document under cosine (unit rows)."""
    scores = queries @ docs.T
    own = scores[np.arange(len(relevant)), np.asarray(relevant)]
    rank = (scores > own[:, None]).sum(1) + 1  # ties count in the query's favour
    return float(np.where(rank <= 10, 1.0 / rank, 0.0).mean())


__all__ = ["ProjectedModel", "distill", "encoder_state", "l_mem", "least_squares_head", "mrr_at_10"]
