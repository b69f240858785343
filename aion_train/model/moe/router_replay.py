"""Router replay for MoE reinforcement learning: record the experts every MoE layer chose for
each token in one forward pass, and make a later pass over the same tokens use those experts.

PPO compares log pi_new(a) with log pi_old(a). In an MoE policy both sides also depend on which
experts the router picked; after an optimizer step the router may pick others for some tokens,
so the ratio mixes a change of the policy with a change of the routing (the clip then fires on
routing flips, not on what the update did). With replay the new pass keeps the recorded expert
ids; its gates are recomputed from the current router probabilities at those ids (so the router
still gets gradients), renormalised as the router does.

    replay = RouterReplay(model)
    with replay.recording():           # the rollout's scoring pass: [B, T, k] ids per layer
        logp_old = ...
    routes = replay.take()             # {layer name: [B, T, k]}
    with replay.replaying(rows_of(routes, idx)):   # a minibatch of those rows, same layout
        logp_new = ...
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from .router import Routing


def replay_routing(routing: Routing, indices: torch.Tensor, normalize: bool) -> Routing:
    """`routing` with the expert ids `indices` [N, k] instead of its own top-k; the gates are the
    current probabilities at those ids (renormalised over them when the router does)."""
    if indices.shape != routing.indices.shape:
        raise ValueError(
            f"router replay: recorded routes have shape {tuple(indices.shape)} but this pass routes "
            f"{tuple(routing.indices.shape)}: replay needs the same tokens in the same layout"
        )
    indices = indices.to(routing.indices.device)
    gates = routing.probs.gather(-1, indices)
    if normalize and indices.shape[-1] > 1:
        gates = gates / gates.sum(dim=-1, keepdim=True)
    return Routing(
        indices, gates.to(routing.gates.dtype), routing.probs, routing.aux_loss, routing.balance_loss, routing.z_loss
    )


class RouterReplay:
    """Record / replay the routes of every MoE layer of `model` (see the module doc)."""

    def __init__(self, model: torch.nn.Module):
        from .moe_layer import MoELayer

        model = getattr(model, "module", model)  # a DeepSpeed engine: its module's names
        self.layers = {name: m for name, m in model.named_modules() if isinstance(m, MoELayer)}
        self._recorded: dict[str, torch.Tensor] = {}

    @contextmanager
    def recording(self):
        self._recorded = {}
        for name, layer in self.layers.items():
            layer.route_hook = self._recorder(name)
        try:
            yield self
        finally:
            for layer in self.layers.values():
                layer.route_hook = None

    def _recorder(self, name: str):
        def hook(routing: Routing, token_shape) -> Routing:
            self._recorded[name] = routing.indices.detach().reshape(*token_shape, -1).clone()
            return routing

        return hook

    def take(self) -> dict[str, torch.Tensor]:
        """The routes of the last recorded pass, {layer name: [B, T, k]} (and forget them)."""
        out, self._recorded = self._recorded, {}
        return out

    @contextmanager
    def replaying(self, routes: dict[str, torch.Tensor]):
        missing = sorted(set(self.layers) - set(routes))
        if missing:
            raise ValueError(f"router replay: no recorded routes for MoE layers {missing[:3]}")
        for name, layer in self.layers.items():
            layer.route_hook = self._replayer(routes[name], layer.router.normalize_gates)
        try:
            yield self
        finally:
            for layer in self.layers.values():
                layer.route_hook = None

    @staticmethod
    def _replayer(indices: torch.Tensor, normalize: bool):
        def hook(routing: Routing, token_shape) -> Routing:
            return replay_routing(routing, indices.reshape(-1, indices.shape[-1]), normalize)

        return hook


def route_rows(routes: dict[str, torch.Tensor], idx: torch.Tensor) -> dict[str, torch.Tensor]:
    """The routes of rows `idx` of the recorded batch (a minibatch)."""
    return {k: v[idx.to(v.device)] for k, v in routes.items()}
