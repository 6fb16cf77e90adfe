"""A static, preallocated KV cache: fixed shapes, so a captured CUDA graph can write into it at any position."""
from __future__ import annotations

import torch


class StaticKVCache:
    """keys / values: (L, B, KV, S, D). Every token's K and V of every kv head are written (dense K/V projections),
    so a query head selected at a later token finds the keys of tokens that skipped it."""

    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device):
        shape = (n_layers, batch, n_kv_heads, max_len, head_dim)
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
