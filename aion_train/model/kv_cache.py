"""Per-layer key/value cache for incremental decoding.

Keys and values of layer l live in a buffer [B, capacity, H, D] of which the first `length`
positions are filled; a decode step writes its column in place (the buffer grows by doubling),
so a step costs no copy of the cache. `dtype` stores them in another precision than the
model's (fp32 keys for an attention that computes in fp32: they are then cast once, when
written, not at every step). The row and column edits (`select_rows`, `drop_leading`,
`left_pad`, `cat_rows`) are for a server whose batch changes between steps."""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, n_layers: int, dtype: torch.dtype | None = None):
        self.dtype = dtype
        self._k: list[torch.Tensor | None] = [None] * n_layers
        self._v: list[torch.Tensor | None] = [None] * n_layers
        self._len = [0] * n_layers

    @classmethod
    def from_tensors(cls, keys: list[torch.Tensor], values: list[torch.Tensor]) -> KVCache:
        """A cache holding these [B, T, H, D] keys and values (one pair per layer)."""
        out = cls(len(keys))
        out._k, out._v = list(keys), list(values)
        out._len = [k.shape[1] for k in keys]
        return out

    @property
    def n_layers(self) -> int:
        return len(self._k)

    @property
    def length(self) -> int:
        return self._len[0]

    @property
    def keys(self) -> list[torch.Tensor | None]:
        return [None if k is None else k[:, :n] for k, n in zip(self._k, self._len)]

    @property
    def values(self) -> list[torch.Tensor | None]:
        return [None if v is None else v[:, :n] for v, n in zip(self._v, self._len)]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Append [B, T, H, D] keys/values for `layer`; return the full cached tensors."""
        n, t = self._len[layer], k.shape[1]
        buf_k, buf_v = self._k[layer], self._v[layer]
        if buf_k is not None and buf_k.shape[0] != k.shape[0]:
            raise ValueError(f"KV cache of {buf_k.shape[0]} rows given {k.shape[0]} rows of keys")
        if buf_k is None or n + t > buf_k.shape[1]:
            cap = max(n + t, 2 * n, 16)
            dtype = self.dtype or k.dtype
            new_k = k.new_empty((k.shape[0], cap, *k.shape[2:]), dtype=dtype)
            new_v = v.new_empty((v.shape[0], cap, *v.shape[2:]), dtype=dtype)
            if n:
                new_k[:, :n] = buf_k[:, :n]
                new_v[:, :n] = buf_v[:, :n]
            buf_k, buf_v = self._k[layer], self._v[layer] = new_k, new_v
        buf_k[:, n : n + t] = k
        buf_v[:, n : n + t] = v
        self._len[layer] = n + t
        return buf_k[:, : n + t], buf_v[:, : n + t]

    # -- a changing batch ------------------------------------------------------------------
    def select_rows(self, index: torch.Tensor) -> None:
        """Keep the rows `index` (in that order)."""
        self._k = [None if k is None else k.index_select(0, index) for k in self._k]
        self._v = [None if v is None else v.index_select(0, index) for v in self._v]

    def drop_leading(self, n: int) -> None:
        """Forget the first n positions of every row (padding no row needs any more)."""
        if n <= 0:
            return
        self._k = [None if k is None else k[:, n:] for k in self._k]
        self._v = [None if v is None else v[:, n:] for v in self._v]
        self._len = [max(0, m - n) for m in self._len]

    def left_pad(self, n: int) -> None:
        """n positions of zeros before every row (padding, masked out by the caller)."""
        if n <= 0:
            return
        self._k = [_pad_front(k, n, m) for k, m in zip(self._k, self._len)]
        self._v = [_pad_front(v, n, m) for v, m in zip(self._v, self._len)]
        self._len = [m + n for m in self._len]

    def cat_rows(self, other: KVCache) -> None:
        """Append the rows of `other` (same length) after this cache's rows."""
        if other.length != self.length:
            raise ValueError(f"cat_rows: lengths {self.length} and {other.length} differ")
        ks, vs = other.keys, other.values
        self._k = [torch.cat([a, b.to(a.dtype)]) for a, b in zip(self.keys, ks)]
        self._v = [torch.cat([a, b.to(a.dtype)]) for a, b in zip(self.values, vs)]


def _pad_front(buf: torch.Tensor | None, n: int, filled: int) -> torch.Tensor | None:
    if buf is None:
        return None
    pad = buf.new_zeros((buf.shape[0], n, *buf.shape[2:]))
    return torch.cat([pad, buf[:, :filled]], dim=1)
