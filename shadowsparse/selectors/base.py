"""What a selector is to the evaluation: the Selector base class, one evaluated variant (Run), and the context a
selector is built from (EvalContext).

A selector decides, per token, which heads and FFN neurons of each gated layer to skip. To the mask path (the
reference, shadowsparse/gating.py) it is a ScoreSource; to the evaluation it is a Selector subclass registered under
its method name (``@register`` in registry.py), which says
  - ``decision``: when it decides, hence what a skip saves (shadowsparse/accounting.py, docs/design.md);
  - ``ffn_only``: whether it has a head axis (levels with head sparsity are skipped for it, with a log line);
  - ``skip_reason(ctx)``: why it cannot run on this model/config (logged, no row), e.g. a SwiGLU-only method on OPT;
  - ``prepare(ctx)``: work done before any evaluation (load a checkpoint and refuse one of another model);
  - ``runs(ctx)``: the variants to evaluate, each a ScoreSource with its levels and the fields its rows carry;
  - ``engine_parts(ctx, run)``: how the decode engine runs it (really skipping the work), or why it cannot.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator

import torch

from ..arch import ModelView
from ..config import ffn_only_levels, gating_levels, window_spec
from ..data import token_windows
from ..gating import ScoreSource

SAME = "same"  # Run.task_source: lm-eval tasks use the run's own source
CONFIG = "config"  # Run.granularity / Run.budget: the configured gating.granularity / gating.budget


@dataclass
class EvalContext:
    """Everything a selector may be built from. ``shared`` caches work that several selectors reuse (the sketch's
    low-bit copies and calibration Hessians, the loaded predictor)."""

    cfg: Any  # the composed config
    model: torch.nn.Module
    tok: Any
    view: ModelView
    run_dir: Path
    targets_dir: Path
    methods: list[str]  # every method of this evaluation, in order
    first_layer: int = 0  # every method gates the same layers: those after the predictor's feature layer
    info: dict = field(default_factory=dict)  # criterion and feature_layer of what was collected / trained
    extra: dict = field(default_factory=dict)  # fit metrics the predictor rows carry
    shared: dict = field(default_factory=dict)
    calib: torch.Tensor | None = None  # (N, T) calibration token ids given by the caller (load_gated), else the
    # configured calibration text

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def esize(self) -> int:
        """Bytes per weight of the model (a selector's own bytes are charged in these units)."""
        return next(self.model.parameters()).element_size()

    def levels(self) -> list[tuple[float, float]]:
        return gating_levels(self.cfg)

    def ffn_levels(self, method: str) -> list[tuple[float, float]]:
        return ffn_only_levels(self.cfg, method)

    def calib_windows(self, n: int) -> torch.Tensor:
        """The first n windows of the calibration text (N, T): selectors calibrate here, never on the evaluation."""
        if self.calib is not None:
            return self.calib[:n]
        return token_windows(self.tok, window_spec(self.cfg.data.calib), "data.calib")[:n]


@dataclass
class Run:
    """One evaluated variant of a selector: its ScoreSource at some levels, and what its rows carry."""

    source: ScoreSource | None  # None: the dense model
    levels: list[tuple[float, float]]
    granularity: str | None = CONFIG  # None labels selectors with no per-input choice (dense, static); their hooks
    # still run per token
    budget: str | None = CONFIG
    selector_bytes: int = 0  # the selector's own weight bytes per token (charged in weight_bytes_skipped)
    before_batch: Callable[[torch.Tensor], None] | None = None  # per evaluation batch, before the gated passes
    task_source: Any = SAME  # the source inside lm-eval (None: no task rows for this run)
    stats_extra: Callable[[float], dict] | None = None  # counts the source keeps itself, by ffn level
    more: dict = field(default_factory=dict)  # extra row fields
    label: str | None = None  # the rows' method name, when not the selector's own
    attach: Callable[[torch.nn.Module], Any] | None = None  # a selector with hooks of its own (teal): attaches
    # them to the model at this run's level and returns the handle (a context manager with stats()); source is None


class Selector:
    """Base class of every evaluation method; subclasses are registered with ``@register`` (registry.py)."""

    name: ClassVar[str] = ""
    decision: ClassVar[str] = "early"  # accounting.DECISIONS: early | after_gate | late | verify | gate_verify
    ffn_only: ClassVar[bool] = False  # no head axis: levels with head sparsity get no row
    needs_targets: ClassVar[bool] = False  # reads the collected targets (their manifest names the criterion)
    needs_predictor: ClassVar[bool] = False  # reads the fit stage's predictor (no such method: the fit is skipped)
    generates: ClassVar[str | None] = None  # why load_gated cannot serve it (None: it can, through runs())

    def skip_reason(self, ctx: EvalContext) -> str | None:
        return None

    def prepare(self, ctx: EvalContext) -> None:
        """Runs for every configured selector before the first evaluation (cheap checks, checkpoint loading)."""

    def levels(self, ctx: EvalContext) -> list[tuple[float, float]]:
        return ctx.ffn_levels(self.name) if self.ffn_only else ctx.levels()

    def runs(self, ctx: EvalContext) -> Iterator[Run]:
        raise NotImplementedError

    def engine_parts(self, ctx: EvalContext, run: Run) -> dict | str:
        """What the decode engine (shadowsparse/runtime) needs to run this selector: DecodeEngine keyword arguments
        (``predictor=``, ``ffn_selector=``, ``input_sparsity=``), or a string saying why it cannot (the mask path
        serves it then). ``run`` is the first of runs(ctx), at the level load_gated asked for."""
        return f"{self.name} has no decode-engine path yet"

    def evaluate(self, ctx: EvalContext, evaluation) -> None:
        """Evaluates every run through the shared mask-path loop (``evaluation``: shadowsparse.evaluate.Evaluation);
        a selector with hooks of its own (teal) or a context to hold (lte) overrides this."""
        for run in self.runs(ctx):
            evaluation.run(self, run)
