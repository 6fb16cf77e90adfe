"""Registry of importance criteria for attention heads and FFN neurons.

A criterion turns what the gating hook points see into one score per head (B, T, H) and per neuron (B, T, F). The
collector hands it a ``Signals`` record per hook point:

  x   the hooked input: the out-projection input (B, T, H*D) or the down-projection input a (B, T, F)
  g   ∂L/∂x                                        (needs "grad")
  gm  ∂L/∂m for a multiplicative unit mask m = 1    (needs "mask_grad"): Σ_d x·g per head, a·g per neuron
  hgm (H_m ∂L/∂m), a Hessian-vector product in mask space (needs "hvp", a double backward)

L is the summed next-token cross-entropy of the window, so a token's gradient carries its effect on the loss of
every later token.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .arch import head_contribution_norm
from .errors import ConfigError


@dataclass
class Signals:
    x: torch.Tensor
    g: torch.Tensor | None = None
    gm: torch.Tensor | None = None  # (B, T, H) for heads, like x for neurons
    hgm: torch.Tensor | None = None


class Criterion:
    name: str = ""
    needs: frozenset = frozenset()  # subset of {"grad", "mask_grad", "hvp"}

    @property
    def needs_grad(self) -> bool:
        return bool(self.needs)

    def neuron(self, s: Signals) -> torch.Tensor:
        """-> (B, T, F)."""
        raise NotImplementedError

    def head(self, s: Signals, o_weight: torch.Tensor, n_heads: int) -> torch.Tensor:
        """o_weight: (d_model, H*D) -> (B, T, H)."""
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

    def neuron(self, s):
        return s.x.float().abs()

    def head(self, s, o_weight, n_heads):
        return head_contribution_norm(s.x, o_weight, n_heads)


@register
class L2Norm(Criterion):
    """Forward only. Neuron: |a_f| (a scalar's L2 norm). Head: ‖x_h‖₂, the norm of the head's output before W_o."""

    name = "l2_norm"

    def neuron(self, s):
        return s.x.float().abs()

    def head(self, s, o_weight, n_heads):
        return _per_head(s.x.float(), n_heads).norm(dim=-1)


@register
class PlainAct(Criterion):
    """ShadowLLM's `plainact`: |a · ∂L/∂a|. Neuron: |a_f g_f|. Head: Σ_d |x_hd g_hd| over the head's D channels."""

    name = "plainact"
    needs = frozenset({"grad"})

    def neuron(self, s):
        return (s.x.float() * s.g.float()).abs()

    def head(self, s, o_weight, n_heads):
        return _per_head((s.x.float() * s.g.float()).abs(), n_heads).sum(-1)


@register
class GradNorm(Criterion):
    """‖∂L/∂a‖. Neuron: |g_f|. Head: ‖g_h‖₂ over the head's D channels."""

    name = "grad_norm"
    needs = frozenset({"grad"})

    def neuron(self, s):
        return s.g.float().abs()

    def head(self, s, o_weight, n_heads):
        return _per_head(s.g.float(), n_heads).norm(dim=-1)


@register
class Snip(Criterion):
    """SNIP: |∂L/∂m · m| with a multiplicative mask m = 1 on each unit: |a_f g_f| per neuron, |Σ_d x_hd g_hd| per
    head (signed contributions of a head's channels can cancel, unlike plainact's Σ|x g|)."""

    name = "snip"
    needs = frozenset({"mask_grad"})

    def neuron(self, s):
        return s.gm.float().abs()

    def head(self, s, o_weight, n_heads):
        return s.gm.float().abs()


@register
class Fisher(Criterion):
    """Fisher: (∂L/∂m)² for a unit mask m = 1 — the diagonal empirical Fisher of the mask. Accumulated over tokens
    by the collector's aggregation (sequence granularity: the mean over the window)."""

    name = "fisher"
    needs = frozenset({"mask_grad"})

    def neuron(self, s):
        return s.gm.float().pow(2)

    def head(self, s, o_weight, n_heads):
        return s.gm.float().pow(2)


@register
class Grasp(Criterion):
    """GraSP: −(H g) ⊙ m in mask space, with g = ∂L/∂m and H the Hessian of L w.r.t. m, at m = 1 (one
    Hessian-vector product by double backward). Large positive values mark units whose removal would most reduce
    gradient flow; ShadowLLM's implementation of it is marked wrong in its own code — this one is tested against
    an explicit double backward."""

    name = "grasp"
    needs = frozenset({"mask_grad", "hvp"})

    def neuron(self, s):
        return -s.hgm.float()

    def head(self, s, o_weight, n_heads):
        return -s.hgm.float()
