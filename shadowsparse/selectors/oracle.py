"""oracle: the true criterion scores of the very tokens evaluated, from a dense pass before each batch: the upper
bound of any predictor of that criterion."""
from __future__ import annotations

import logging

from ..criteria import get_criterion
from ..gating import TensorScores
from ..targets import score_window
from ..training_free import LiveActivationScores
from .base import Run, Selector
from .registry import register

log = logging.getLogger("shadowsparse")


@register
class Oracle(Selector):
    name = "oracle"
    decision = "late"  # it reads the units' own outputs: only the down columns / o columns are saved
    needs_targets = True
    generates = "it needs a dense pass over the very tokens it gates (an upper bound, not a selector)"

    def runs(self, ctx):
        crit = get_criterion(ctx.info["criterion"])
        sequence = ctx.cfg.gating.granularity == "sequence"
        oracle = TensorScores()

        def score(ids):  # (B, T): the true criterion scores of these tokens, with no gating hooks attached
            heads, neurons, _, _ = score_window(ctx.model, crit, ids)
            if sequence:
                heads, neurons = heads.mean(1, keepdim=True), neurons.mean(1, keepdim=True)
            oracle.set(heads, neurons)
        live = LiveActivationScores() if ctx.info["criterion"] == "activation" else None  # lm-eval runs its batches
        if live is None and ctx.cfg.evaluate.get("tasks"):
            log.warning("oracle on lm-eval tasks needs the activation criterion (read live); skipped for %s",
                        ctx.info["criterion"])
        yield Run(oracle, ctx.levels(), before_batch=score, task_source=live)
