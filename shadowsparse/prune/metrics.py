"""Pruning metrics: one registry; each scores every weight of a linear layer (higher = keep).

    magnitude  S_ij = |W_ij|, compared within the whole matrix.
               (Han et al. 2015; the baseline of every LLM-pruning paper.)
    wanda      S_ij = |W_ij| · ‖X_j‖₂, compared within each output row (and each group of M for N:M).
               Sun et al., "A Simple and Effective Pruning Approach for LLMs", arXiv 2306.11695.
    esparse    S_ij = |W_ij| · (Ĥ_j + α · ‖X_j‖₂ / mean_k ‖X_k‖₂), with Ĥ_j the histogram entropy of input channel j
               divided by its layer mean (see esparse.py for every choice), compared like Wanda, after the channel
               shuffles. Li et al., "E-Sparse", arXiv 2310.15929.
    sparsegpt  OBS-style: chooses the mask by w² / [H⁻¹]²_jj and updates the remaining weights to reconstruct the
               layer output. Frantar & Alistarh, arXiv 2301.00774 (sparsegpt.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import ConfigError
from .stats import InputStats


@dataclass(frozen=True)
class Metric:
    name: str
    score: Callable[[torch.Tensor, InputStats | None, dict], torch.Tensor] | None  # (W, stats, options) -> S
    group: str  # where unstructured scores compete: "row" or "matrix"
    needs: tuple[str, ...]  # statistics it reads: "norm", "gram", "samples"


def magnitude_scores(w: torch.Tensor, stats: InputStats | None, opts: dict) -> torch.Tensor:
    return w.abs().float()


def wanda_scores(w: torch.Tensor, stats: InputStats, opts: dict) -> torch.Tensor:
    return w.abs().float() * stats.norm.to(w.device)[None, :]


def esparse_scores(w: torch.Tensor, stats: InputStats, opts: dict) -> torch.Tensor:
    from .esparse import channel_importance
    return w.abs().float() * channel_importance(stats, opts).to(w.device)[None, :]


METRICS: dict[str, Metric] = {
    "magnitude": Metric("magnitude", magnitude_scores, "matrix", ()),
    "wanda": Metric("wanda", wanda_scores, "row", ("norm",)),
    "esparse": Metric("esparse", esparse_scores, "row", ("norm", "samples")),
    "sparsegpt": Metric("sparsegpt", None, "row", ("gram",)),  # a solver, not a score: see sparsegpt.py
}


def get_metric(name: str) -> Metric:
    if name not in METRICS:
        raise ConfigError(f"unknown pruning metric {name!r}; available: {', '.join(METRICS)}")
    return METRICS[name]
