"""Per-layer FFN sparsity levels with a given mean: how a threshold selector (verify.SketchThresholdScores: the
sketch_threshold and sketch_teal methods) spreads one requested level over its gated layers. The per-layer
thresholds are the calibration estimates' quantiles at these levels, one array that the hooks and the decode engine
both read, so the engine serves any allocation unchanged.

    depth_levels(s, layers, slope)          s + slope·(r - 1/2), r the layer's depth in [0, 1]  (verify.depth_slope)
    ffn_sensitivity(model, windows, layers) each layer's cost: log perplexity ratio on the calibration windows with
                                            only that layer's FFN at PROBE sparsity (true top-|a| per token)
    sensitivity_levels(s, costs, power)     levels ∝ cost ** -power, scaled to mean s  (verify.allocation=sensitivity)

Why a measured cost: single layers of SmolLM2 at 80% FFN sparsity cost from 0.1% to 2.4% perplexity (docs/
research.md, session 17), a 20x spread that a uniform level ignores. If each layer's cost grows as α_l·s**p, the
levels that minimize the summed cost at a fixed mean go as α_l ** (-1/(p-1)): power = 1/(p-1).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .arch import ModelView
from .errors import ConfigError

PROBE = 0.8  # the probe's FFN sparsity: high enough that every layer's cost is measurable on a few windows
CAP = 0.95  # no layer is asked to skip more than this


def depth_levels(sparsity: float, layers: list[int], slope: float, cap: float = CAP) -> dict[int, float]:
    """Per-layer sparsities with mean ``sparsity`` over ``layers`` (the gated ones, ascending) that grow linearly
    with depth by ``slope`` from the first to the last: s + slope·(r - 1/2), r = i / (n - 1). Clipped to [0, cap],
    so a steep slope at a high level keeps a little less on average than asked (the realized sparsity is counted
    from the masks, as always). slope 0 or sparsity 0: every layer at ``sparsity``."""
    n = len(layers)
    if slope == 0 or sparsity == 0 or n < 2:
        return {layer: sparsity for layer in layers}
    return {layer: min(max(sparsity + slope * (i / (n - 1) - 0.5), 0.0), cap) for i, layer in enumerate(layers)}


def sensitivity_levels(sparsity: float, costs: dict[int, float], power: float, cap: float = CAP,
                       floor: float = 1e-4) -> dict[int, float]:
    """Levels c·w_l with w_l = max(cost_l, floor) ** -power, c chosen by bisection so that the mean of
    min(c·w_l, cap) is ``sparsity`` (exact unless sparsity > cap). Costs at or below ``floor`` (a layer whose probe
    moved nothing, or noise) count as ``floor``."""
    if sparsity <= 0 or not costs:
        return {layer: max(sparsity, 0.0) for layer in costs}
    if sparsity >= cap:
        return {layer: cap for layer in costs}
    w = {layer: max(c, floor) ** -power for layer, c in costs.items()}
    lo, hi = 0.0, cap / min(w.values())
    for _ in range(60):  # mean(min(c·w, cap)) grows with c: bisection to ~1e-18 of hi
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if sum(min(mid * v, cap) for v in w.values()) / len(w) < sparsity else (lo, mid)
    return {layer: min(hi * v, cap) for layer, v in w.items()}


def _top_activation_hook(sparsity: float):
    """A forward pre-hook for a down projection: its input a (..., F) with all but each token's top (1 - s)·F |a|
    zeroed (the oracle rule at s)."""
    def hook(_module, inputs):
        a = inputs[0]
        k = max(1, round(a.shape[-1] * (1 - sparsity)))
        kth = a.abs().topk(k, dim=-1).values[..., -1:]  # (..., 1) each token's k-th largest |a|
        return (a * (a.abs() >= kth),)
    return hook


@torch.no_grad()
def ffn_sensitivity(model: nn.Module, windows: torch.Tensor, layers: list[int],
                    probe: float = PROBE) -> dict[int, float]:
    """layer -> log(ppl with only this layer's FFN at ``probe`` sparsity / dense ppl) on ``windows`` (N, T) token
    ids (the calibration text: never the evaluation windows). One dense pass and one pass per layer."""
    view = ModelView(model)
    if view.dims.experts:
        raise ConfigError("verify.allocation=sensitivity measures dense FFNs; this model's FFNs are mixtures of "
                          "experts: use allocation=uniform")
    device = next(model.parameters()).device

    def nll() -> float:
        total = 0.0
        for i in range(len(windows)):
            ids = windows[i:i + 1].to(device)
            total += model(input_ids=ids, labels=ids).loss.item()
        return total / len(windows)

    dense = nll()
    out = {}
    for layer in layers:
        handle = view.ffn_down(layer).register_forward_pre_hook(_top_activation_hook(probe))
        try:
            out[layer] = nll() - dense
        finally:
            handle.remove()
    if not all(math.isfinite(v) for v in out.values()):
        raise ConfigError("the FFN sensitivity probe produced a non-finite loss: check the calibration windows")
    return out
