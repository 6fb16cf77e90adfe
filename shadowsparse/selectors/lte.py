"""lte (Learn-To-be-Efficient): routers over k-means groups of neurons read each FFN input; the model was
fine-tuned to them in the fit stage (shadowsparse/lte/). The evaluation swaps its weights in for these rows only;
load_gated swaps them into the model it serves (a run directory's: the model load_gated loaded itself) and runs the
routers in the decode engine (runtime/ffn_select.LTEFFNSelector)."""
from __future__ import annotations

import logging

from ..gating import n_keep
from ..lte import load_lte, lte_folder
from .base import Run, Selector
from .registry import register


@register
class LTE(Selector):
    name = "lte"
    ffn_only = True  # routes FFN neurons only

    def evaluate(self, ctx, evaluation):
        lte = load_lte(lte_folder(ctx.cfg, ctx.run_dir), ctx.model)
        with lte.applied(ctx.model) as source:  # the fine-tuned weights, restored on exit
            evaluation.run(self, Run(source, self.levels(ctx), granularity="token", budget="local",
                                     selector_bytes=lte.router_bytes(ctx.model),
                                     more={"criterion": None, **lte.info()}))

    def runs(self, ctx):
        """For load_gated: the fine-tuned weights swapped into ctx.model for as long as it serves (not restored),
        and the hard router source at the requested level."""
        lte = load_lte(lte_folder(ctx.cfg, ctx.run_dir), ctx.model)
        if ctx.run_dir is None or str(ctx.run_dir) == ".":
            logging.getLogger("shadowsparse").warning(
                "lte: the LTE fine-tuned weights are swapped into the model passed to load_gated (kept there)")
        # for good, not through lte.applied: a context manager entered in this generator would be exited (the base
        # weights restored) when the generator is collected, leaving load_gated serving the base model
        source = lte.apply_(ctx.model)
        ctx.shared["lte"] = lte
        yield Run(source, self.levels(ctx), granularity="token", budget="local",
                  selector_bytes=lte.router_bytes(ctx.model), more={"criterion": None, **lte.info()})

    def engine_parts(self, ctx, run):
        """The routers in the engine: whole experts per token (route=topk); the engine keeps a fixed number of
        neurons, so the level must be whole experts."""
        from ..runtime.ffn_select import LTEFFNSelector
        lte = ctx.shared["lte"]
        # the groups and neurons a token computes: all of them, or (an MoE model) its routed experts' share
        d = ctx.view.dims
        routers, ffn = lte.routers, d.active_ffn
        groups = routers.n_experts * d.active_ffn // d.ffn
        if lte.cfg.route != "topk":
            return f"lte route={lte.cfg.route} keeps a varying number of experts per token; the engine needs topk"
        s = ctx.cfg.gating.ffn_sparsity
        k_e = n_keep(groups, s)
        if k_e * ffn // groups != n_keep(ffn, s):
            return (f"lte in the engine keeps whole experts: ffn_sparsity={s} keeps {k_e} of {groups} "
                    f"experts ({k_e * ffn // groups} neurons) but the engine keeps {n_keep(ffn, s)}; pick "
                    f"a sparsity that is a multiple of 1/{groups}")
        return {"ffn_selector": LTEFFNSelector(routers.to(ctx.device), k_e)}
