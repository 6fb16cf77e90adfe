"""teal: TEAL-style input-channel sparsity on every decoder projection (per-layer quantile thresholds of |x|,
calibrated on the calibration text). It gates inputs, not heads or neurons, so it brings its own hooks
(shadowsparse/teal.py) and rows: realized sparsity per input kind, bytes from the input channels skipped."""
from __future__ import annotations

import logging
import math

from ..perplexity import window_nll
from ..progress import progress
from ..teal import TealThresholds, attach_teal
from .base import Selector
from .registry import register

log = logging.getLogger("shadowsparse")


@register
class Teal(Selector):
    name = "teal"
    decision = "input"  # its rows' bytes come from the hooks' own count (TealHandle.weight_bytes_skipped)
    ffn_only = True  # one sparsity for all projections; no head axis
    generates = "it brings hooks of its own (input channels, not heads or neurons); train.py evaluates it"

    def evaluate(self, ctx, evaluation):
        thresholds = TealThresholds.calibrate(ctx.model, ctx.calib_windows(ctx.cfg.evaluate.threshold_windows),
                                              ctx.cfg.seed)
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
            log.info("teal s=%.2f wikitext ppl=%.4f (realized inputs %s)", ffn, math.exp(nll / n),
                     {k: round(v, 3) for k, v in st.items()})
