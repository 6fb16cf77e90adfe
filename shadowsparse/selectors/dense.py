"""dense: the ungated model, the reference every row is compared with."""
from __future__ import annotations

from .base import Run, Selector
from .registry import register


@register
class Dense(Selector):
    name = "dense"

    def runs(self, ctx):
        yield Run(None, levels=[(0.0, 0.0)], granularity=None, budget=None, more={"criterion": None})

    def engine_parts(self, ctx, run):
        return {}  # the engine's own dense step
