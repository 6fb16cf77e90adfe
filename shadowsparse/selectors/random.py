"""random: keeps a uniformly random (1 - s) of each gated layer's heads and neurons per token — the floor that any
selector has to beat. It decides before the block runs and reads no weights of its own."""
from __future__ import annotations

import torch

from ..gating import ScoreSource
from .base import Run, Selector
from .registry import register


class RandomScores(ScoreSource):
    """Fresh uniform scores for every forward, from one seeded generator per device (runs are reproducible)."""

    def __init__(self, seed: int):
        self.seed, self.n_heads = seed, 0
        self.generators: dict[torch.device, torch.Generator] = {}

    def attach(self, view, cfg):
        self.n_heads = view.dims.n_heads
        return []

    def _uniform(self, x: torch.Tensor, units: int) -> torch.Tensor:
        if x.device not in self.generators:
            self.generators[x.device] = torch.Generator(x.device).manual_seed(self.seed)
        return torch.rand(*x.shape[:-1], units, generator=self.generators[x.device], device=x.device)

    def heads(self, layer, x):  # x: (B, T, H*D) -> (B, T, H)
        return self._uniform(x, self.n_heads)

    def neurons(self, layer, x):  # x: (B, T, F) or (B*T, F) -> the same shape
        return self._uniform(x, x.shape[-1])


@register
class Random(Selector):
    name = "random"  # decision "early" (the default): a skipped unit saves all of its weights

    def runs(self, ctx):
        yield Run(RandomScores(ctx.cfg.seed), ctx.levels(), more={"criterion": None})
