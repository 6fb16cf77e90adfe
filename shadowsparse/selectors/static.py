"""static: one mask for every input, from the calibration-average importance of the collected targets."""
from __future__ import annotations

from ..gating import StaticScores
from ..targets import mean_scores
from .base import Run, Selector
from .registry import register


@register
class Static(Selector):
    name = "static"
    needs_targets = True

    def runs(self, ctx):
        source = StaticScores(*mean_scores(ctx.targets_dir, ctx.model))  # (L, H), (L, F): streamed, not loaded whole
        yield Run(source, ctx.levels(), granularity=None)

    def engine_parts(self, ctx, run):
        """The same per-layer means as fixed scores in the predictor's place (runtime/fixed_scores.py)."""
        from ..runtime.fixed_scores import FixedScores
        return {"predictor": FixedScores(run.source._heads, run.source._neurons, ctx.first_layer)}
