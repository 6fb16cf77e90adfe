"""Index sets for one decode step: from per-token scores to the rows the kernels read.

scores (n, Lg, U) for n = B·T tokens and the Lg gated layers -> idx (Lg, K) int32 and keep (Lg, n, K) or None.

  - one token: its own top-k (K = k).
  - "union": every token keeps its own top-k (exactly the mask path); the kernels read the union of the tokens'
    sets once. CUDA graphs need fixed shapes, so the union is padded to K = min(U, n·k) with units outside it, and
    keep (0/1 per token and unit) zeroes what a token did not select, padding included.
  - "vote": one set of k units for the whole step (K = k): the units most tokens chose, ties broken by the mean
    standardized score. Each token then uses the shared set; this bounds the bytes read at any batch size.

All on device (top-k, scatter, gather): no host synchronisation, so it runs inside a captured graph.
"""
from __future__ import annotations

import torch

BATCH_SETS = ("union", "vote")


def padded_size(n_tokens: int, k: int, units: int, mode: str) -> int:
    """K, the fixed number of rows read per layer."""
    if n_tokens == 1 or mode == "vote":
        return k
    return min(units, n_tokens * k)


def select_units(scores: torch.Tensor, k: int, mode: str = "union"):
    """scores (n, Lg, U) -> idx (Lg, K) int32, keep (Lg, n, K) in scores' float dtype, or None when every token
    uses all K units."""
    if mode not in BATCH_SETS:
        raise ValueError(f"batch set mode must be one of {BATCH_SETS}, got {mode!r}")
    n, _, units = scores.shape
    top = scores.topk(k, dim=-1, sorted=False).indices  # (n, Lg, k)
    if n == 1:
        return top[0].to(torch.int32), None
    chosen = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device).scatter_(-1, top, True)
    if mode == "vote":
        votes = chosen.sum(0, dtype=torch.float32)  # (Lg, U) how many tokens chose each unit
        z = (scores.float() - scores.float().mean(-1, keepdim=True)) / (scores.float().std(-1, keepdim=True) + 1e-6)
        agg = votes + torch.sigmoid(z.mean(0))  # the tie-break is in (0, 1): it never outweighs one vote
        return agg.topk(k, dim=-1, sorted=False).indices.to(torch.int32), None
    size = padded_size(n, k, units, mode)
    union = chosen.any(0).to(torch.float32)  # (Lg, U)
    idx = union.topk(size, dim=-1, sorted=False).indices  # (Lg, K): the whole union first, then padding
    keep = chosen.gather(-1, idx.unsqueeze(0).expand(n, -1, -1))  # (n, Lg, K)
    return idx.to(torch.int32), keep.transpose(0, 1).to(scores.dtype if scores.is_floating_point() else torch.float32)


def head_rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """heads (..., J) int -> rows (..., J*D) int32: the rows of W_q (and of W_o transposed) of those heads."""
    offs = torch.arange(head_dim, device=heads.device, dtype=heads.dtype)
    return (heads.unsqueeze(-1) * head_dim + offs).flatten(-2).to(torch.int32)
