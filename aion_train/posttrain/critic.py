"""The PPO critic: a value head on a transformer backbone, V(prefix) at every position.

By default (`ppo.critic_init=rm`) it starts as a copy of the trained reward model, backbone
and head, so that its first value estimates are already on the reward's scale; with
`ppo.critic_init=sft` it starts from the SFT model (adapters merged) with a zero head.
The whole critic is trained (it is small); the reward model itself stays frozen."""

from __future__ import annotations

import torch
from torch import nn


class Critic(nn.Module):
    """values[b, t] = w^T h[b, t] + c: the value of the state after reading tokens <= t."""

    def __init__(self, backbone: nn.Module, d_model: int):
        super().__init__()
        self.backbone = backbone
        self.value_head = nn.Linear(d_model, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)
        from aion_train.parallel.device import module_device

        self.value_head.to(module_device(backbone))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.backbone(input_ids, return_hidden=True).hidden
        return self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1).float()


def build_critic(cfg, groups) -> Critic:
    """The critic of cfg.ppo.critic_init on this rank's shards, every parameter trainable."""
    if cfg.ppo.critic_init == "rm":
        from .reward import load_reward_model

        rm = load_reward_model(cfg, groups)
        critic = Critic(rm.backbone, cfg.model.d_model)
        with torch.no_grad():
            critic.value_head.weight.copy_(rm.head.weight)
            critic.value_head.bias.copy_(rm.head.bias)
    else:
        from .sft import load_policy

        model, _ = load_policy(cfg, "sft", merge=True, groups=groups)
        critic = Critic(model, cfg.model.d_model)
    for p in critic.parameters():
        p.requires_grad_(True)
    return critic.train()
