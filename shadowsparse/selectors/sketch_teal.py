"""sketch_teal: one selector per sub-block, as the decode engine runs them together — sketch_threshold on the FFN
(the sketch's estimate of |act(gate)·up| against each layer's calibrated threshold, at the level's FFN sparsity)
and teal on the attention inputs (q/k/v's input and o's input zeroed below their per-layer |x| quantiles at
evaluate.teal.sketch_attn). FFN levels only; the bytes of a row are the FFN's (the sketch's decision, its copy
charged) plus the attention projections' skipped input columns (teal's count)."""
from __future__ import annotations

from ..accounting import weight_bytes_skipped
from ..gating import GatingConfig, HookHandle, SparsityCounter, attach_gating
from ..teal import TealThresholds, attach_teal
from .base import Run
from .registry import register
from .teal import calibration
from .verify import SketchThreshold

ATTN = ("attn_in", "attn_out")  # the inputs teal thresholds here (runtime/input_sparsity.INPUTS names)


class SketchTealHandle(HookHandle):
    """The two handles of one attachment: the sketch's gating hooks (FFN) and teal's (attention inputs)."""

    def __init__(self, gating, teal):
        self.gating, self.teal = gating, teal
        self._hooks = []  # each handle owns its own

    def remove(self) -> None:
        self.gating.remove()
        self.teal.remove()

    def stats(self) -> dict:
        """The FFN's realized sparsity (per layer too) and the attention inputs'."""
        teal = self.teal.stats()
        return {**self.gating.stats(), **{f"realized_{n}_sparsity": teal[f"realized_{n}_sparsity"] for n in ATTN}}


@register
class SketchTeal(SketchThreshold):
    name = "sketch_teal"
    decision = "input"  # its rows' bytes come from the two handles' counts (sketch FFN + teal attention)

    def attn_sparsity(self, ctx) -> float:
        node = ctx.cfg.evaluate.get("teal")  # absent from the configs of runs made before it existed
        return float(node.get("sketch_attn", 0.3)) if node is not None else 0.3

    def teal_thresholds(self, ctx) -> TealThresholds:
        """|x| calibration magnitudes per (input, layer) on the calibration text, uniform (no allocation): the
        calibration teal takes too, once per context."""
        return calibration(ctx)

    def attach(self, ctx, ffn: float, counter: SparsityCounter | None = None, counts: dict | None = None,
               model=None):
        """Both hook sets on ``model`` (default ctx.model; another: a copy of it, e.g. a student trained through
        these decisions) at FFN sparsity ``ffn`` (counter / counts: shared by several attachments, so that stats()
        covers every call of gated generation)."""
        model = ctx.model if model is None else model
        source, thresholds = self.threshold_source(ctx), self.teal_thresholds(ctx)
        gating = attach_gating(model, source, GatingConfig(ffn_sparsity=ffn, head_sparsity=0.0,
                                                           first_layer=ctx.first_layer), counter=counter)
        try:
            teal = attach_teal(model, thresholds, self.attn_sparsity(ctx), ctx.first_layer, counts, inputs=ATTN)
        except BaseException:
            gating.remove()
            raise
        return SketchTealHandle(gating, teal)

    def runs(self, ctx):
        """For gated generation (load_gated): one level each, the hooks attached per call (evaluate() attaches
        fresh hooks per row: Evaluation.run_hooks)."""
        source = self.threshold_source(ctx)
        for ffn, heads in self.levels(ctx):
            counter, counts = SparsityCounter(), {"zeros": {}, "rows": {}}
            yield Run(source, [(ffn, heads)], granularity="token", budget="local",
                      attach=lambda model, ffn=ffn, counter=counter, counts=counts: self.attach(ctx, ffn, counter,
                                                                                                 counts, model))

    def engine_parts(self, ctx, run):
        """sketch_threshold's FFN selector and teal's thresholds on the attention inputs: the engine reads the gate/up
        rows of the neurons that pass, the down rows of the nonzero activations, and the q/k/v and o rows of the
        kept input channels (runtime/input_sparsity.py)."""
        from ..runtime.input_sparsity import InputSparsity
        parts = super().engine_parts(ctx, run)
        if isinstance(parts, str):
            return parts
        parts["input_sparsity"] = InputSparsity.from_teal(self.teal_thresholds(ctx), self.attn_sparsity(ctx),
                                                          ctx.view.dims.n_layers, ctx.first_layer, inputs=ATTN)
        return parts

    def evaluate(self, ctx, evaluation):
        sel_bytes = self.selector_bytes(ctx)

        def describe(handle):
            st = handle.stats()
            return {"realized_ffn_sparsity": st["realized_ffn_sparsity"], "realized_head_sparsity": 0.0,
                    "realized_input_sparsity": {f"realized_{k}_sparsity": st[f"realized_{k}_sparsity"] for k in ATTN},
                    "realized_candidate_sparsity": st["realized_ffn_sparsity"],  # the kept set is the candidates
                    "weight_bytes_skipped": weight_bytes_skipped(ctx.view, "verify", {
                        **st, "realized_candidate_sparsity": st["realized_ffn_sparsity"]}, sel_bytes)
                    + handle.teal.weight_bytes_skipped()}

        for ffn, heads in self.levels(ctx):
            evaluation.run_hooks(self, (ffn, heads), lambda ffn=ffn: self.attach(ctx, ffn), describe,
                                 {"criterion": None, "attn_sparsity": self.attn_sparsity(ctx),
                                  **self.variant_fields(ctx)})
