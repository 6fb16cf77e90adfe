"""Pieces every fit shares (the shared predictor, the verify predictor, LTE): how importance scores become
regression targets, and the learning-rate schedule."""
from __future__ import annotations

import math

import torch


def normalize_scores(s: torch.Tensor, eps: float, over: str = "layer") -> torch.Tensor:
    """Standardized log scores: (N, L, U) -> (N, L, U) (any leading shape; U last).

    over="layer": mean 0 / std 1 over each (row, layer)'s U units — only the ranking within a layer is kept, which
    is all a local budget uses. over="token": over all L*U units of a row, so that scores stay comparable across
    layers, as global and hybrid budgets need. Raw scores span decades and differ between criteria; the log keeps
    the order and tames the scale.
    """
    s = s.float()
    dims = (-1,) if over == "layer" else (-2, -1)
    z = torch.log(s + eps * s.mean(dims, keepdim=True) + 1e-30)
    mean, std = z.mean(dims, keepdim=True), z.std(dims, keepdim=True)
    # a constant row (all-zero scores: e.g. a window's last token under gradient criteria, which predicts nothing)
    # has no ranking: 0, not its rounding noise (|z| * 1e-7) divided by 1e-6, which depended on the batch shape
    flat = std <= 1e-5 * (mean.abs() + 1)
    return torch.where(flat, 0.0, (z - mean) / (std + 1e-6))


def trainer_args(trainer_cfg: dict | None, also: tuple[str, ...] = ()) -> dict:
    """The device / precision / logging keys of the project's trainer config (and ``also``) for a fine-tune that
    counts its own steps (LTE, sparse distillation)."""
    keep = ("accelerator", "devices", "precision", "log_every_n_steps", "enable_progress_bar", "deterministic", *also)
    return {k: v for k, v in (trainer_cfg or {}).items() if k in keep}


def warmup_cosine(warmup: int, total: int, floor: float = 0.0):
    """LambdaLR factor: linear warm-up over ``warmup`` steps (none for 0), then cosine decay from 1 to ``floor`` at
    ``total``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor
