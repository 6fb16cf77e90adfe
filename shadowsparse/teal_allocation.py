"""TEAL's block-wise greedy allocation: how much input sparsity each projection input of a layer gets, for a given
fraction of the layer's linear weights skipped.

Uniform TEAL thresholds every input at the same sparsity s. The inputs are not equally sensitive (in TEAL's paper
the attention output and the FFN input tolerate less than the FFN's down input), so TEAL allocates per block: start
dense; at each step try raising each input's sparsity by ``step`` (its own fraction), run the block on calibration
inputs, and keep the raise that adds the least output error per weight skipped; record the inputs' sparsities each
time the block's weight-weighted sparsity b = Σ s_i P_i / Σ P_i crosses a grid point. ``TealThresholds`` then
thresholds input i of layer l at its allocated sparsity for the requested b (linear between recorded steps): the same
fraction of weights skipped as uniform s = b, spent where it costs least.

Each block is scored in isolation on its dense inputs (the calibration text's hidden states, recorded once), by the
squared error of its output against its dense output; the rest of the model plays no part. Cost: one dense pass
to record every layer's inputs (held in memory: 2 · windows · T · d floats per layer), then about
4 · (b_max / step) · 4 block forwards per layer on the calibration tokens.

    alloc = greedy_allocation(model, windows, thresholds)     # thresholds: TealThresholds of the same text
    thresholds.allocation = alloc                             # TealThresholds.thresholds(b) now follows it
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .arch import ModelView
from .errors import ConfigError
from .training_free import magnitude_quantile


@dataclass
class TealAllocation:
    """The greedy path of every layer: ``path[layer]`` is a list of (b, {input: sparsity}) from b = 0 upward, b the
    layer's weight-weighted sparsity after each accepted step."""
    path: dict[int, list[tuple[float, dict[str, float]]]]

    @property
    def max_sparsity(self) -> float:
        """The largest b every layer's path reaches."""
        return min(p[-1][0] for p in self.path.values())

    def at(self, b: float) -> dict[tuple[str, int], float]:
        """(input, layer) -> its sparsity where the layer skips a fraction b of its linear weights: linear between
        the two recorded steps around b."""
        if not 0.0 <= b <= self.max_sparsity + 1e-9:
            raise ConfigError(f"the greedy TEAL allocation reaches block sparsity {self.max_sparsity:.3f}; got {b} "
                              "(recompute it with a larger max_sparsity, or use evaluate.teal_allocation=uniform)")
        out = {}
        for layer, steps in self.path.items():
            hi = next(j for j, (bj, _) in enumerate(steps) if bj >= b - 1e-9)
            (b1, s1), (b0, s0) = steps[hi], steps[max(hi - 1, 0)]
            w = 0.0 if b1 <= b0 else (b - b0) / (b1 - b0)
            for name in s1:
                out[name, layer] = (1 - w) * s0[name] + w * s1[name]
        return out


ALLOCATIONS = ("uniform", "greedy")


def validate_teal_config(node, levels: list[float]) -> None:
    """evaluate.teal (schema.TealNode, or a dict of its keys) before any model loads; levels: the teal levels to be
    evaluated."""
    attn = node.get("sketch_attn", 0.3)
    if isinstance(attn, bool) or not isinstance(attn, (int, float)) or not 0 < attn < 1:
        raise ConfigError(f"evaluate.teal.sketch_attn (sketch_teal's sparsity on the attention inputs) must be in "
                          f"(0, 1), got {attn!r}; e.g. evaluate.teal.sketch_attn=0.3")
    if node["allocation"] not in ALLOCATIONS:
        raise ConfigError(f"evaluate.teal.allocation must be one of {ALLOCATIONS}, got {node['allocation']!r}")
    if node["allocation"] == "uniform":
        return
    step, top, windows = node["step"], node["max_sparsity"], node["windows"]
    if not (0 < step < 1 and 0 < top < 0.98 and windows >= 1):
        raise ConfigError(f"evaluate.teal needs 0 < step < 1, 0 < max_sparsity < 0.98 and windows >= 1, got "
                          f"step={step}, max_sparsity={top}, windows={windows}")
    above = [s for s in levels if s > top]
    if above:
        raise ConfigError(f"teal levels {above} exceed evaluate.teal.max_sparsity={top}, the largest "
                          "layer sparsity the greedy allocation computes; raise it (e.g. evaluate.teal.max_sparsity="
                          f"{min(0.95, max(above) + 0.05):.2f}) or drop those levels")


def _input_params(view: ModelView, layer: int, inputs: dict[str, tuple[str, ...]]) -> dict[str, int]:
    """Weights read per input: every projection that reads it (q, k and v read attn_in, gate and up ffn_in)."""
    return {name: sum(view.weight(layer, p).numel() for p in paths) for name, paths in inputs.items()}


@torch.no_grad()
def _record_block_io(model, view: ModelView, windows: torch.Tensor, layers: range) -> dict[int, list]:
    """Each layer's calls on the calibration windows, in one dense pass per window: layer -> [(args, kwargs, dense
    output)]. use_cache=False, so calling a layer again with the same arguments computes the same thing."""
    calls = {i: [] for i in layers}

    def grab(i):
        def hook(module, args, kwargs, output):
            calls[i].append((args, kwargs, output[0] if isinstance(output, tuple) else output))
        return hook

    handles = [view.layer(i).register_forward_hook(grab(i), with_kwargs=True) for i in layers]
    device = next(model.parameters()).device
    try:
        for w in windows:
            model(input_ids=w[None].to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return calls


def _masked(view: ModelView, layer: int, inputs: dict[str, tuple[str, ...]], thr: dict[str, torch.Tensor]):
    """Pre-hooks zeroing |x| <= thr[input] (teal.keep_above, the hooks' rule) on every projection of ``layer`` that
    reads that input -> handles."""
    from .teal import keep_above

    def hook(t):
        def pre(module, args):
            return (keep_above(args[0], t)[0],) + tuple(args[1:])
        return pre
    return [view.module(layer, p).register_forward_pre_hook(hook(thr[name]))
            for name, paths in inputs.items() if name in thr for p in paths]


@torch.no_grad()
def greedy_allocation(model, windows: torch.Tensor, thresholds, step: float = 0.05, max_sparsity: float = 0.8,
                      max_input: float = 0.98, first_layer: int = 0) -> TealAllocation:
    """The greedy path of every layer from first_layer on (module docstring). windows (N, T) calibration token ids
    (not evaluation text); thresholds: TealThresholds calibrated on the same text (its magnitude samples turn a
    sparsity into a threshold). step: the raise of one input's sparsity per try; max_sparsity: the block sparsity
    at which a layer's path stops; max_input: no input is thresholded beyond this."""
    from .teal import projection_inputs
    if not 0 < step < 1 or not 0 < max_sparsity < max_input <= 1:
        raise ConfigError(f"greedy TEAL allocation needs 0 < step < 1 and 0 < max_sparsity < max_input <= 1, got "
                          f"step={step}, max_sparsity={max_sparsity}, max_input={max_input}")
    view = ModelView(model)
    inputs = projection_inputs(view)
    path = {}
    layers = range(first_layer, view.dims.n_layers)
    recorded = _record_block_io(model, view, windows, layers)
    for layer in tqdm(layers, desc="greedy TEAL allocation", unit="layer"):
        calls = recorded.pop(layer)  # freed as the layers are done
        params = _input_params(view, layer, inputs)
        total = sum(params.values())
        samples = {name: thresholds.samples[name, layer] for name in inputs}

        def error(sparsity: dict[str, float]) -> float:
            thr = {n: magnitude_quantile(samples[n], s) for n, s in sparsity.items() if s > 0}
            handles = _masked(view, layer, inputs, thr)
            try:
                err = 0.0
                for args, kwargs, dense in calls:
                    out = view.layer(layer)(*args, **kwargs)
                    out = out[0] if isinstance(out, tuple) else out
                    err += (out.float() - dense.float()).pow(2).sum().item()
                return err
            finally:
                for h in handles:
                    h.remove()

        s = {name: 0.0 for name in inputs}
        b, err = 0.0, 0.0
        steps = [(0.0, dict(s))]
        while b < max_sparsity - 1e-9:
            best = None  # (error added per unit of block sparsity, trial, its error, the block sparsity it adds)
            for name in inputs:
                if s[name] >= max_input - 1e-9:
                    continue
                trial = {**s, name: min(max_input, s[name] + step)}
                gain = (trial[name] - s[name]) * params[name] / total
                e = error(trial)
                if best is None or (e - err) / gain < best[0]:
                    best = ((e - err) / gain, trial, e, gain)
            if best is None:  # every input at max_input: the path ends below max_sparsity
                break
            _, s, err, gain = best
            b += gain
            steps.append((b, dict(s)))
        path[layer] = steps
    return TealAllocation(path)
