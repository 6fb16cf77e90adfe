"""E-Sparse (Li et al., arXiv 2310.15929): an entropy-aware N:M metric and two channel shuffles.

The paper has no public code; this module is written from its description, and every choice it leaves open is
fixed here:

Channel entropy.  For input channel j, the calibration activations x_tj (a random subset of at most
``sample_rows`` tokens, spread over all calibration windows) are binned into ``bins`` equal-width bins spanning
that channel's own [min, max]; p_k = count_k / N and H_j = -Σ_k p_k ln p_k (nats; empty bins contribute 0; a
constant channel has H = 0). A channel whose values spread over many levels carries more information.

Metric.  S_ij = |W_ij| · (Ĥ_j + α · n̂_j) with Ĥ_j = H_j / mean_k H_k and n̂_j = ‖X_j‖₂ / mean_k ‖X_k‖₂: both terms
are divided by their layer mean so that α (default 1) weighs them on the same scale whatever the bin count or the
activation scale. Weights are compared within each output row (and each group of M), as in Wanda; no weight is
updated.

Global naive shuffle.  N:M keeps N of every M *adjacent* channels, so important channels that sit side by side
compete for the same slots. Channels are sorted by importance I_j = Ĥ_j + α n̂_j (descending) and dealt round-robin
over the I/M groups: the r-th channel goes to group r mod (I/M), slot r div (I/M). Every group then holds one
channel from each importance tier.

Local block shuffle.  Within each block of ``block`` consecutive (already shuffled) channels, ``trials`` random
re-orderings of the block are scored by the metric mass that N:M selection keeps (Σ over rows and groups of the
top-N scores), and the best one — the current order included — is kept, so the kept mass never decreases.

Function preservation.  A permutation π of a layer's input channels leaves y = W x unchanged when the weight
columns and the input are permuted together: y = W[:, π] x[π]. Where the input comes from a layer of the same block
with nothing in between but an element-wise function (the FFN down projection: its input is act(gate)·up, or
act(fc1)), π is folded into the producer's rows (gate/up/fc1 rows and fc1 bias) and costs nothing at run time.
Elsewhere (q/k/v/gate/up/fc1 read the normed residual stream, which every layer shares) the permuted weight is kept
and a pre-hook gathers x[..., π] — the gather an N:M kernel would fuse. The attention out-projection is not shuffled:
its input channels are heads × head_dim produced by attention, and a permutation would have to be mirrored in the
value projection of every query head of a KV group.
"""
from __future__ import annotations

import torch

from .stats import InputStats

DEFAULTS = dict(bins=64, alpha=1.0, block=64, trials=16, sample_rows=4096, shuffle=True)


def channel_entropy(x: torch.Tensor, bins: int) -> torch.Tensor:
    """Histogram entropy (nats) of every column of x (N, I) over its own [min, max] range -> (I,)."""
    lo, hi = x.min(0).values, x.max(0).values
    width = (hi - lo).clamp_min(1e-12)
    idx = ((x - lo) / width * bins).long().clamp_(0, bins - 1)  # (N, I) bin of each value
    counts = torch.zeros(x.shape[1], bins, dtype=torch.float64)
    counts.scatter_add_(1, idx.T, torch.ones_like(idx.T, dtype=torch.float64))
    p = counts / x.shape[0]
    h = -(p * p.clamp_min(1e-300).log()).sum(1)
    return torch.where(hi > lo, h, torch.zeros_like(h)).float()


def channel_importance(stats: InputStats, opts: dict) -> torch.Tensor:
    """Ĥ_j + α n̂_j per input channel (I,)."""
    o = {**DEFAULTS, **opts}
    h = channel_entropy(stats.sample(), o["bins"])
    norm = stats.norm
    return h / h.mean().clamp_min(1e-12) + o["alpha"] * norm / norm.mean().clamp_min(1e-12)


def global_naive_shuffle(importance: torch.Tensor, m: int) -> torch.Tensor:
    """Permutation π (I,) dealing channels round-robin by importance: new column c holds old channel π[c]."""
    n_ch = importance.numel()
    groups = n_ch // m
    order = importance.argsort(descending=True)  # rank r -> channel
    r = torch.arange(n_ch)
    new_pos = (r % groups) * m + r // groups  # group r mod G, slot r div G
    perm = torch.empty_like(order)
    perm[new_pos] = order
    return perm


def kept_mass(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Σ of the scores N:M keeps. scores (..., O, I) -> (...)."""
    g = scores.unflatten(-1, (-1, m))
    return g.topk(n, dim=-1).values.sum((-1, -2, -3))


def local_block_shuffle(scores: torch.Tensor, n: int, m: int, block: int, trials: int,
                        generator: torch.Generator) -> torch.Tensor:
    """Best-of-``trials`` random re-ordering within each block of columns. scores (O, I), already globally
    shuffled -> permutation (I,) of its columns that never lowers the kept mass."""
    n_ch = scores.shape[1]
    block = max(m, block - block % m)
    perm = torch.arange(n_ch)
    for start in range(0, n_ch - n_ch % block, block):
        cols = torch.arange(start, start + block)
        cand = torch.stack([torch.arange(block)] + [torch.randperm(block, generator=generator)
                                                     for _ in range(trials)])  # (T+1, B); row 0 = as is
        sub = scores[:, cols][:, cand].permute(1, 0, 2)  # (T+1, O, B)
        best = kept_mass(sub, n, m).argmax()
        perm[cols] = cols[cand[best]]
    return perm


def shuffle_for(scores: torch.Tensor, importance: torch.Tensor, n: int, m: int, opts: dict,
                generator: torch.Generator) -> torch.Tensor:
    """The combined permutation π (global naive, then local block) of one weight's input channels, from its metric
    scores (O, I) in the original order and the channel importance (I,)."""
    o = {**DEFAULTS, **opts}
    perm = global_naive_shuffle(importance, m)
    local = local_block_shuffle(scores[:, perm], n, m, o["block"], o["trials"], generator)
    return perm[local]
