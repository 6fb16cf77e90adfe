"""Stage 4, evaluate: every configured method (a registered selector, shadowsparse/selectors/) at every sparsity
level -> rows of results.jsonl (perplexity on the evaluation windows, and lm-eval tasks when configured).

The loop knows no method by name: each selector says which levels it serves, why it skips a model, and what its
rows carry; the rows' common fields (docs/design.md, results.jsonl) are filled here.
"""
from __future__ import annotations

import contextlib
import logging
import math
from pathlib import Path

from .accounting import weight_bytes_skipped
from .arch import ModelView
from .config import window_spec
from .data import token_windows
from .gating import GatingConfig, SparsityCounter, attach_gating
from .perplexity import Level, evaluate_levels, window_nll
from .progress import progress
from .errors import ConfigError
from .report import PARTIAL_RESULTS, append_result, publish_results
from .selectors import EvalContext, Run, Selector, get_selector
from .selectors.base import CONFIG, SAME
from .targets import read_manifest
from .tasks import evaluate_tasks

log = logging.getLogger("shadowsparse")


def collection_info(ctx: EvalContext, selectors: list[Selector]) -> dict:
    """Criterion and feature layer of what is gated: from the targets when a method reads them, else from the
    trained predictor's checkpoint, else (training-free methods alone) from the configured targets."""
    if any(s.needs_targets for s in selectors):
        return read_manifest(ctx.targets_dir)
    if "predictor" in ctx.shared:
        return ctx.shared["predictor"].targets_info
    return {"criterion": ctx.cfg.targets.criterion, "feature_layer": ctx.cfg.targets.feature_layer}


def check_same_layers(ctx: EvalContext, selectors: list[Selector]) -> None:
    """Every method gates the layers after one feature layer: refuse (before any row) a trained predictor whose
    feature layer is not that of the targets the other methods read."""
    pred = ctx.shared.get("predictor")
    if pred is None or pred.feature_layer == ctx.info["feature_layer"]:
        return
    readers = [s.name for s in selectors if s.needs_targets]
    fl, tl = pred.feature_layer, ctx.info["feature_layer"]
    raise ConfigError(f"the predictor '{getattr(pred, 'source_path', None) or 'predictor'}' reads the hidden state "
                      f"after layer {fl} (trained with targets.feature_layer={fl}), but {', '.join(readers)} read(s) "
                      f"the targets at '{ctx.targets_dir}', collected after layer {tl}; every method gates the same "
                      f"layers, so collect the targets with targets.feature_layer={fl} (or point paths.targets_dir "
                      f"at such targets), or evaluate {', '.join(readers)} without this predictor")


class Evaluation:
    """The rows of one evaluation stage: runs a selector's Runs through the mask path and records their rows.
    Selectors with hooks of their own (teal) use ``windows``, ``row`` and ``add`` directly."""

    def __init__(self, ctx: EvalContext, static: dict | None, windows=None):
        cfg = ctx.cfg
        self.ctx, self.cfg, self.view = ctx, cfg, ctx.view
        # (N, T): the pipeline cuts them before the model loads (a text too short is refused before any work)
        self.windows = windows if windows is not None else token_windows(ctx.tok, window_spec(cfg.data.eval),
                                                                         "data.eval")
        self.tasks = list(cfg.evaluate.get("tasks") or [])
        self.base = {"criterion": ctx.info["criterion"], "nm": None, "granularity": cfg.gating.granularity,
                     "dataset": cfg.data.eval.name, "metric": "ppl", "model": cfg.llm.name,
                     "first_gated_layer": ctx.first_layer, "seed": cfg.seed, **(static or {})}
        self.rows: list[dict] = []

    def add(self, row: dict) -> None:
        append_result(self.ctx.run_dir, row)
        self.rows.append(row)

    def row(self, selector: Selector, run: Run, level: Level | tuple, counter: SparsityCounter, dataset: str,
            metric: str, value: float, n_tokens: int | None, more: dict) -> dict:
        """One row from the masks a run applied (realized sparsity counted, not assumed)."""
        ffn, heads = (level.ffn, level.heads) if isinstance(level, Level) else level
        d = self.view.dims
        stats = counter.stats(d.n_heads, d.active_ffn, d.n_kv_heads)  # MoE: of the routed neurons
        if run.stats_extra is not None:  # counts a source keeps itself (predict-then-verify: candidate sparsity)
            stats.update(run.stats_extra(ffn))
            more = {**more, **{k: v for k, v in stats.items() if k.startswith("realized_candidate")}}
        return {**self.base, "method": run.label or selector.name, "granularity": self._granularity(run),
                "budget": self._budget(run), "ffn_sparsity": ffn, "head_sparsity": heads, "dataset": dataset,
                "metric": metric, "value": value, "realized_ffn_sparsity": stats["realized_ffn_sparsity"],
                "realized_head_sparsity": stats["realized_head_sparsity"],
                "weight_bytes_skipped": weight_bytes_skipped(self.view, selector.decision, stats, run.selector_bytes),
                "n_tokens": n_tokens, **more}

    def _granularity(self, run: Run) -> str | None:
        return self.cfg.gating.granularity if run.granularity == CONFIG else run.granularity

    def _budget(self, run: Run) -> str | None:
        return self.cfg.gating.budget if run.budget == CONFIG else run.budget

    def gating_kw(self, run: Run) -> dict:
        return dict(budget=self._budget(run) or "local", min_keep=self.cfg.gating.min_keep)

    def run(self, selector: Selector, run: Run) -> None:
        """Perplexity of one run at every level, then its lm-eval task rows."""
        levels = [Level(f, h) for f, h in run.levels]
        evaluate_levels(self.ctx.model, self.windows, run.source, levels, self.ctx.first_layer,
                        self._granularity(run) or "token", self.cfg.data.eval.batch_size,
                        before_batch=run.before_batch, desc=run.label or selector.name, **self.gating_kw(run))
        for lv in levels:
            self._log(self.row(selector, run, lv, lv.counter, self.cfg.data.eval.name, "ppl", lv.ppl, lv.tokens,
                               run.more))
        task_source = run.source if run.task_source == SAME else run.task_source
        if self.tasks and (task_source is not None or run.source is None):
            self._tasks(selector, run, levels, task_source)

    def _tasks(self, selector: Selector, run: Run, levels: list[Level], task_source) -> None:
        limit = self.cfg.evaluate.task_limit
        for lv in levels:
            counter = SparsityCounter()
            gcfg = GatingConfig(ffn_sparsity=lv.ffn, head_sparsity=lv.heads, granularity=self._granularity(run) or
                                "token", first_layer=self.ctx.first_layer, **self.gating_kw(run))
            with (attach_gating(self.ctx.model, task_source, gcfg, counter=counter) if task_source is not None
                  else contextlib.nullcontext()):
                results = evaluate_tasks(self.ctx.model, self.ctx.tok, self.tasks, limit=limit,
                                         batch_size=self.cfg.evaluate.task_batch_size)
            for task, res in results.items():
                for metric, value in res.items():
                    if metric != "n":
                        self._log(self.row(selector, run, lv, counter, task, metric, value, None,
                                           {**run.more, "n_examples": res["n"], "task_limit": limit}))

    def run_hooks(self, selector: Selector, level: tuple, attach, describe, more: dict | None = None) -> None:
        """One level of a selector with hooks of its own (teal, sketch_teal): perplexity on the evaluation windows,
        then the lm-eval task rows when configured, each through a fresh attachment so that each row's realized
        sparsity counts its own tokens. attach() -> a handle (context manager); describe(handle) -> the row's
        measured fields (realized_ffn_sparsity, realized_head_sparsity, weight_bytes_skipped, ...)."""
        ffn, heads = level
        model, batch = self.ctx.model, self.cfg.data.eval.batch_size
        base = {**self.base, "method": selector.name, "granularity": "token", "budget": "local",
                "ffn_sparsity": ffn, "head_sparsity": heads, **(more or {})}
        with attach() as handle:
            nll, n = 0.0, 0
            for ids in progress(self.windows.split(batch), desc=f"{selector.name} s={ffn:.2f}", unit="batch"):
                nll += window_nll(model, ids.to(self.ctx.device))
                n += ids[:, 1:].numel()
            fields = describe(handle)
        self._log({**base, "dataset": self.cfg.data.eval.name, "metric": "ppl", "value": math.exp(nll / n),
                   "n_tokens": n, **fields})
        if not self.tasks:
            return
        limit = self.cfg.evaluate.task_limit
        with attach() as handle:
            results = evaluate_tasks(model, self.ctx.tok, self.tasks, limit=limit,
                                     batch_size=self.cfg.evaluate.task_batch_size)
            fields = describe(handle)
        for task, res in results.items():
            for metric, value in res.items():
                if metric != "n":
                    self._log({**base, "dataset": task, "metric": metric, "value": value, "n_tokens": None,
                               "n_examples": res["n"], "task_limit": limit, **fields})

    def _log(self, row: dict) -> None:
        self.add(row)
        log.info("%s ffn=%.2f heads=%.2f %s %s=%.4f (realized ffn %.3f, heads %.3f)", row["method"],
                 row["ffn_sparsity"], row["head_sparsity"], row["dataset"], row["metric"], row["value"],
                 row["realized_ffn_sparsity"], row["realized_head_sparsity"])


def stage_evaluate(cfg, model, tok, targets_dir: Path, run_dir: Path, extra: dict,
                   static: dict | None = None, windows=None) -> list[dict]:
    """Every configured method's rows, in the configured order; ``static`` (from the sparsify stage) labels them
    with the static mask under them; ``windows``: the evaluation windows, if already cut. The rows go to
    results.jsonl.partial as they finish and become results.jsonl when the stage is over (replacing an earlier
    run's in this folder); a refusal (ConfigError) removes them, a crash leaves them in the .partial file."""
    partial = Path(run_dir) / PARTIAL_RESULTS
    partial.unlink(missing_ok=True)  # rows of a run killed in this folder: not this run's
    try:
        rows = _evaluate(cfg, model, tok, targets_dir, run_dir, extra, static, windows)
    except ConfigError:
        partial.unlink(missing_ok=True)
        raise
    except BaseException:
        if partial.exists():
            log.warning("evaluation stopped: its finished rows are in %s (results.jsonl not written)", partial)
        raise
    publish_results(run_dir)
    return rows


def _evaluate(cfg, model, tok, targets_dir, run_dir, extra, static, windows) -> list[dict]:
    methods = list(cfg.evaluate.methods)
    selectors = [get_selector(m) for m in methods]
    ctx = EvalContext(cfg=cfg, model=model, tok=tok, view=ModelView(model), run_dir=Path(run_dir),
                      targets_dir=Path(targets_dir), methods=methods, extra=extra)
    for sel in selectors:  # before any work: e.g. a predictor checkpoint of another model is refused here
        sel.prepare(ctx)
    ctx.info = collection_info(ctx, selectors)
    ctx.first_layer = ctx.info["feature_layer"] + 1  # every method gates the same layers: those after the feature
    check_same_layers(ctx, selectors)
    evaluation = Evaluation(ctx, static, windows)
    for sel in selectors:
        reason = sel.skip_reason(ctx)
        if reason:
            log.warning("%s: skipped (%s)", sel.name, reason)
            continue
        sel.evaluate(ctx, evaluation)
    return evaluation.rows
