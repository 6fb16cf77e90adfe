"""gate (CATS): the gate projection runs in full and the neurons with the largest |act(gate)| are kept; up and down
then need only their rows. Gated FFNs only (SwiGLU, GeGLU; a fused gate_up's gate half)."""
from __future__ import annotations

from ..training_free import GateScores
from .base import Run, Selector
from .registry import register


@register
class Gate(Selector):
    name = "gate"
    decision = "after_gate"
    ffn_only = True

    def skip_reason(self, ctx):
        if not ctx.view.spec.glu:
            return f"gate (CATS) needs a gated FFN (SwiGLU, GeGLU); {ctx.view.spec.family} has none"
        return None

    def runs(self, ctx):
        yield Run(GateScores(), self.levels(ctx), granularity="token", budget="local", more={"criterion": None})

    def engine_parts(self, ctx, run):
        """The gate projection in full scores each gated layer's neurons (runtime/ffn_select.GateFFNSelector)."""
        from ..runtime.ffn_select import GateFFNSelector
        from ..runtime.weights import act_name
        gates = {i: ctx.view.ffn_in_rows(i)[0][0] for i in range(ctx.first_layer, ctx.view.dims.n_layers)}  # (F, d)
        return {"ffn_selector": GateFFNSelector(gates, act_name(ctx.model.config))}
