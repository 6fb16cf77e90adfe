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

    def runs(self, ctx):  # calibrated on the calibration text, never on the evaluation windows
        source = ThresholdScores.calibrate(ctx.model, ctx.calib_windows(ctx.cfg.evaluate.threshold_windows),
                                           ctx.cfg.seed)
        yield Run(source, ctx.levels(), granularity="token", budget="local",  # per-layer thresholds are its budget
                  more={"criterion": None})
