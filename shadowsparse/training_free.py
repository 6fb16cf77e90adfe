"""Training-free selectors, as ScoreSources for the same gating hooks:

- ThresholdScores (TEAL-style): per-layer magnitude thresholds calibrated on calibration text so that a fraction s
  of units falls below them; a unit is kept when its own magnitude (|activation| for neurons, the head's
  contribution norm for heads) clears the threshold. Realized sparsity varies per token and is counted.
- GateScores (CATS): for gated FFNs (SwiGLU, GeGLU), the gate projection runs in full and the neurons with the largest
  |act(gate)| are kept per token — up and down then need only those rows.
"""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .arch import ModelView, head_contribution_norm
from .errors import ConfigError
from .gating import GatingConfig, ScoreSource

_SAMPLE = 1 << 18  # calibration magnitudes kept per layer (a random subsample when there are more)


def sample_magnitudes(values: torch.Tensor, g: torch.Generator, routed: torch.Tensor | None = None) -> torch.Tensor:
    """A bounded random subsample (1-D, fp32, CPU) of one forward's magnitudes: memory stays fixed per window.
    routed (N, F) bool: an MoE layer's computed neurons, the only ones sampled (values (N, F) or (..., F))."""
    if routed is not None:
        values = values.reshape(routed.shape)[routed]
    values = values.float().flatten().cpu()
    if values.numel() > _SAMPLE // 4:
        values = values[torch.randint(values.numel(), (_SAMPLE // 4,), generator=g)]
    return values


def magnitude_quantile(samples: torch.Tensor, s: float) -> torch.Tensor:
    """The s-quantile of the calibration magnitudes (at most _SAMPLE of them are used)."""
    return torch.quantile(samples[:_SAMPLE], s)


class ThresholdScores(ScoreSource):
    """Keep units whose magnitude exceeds the layer's calibrated threshold (quantile s of calibration data)."""

    def __init__(self, head_samples: list[torch.Tensor], neuron_samples: list[torch.Tensor]):
        self.head_samples, self.neuron_samples = head_samples, neuron_samples  # per layer, 1-D magnitudes
        self._view = None
        self._head_thr = self._neuron_thr = None

    @classmethod
    @torch.no_grad()
    def calibrate(cls, model, windows: torch.Tensor, seed: int = 0) -> "ThresholdScores":
        """One dense pass over windows (N, T) recording per-layer magnitude samples."""
        view = ModelView(model)
        L = view.dims.n_layers
        heads: list[list[torch.Tensor]] = [[] for _ in range(L)]
        neurons: list[list[torch.Tensor]] = [[] for _ in range(L)]
        g = torch.Generator().manual_seed(seed)

        def keep(store, values, routed=None):
            store.append(sample_magnitudes(values, g, routed))

        hooks = []
        for i in range(L):
            w = view.attn_out_weight(i)  # (d_model, H*D)
            hooks.append(view.attn_out(i).register_forward_pre_hook(
                lambda m, a, i=i, w=w: keep(heads[i], head_contribution_norm(a[0], w, view.dims.n_heads))))
            hooks.append(view.ffn_down(i).register_forward_pre_hook(
                lambda m, a, i=i: keep(neurons[i], a[0].abs(), view.routed_neurons(i))))
        device = next(model.parameters()).device
        try:
            for start in tqdm(range(len(windows)), desc="calibrate thresholds", unit="win"):
                model(input_ids=windows[start:start + 1].to(device))
        finally:
            for h in hooks:
                h.remove()
        return cls([torch.cat(h) for h in heads], [torch.cat(n) for n in neurons])

    @staticmethod
    def _quantiles(samples: list[torch.Tensor], s: float) -> torch.Tensor:
        return torch.stack([magnitude_quantile(x, s) if s > 0 else x.min() - 1 for x in samples])

    def attach(self, view: ModelView, cfg: GatingConfig) -> list:
        self._view = view
        self._head_thr = self._quantiles(self.head_samples, cfg.head_sparsity)  # (L,)
        self._neuron_thr = self._quantiles(self.neuron_samples, cfg.ffn_sparsity)  # (L,)
        return []

    def head_mask(self, layer, x, k):
        norms = head_contribution_norm(x, self._view.attn_out_weight(layer), self._view.dims.n_heads)  # (B, T, H)
        return (norms > self._head_thr[layer].to(x.device)).to(x.dtype)

    def neuron_mask(self, layer, x, k, routed=None):  # an MoE layer's unrouted neurons hold 0: never above
        return (x.abs() > self._neuron_thr[layer].to(x.device)).to(x.dtype)


class LiveActivationScores(ScoreSource):
    """The `activation` criterion read live at the hook points of the gated forward itself: |a| per neuron, the
    contribution norm per head. Top-k of it is the per-token oracle where no separate dense pass can be run first
    (e.g. inside lm-eval's loglikelihood batches)."""

    def attach(self, view: ModelView, cfg: GatingConfig) -> list:
        self._view = view
        return []

    def heads(self, layer, x):
        return head_contribution_norm(x, self._view.attn_out_weight(layer), self._view.dims.n_heads)

    def neurons(self, layer, x):
        return x.abs()


class GateScores(ScoreSource):
    """CATS: neurons ranked by |act(gate)| of the current token; needs a gated (SwiGLU, GeGLU) FFN. FFN only."""

    def __init__(self):
        self._gate: dict[int, torch.Tensor] = {}

    def attach(self, view: ModelView, cfg: GatingConfig) -> list:
        spec = view.spec
        if not spec.glu:
            raise ConfigError(f"the gate (CATS) selector needs a gated FFN (SwiGLU, GeGLU); '{spec.family}' has none "
                              "— use predictor, threshold or oracle for it")
        if cfg.head_sparsity > 0:
            raise ConfigError("the gate (CATS) selector chooses FFN neurons only; set head_sparsity=0 for it")
        # act(gate) (B, T, F) of this very forward, split from a fused gate_up where the family has one
        return [view.hook_gate_activation(i, lambda a, i=i: self._gate.__setitem__(i, a.abs()))
                for i in range(view.dims.n_layers)]

    def neurons(self, layer, x):
        return self._gate.pop(layer)  # (B, T, F), from this very forward
