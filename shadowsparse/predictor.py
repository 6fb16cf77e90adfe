"""Plain nn.Module predictors (no Lightning here). They read one early hidden state per token and emit raw scores
for every layer's heads (B, T, L, H) and neurons (B, T, L, F); higher = more important. Only the ranking within a
(token, layer) row matters to the gating hooks.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass
class PredictorConfig:
    kind: str = "shared"  # predictor family; the spine ships the ShadowLLM-style shared MLP
    hidden: int = 1024  # trunk width
    depth: int = 2  # trunk Linear+GELU blocks
    rank: int = 64  # neuron head: per-layer code of this size times a (L, rank, F) table, instead of hidden x L*F
    dropout: float = 0.0


class SharedPredictor(nn.Module):
    """ShadowLLM's shared predictor: one MLP from the hidden state after ``feature_layer`` to all layers' scores.

    neurons[l, f] = <z_l, E[l, :, f]> + b[l, f], with z = U · trunk(x) reshaped to (L, rank): the factorized output
    keeps the head at L*rank*(hidden + F) parameters instead of hidden*L*F.
    """

    def __init__(self, d_model: int, n_layers: int, n_heads: int, ffn: int, feature_layer: int,
                 cfg: PredictorConfig | None = None):
        super().__init__()
        cfg = cfg or PredictorConfig()
        self.cfg = cfg
        self.dims = dict(d_model=d_model, n_layers=n_layers, n_heads=n_heads, ffn=ffn, feature_layer=feature_layer)
        self.feature_layer = feature_layer
        blocks: list[nn.Module] = [nn.LayerNorm(d_model)]
        width = d_model
        for _ in range(cfg.depth):
            blocks += [nn.Linear(width, cfg.hidden), nn.GELU(), nn.Dropout(cfg.dropout)]
            width = cfg.hidden
        self.trunk = nn.Sequential(*blocks)
        self.head_out = nn.Linear(width, n_layers * n_heads)
        self.neuron_code = nn.Linear(width, n_layers * cfg.rank)
        self.neuron_table = nn.Parameter(torch.randn(n_layers, cfg.rank, ffn) / cfg.rank ** 0.5)
        self.neuron_bias = nn.Parameter(torch.zeros(n_layers, ffn))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (..., d_model) -> heads (..., L, H), neurons (..., L, F)."""
        L, H = self.dims["n_layers"], self.dims["n_heads"]
        h = self.trunk(x.to(self.head_out.weight.dtype))
        heads = self.head_out(h).unflatten(-1, (L, H))
        z = self.neuron_code(h).unflatten(-1, (L, self.cfg.rank))  # (..., L, r)
        neurons = torch.einsum("...lr,lrf->...lf", z, self.neuron_table) + self.neuron_bias
        return heads, neurons

    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self) -> int:
        """Multiply-adds x2 of one token's prediction (LayerNorm and activations ignored)."""
        mats = [m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear)]
        return 2 * (sum(mats) + self.neuron_table.numel())

    def export(self) -> dict:
        return {"dims": self.dims, "cfg": asdict(self.cfg)}


PREDICTORS = {"shared": SharedPredictor}


def build_predictor(kind: str, **kwargs) -> nn.Module:
    from .errors import ConfigError
    if kind not in PREDICTORS:
        raise ConfigError(f"predictor '{kind}' is not registered; choose one of {sorted(PREDICTORS)}")
    return PREDICTORS[kind](**kwargs)
