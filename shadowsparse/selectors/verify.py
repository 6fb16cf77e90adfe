"""Selection before / around the FFN (shadowsparse/verify.py): a proposer ranks each layer's neurons from the FFN
input and keeps the top q as candidates; the verify stage keeps the top (1 - s) of those by their true |a|.

  sketch           a low-bit copy of W_gate and W_up estimates |silu(gate)*up|; its top (1 - s) are kept (no verify
                   stage: decided before the FFN runs)
  sketch_threshold the same estimate kept where it exceeds a per-layer threshold calibrated on the calibration text
                   (no top-k: the engine reads the rows that pass; realized sparsity varies per token)
  sketch_verify    the same sketch proposes evaluate.verify.q of the neurons, verified by |a|
  gate_verify      the real gate projection in full proposes (CATS-style), verified by |a|
  predictor_verify a per-layer low-rank predictor of the FFN input proposes (trained here on calibration text)

All five select FFN neurons only; the sketch and gate proposers need a gated (SwiGLU) FFN.
"""
from __future__ import annotations

import logging
from pathlib import Path

from ..config import verify_config, window_spec
from ..data import WindowSpec, token_windows
from ..gating import n_keep
from ..quant import ffn_input_hessians
from ..verify import SketchThresholdScores, VerifyScores, sketch_bytes
from ..verify_predictor import FFNInputPredictor, train_verify_predictor
from .base import Run, Selector
from .registry import register

log = logging.getLogger("shadowsparse")


class VerifyFamily(Selector):
    """What the four methods share: FFN levels only, the verify decision point, the rows' verify_* fields."""

    decision = "verify"  # a non-candidate saves its gate/up rows and down column, a dropped candidate its column
    ffn_only = True
    proposer = "sketch"

    def skip_reason(self, ctx):
        if self.proposer != "predictor" and not ctx.view.spec.glu:
            return (f"{self.name} needs a gated FFN (SwiGLU, GeGLU) to sketch or read the gate; "
                    f"{ctx.view.spec.family} has none")
        return None

    def qs(self, ctx) -> list[float]:
        return verify_config(ctx.cfg).qs

    def selector_bytes(self, ctx) -> int:
        return 0

    def variant_fields(self, ctx) -> dict:
        vcfg = verify_config(ctx.cfg)
        return {"verify_bits": vcfg.bits, "verify_group": vcfg.group, "verify_sketch": vcfg.sketch,
                "verify_quantizer": vcfg.quantizer, "verify_x_bits": vcfg.x_bits}

    def levels_for(self, ctx, q: float, levels: list) -> list:
        return levels

    def runs(self, ctx):
        vcfg = verify_config(ctx.cfg)
        levels, predictor = self.levels(ctx), self.predictor(ctx)
        sel_bytes = self.selector_bytes(ctx)
        for q in self.qs(ctx):
            q_levels = self.levels_for(ctx, q, levels)
            if not q_levels:
                continue
            src = VerifyScores(q, predictor, self.proposer, vcfg.final, sketch=vcfg,
                               qcache=ctx.shared.setdefault("sketch_copies", {}), hessians=self.hessians(ctx))
            ffn = ctx.view.dims.active_ffn
            yield Run(src, q_levels, granularity="token", budget="local", selector_bytes=sel_bytes,
                      stats_extra=lambda f, src=src: {"realized_candidate_sparsity": src.candidate_sparsity(f, ffn)},
                      more={"criterion": None, **self.variant_fields(ctx),
                            **({} if self.name == "sketch" else {"verify_q": q}), "verify_final": vcfg.final,
                            **self.predictor_fields(ctx, predictor)})

    def predictor(self, ctx) -> FFNInputPredictor | None:
        return None

    def engine_parts(self, ctx, run):
        """The proposer's own engine selector (the sketch copy, the real gate, the per-layer predictor), verified in
        the engine by the candidates' true |a| (runtime/ffn_select.VerifyFFNSelector)."""
        from ..runtime.ffn_select import GateFFNSelector, PredictorProposer, VerifyFFNSelector
        from ..runtime.weights import act_name
        from ..verify import down_column_norms
        layers = range(ctx.first_layer, ctx.view.dims.n_layers)
        if self.proposer == "sketch":
            proposer = self.sketch_selector(ctx)
            if isinstance(proposer, str):
                return proposer
        elif self.proposer == "gate":
            proposer = GateFFNSelector({i: ctx.view.ffn_in_rows(i)[0][0] for i in layers},  # gate rows (F, d)
                                       act_name(ctx.model.config))
        else:
            proposer = PredictorProposer(run.source.predictor)
        columns = {i: down_column_norms(ctx.view, i) for i in layers} if run.source.final == "contribution" else None
        return {"ffn_selector": VerifyFFNSelector(proposer, run.source.q, run.source.final, columns)}

    def predictor_fields(self, ctx, predictor) -> dict:
        return {}

    def hessians(self, ctx) -> dict | None:
        """X^T X of each gated layer's FFN input on the calibration text (the GPTQ sketch fits its copy to them),
        computed once for every sketch method of the evaluation."""
        vcfg = verify_config(ctx.cfg)
        if self.proposer != "sketch" or vcfg.quantizer != "gptq":
            return None
        if "hessians" not in ctx.shared:  # calibrated on the calibration text, never the evaluation windows
            layers = list(range(ctx.first_layer, ctx.view.dims.n_layers))
            ctx.shared["hessians"] = ffn_input_hessians(ctx.model, ctx.calib_windows(vcfg.calib_windows), layers)
        return ctx.shared["hessians"]


class SketchProposer(VerifyFamily):
    def selector_bytes(self, ctx):
        return sketch_bytes(ctx.view, ctx.view.dims.n_layers - ctx.first_layer, verify_config(ctx.cfg))

    def sketch_selector(self, ctx):
        """The packed copy of every gated layer's W_gate and W_up, quantized as the mask path quantizes them
        (kernels/sketch.py: its fp16 steps round the quantizer's by at most 2**-11 relative), or why not."""
        from ..kernels.sketch import BITS, GROUP, sketch_from_weights
        from ..kernels.sketch_x8 import sketch_from_weights_x8
        from ..runtime.ffn_select import SketchFFNSelector
        from ..runtime.weights import act_name
        vcfg = verify_config(ctx.cfg)
        if vcfg.sketch != "act" or vcfg.bits not in BITS or vcfg.quantizer == "symmetric" or vcfg.group != GROUP:
            return (f"the sketch kernel reads a {BITS}-bit midrise/GPTQ copy of gate and up in groups of {GROUP} "
                    f"(verify.sketch=act); got sketch={vcfg.sketch} bits={vcfg.bits} quantizer={vcfg.quantizer} "
                    f"group={vcfg.group}")
        hessians = self.hessians(ctx)
        sketches = {}
        make = sketch_from_weights_x8 if vcfg.x_bits == 8 else sketch_from_weights  # int8 x: the dp4a kernel
        for layer in range(ctx.first_layer, ctx.view.dims.n_layers):
            (w_gate, _), (w_up, _) = ctx.view.ffn_in_rows(layer)  # (F, d) each, split from a fused gate_up
            h = None if hessians is None else hessians[layer].to(w_gate.device)
            sketches[layer] = make(w_gate, w_up, vcfg.bits, vcfg.group, h).to(w_gate.device)
        return SketchFFNSelector(sketches, act=act_name(ctx.model.config))  # the FFN's act (Gemma: gelu_tanh)


@register
class Sketch(SketchProposer):
    name = "sketch"

    def qs(self, ctx):
        return [0.0]  # the proposal is the keep set (q = 0 proposes no more than 1 - s): no verify stage

    def engine_parts(self, ctx, run):
        proposer = self.sketch_selector(ctx)
        return proposer if isinstance(proposer, str) else {"ffn_selector": proposer}



@register
class SketchThreshold(SketchProposer):
    name = "sketch_threshold"

    def variant_fields(self, ctx) -> dict:
        """The sketch's settings and how its level is spread over the layers (shadowsparse/layer_levels.py)."""
        vcfg = verify_config(ctx.cfg)
        spread = {"verify_depth_slope": vcfg.depth_slope, "verify_allocation": vcfg.allocation}
        if vcfg.allocation == "sensitivity":
            spread["verify_allocation_power"] = vcfg.allocation_power
        return {**super().variant_fields(ctx), **spread}

    def threshold_source(self, ctx) -> SketchThresholdScores:
        """The estimates' calibration, on the calibration text (never the evaluation windows); once per context
        (sketch_teal reuses it)."""
        if "sketch_threshold" not in ctx.shared:
            ctx.shared["sketch_threshold"] = SketchThresholdScores.calibrate(
                ctx.model, ctx.calib_windows(ctx.cfg.evaluate.threshold_windows), verify_config(ctx.cfg),
                ctx.first_layer, qcache=ctx.shared.setdefault("sketch_copies", {}), hessians=self.hessians(ctx),
                seed=ctx.cfg.seed)
        return ctx.shared["sketch_threshold"]

    def runs(self, ctx):
        source = self.threshold_source(ctx)
        source.candidate_stats.clear()  # counts of this method's passes only (sketch_teal shares the source)
        ffn = ctx.view.dims.active_ffn  # the kept set is the candidate set: both counted from the hooks' masks
        yield Run(source, self.levels(ctx), granularity="token", budget="local",  # per-layer thresholds
                  selector_bytes=self.selector_bytes(ctx),
                  stats_extra=lambda f: {"realized_candidate_sparsity": source.candidate_sparsity(f, ffn)},
                  more={"criterion": None, **self.variant_fields(ctx)})

    def engine_parts(self, ctx, run):
        """The sketch's packed copy scoring every neuron, the thresholds of the run's first level (its FFN
        sparsity), kernels that read the rows that pass (runtime/ffn_select.SketchThresholdFFNSelector)."""
        from ..runtime.ffn_select import SketchThresholdFFNSelector
        proposer = self.sketch_selector(ctx)
        if isinstance(proposer, str):
            return proposer
        thr = run.source.thresholds(run.levels[0][0], ctx.view.dims.n_layers)  # (L,) the hooks' own
        return {"ffn_selector": SketchThresholdFFNSelector(proposer, thr)}


@register
class SketchVerify(SketchProposer):
    name = "sketch_verify"

    def levels_for(self, ctx, q, levels):
        if "sketch" not in ctx.methods:
            return levels
        ffn = ctx.view.dims.active_ffn
        same = [(f, h) for f, h in levels if round(q * ffn) <= n_keep(ffn, f)]  # no verify stage: the sketch row
        if same:
            log.info("sketch_verify q=%.2f proposes no more than it keeps at ffn=%s: the same selection as the sketch "
                     "row, not evaluated again", q, ", ".join(f"{f:.2f}" for f, _ in same))
        return [lv for lv in levels if lv not in same]


@register
class GateVerify(VerifyFamily):
    name = "gate_verify"
    decision = "gate_verify"  # the gate runs in full: a non-candidate saves its up row and down column
    proposer = "gate"

    def variant_fields(self, ctx):
        return {}


@register
class PredictorVerify(VerifyFamily):
    name = "predictor_verify"
    proposer = "predictor"

    def variant_fields(self, ctx):
        return {}

    def predictor(self, ctx):
        if "verify_predictor" not in ctx.shared:
            ctx.shared["verify_predictor"] = verify_predictor_for(ctx.cfg, ctx.model, ctx.tok, ctx.first_layer,
                                                                  ctx.run_dir)
        return ctx.shared["verify_predictor"]

    def selector_bytes(self, ctx):
        return self.predictor(ctx).n_params() * ctx.esize

    def predictor_fields(self, ctx, predictor):
        vcfg = verify_config(ctx.cfg)
        return {"predictor_params": predictor.n_params(), "verify_rank": vcfg.rank, "verify_target": vcfg.target,
                "verify_train_tokens": predictor.train_tokens}


def verify_predictor_for(cfg, model, tok, first_layer: int, run_dir: Path) -> FFNInputPredictor:
    """The predict-then-verify predictor: ``paths.verify_ckpt`` or run_dir/verify_predictor.safetensors when it
    exists, else trained now on the first ``evaluate.verify.train_windows`` windows of the calibration text."""
    from ..arch import ModelView
    from ..errors import ConfigError
    vcfg = verify_config(cfg)
    ckpt = Path(cfg.paths.get("verify_ckpt") or Path(run_dir) / "verify_predictor.safetensors")
    view = ModelView(model)
    layers = list(range(first_layer, view.dims.n_layers))
    if ckpt.exists():
        pred = FFNInputPredictor.load(ckpt, model)
        missing = set(layers) - set(pred.layers)
        if missing or pred.dims["d_model"] != view.dims.hidden or pred.dims["ffn"] != view.dims.ffn:
            raise ConfigError(f"verify predictor '{ckpt}' does not fit this model (layers {pred.layers}, dims "
                              f"{pred.dims}); delete it or point paths.verify_ckpt at a matching one")
        log.info("verify predictor: loaded %s", ckpt)
        return pred.to(next(model.parameters()).device)
    spec = window_spec(cfg.data.calib)
    windows = token_windows(tok, WindowSpec(spec.seq_len, vcfg.train_windows, spec.source))
    pred = train_verify_predictor(model, windows, vcfg, layers, Path(run_dir) / "verify_ffn_io", seed=cfg.seed)
    from ..llm import model_fingerprint
    pred.save(ckpt, model_fingerprint(model))
    log.info("verify predictor: %s parameters, trained on %d tokens, saved to %s", f"{pred.n_params():,}",
             windows.numel(), ckpt)
    return pred.to(next(model.parameters()).device)
