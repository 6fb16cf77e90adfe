"""teal: TEAL-style input-channel sparsity on every decoder projection (per-layer quantile thresholds of |x|,
calibrated on the calibration text). It gates inputs, not heads or neurons, so it brings its own hooks
(shadowsparse/teal.py) and rows: realized sparsity per input kind, bytes from the input channels skipped."""
from __future__ import annotations

from ..teal import TealThresholds, attach_teal
from .base import Run, Selector
from .registry import register


def calibration(ctx) -> TealThresholds:
    """The |x| calibration magnitudes per (input, layer) on the calibration text (never the evaluation windows),
    without an allocation: taken once per context, shared by teal and sketch_teal."""
    if "teal_calibration" not in ctx.shared:
        ctx.shared["teal_calibration"] = TealThresholds.calibrate(
            ctx.model, ctx.calib_windows(ctx.cfg.evaluate.threshold_windows), ctx.cfg.seed)
    return ctx.shared["teal_calibration"]


@register
class Teal(Selector):
    name = "teal"
    decision = "input"  # its rows' bytes come from the hooks' own count (TealHandle.weight_bytes_skipped)
    ffn_only = True  # one sparsity for all projections; no head axis

    def thresholds(self, ctx) -> TealThresholds:
        """Calibration magnitudes per (input, layer), on the calibration text (never the evaluation windows), and
        with evaluate.teal.allocation=greedy TEAL's per-input allocation on its first windows; once per context."""
        if "teal" not in ctx.shared:
            thresholds = TealThresholds(calibration(ctx).samples)
            node = ctx.cfg.evaluate.get("teal")  # absent from the configs of runs made before it existed
            if node is not None and node.allocation == "greedy":
                from ..teal_allocation import greedy_allocation
                thresholds.allocation = greedy_allocation(ctx.model, ctx.calib_windows(node.windows), thresholds,
                                                          node.step, node.max_sparsity, first_layer=ctx.first_layer)
            ctx.shared["teal"] = thresholds
        return ctx.shared["teal"]

    def runs(self, ctx):
        """For gated generation (load_gated): the hooks of one level each (evaluate() attaches fresh hooks per row:
        Evaluation.run_hooks)."""
        thresholds = self.thresholds(ctx)
        for ffn, heads in self.levels(ctx):
            counts = {"zeros": {}, "rows": {}}  # one count over every call of this level
            yield Run(None, [(ffn, heads)], granularity="token", budget="local",
                      attach=lambda model, ffn=ffn, counts=counts: attach_teal(model, thresholds, ffn,
                                                                               ctx.first_layer, counts))

    def engine_parts(self, ctx, run):
        """Every projection reads only the weight rows of its kept input channels (kernels/sparse_input.py)."""
        from ..runtime.input_sparsity import InputSparsity
        ffn = run.levels[0][0]
        if ffn <= 0:
            return "teal at sparsity 0 is the dense model"
        return {"input_sparsity": InputSparsity.from_teal(self.thresholds(ctx), ffn, ctx.view.dims.n_layers,
                                                          ctx.first_layer)}

    def evaluate(self, ctx, evaluation):
        thresholds = self.thresholds(ctx)

        def describe(handle):
            st = handle.stats()
            return {"realized_ffn_sparsity": st["realized_ffn_out_sparsity"], "realized_head_sparsity": 0.0,
                    "realized_input_sparsity": st, "weight_bytes_skipped": handle.weight_bytes_skipped()}

        for ffn, heads in self.levels(ctx):
            evaluation.run_hooks(self, (ffn, heads), lambda ffn=ffn: attach_teal(ctx.model, thresholds, ffn,
                                                                                 ctx.first_layer), describe,
                                 {"criterion": None})
