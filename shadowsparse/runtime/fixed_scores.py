"""Scores that do not depend on the input — the static selector's calibration means (selectors/static.py) — served
to the decode engine in the shared predictor's place: each step keeps the top-k sets the mask path keeps, through
the same gathered kernels (and lazy K/V for heads).
"""
from __future__ import annotations

import torch


class FixedScores(torch.nn.Module):
    """heads (L, H), neurons (L, F): one score per layer and unit. The engine calls it as a predictor (dims,
    feature_layer, forward(x) -> (B, T, L, H), (B, T, L, F)) at layer first_layer."""

    def __init__(self, heads: torch.Tensor, neurons: torch.Tensor, first_layer: int):
        super().__init__()
        L, H = heads.shape
        self.dims = {"n_layers": L, "n_heads": H, "ffn": neurons.shape[1]}
        self.feature_layer = first_layer - 1  # the engine runs a predictor at feature_layer + 1 = first_layer
        # plain attributes, not buffers: the engine's .to(dtype) must not round them (fp16 rounding could tie two
        # units the mask path's fp32 top-k tells apart)
        self._scores = (heads.float(), neurons.float())
        self._device = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, d) -> the scores expanded over (B, T) (no copy)."""
        if self._device != x.device:  # once, before a CUDA graph captures the step (warm-up steps run first)
            self._scores = tuple(s.to(x.device) for s in self._scores)
            self._device = x.device
        B, T = x.shape[:2]
        heads, neurons = self._scores
        return heads.expand(B, T, *heads.shape), neurons.expand(B, T, *neurons.shape)
