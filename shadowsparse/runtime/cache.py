"""Static, preallocated decode state: fixed shapes, so a captured CUDA graph can write into it at any position.

StaticKVCache holds every layer's keys and values; InputWindow holds the normed inputs of the last W positions of
the gated layers, from which lazy K/V (engine.py) recomputes the keys and values of heads that earlier tokens
skipped.
"""
from __future__ import annotations

import torch


class StaticKVCache:
    """keys / values: (L, B, KV, S + 1, D). Position S (= max_len) is a scratch slot: lazy K/V writes the window
    slots that hold no position yet there, and attention never reads past the current position."""

    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device):
        shape = (n_layers, batch, n_kv_heads, max_len + 1, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len

    def write(self, layer: int, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """positions (T,) int64 on device; k, v (B, KV, T, D). index_copy_ takes positions from a tensor: no host
        value is baked into a captured graph."""
        self.keys[layer].index_copy_(2, positions, k)
        self.values[layer].index_copy_(2, positions, v)

    def nbytes_per_token(self) -> int:
        """Bytes of one position's K and V over all layers and sequences."""
        L, B, KV, _, D = self.keys.shape
        return 2 * L * B * KV * D * self.keys.element_size()


class InputWindow:
    """The normed attention inputs of the last W positions of each gated layer, a ring indexed by position % W.

    h: (Lg, B, W, d); positions: (W,) int64, the position each slot holds (max_len, the cache's scratch slot,
    until written). Slot order is irrelevant to its readers: each slot carries its position.
    """

    def __init__(self, n_layers: int, batch: int, window: int, hidden: int, max_len: int, dtype: torch.dtype,
                 device):
        self.h = torch.zeros(n_layers, batch, window, hidden, dtype=dtype, device=device)
        self.positions = torch.full((window,), max_len, dtype=torch.long, device=device)
        self.window = window
        self.slots = None  # (T',) the current step's slots (its last min(T, W) positions), set by advance
        self.slot = None  # (1,) the slot of the step's last position
    def _last(self, positions: torch.Tensor):
        """The last min(T, W) positions and their slots (a step of more than W tokens keeps its last W)."""
        positions = positions[-self.window:]
        return positions, positions % self.window

    def advance(self, positions: torch.Tensor) -> None:
        """Record that the step's positions (T,) now own their slots (once per step, before the layers)."""
        positions, self.slots = self._last(positions)
        self.slot = self.slots[-1:]
        self.positions.index_copy_(0, self.slots, positions)

    def write(self, gi: int, h: torch.Tensor) -> None:
        """h (B, T, d): the normed input of gated layer gi at the positions of the last advance."""
        self.h[gi].index_copy_(1, self.slots, h[:, -self.slots.shape[0]:])
