"""lte (Learn-To-be-Efficient): routers over k-means groups of neurons read each FFN input; the model was
fine-tuned to them in the fit stage (shadowsparse/lte/). Its weights are swapped in for these rows only."""
from __future__ import annotations

from ..lte import load_lte, lte_folder
from .base import Run, Selector
from .registry import register


@register
class LTE(Selector):
    name = "lte"
    ffn_only = True  # routes FFN neurons only
    generates = "its fine-tuned weights are swapped in by the evaluation only; train.py evaluates it"

    def evaluate(self, ctx, evaluation):
        lte = load_lte(lte_folder(ctx.cfg, ctx.run_dir), ctx.model)
        with lte.applied(ctx.model) as source:  # the fine-tuned weights, restored on exit
            evaluation.run(self, Run(source, self.levels(ctx), granularity="token", budget="local",
                                     selector_bytes=lte.router_bytes(ctx.model),
                                     more={"criterion": None, **lte.info()}))
