"""FFN selectors that decide inside each gated layer, from that layer's own FFN input (B·T, d), rather than once
per step from the predictor's hidden state: the engine asks ``scores(layer, h)`` just before the FFN runs and keeps
each token's top k (the same rule as the mask path's hooks), then reads only those neurons' rows.

  SketchFFNSelector   the sketch selector (shadowsparse/selectors/verify.py, `sketch`): a packed 2/3-bit copy of
                      W_gate and W_up scores |silu(gate)·up| per neuron (kernels/sketch.py)
"""
from __future__ import annotations

import torch

from ..kernels.sketch import PackedSketch, sketch_scores, sketch_topk


class SketchFFNSelector:
    """sketches: gated layer -> its PackedSketch (on the engine's device)."""

    name = "sketch"

    def __init__(self, sketches: dict[int, PackedSketch], backend: str = "auto"):
        self.sketches, self.backend = sketches, backend

    def scores(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        """h (n, d) the normed FFN input -> (n, F) fp32 estimates of |act(gate)·up| (fp32 FFMAs on the GPU, rows
        two at a time; the torch fallback on the unpacked copy elsewhere)."""
        return sketch_scores(h, self.sketches[layer], backend=self.backend)

    def topk(self, layer: int, h: torch.Tensor, k: int) -> torch.Tensor:
        """h (1, d) -> (k,) int32 ascending: one token's k highest-scoring neurons (the bisection top-k kernel on a
        GPU: ~21 us against ~50 for torch.topk on 11008 scores, H200)."""
        return sketch_topk(h, self.sketches[layer], k, backend=self.backend)[0]

    def nbytes(self) -> int:
        """The selector's extra weight bytes (read once per step for every gated layer)."""
        return sum(p.nbytes for p in self.sketches.values())
