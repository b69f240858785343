"""Per-layer key/value cache for incremental decoding."""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, n_layers: int):
        self.keys: list[torch.Tensor | None] = [None] * n_layers
        self.values: list[torch.Tensor | None] = [None] * n_layers

    @property
    def length(self) -> int:
        k = self.keys[0]
        return 0 if k is None else k.shape[1]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Append [B, T, H, D] keys/values for `layer`; return the full cached tensors."""
        if self.keys[layer] is not None:
            k = torch.cat([self.keys[layer], k], dim=1)
            v = torch.cat([self.values[layer], v], dim=1)
        self.keys[layer], self.values[layer] = k, v
        return k, v
