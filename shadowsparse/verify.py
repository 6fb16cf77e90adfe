"""Predict-then-verify FFN selection (two stages per token and layer), evaluated as four methods:

1. propose: a selector ranks the layer's neurons and keeps the top ``q`` fraction as candidates —
   ``predictor_verify``: a per-layer low-rank predictor reading the FFN input itself (the vector gate and up read);
   ``sketch_verify``: a low-bit copy of the FFN's own weights, |act(Q(W_gate) x) * Q(W_up) x| (sketch "act") or
   |act(Q(W_gate) x)| (sketch "gate"), read instead of the real weights (docs/research.md: the best proposer here);
   ``gate_verify``: the real gate projection in full, CATS-style;
   ``sketch``: the ``sketch_verify`` proposer with nothing to verify (q = 1 - s at every level): a selector that
   decides before the FFN runs (in the default run, next to ``sketch_verify`` with q = 0.6).
2. verify: gate and up are computed for the candidates only; the final keep set is the top (1 - s) of the
   candidates by their true |a| (optionally |a| * ||W_down[:, i]||, the neuron's output contribution). With
   q <= 1 - s there is nothing to verify: the proposal is the keep set, decided before the FFN runs.

A real kernel reads, per token, the candidates' gate and up rows and the kept neurons' down columns, so the bytes
skipped are (1 - q) of gate + up (of up alone for gate_verify) plus s of down, minus the proposer's own bytes
(shadowsparse.accounting, sketch_bytes). Here it runs through the gating hooks' mask path: the activation is
computed densely and every neuron outside the final set is zeroed, which equals the sliced computation exactly
because non-candidates are never eligible (tests/test_verify.py checks it against a hand-sliced forward).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from .accounting import ffn_element_size
from .arch import ModelView
from .errors import ConfigError
from .ffn_io import ffn_input_module
from .gating import GatingConfig, ScoreSource, n_keep, only_routed, topk_mask
from .layer_levels import depth_levels, ffn_sensitivity, sensitivity_levels
from .partial_forward import forward_until
from .quant import gptq_act_order, quantize_rows, x8_grid

log = logging.getLogger("shadowsparse")


@dataclass
class VerifyConfig:
    q: float | list = 0.7  # fraction of each layer's neurons proposed per token (gate/up computed for them); a list
    # evaluates each (one predictor); fewer than the final keep (1 - s) are never proposed
    rank: int = 64  # predictor bottleneck per layer: rank * (d_model + F) parameters per layer
    act: str = "gelu"  # predictor nonlinearity between its two matrices: "gelu" or "none" (a low-rank linear map)
    target: str = "activation"  # what the predictor learns to rank: "activation" |a| or "contribution" |a|*||W_down col||
    final: str = "activation"  # how the verify stage ranks the candidates: "activation" or "contribution"
    train_windows: int = 32  # calibration windows (of the calibration text) the predictor is trained on
    epochs: int = 4
    lr: float = 3e-3
    batch_size: int = 512
    weight_decay: float = 0.0
    eps: float = 1e-3  # targets are log(s + eps * mean_row(s)), z-scored per row (as the shared predictor's)
    sketch: str = "act"  # sketch_verify's proposer: "act" |act(Q(W_gate) x) * Q(W_up) x| (an |a| estimate) or "gate"
    # |act(Q(W_gate) x)| alone (half the bytes, weaker: docs/research.md)
    bits: int = 3  # sketch_verify: bits per weight of the low-bit copy (1 = sign times the group's mean |w|)
    group: int = 64  # sketch_verify: input channels sharing one 16-bit scale
    quantizer: str = "midrise"  # sketch_verify: "midrise" (2**bits levels, MSE-fitted clip), "symmetric" (with 0) or
    # "gptq" (midrise levels, GPTQ error feedback in act order on calibration inputs of each FFN)
    calib_windows: int = 32  # quantizer gptq: calibration windows (of the calibration text) for X^T X per layer
    x_bits: int | None = 8  # the sketch's input: 8: int8 per group of the copy's input channels (symmetric, in act
    # order), what the dp4a scoring kernel reads (kernels/sketch_x8.py; the mask path rounds x the same way, so the
    # two paths keep one estimate); None: fp32 x (kernels/sketch.py). Held-out C4 at 50% FFN: equal within 0.11%
    # (docs/research.md, session 16)
    depth_slope: float = 0.0  # sketch_threshold / sketch_teal: FFN sparsity per gated layer s + depth_slope·(r - mean
    # r), r = the layer's depth in [0, 1] over the gated layers (layer_levels.depth_levels); 0: every layer at s
    allocation: str = "uniform"  # sketch_threshold / sketch_teal: "uniform" (every layer at s, or depth_slope) or
    # "sensitivity": per-layer levels from each layer's measured cost on the calibration text, same mean
    # (layer_levels.sensitivity_levels)
    allocation_power: float = 0.5  # "sensitivity": a layer's level goes as cost ** -allocation_power

    @property
    def qs(self) -> list[float]:
        return [float(v) for v in (self.q if isinstance(self.q, (list, tuple)) else [self.q])]

    def validate(self) -> "VerifyConfig":
        if not self.qs or not all(0.0 < q <= 1.0 for q in self.qs):
            raise ConfigError(f"verify.q must be in (0, 1] (the fraction proposed), got {self.q}")
        for key, allowed in (("act", ("gelu", "none")), ("target", ("activation", "contribution")),
                             ("final", ("activation", "contribution")),
                             ("quantizer", ("midrise", "symmetric", "gptq"))):
            if getattr(self, key) not in allowed:
                raise ConfigError(f"verify.{key} must be one of {allowed}, got {getattr(self, key)!r}")
        if self.sketch not in ("gate", "act") or not 1 <= self.bits <= 8 or self.group < 1:
            raise ConfigError(f"verify.sketch must be gate or act, bits in [1, 8], group >= 1; got {self.sketch!r}, "
                              f"{self.bits}, {self.group}")
        if self.x_bits not in (None, 8):
            raise ConfigError(f"verify.x_bits must be null (fp32 x) or 8 (int8 x, the dp4a kernel), got {self.x_bits}")
        if not -1.0 <= self.depth_slope <= 1.0:
            raise ConfigError(f"verify.depth_slope must be in [-1, 1] (sparsity added from the first gated layer to the "
                              f"last), got {self.depth_slope}")
        if self.allocation not in ("uniform", "sensitivity") or not 0 < self.allocation_power <= 4:
            raise ConfigError(f"verify.allocation must be uniform or sensitivity and verify.allocation_power in (0, 4], "
                              f"got {self.allocation!r}, {self.allocation_power}")
        if self.rank < 1 or self.train_windows < 1 or self.epochs < 1 or self.calib_windows < 1:
            raise ConfigError("verify.rank, verify.train_windows, verify.epochs and verify.calib_windows must be "
                              "positive")
        return self


def sketch_bytes(view: ModelView, layers: int, cfg: VerifyConfig) -> int:
    """Bytes a kernel reads for the low-bit proposer, per token, in the units of the model's own weights: a b-bit
    copy with one 16-bit scale per group costs (b + 16/group)/16 of a 16-bit matrix of the same shape. An MoE layer:
    the copy of the k routed experts' rows."""
    d, F = view.dims.hidden, view.dims.active_ffn
    esize = ffn_element_size(view)
    mats = 2 if cfg.sketch == "act" else 1
    return int(layers * mats * F * d * (cfg.bits + 16 / cfg.group) / 16 * esize)


def down_column_norms(view: ModelView, layer: int) -> torch.Tensor:
    """||W_down[:, i]|| per neuron (F,): what one unit of activation adds to the residual stream."""
    return view.weight(layer, view.spec.ffn_down).detach().float().norm(dim=0)  # (d_model, F) -> (F,)


class VerifyScores(ScoreSource):
    """The two-stage selector as a ScoreSource: the hook before the FFN proposes candidates (top q by the proposer),
    the down-projection hook keeps the top-k of the candidates by their own activation. FFN only.

    candidate_stats[ffn_sparsity] = [non-candidate neurons summed over rows, rows], counted from the candidate masks.
    """

    def __init__(self, q: float, predictor: nn.Module | None = None, proposer: str = "predictor",
                 final: str = "activation", sketch: VerifyConfig | None = None, qcache: dict | None = None,
                 hessians: dict | None = None):
        if proposer not in ("predictor", "gate", "sketch"):
            raise ConfigError(f"verify proposer must be 'predictor', 'gate' or 'sketch', got {proposer!r}")
        self.sketch = sketch or VerifyConfig()  # sketch proposer: bits, group and what is sketched
        # (layer, which, bits, group, quantizer) -> dequantized low-bit copy, made once; sources may share one dict
        self._qweights: dict = {} if qcache is None else qcache
        self.hessians = hessians  # quantizer gptq: layer -> X^T X of its FFN input (ffn_input_hessians)
        if proposer == "sketch" and self.sketch.quantizer == "gptq" and hessians is None:
            raise ConfigError("verify.quantizer=gptq needs calibration inputs (ffn_input_hessians)")
        if proposer == "predictor" and predictor is None:
            raise ConfigError("the predictor proposer needs a trained FFNInputPredictor")
        self.q, self.predictor, self.proposer, self.final = q, predictor, proposer, final
        first = min(predictor.layers) if predictor is not None else 0
        self.feature_layer = first - 1 if first > 0 else None  # so a default first_layer gates what was trained
        self._cand: dict[int, torch.Tensor] = {}
        self._col: dict[int, torch.Tensor] = {}
        self._xperm: dict[int, torch.Tensor | None] = {}  # x_bits: layer -> the copy's input order
        self.candidate_stats: dict[float, list] = {}

    def attach(self, view: ModelView, cfg: GatingConfig) -> list:
        spec = view.spec
        if cfg.head_sparsity > 0:
            raise ConfigError("predict-then-verify selects FFN neurons only; set head_sparsity=0 for it")
        if self.proposer in ("gate", "sketch") and not spec.glu:
            raise ConfigError(f"the {self.proposer} proposer needs a gated FFN (SwiGLU, GeGLU) to read or sketch its "
                              f"gate; '{spec.family}' has none")
        F = view.dims.active_ffn  # the neurons a token computes (MoE: its routed experts')
        self._view = view
        k_final = n_keep(F, cfg.ffn_sparsity)
        self._k_cand = max(k_final, int(round(self.q * F)))  # never fewer candidates than the final keep
        first = cfg.first_layer if cfg.first_layer is not None else (self.feature_layer or -1) + 1
        stats = self.candidate_stats.setdefault(cfg.ffn_sparsity, [0.0, 0])
        hooks = []
        for l in range(first, view.dims.n_layers):
            if self.final == "contribution":
                self._col[l] = down_column_norms(view, l)
            if self.proposer == "predictor":
                if l not in self.predictor.index:
                    raise ConfigError(f"the verify predictor has no layer {l} (trained for {self.predictor.layers})")

                def propose(module, args, l=l):
                    with torch.no_grad():
                        self._set(l, self.predictor.predict_layer(l, args[0]), stats)
                hooks.append(ffn_input_module(view, l).register_forward_pre_hook(propose))
            elif self.proposer == "sketch":
                act = view.module(l, spec.ffn_act)
                qg = self._qweight(view, l, 0)  # low-bit gate rows (F, d)
                qu = self._qweight(view, l, 1) if self.sketch.sketch == "act" else None  # up rows (F, d)

                perm = self._x_perm(view, l) if self.sketch.x_bits else None

                def propose_q(module, args, l=l, act=act, qg=qg, qu=qu, perm=perm):
                    with torch.no_grad():
                        x = args[0]  # (B, T, d): the FFN input, what gate and up (or a fused gate_up) read
                        if self.sketch.x_bits:  # the sketch reads x rounded to int8 per group (dp4a kernel's)
                            x = x8_grid(x, perm, self.sketch.group)
                        est = act(x @ qg.T)
                        if qu is not None:
                            est = est * (x @ qu.T)
                        self._set(l, est.abs(), stats)
                hooks.append(ffn_input_module(view, l).register_forward_pre_hook(propose_q))
            else:
                def propose_gate(a, l=l):  # a = act(gate) (B, T, F) of this forward
                    with torch.no_grad():
                        self._set(l, a.abs(), stats)
                hooks.append(view.hook_gate_activation(l, propose_gate))
        return hooks

    def _qweight(self, view: ModelView, layer: int, block: int) -> torch.Tensor:
        """The dequantized low-bit copy of the gate (block 0) or up (block 1) rows (F, d), made once per setting and
        cached under the module's path (a fused gate_up's half: its path and [gate] / [up])."""
        spec = view.spec
        name = spec.ffn_in[block] if spec.gate_up == "separate" else f"{spec.ffn_in[0]}[{('gate', 'up')[block]}]"
        key = (layer, name, self.sketch.bits, self.sketch.group, self.sketch.quantizer)
        if key not in self._qweights:
            w = view.ffn_in_rows(layer)[block][0]
            if self.sketch.quantizer == "gptq":
                h = self.hessians[layer].to(w.device)
                self._qweights[key] = gptq_act_order(w, h, self.sketch.bits, self.sketch.group)
            else:
                self._qweights[key] = quantize_rows(w, self.sketch.bits, self.sketch.group, self.sketch.quantizer)
        return self._qweights[key]

    def _x_perm(self, view: ModelView, layer: int) -> torch.Tensor | None:
        """The input order whose consecutive groups share an int8 scale of x: the copy's own (act order of the GPTQ
        hessian, as quant.gptq_act_order_codes; None: the identity), cached."""
        if layer not in self._xperm:
            hess = self.hessians.get(layer) if self.hessians and self.sketch.quantizer == "gptq" else None
            self._xperm[layer] = None if hess is None else torch.argsort(torch.diag(hess), descending=True)
        return self._xperm[layer]

    def _set(self, layer: int, scores: torch.Tensor, stats: list) -> None:
        routed = self._view.routed_neurons(layer)  # MoE (N, E*F): candidates among the computed neurons only
        cand = topk_mask(only_routed(scores, routed), self._k_cand, torch.bool)  # (..., F)
        rows = cand.numel() // cand.shape[-1]
        stats[0] += float((~cand).sum()) - (0 if routed is None else float((~routed).sum()))
        stats[1] += rows
        self._cand[layer] = cand

    def neuron_mask(self, layer: int, x: torch.Tensor, k: int, routed: torch.Tensor | None = None) -> torch.Tensor:
        cand = self._cand.pop(layer)  # from this very forward's FFN input
        if self._k_cand <= k:  # nothing to verify: the candidates are the keep set (skips a masked top-k)
            return cand.reshape(x.shape).to(x.dtype)
        s = x.abs().float()
        if self.final == "contribution":
            s = s * self._col[layer].to(x.device)
        s = s.masked_fill(~cand.reshape(s.shape), float("-inf"))
        return topk_mask(s, k, x.dtype)

    def candidate_sparsity(self, ffn_sparsity: float, ffn: int) -> float:
        skipped, rows = self.candidate_stats.get(ffn_sparsity, (0.0, 0))
        return skipped / (rows * ffn) if rows else 0.0


class SketchThresholdScores(VerifyScores):
    """sketch_threshold's mask path: the sketch's estimate of |act(gate)·up| (the ``sketch`` proposer's, same copy)
    against a per-layer threshold, the ffn_sparsity-quantile of the estimates the calibration text produced. A neuron
    is kept where its estimate exceeds the threshold: decided before the FFN runs, no top-k (the engine's kernels
    read the rows that pass), realized sparsity varies per token around the requested one (counted from the masks).

    samples: gated layer -> 1-D fp32 estimate samples (training_free.sample_magnitudes), made by ``calibrate``."""

    def __init__(self, samples: dict[int, torch.Tensor], sketch: VerifyConfig, qcache: dict | None = None,
                 hessians: dict | None = None):
        super().__init__(0.0, None, "sketch", sketch=sketch, qcache=qcache, hessians=hessians)
        self.samples = samples
        self._thr: dict[int, torch.Tensor] = {}
        self._record: dict[int, list] | None = None  # calibrate(): estimates gathered here instead of masks
        self._rng: torch.Generator | None = None
        self.sensitivity: dict[int, float] | None = None  # gated layer -> measured cost (allocation=sensitivity)

    @classmethod
    @torch.no_grad()
    def calibrate(cls, model: nn.Module, windows: torch.Tensor, sketch: VerifyConfig, first_layer: int,
                  qcache: dict | None = None, hessians: dict | None = None,
                  seed: int = 0) -> "SketchThresholdScores":
        """One dense pass over the calibration windows (N, T), recording each gated layer's estimates."""
        view = ModelView(model)
        src = cls({}, sketch, qcache, hessians)
        src._record = {layer: [] for layer in range(first_layer, view.dims.n_layers)}
        src._rng = torch.Generator().manual_seed(seed)
        hooks = src.attach(view, GatingConfig(ffn_sparsity=0.0, head_sparsity=0.0, first_layer=first_layer))
        device = next(model.parameters()).device
        try:
            for i in range(len(windows)):  # up to the last gated layer: the LM head's logits are not read
                forward_until(model, windows[i:i + 1].to(device), view.layer(view.dims.n_layers - 1))
        finally:
            for h in hooks:
                h.remove()
        src.samples = {layer: torch.cat(vals) if vals else torch.zeros(1) for layer, vals in src._record.items()}
        src._record = None
        if sketch.allocation == "sensitivity":
            src.sensitivity = ffn_sensitivity(model, windows, sorted(src.samples))
        return src

    def thresholds(self, ffn_sparsity: float, n_layers: int) -> torch.Tensor:
        """(n_layers,) fp32: each gated layer's threshold at ``ffn_sparsity`` (its level under verify.allocation /
        depth_slope: layer_levels.py; layers without samples: 0, unused)."""
        from .training_free import magnitude_quantile
        out = torch.zeros(n_layers)
        layers = sorted(self.samples)
        if self.sketch.allocation == "sensitivity":
            if self.sensitivity is None:
                raise ConfigError("verify.allocation=sensitivity needs the layers' measured costs: build the source "
                                  "with SketchThresholdScores.calibrate")
            levels = sensitivity_levels(ffn_sparsity, self.sensitivity, self.sketch.allocation_power)
        else:
            levels = depth_levels(ffn_sparsity, layers, self.sketch.depth_slope)
        for layer, s in self.samples.items():
            out[layer] = magnitude_quantile(s, levels[layer]) if levels[layer] > 0 else s.min() - 1
        return out

    def attach(self, view: ModelView, cfg: GatingConfig) -> list:
        hooks = super().attach(view, cfg)
        if self._record is None:
            if not self.samples:
                raise ConfigError("sketch_threshold has no calibration estimates: build it with "
                                  "SketchThresholdScores.calibrate(model, windows, ...)")
            self._thr = dict(enumerate(self.thresholds(cfg.ffn_sparsity, view.dims.n_layers).tolist()))
        return hooks

    def _set(self, layer: int, scores: torch.Tensor, stats: list) -> None:
        routed = self._view.routed_neurons(layer)  # MoE (N, E*F): the sketch estimates every expert's neurons
        if self._record is not None:
            if layer in self._record:  # a bounded sample per forward: memory stays fixed per window
                from .training_free import sample_magnitudes
                self._record[layer].append(sample_magnitudes(scores, self._rng, routed))
            return
        cand = scores > self._thr[layer]
        if routed is not None:
            cand &= routed
        stats[0] += float((~cand).sum()) - (0 if routed is None else float((~routed).sum()))
        stats[1] += cand.numel() // cand.shape[-1]
        self._cand[layer] = cand

    def neuron_mask(self, layer: int, x: torch.Tensor, k: int, routed: torch.Tensor | None = None) -> torch.Tensor:
        return self._cand.pop(layer).reshape(x.shape).to(x.dtype)  # the estimate's decision, whatever k says
