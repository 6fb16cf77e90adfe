"""Registry of importance criteria for attention heads and FFN neurons.

A criterion turns what the gating hook points see — the out-projection input x (B, T, H*D) and the down-projection
input a (B, T, F), plus, for gradient criteria, ∂L/∂x and ∂L/∂a — into one score per head (B, T, H) and per neuron
(B, T, F). L is the summed next-token cross-entropy of the window, so a token's gradient carries its effect on the
loss of every later token.
"""
from __future__ import annotations

from typing import Callable

import torch

from .arch import head_contribution_norm
from .errors import ConfigError


class Criterion:
    name: str = ""
    needs_grad: bool = False  # True: the collector runs a backward pass through the frozen model

    def neuron(self, a: torch.Tensor, g: torch.Tensor | None) -> torch.Tensor:
        """a, g: (B, T, F) -> (B, T, F)."""
        raise NotImplementedError

    def head(self, x: torch.Tensor, g: torch.Tensor | None, o_weight: torch.Tensor, n_heads: int) -> torch.Tensor:
        """x, g: (B, T, H*D); o_weight: (d_model, H*D) -> (B, T, H)."""
        raise NotImplementedError


CRITERIA: dict[str, Callable[[], Criterion]] = {}


def register(cls):
    CRITERIA[cls.name] = cls
    return cls


def get_criterion(name: str) -> Criterion:
    if name not in CRITERIA:
        raise ConfigError(f"criterion '{name}' is not registered; choose one of {sorted(CRITERIA)}")
    return CRITERIA[name]()


def _per_head(t: torch.Tensor, n_heads: int) -> torch.Tensor:
    return t.unflatten(-1, (n_heads, t.shape[-1] // n_heads))  # (B, T, H, D)


@register
class Activation(Criterion):
    """Forward only (DejaVu's labels). Neuron: |a_f|. Head: ‖W_o[:, h] x_h‖₂, the head's contribution to the
    residual stream (a head whose output is large but lies in W_o's near-null space contributes nothing)."""

    name = "activation"

    def neuron(self, a, g):
        return a.float().abs()

    def head(self, x, g, o_weight, n_heads):
        return head_contribution_norm(x, o_weight, n_heads)


@register
class PlainAct(Criterion):
    """ShadowLLM's `plainact`: |a · ∂L/∂a|. Neuron: |a_f g_f|. Head: Σ_d |x_hd g_hd| over the head's D channels."""

    name = "plainact"
    needs_grad = True

    def neuron(self, a, g):
        return (a.float() * g.float()).abs()

    def head(self, x, g, o_weight, n_heads):
        return _per_head((x.float() * g.float()).abs(), n_heads).sum(-1)
