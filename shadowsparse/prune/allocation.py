"""Per-matrix sparsity for unstructured pruning: how a mean sparsity p is spread over the decoder's matrices.

    uniform      every matrix at p.
    sensitivity  one-shot sensitivity-aware mixed sparsity (Shao et al., arXiv 2310.09499): the sensitivity of a
                 weight matrix is the trace of the loss Hessian restricted to it, estimated with Hutchinson's method
                 (E_v[vᵀHv] over Rademacher v; one Hessian-vector product per sample serves all matrices at once,
                 since the cross-block terms vanish in expectation). More sensitive matrices keep more weights.
    owl          outlier-weighted layerwise sparsity (Yin et al., arXiv 2310.05175): a decoder layer's outlier ratio
                 D_l is the fraction of its Wanda scores |W_ij|·‖X_j‖₂ above ``owl_m`` times their layer mean;
                 layers with more outliers keep more weights. All matrices of a layer share its sparsity.

Mapping (sensitivity and owl): scores s_k are scaled to z_k ∈ [-1, 1] by min-max (sensitivity on log-traces, whose
spread across layers is orders of magnitude; OWL on D_l itself, as the paper), densities start at 1 - p + α z_k, and
one shift c, found by bisection, makes the parameter-weighted mean sparsity exactly p with every density clipped to
[1 - p - α, 1 - p + α] ∩ [0, 1].
"""
from __future__ import annotations

import torch

from ..errors import ConfigError

ALLOCATIONS = ("uniform", "sensitivity", "owl")


def spread(scores: dict[str, float], sizes: dict[str, int], p: float, alpha: float) -> dict[str, float]:
    """Sparsity per matrix from importance scores (higher keeps more); Σ sizes·sparsity / Σ sizes == p."""
    if not 0.0 <= alpha <= min(p, 1.0 - p) + 1e-12:
        raise ConfigError(f"allocation range alpha must be in [0, min(p, 1-p)] = [0, {min(p, 1 - p):g}] so densities "
                          f"stay in [0, 1], got {alpha}")
    names = list(scores)
    s = torch.tensor([scores[k] for k in names], dtype=torch.float64)
    n = torch.tensor([sizes[k] for k in names], dtype=torch.float64)
    z = (s - s.min()) / (s.max() - s.min()) * 2 - 1 if s.max() > s.min() else torch.zeros_like(s)
    lo, hi = max(0.0, 1 - p - alpha), min(1.0, 1 - p + alpha)
    target = (1 - p) * n.sum()

    def kept(c: float) -> torch.Tensor:
        return ((1 - p + alpha * z + c).clamp(lo, hi) * n).sum()

    a, b = -2.0, 2.0  # kept() is monotone in c: bisection to machine precision
    for _ in range(200):
        mid = (a + b) / 2
        a, b = (mid, b) if kept(mid) < target else (a, mid)
    dens = (1 - p + alpha * z + (a + b) / 2).clamp(lo, hi)
    return {k: float(1 - d) for k, d in zip(names, dens)}


def hutchinson_traces(model, params: dict[str, torch.nn.Parameter], windows: torch.Tensor, samples: int,
                      seed: int) -> dict[str, float]:
    """tr(H_k) of the next-token loss for each named weight, averaged over ``samples`` Rademacher probes."""
    from ..llm import eager_attention
    gen = torch.Generator().manual_seed(seed)
    tensors = list(params.values())
    traces = torch.zeros(len(tensors), dtype=torch.float64)
    was = [t.requires_grad for t in tensors]
    device = tensors[0].device
    try:
        for t in tensors:
            t.requires_grad_(True)
        with eager_attention(model, True):
            for _ in range(samples):
                for ids in windows.split(1):
                    ids = ids.to(device)
                    loss = model(input_ids=ids, labels=ids).loss
                    grads = torch.autograd.grad(loss, tensors, create_graph=True)
                    probes = [(torch.randint(0, 2, t.shape, generator=gen) * 2 - 1).to(t) for t in tensors]
                    hv = torch.autograd.grad(sum((g * v).sum() for g, v in zip(grads, probes)), tensors)
                    traces += torch.tensor([(h * v).sum().item() for h, v in zip(hv, probes)], dtype=torch.float64)
    finally:
        for t, w in zip(tensors, was):
            t.requires_grad_(w)
    traces /= samples * len(windows)
    return dict(zip(params, traces.tolist()))


def sensitivity_scores(traces: dict[str, float]) -> dict[str, float]:
    """log tr(H); a negative estimate (noise on a flat matrix) counts as the least sensitive."""
    floor = min((t for t in traces.values() if t > 0), default=1.0) * 0.5
    return {k: float(torch.tensor(max(t, floor)).log()) for k, t in traces.items()}


def outlier_ratio(scores: torch.Tensor, owl_m: float) -> float:
    """Fraction of entries above owl_m × their mean (OWL's layerwise outlier distribution)."""
    return float((scores > owl_m * scores.mean()).double().mean())
