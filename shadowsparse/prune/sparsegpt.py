"""SparseGPT (Frantar & Alistarh, arXiv 2301.00774): prune one linear layer and update its remaining weights so the
layer's output on the calibration inputs changes as little as possible.

With H = 2XᵀX/n + λI (λ = damp · mean diag), columns are processed left to right in blocks. Inside a block, the mask
is chosen by the OBS saliency w²/[H⁻¹]²_jj — over the whole block for unstructured sparsity (adaptive per-block
selection, as the paper does), per group of M columns for N:M — and every pruned weight's error is propagated to the
not-yet-processed columns through the upper Cholesky factor of H⁻¹ (lazy batched updates between blocks).
"""
from __future__ import annotations

import torch

from ..errors import ConfigError
from .patterns import Pattern


@torch.no_grad()
def sparsegpt_prune(weight: torch.Tensor, hessian: torch.Tensor, pattern: Pattern, ratio: float,
                    blocksize: int = 128, damp: float = 0.01) -> torch.Tensor:
    """The pruned and reconstructed weight (O, I) in the weight's dtype. hessian (I, I); ratio: this matrix's
    unstructured sparsity (ignored for N:M)."""
    w = weight.detach().to(torch.float64).clone()  # (O, I)
    n_in = w.shape[1]
    h = hessian.to(torch.float64).clone()
    dead = torch.diag(h) == 0  # channels never active: their weights cannot matter, prune them outright
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damp * torch.diag(h).mean() * torch.eye(n_in, dtype=h.dtype)
    try:
        hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    except torch.linalg.LinAlgError as e:
        raise ConfigError(f"SparseGPT's Hessian is not positive definite even after damping ({e}); raise "
                          "sparsity.sparsegpt.damp or use more calibration windows") from e
    if pattern.is_nm and blocksize % pattern.m:
        blocksize -= blocksize % pattern.m
    for i1 in range(0, n_in, blocksize):
        i2 = min(i1 + blocksize, n_in)
        w1 = w[:, i1:i2].clone()
        q1 = torch.zeros_like(w1)
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        d = torch.diag(hinv1)
        prune = torch.zeros_like(w1, dtype=torch.bool)
        if not pattern.is_nm:
            drop = int(round(ratio * w1.numel()))
            if drop:
                sal = (w1 ** 2 / d[None, :] ** 2).flatten()
                prune.view(-1)[sal.topk(drop, largest=False).indices] = True
        for i in range(i2 - i1):
            if pattern.is_nm and i % pattern.m == 0:
                sal = w1[:, i:i + pattern.m] ** 2 / d[None, i:i + pattern.m] ** 2
                drop_idx = sal.topk(pattern.m - pattern.n, dim=1, largest=False).indices
                prune[:, i:i + pattern.m].scatter_(1, drop_idx, True)
            col = w1[:, i]
            q = torch.where(prune[:, i], torch.zeros_like(col), col)
            q1[:, i] = q
            e = (col - q) / hinv1[i, i]
            w1[:, i:] -= e[:, None] * hinv1[i, i:][None, :]
            err1[:, i] = e
        w[:, i1:i2] = q1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return w.to(weight.dtype)
