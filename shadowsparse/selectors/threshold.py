"""threshold: TEAL-style per-layer magnitude thresholds on each unit's own output (|a| for neurons, the head's
contribution norm for heads), calibrated on the calibration text; realized sparsity varies per token."""
from __future__ import annotations

from ..training_free import ThresholdScores
from .base import Run, Selector
from .registry import register


@register
class Threshold(Selector):
    name = "threshold"
    decision = "late"

    def engine_parts(self, ctx, run):
        """FFN thresholds only: gate/up read in full, the down rows of neurons with |a| <= τ skipped
        (runtime/input_sparsity.py). The head thresholds (contribution norms, known after attention) have none."""
        from ..runtime.input_sparsity import InputSparsity
        ffn, heads = run.levels[0]
        if heads:
            return "threshold's head decisions (output contribution norms) have no engine path; use head_sparsity=0"
        thr = run.source._quantiles(run.source.neuron_samples, ffn)  # (L,) the hooks' own thresholds
        return {"input_sparsity": InputSparsity.from_neuron_thresholds(thr, ctx.first_layer)}

    def runs(self, ctx):  # calibrated on the calibration text, never on the evaluation windows
        source = ThresholdScores.calibrate(ctx.model, ctx.calib_windows(ctx.cfg.evaluate.threshold_windows),
                                           ctx.cfg.seed)
        yield Run(source, ctx.levels(), granularity="token", budget="local",  # per-layer thresholds are its budget
                  more={"criterion": None})
