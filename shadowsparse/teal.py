"""TEAL-style activation sparsity (training-free): zero the small-magnitude *input channels* of every decoder
linear, so a kernel skips the weight columns that read them.

Projections that read the same tensor share one threshold: q/k/v read the attention input, gate/up (OPT: fc1)
the FFN input, then o and down (fc2) their own inputs. Per layer and input, the threshold is the s-quantile of
|x| on calibration text. Realized sparsity is counted per input from the masks applied.

    handle = attach_teal(model, TealThresholds.calibrate(model, windows), sparsity=0.4)
"""
from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from .arch import ModelView
from .errors import ConfigError
from .gating import HookHandle
from .training_free import magnitude_quantile, sample_magnitudes


def projection_inputs(view: ModelView) -> dict[str, tuple[str, ...]]:
    """input name -> the projections (dotted paths in a layer) that read it; the first one carries the hook."""
    s = view.spec
    return {"attn_in": s.attn_in, "attn_out": (s.attn_out,), "ffn_in": s.ffn_in, "ffn_out": (s.ffn_down,)}


def keep_above(x: torch.Tensor, threshold: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """TEAL's rule on one projection input: (x with |x| <= threshold zeroed, the keep mask). The hooks and the greedy
    allocation's block forwards (teal_allocation.py) both apply it."""
    keep = x.abs() > threshold.to(x.device)
    return x * keep, keep


class TealThresholds:
    def __init__(self, samples: dict[tuple[str, int], torch.Tensor], allocation=None):
        self.samples = samples  # (input name, layer) -> 1-D calibration magnitudes
        # teal_allocation.TealAllocation: per-input sparsities for a layer sparsity (None: every input at s)
        self.allocation = allocation

    @classmethod
    @torch.no_grad()
    def calibrate(cls, model, windows: torch.Tensor, seed: int = 0) -> "TealThresholds":
        view = ModelView(model)
        g = torch.Generator().manual_seed(seed)
        store: dict = {}

        def record(key):
            routed = (lambda: view.routed_neurons(key[1])) if key[0] == "ffn_out" else (lambda: None)

            def hook(module, args):  # an MoE layer's down input: its routed neurons only
                store.setdefault(key, []).append(sample_magnitudes(args[0].abs(), g, routed()))
            return hook

        hooks = [view.module(i, paths[0]).register_forward_pre_hook(record((name, i)))
                 for i in range(view.dims.n_layers) for name, paths in projection_inputs(view).items()]
        device = next(model.parameters()).device
        try:
            for w in tqdm(windows, desc="calibrate TEAL thresholds", unit="win"):
                model(input_ids=w[None].to(device))
        finally:
            for h in hooks:
                h.remove()
        return cls({k: torch.cat(v) for k, v in store.items()})

    def thresholds(self, sparsity: float) -> dict:
        """(input, layer) -> the |x| threshold: the quantile of its calibration magnitudes at ``sparsity``, or at the
        allocation's sparsity for that input where the layer skips that fraction of its weights (an input left
        dense gets threshold 0: only exact zeros count as skipped)."""
        per = self.allocation.at(sparsity) if self.allocation is not None else {}
        out = {}
        for k, v in self.samples.items():
            s = per.get(k, sparsity)
            out[k] = magnitude_quantile(v, s) if s > 0 else torch.zeros(())
        return out


class TealHandle(HookHandle):
    """Pre-hooks zeroing input channels below threshold on every projection from first_layer on."""

    def __init__(self, model: nn.Module, thresholds: TealThresholds, sparsity: float, first_layer: int = 0,
                 counts: dict | None = None, inputs: tuple[str, ...] | None = None):
        """counts: {"zeros": {}, "rows": {}} shared by several attachments (gated generation attaches once per
        call) so that stats() covers all of them. inputs: the input names thresholded (projection_inputs' keys;
        None: all), the others left dense (their realized sparsity reads 0)."""
        if not 0.0 <= sparsity < 1.0:
            raise ConfigError(f"TEAL sparsity must be in [0, 1), got {sparsity}")
        self.view = view = ModelView(model)
        self.first_layer = first_layer
        thr = thresholds.thresholds(sparsity) if sparsity > 0 else {}
        counts = counts if counts is not None else {"zeros": {}, "rows": {}}
        self.zeros, self.rows = counts["zeros"], counts["rows"]  # skipped input channels, summed over rows
        for name in projection_inputs(view):
            self.zeros.setdefault(name, 0.0)
            self.rows.setdefault(name, 0)
        unknown = sorted(set(inputs or ()) - set(projection_inputs(view)))
        if unknown or inputs == ():
            raise ConfigError(f"teal inputs must be a non-empty subset of {tuple(projection_inputs(view))}, got "
                              f"{inputs!r}")
        self._hooks = []
        for i in range(first_layer, view.dims.n_layers) if sparsity > 0 else []:
            for name, paths in projection_inputs(view).items():
                if inputs is not None and name not in inputs:
                    continue
                t = thr[name, i]
                for j, path in enumerate(paths):  # every projection reading this input gets the same mask
                    self._hooks.append(view.module(i, path).register_forward_pre_hook(self._hook(name, t, j == 0, i)))

    def _hook(self, name: str, threshold: torch.Tensor, count: bool, layer: int):
        def hook(module, args):
            x = args[0]
            kept, keep = keep_above(x, threshold)
            if count:
                routed = self.view.routed_neurons(layer) if name == "ffn_out" else None
                skipped = ~keep if routed is None else ~keep & routed.reshape(keep.shape)  # MoE: of computed ones
                self.zeros[name] = self.zeros[name] + skipped.sum().double()
                self.rows[name] += x.numel() // x.shape[-1]
            return (kept,) + tuple(args[1:])
        return hook

    def stats(self) -> dict:
        """Realized input sparsity per input kind, over the gated layers."""
        d = self.view.dims
        width = {"attn_in": d.hidden, "attn_out": d.n_heads * d.head_dim, "ffn_in": d.hidden,
                 "ffn_out": d.active_ffn}
        return {f"realized_{n}_sparsity": (float(self.zeros[n]) / (self.rows[n] * width[n]) if self.rows[n] else 0.0)
                for n in width}

    def weight_bytes_skipped(self) -> float:
        return input_bytes_skipped(self.view, self.stats(), self.view.dims.n_layers - self.first_layer)


def input_bytes_skipped(view: ModelView, stats: dict, gated_layers: int) -> float:
    """Fraction of decoder-linear bytes not read per token from the realized input sparsities in ``stats``
    (``realized_<input>_sparsity``; an input without one is dense): each skipped input channel saves one column of
    every projection reading it."""
    from .accounting import decoder_linear_bytes, linear_bytes_per_token
    skipped = 0.0
    for name, paths in projection_inputs(view).items():
        for path in paths:
            skipped += stats.get(f"realized_{name}_sparsity", 0.0) * linear_bytes_per_token(view, path)
    return skipped * gated_layers / decoder_linear_bytes(view)



def attach_teal(model, thresholds: TealThresholds, sparsity: float, first_layer: int = 0,
                counts: dict | None = None, inputs: tuple[str, ...] | None = None) -> TealHandle:
    return TealHandle(model, thresholds, sparsity, first_layer, counts, inputs)
