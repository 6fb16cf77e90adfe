"""predictor: the trained predictor of the fit stage (shared, or DejaVu-style per_layer), reading the hidden state
after its feature layer and scoring every gated layer's heads and neurons; rows are labelled by its kind and by the
criterion of the targets it was trained on (which may differ from the targets the oracle and static read)."""
from __future__ import annotations

from ..system import PREDICTOR_CKPT, load_predictor
from .base import Run, Selector
from .registry import register


@register
class Predictor(Selector):
    name = "predictor"
    needs_predictor = True

    def prepare(self, ctx):  # first: a checkpoint of another model is refused before any work
        ckpt = ctx.cfg.paths.get("predictor_ckpt") or str(ctx.run_dir / PREDICTOR_CKPT)
        ctx.shared["predictor"] = load_predictor(ckpt, ctx.model, allow_pickle=bool(ctx.cfg.paths.get("allow_pickle"))
                                                 ).to(ctx.device)

    def runs(self, ctx):
        pred = ctx.shared["predictor"]
        kind = pred.cfg.kind
        yield Run(pred, ctx.levels(), label="predictor" if kind == "shared" else kind,
                  selector_bytes=pred.n_params() * ctx.esize,
                  more={**({"criterion": crit} if (crit := pred.targets_info.get("criterion")) else {}),
                        "predictor": kind, "predictor_params": pred.n_params(),
                        "predictor_flops_per_token": pred.flops_per_token(), **ctx.extra})

    def engine_parts(self, ctx, run):
        pred = ctx.shared["predictor"]
        if pred.cfg.kind != "shared":
            return f"the decode engine runs the shared predictor, not {pred.cfg.kind} (one predictor per layer)"
        return {"predictor": pred}  # run once per step on the hidden state after its feature layer
