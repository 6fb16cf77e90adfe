"""Sparsity patterns and the masks that realize them.

A pattern is ``unstructured:<ratio>`` (any fraction of each matrix zeroed) or ``N:M`` (at most N non-zeros in every
group of M consecutive weights along the input dimension, i.e. the layout sparse tensor cores and a 2:4 GEMV read).
Masks are boolean "keep" tensors shaped like the weight (out, in).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError


@dataclass(frozen=True)
class Pattern:
    ratio: float  # fraction of weights zeroed (N:M: 1 - N/M)
    n: int | None = None  # N:M: non-zeros kept per group
    m: int | None = None  # N:M: group length along the input dimension

    @property
    def is_nm(self) -> bool:
        return self.n is not None

    @property
    def label(self) -> str:
        """The results.jsonl ``nm`` field."""
        return f"{self.n}:{self.m}" if self.is_nm else f"unstructured:{self.ratio:g}"

    @classmethod
    def parse(cls, text: str | None, ratio: float | None = None) -> "Pattern":
        """'2:4' / '4:8' (N:M), 'unstructured:0.5', or 'unstructured' with ``ratio``."""
        text = str(text or "unstructured").strip()
        if text.startswith("unstructured"):
            _, _, value = text.partition(":")
            r = float(value) if value else ratio
            if r is None or not 0.0 <= float(r) < 1.0:
                raise ConfigError(f"unstructured sparsity must be in [0, 1) (the fraction zeroed), got {r!r}; "
                                  "write e.g. sparsity.pattern=unstructured:0.5")
            return cls(ratio=float(r))
        try:
            n, m = (int(v) for v in text.split(":"))
        except ValueError:
            raise ConfigError(f"unknown sparsity pattern {text!r}; use 'N:M' (e.g. 2:4, 4:8) or 'unstructured:0.5'")
        if not 0 < n < m:
            raise ConfigError(f"N:M pattern needs 0 < N < M, got {n}:{m}; e.g. 2:4 keeps 2 of every 4 weights")
        return cls(ratio=1.0 - n / m, n=n, m=m)

    def check_fits(self, in_features: int, name: str) -> None:
        if self.is_nm and in_features % self.m:
            raise ConfigError(f"{name} has {in_features} input features, not a multiple of M={self.m}: "
                              f"{self.label} cannot tile it; pick M dividing {in_features}")


def nm_keep(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the N highest scores in every group of M along the last dim. scores (O, I) -> bool (O, I)."""
    o, i = scores.shape
    groups = scores.reshape(o, i // m, m)
    top = groups.topk(n, dim=-1).indices
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, top, True)
    return keep.reshape(o, i)


def row_keep(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    """Zero round(ratio * I) lowest scores of every output row (Wanda's comparison group). (O, I) -> bool."""
    o, i = scores.shape
    drop = int(round(ratio * i))
    keep = torch.ones_like(scores, dtype=torch.bool)
    if drop:
        keep.scatter_(1, scores.topk(drop, dim=1, largest=False).indices, False)
    return keep


def matrix_keep(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    """Zero round(ratio * numel) lowest scores of the whole matrix (classic layer-wise magnitude pruning)."""
    drop = int(round(ratio * scores.numel()))
    keep = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    if drop:
        keep[scores.flatten().topk(drop, largest=False).indices] = False
    return keep.view_as(scores)


def keep_mask(scores: torch.Tensor, pattern: Pattern, ratio: float, group: str = "row") -> torch.Tensor:
    """The mask a metric's scores give under a pattern; ``ratio`` is this matrix's allocated sparsity
    (unstructured only); ``group`` is where unstructured scores compete: 'row' or 'matrix'."""
    if pattern.is_nm:
        return nm_keep(scores, pattern.n, pattern.m)
    return row_keep(scores, ratio) if group == "row" else matrix_keep(scores, ratio)


@torch.no_grad()
def apply_mask_(weight: torch.Tensor, keep: torch.Tensor) -> None:
    """Zero the weights outside ``keep`` in place (the bias is untouched). weight: (O, I), the parameter or a view of
    it (ModelView.weight: a Conv1D's transpose), keep: bool (O, I)."""
    weight.mul_(keep.to(weight.dtype))


def nm_counts(weight: torch.Tensor, m: int) -> torch.Tensor:
    """Non-zeros in every group of M along the input dim: (O, I) -> (O, I // M)."""
    return (weight != 0).reshape(weight.shape[0], -1, m).sum(-1)
