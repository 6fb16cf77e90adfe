"""Perplexity of a (gated) model: one method at several sparsity levels, window by window.

Levels run inside the window loop so per-window work (the oracle's dense scoring pass) is done once for all of
them; each level keeps its own NLL sum and SparsityCounter across windows.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from .gating import GatingConfig, ScoreSource, SparsityCounter, attach_gating
from .progress import progress


@dataclass
class Level:
    ffn: float  # requested FFN sparsity
    heads: float  # requested head sparsity
    nll: float = 0.0
    tokens: int = 0
    counter: SparsityCounter = field(default_factory=SparsityCounter)

    @property
    def ppl(self) -> float:
        return math.exp(self.nll / self.tokens)


@torch.no_grad()
def window_nll(model, ids: torch.Tensor) -> float:
    """Summed next-token NLL of a batch of windows (B, T)."""
    logits = model(input_ids=ids).logits  # (B, T, V)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="sum").item()


def evaluate_levels(model, windows: torch.Tensor, source: ScoreSource | None, levels: list[Level],
                    first_layer: int, granularity: str = "token", batch_size: int = 1,
                    before_batch: Callable[[torch.Tensor], None] | None = None, desc: str = "eval",
                    **gating: object) -> list[Level]:
    """Perplexity of ``model`` gated by ``source`` at every level (source None: dense). Fills and returns levels.
    Extra keyword arguments go to GatingConfig (budget, min_keep)."""
    device = next(model.parameters()).device
    levels_desc = f"{desc}, {len(levels)} level{'s' if len(levels) > 1 else ''}"
    for start in progress(range(0, len(windows), batch_size), desc=levels_desc, unit="batch"):
        ids = windows[start:start + batch_size].to(device)
        if before_batch is not None:
            before_batch(ids)  # runs with no gating hooks attached
        for lv in levels:
            if source is None:
                lv.nll += window_nll(model, ids)
            else:
                cfg = GatingConfig(ffn_sparsity=lv.ffn, head_sparsity=lv.heads, granularity=granularity,
                                   first_layer=first_layer, **gating)
                with attach_gating(model, source, cfg, counter=lv.counter):
                    lv.nll += window_nll(model, ids)
            lv.tokens += ids[:, 1:].numel()
    return levels
