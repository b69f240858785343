"""Choosing the next token: greedy, or temperature / top-k / top-p sampling with one
random stream per choice, so that a choice's tokens depend only on its own seed (not on the
other rows of a batch, nor on how many requests were batched together).

Sampling draws one uniform number per step from the choice's `torch.Generator` and inverts
the CDF of the filtered distribution (fp32 probabilities, fp64 cumulative sum); greedy is
`argmax` (first maximum), as in `aion_train.model.generate`.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import torch

GREEDY_BELOW = 1e-5  # a temperature under this is greedy


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    max_tokens: int = 16
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: int | None = None  # None: none; k >= 0: the chosen token's and the top k
    echo: bool = False  # completions: prompt text (and logprobs) first

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


def new_seed() -> int:
    return secrets.randbits(63)


def choice_generator(seed: int, index: int) -> torch.Generator:
    """The random stream of choice `index` of a request seeded with `seed`."""
    mixed = (int(seed) * 1_000_003 + int(index) * 7_919 + 1) % (1 << 63)
    return torch.Generator().manual_seed(mixed)


def sample_next(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token id from the [V] logits of one row."""
    if params.greedy:
        return int(torch.argmax(logits))
    x = logits.float() / float(params.temperature)
    v = x.shape[-1]
    if 0 < params.top_k < v:
        kth = torch.topk(x, params.top_k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    probs = torch.softmax(x, dim=-1)
    if params.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True, stable=True)
        cum = torch.cumsum(sorted_p.double(), dim=-1)
        drop = (cum - sorted_p.double()) >= params.top_p  # keeps the first token always
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(0, order, sorted_p)
    cdf = torch.cumsum(probs.double(), dim=-1)
    u = torch.rand((), generator=generator, dtype=torch.float64)
    idx = int(torch.searchsorted(cdf, u * cdf[-1], right=True))
    return min(idx, v - 1)


def top_logprobs(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, list[tuple[int, float]]]:
    """(log_softmax of the raw [V] logits, its top k as (id, logprob))."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    if k <= 0:
        return lp, []
    vals, ids = torch.topk(lp, min(k, lp.shape[-1]))
    return lp, [(int(i), float(x)) for i, x in zip(ids, vals)]
