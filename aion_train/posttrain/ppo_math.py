"""The arithmetic of PPO as pure tensor functions, shared by the RLHF loop (token-level, rows
of a padded [B, T] batch with a 0/1 mask) and the POMDP loop (step-level, the same layout).

Textbook forms (Schulman et al. 2016 for GAE, 2017 for PPO; Ziegler et al. 2019 for the
per-token KL penalty of RLHF):

    delta_t  = r_t + gamma V(s_{t+1}) - V(s_t)                    (V = 0 past the last valid step
    A_t      = sum_l (gamma lambda)^l delta_{t+l}                   unless a bootstrap value is given)
    R_t      = A_t + V(s_t)                                         (the critic's target)
    L_clip   = -E[min(rho A, clip(rho, 1-eps, 1+eps) A)],  rho = exp(logp - logp_old)
    L_V      = 0.5 E[max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2)]
    r_t      = -beta (logp_actor - logp_ref)_t  (+ the reward model's score at the last token)

Without a critic, over G samples of one prompt with returns R_i = sum_t r_t (Ahmadian et al.
2024 for RLOO, Shao et al. 2024 for GRPO's group normalisation), at every token of response i:

    A_i (rloo)       = R_i - 1/(G-1) sum_{j != i} R_j
    A_i (group_norm) = (R_i - mean_j R_j) / (std_j R_j + eps)

Every mean is a masked mean over the valid positions. Nothing here touches a model."""

from __future__ import annotations

import torch
import torch.distributed as dist

from aion_train.parallel.collectives import all_reduce_


def _all_reduce_sum(t: torch.Tensor, group) -> torch.Tensor:
    """Sum over `group` (none: this rank alone), on the group's communication device."""
    if group is not None and dist.is_initialized():
        all_reduce_(t, op=dist.ReduceOp.SUM, group=group)
    return t


def masked_mean(x: torch.Tensor, mask: torch.Tensor, group=None) -> torch.Tensor:
    """Mean of x over mask == 1 (over every rank of `group` when one is given)."""
    s = torch.stack([(x * mask).sum(), mask.sum()]).double()
    s = _all_reduce_sum(s, group)
    if s[1] <= 0:
        raise ValueError("masked_mean: the mask selects no element")
    return (s[0] / s[1]).to(x.dtype)


def masked_var(x: torch.Tensor, mask: torch.Tensor, group=None) -> torch.Tensor:
    """Population variance of x over mask == 1."""
    mean = masked_mean(x, mask, group)
    return masked_mean((x - mean) ** 2, mask, group)


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8, group=None) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over the valid positions (mean kept when shift_mean=False);
    masked-out positions come back as 0."""
    mean, var = masked_mean(x, mask, group), masked_var(x, mask, group)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


def unit_scale(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8, group=None) -> torch.Tensor:
    """x / sqrt(var + eps) over the valid positions, not shifted: advantages already centred on
    their own baseline (a prompt's other samples) keep it. Masked-out positions come back as 0."""
    return x * torch.rsqrt(masked_var(x, mask, group) + eps) * mask


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    lam: float,
    bootstrap: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over rows of [B, T].

    `mask` marks the valid steps of each row; they must form a prefix (responses and episodes
    end, they do not pause). After a row's last valid step the next value is `bootstrap[b]`
    (a truncated episode) or 0 (a terminal one). Returns (advantages, returns), 0 where masked."""
    if rewards.shape != values.shape or rewards.shape != mask.shape or rewards.dim() != 2:
        raise ValueError(
            f"gae: rewards {tuple(rewards.shape)}, values {tuple(values.shape)} and mask "
            f"{tuple(mask.shape)} must be the same [B, T] shape"
        )
    m = mask.to(values.dtype)
    if bool((m[:, 1:] > m[:, :-1]).any()):
        raise ValueError("gae: each row's mask must be a prefix of ones followed by zeros")
    B, T = rewards.shape
    nxt = torch.zeros(B, dtype=values.dtype, device=values.device) if bootstrap is None else bootstrap.to(values.dtype)
    adv = torch.zeros_like(values)
    running = torch.zeros(B, dtype=values.dtype, device=values.device)
    for t in reversed(range(T)):
        valid = m[:, t]
        # the value after step t: V(s_{t+1}) if t+1 is valid in this row, else the bootstrap
        v_next = values[:, t + 1] * m[:, t + 1] + nxt * (1 - m[:, t + 1]) if t + 1 < T else nxt
        delta = rewards[:, t] + gamma * v_next - values[:, t]
        carry = running * (m[:, t + 1] if t + 1 < T else torch.zeros_like(valid))
        running = (delta + gamma * lam * carry) * valid
        adv[:, t] = running
    return adv, (adv + values) * m


def group_advantages(
    rewards: torch.Tensor, mask: torch.Tensor, group_size: int, kind: str, eps: float = 1e-6
) -> torch.Tensor:
    """Critic-free advantages [B, T] of rows that come in consecutive groups of `group_size`
    samples of one prompt: each row's return (its rewards summed over the valid steps) against
    the other samples of its prompt (`kind` rloo or group_norm, formulas above), the same at
    every valid step of the row, 0 where masked."""
    B = rewards.shape[0]
    if group_size < 2 or B % group_size:
        raise ValueError(f"group_advantages: {B} rows do not form groups of {group_size} >= 2 samples")
    m = mask.to(rewards.dtype)
    ret = (rewards * m).sum(1).view(B // group_size, group_size)
    if kind == "rloo":
        adv = ret - (ret.sum(1, keepdim=True) - ret) / (group_size - 1)
    elif kind == "group_norm":
        adv = (ret - ret.mean(1, keepdim=True)) / (ret.std(1, keepdim=True) + eps)
    else:
        raise ValueError(f"group_advantages: unknown kind {kind!r} (rloo, group_norm)")
    return adv.reshape(B, 1) * m


def kl_penalty_rewards(
    score: torch.Tensor, logp: torch.Tensor, logp_ref: torch.Tensor, mask: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token RLHF rewards: -beta (logp - logp_ref) at every valid token, plus `score[b]`
    (the reward model's) at each row's last valid token. Returns (rewards, kl), both [B, T]."""
    m = mask.to(logp.dtype)
    lengths = m.sum(1).long()
    if bool((lengths < 1).any()):
        raise ValueError("kl_penalty_rewards: every row needs at least one valid token")
    kl = (logp - logp_ref) * m
    rewards = -beta * kl
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, lengths - 1] += score.to(rewards.dtype)
    return rewards, kl


def kl_estimators(logp: torch.Tensor, logp_ref: torch.Tensor) -> dict[str, torch.Tensor]:
    """Schulman's estimators of KL(pi || ref) from samples of pi, per element:
    k1 = log r, k2 = (log r)^2 / 2, k3 = (r' - 1) - log r' with r = pi/ref, r' = ref/pi
    (k1 unbiased; k3 unbiased and >= 0)."""
    log_ratio = logp - logp_ref
    return {"k1": log_ratio, "k2": 0.5 * log_ratio**2, "k3": torch.expm1(-log_ratio) + log_ratio}


def clipped_surrogate(
    logp: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, clip_eps: float = 0.2
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped policy loss (to minimise) and its diagnostics: clip fraction (share of valid
    tokens where the clipped term is the active one) and the k3 estimate of KL(old || new)."""
    log_ratio = logp - logp_old
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).to(logp.dtype), mask)
        approx_kl = masked_mean(torch.expm1(log_ratio) - log_ratio, mask)
    return loss, {"clipfrac": clipfrac, "approx_kl": approx_kl}


def clipped_value_loss(
    values: torch.Tensor, values_old: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip: float = 0.2
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """0.5 * max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2), masked mean; and the share
    of valid positions where the clipped term is the larger one."""
    v_clipped = values_old + torch.clamp(values - values_old, -clip, clip)
    loss_unclipped = (values - returns) ** 2
    loss_clipped = (v_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(loss_unclipped, loss_clipped), mask)
    with torch.no_grad():
        vclipfrac = masked_mean((loss_clipped > loss_unclipped).to(values.dtype), mask)
    return loss, {"vclipfrac": vclipfrac}


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) along the last dim: logsumexp(z) - sum softmax(z) z."""
    logits = logits.float()
    probs = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(-1)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[..., tokens] in fp32 (logits [..., V], tokens [...])."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
