"""Torch reference implementations of every fused kernel in `aion_train.kernels`.

These are the ground truth the Triton kernels are tested against and the automatic fallback
when Triton cannot run (no CUDA and no TRITON_INTERPRET=1). They reproduce the model's own
math exactly (`model/norms.py`, `model/rope.py`, `model/ffn.py`, `model/moe/token_dispatcher.py`,
`F.cross_entropy`), and their backward passes come from autograd, except `linear_cross_entropy`
(an autograd.Function that never stores the logits, `linear_cross_entropy.py`).

Signatures are shared with the Triton implementations, so `select(name, ...)` can return either.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .linear_cross_entropy import linear_cross_entropy  # noqa: F401  (autograd.Function, logits never stored)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """y = x / sqrt(mean(x^2) + eps) * weight over the last dim, in fp32, cast back to x.dtype."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.float()).to(x.dtype)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Interleaved-pair rotary embedding. x: [B, T, H, D]; cos/sin: [T, D/2] (fp32).
    Pair (x_2i, x_2i+1) -> (x_2i cos - x_2i+1 sin, x_2i sin + x_2i+1 cos), i.e. the pair read as
    the complex number x_2i + i x_2i+1 times e^{i angle}: one complex multiply (faster on CPU
    than rotating the strided halves, docs/notes.md; exactly the same numbers)."""
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)).contiguous())
    rot = torch.complex(cos.float(), sin.float())[None, :, None, :]
    return torch.view_as_real(pairs * rot).flatten(-2).to(x.dtype)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up (the SwiGLU activation, between w_gate/w_up and w_down)."""
    return F.silu(gate) * up


def moe_permute(x: torch.Tensor, token_index: torch.Tensor) -> torch.Tensor:
    """Gather token rows into expert order: out[m] = x[token_index[m]]. x: [N, d]; token_index: [M]."""
    return x.index_select(0, token_index)


def moe_unpermute(
    expert_out: torch.Tensor, token_index: torch.Tensor, gates: torch.Tensor | None, n_tokens: int
) -> torch.Tensor:
    """Weighted combine: out[t] = sum_{m: token_index[m] = t} gates[m] * expert_out[m].
    Tokens with no kept copy get zeros. gates=None means weight 1 (plain un-permute)."""
    weighted = expert_out if gates is None else expert_out * gates.unsqueeze(-1).to(expert_out.dtype)
    out = expert_out.new_zeros(n_tokens, expert_out.shape[-1])
    return out.index_add(0, token_index, weighted)


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Per-row loss logsumexp(logits) - logits[label], in fp32; 0 where label == ignore_index.
    logits: [..., V]; labels: [...]; returns fp32 [...]."""
    loss = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=ignore_index, reduction="none"
    )
    return loss.reshape(labels.shape)


def mean_loss(per_row: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean over rows whose label is not ignore_index (what F.cross_entropy(reduction='mean') gives)."""
    valid = labels != ignore_index
    return (per_row * valid).sum() / valid.sum().clamp(min=1)
