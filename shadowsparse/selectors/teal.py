"""teal: TEAL-style input-channel sparsity on every decoder projection (per-layer quantile thresholds of |x|,
calibrated on the calibration text). It gates inputs, not heads or neurons, so it brings its own hooks
(shadowsparse/teal.py) and rows: realized sparsity per input kind, bytes from the input channels skipped."""
from __future__ import annotations

import logging
import math

from ..perplexity import window_nll
from ..progress import progress
from ..teal import TealThresholds, attach_teal
from .base import Run, Selector
from .registry import register

log = logging.getLogger("shadowsparse")


@register
class Teal(Selector):
    name = "teal"
    decision = "input"  # its rows' bytes come from the hooks' own count (TealHandle.weight_bytes_skipped)
    ffn_only = True  # one sparsity for all projections; no head axis

    def thresholds(self, ctx) -> TealThresholds:
        """Calibration magnitudes per (input, layer), on the calibration text (never the evaluation windows), and
        with evaluate.teal.allocation=greedy TEAL's per-input allocation on its first windows; once per context."""
        if "teal" not in ctx.shared:
            thresholds = TealThresholds.calibrate(
                ctx.model, ctx.calib_windows(ctx.cfg.evaluate.threshold_windows), ctx.cfg.seed)
            node = ctx.cfg.evaluate.get("teal")  # absent from the configs of runs made before it existed
            if node is not None and node.allocation == "greedy":
                from ..teal_allocation import greedy_allocation
                thresholds.allocation = greedy_allocation(ctx.model, ctx.calib_windows(node.windows), thresholds,
                                                          node.step, node.max_sparsity, first_layer=ctx.first_layer)
            ctx.shared["teal"] = thresholds
        return ctx.shared["teal"]

    def runs(self, ctx):
        """For gated generation (load_gated): the hooks of one level each; evaluate() has its own loop and rows."""
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
        batch = ctx.cfg.data.eval.batch_size
        for ffn, _ in self.levels(ctx):
            with attach_teal(ctx.model, thresholds, ffn, ctx.first_layer) as handle:
                nll, n = 0.0, 0
                for ids in progress(evaluation.windows.split(batch), desc=f"teal s={ffn:.2f}", unit="batch"):
                    nll += window_nll(ctx.model, ids.to(ctx.device))
                    n += ids[:, 1:].numel()
                st = handle.stats()
                evaluation.add({**evaluation.base, "method": "teal", "criterion": None, "granularity": "token",
                                "budget": "local", "ffn_sparsity": ffn, "head_sparsity": 0.0,
                                "value": math.exp(nll / n), "realized_ffn_sparsity": st["realized_ffn_out_sparsity"],
                                "realized_head_sparsity": 0.0, "realized_input_sparsity": st,
                                "weight_bytes_skipped": handle.weight_bytes_skipped(), "n_tokens": n})
            log.info("teal s=%.2f %s ppl=%.4f (realized inputs %s)", ffn, ctx.cfg.data.eval.name, math.exp(nll / n),
                     {k: round(v, 3) for k, v in st.items()})
