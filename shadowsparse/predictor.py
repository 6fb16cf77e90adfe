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
    kind: str = "shared"  # "shared" (ShadowLLM: one MLP from an early layer) or "per_layer" (DejaVu)
    hidden: int = 1024  # shared: trunk width
    depth: int = 2  # shared: trunk Linear+GELU blocks
    rank: int = 64  # shared: neuron code size per layer; per_layer: bottleneck width of each layer's MLP
    dropout: float = 0.0
    lookahead: int = 0  # per_layer: layer l reads the input of layer l - lookahead (DejaVu overlaps it with l - 1)


class SharedPredictor(nn.Module):
    """ShadowLLM's shared predictor: one MLP from the hidden state after ``feature_layer`` to all layers' scores.

    neurons[l, f] = <z_l, E[l, :, f]> + b[l, f], with z = U · trunk(x) reshaped to (L, rank): the factorized output
    keeps the head at L*rank*(hidden + F) parameters instead of hidden*L*F.
    """

    input_key = "features"  # which targets tensor it reads: (N, d_model)

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


class PerLayerPredictor(nn.Module):
    """DejaVu-style: a small bottleneck MLP per layer reading that layer's input hidden state (or, with lookahead k,
    the input of layer l - k), emitting layer l's head and neuron scores. All layers' weights are stacked so that
    training runs every layer in one batched einsum; at inference each layer is predicted from its own hook.
    """

    input_key = "layer_inputs"  # (N, L, d_model): the input of every decoder layer

    def __init__(self, d_model: int, n_layers: int, n_heads: int, ffn: int, feature_layer: int,
                 cfg: PredictorConfig | None = None):
        super().__init__()
        cfg = cfg or PredictorConfig(kind="per_layer", rank=128)
        self.cfg = cfg
        self.dims = dict(d_model=d_model, n_layers=n_layers, n_heads=n_heads, ffn=ffn, feature_layer=feature_layer)
        self.feature_layer = feature_layer
        L, r = n_layers, cfg.rank
        self.norm_weight = nn.Parameter(torch.ones(L, d_model))
        self.w_in = nn.Parameter(torch.randn(L, d_model, r) / d_model ** 0.5)
        self.b_in = nn.Parameter(torch.zeros(L, r))
        self.w_out = nn.Parameter(torch.randn(L, r, n_heads + ffn) / r ** 0.5)
        self.b_out = nn.Parameter(torch.zeros(L, n_heads + ffn))
        # layer l reads source layer max(0, l - lookahead)
        self.register_buffer("source", (torch.arange(L) - cfg.lookahead).clamp(min=0), persistent=False)

    def _mlp(self, x: torch.Tensor, layers: slice | int) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (..., l, d) for the layers selected -> heads (..., l, H), neurons (..., l, F)."""
        x = torch.nn.functional.rms_norm(x.to(self.w_in.dtype), (x.shape[-1],)) * self.norm_weight[layers]
        h = torch.nn.functional.gelu(torch.einsum("...ld,ldr->...lr", x, self.w_in[layers]) + self.b_in[layers])
        out = torch.einsum("...lr,lro->...lo", h, self.w_out[layers]) + self.b_out[layers]
        H = self.dims["n_heads"]
        return out[..., :H], out[..., H:]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (..., L, d_model) every layer's input -> heads (..., L, H), neurons (..., L, F)."""
        return self._mlp(x.index_select(-2, self.source), slice(None))

    def predict_layer(self, layer: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (..., d_model), the input of layer ``layer - lookahead`` -> heads (..., H), neurons (..., F)."""
        h, n = self._mlp(x.unsqueeze(-2), slice(layer, layer + 1))
        return h.squeeze(-2), n.squeeze(-2)

    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self) -> int:
        return 2 * (self.w_in.numel() + self.w_out.numel())

    def export(self) -> dict:
        return {"dims": self.dims, "cfg": asdict(self.cfg)}


PREDICTORS = {"shared": SharedPredictor, "per_layer": PerLayerPredictor}


def build_predictor(kind: str, **kwargs) -> nn.Module:
    from .errors import ConfigError
    if kind not in PREDICTORS:
        raise ConfigError(f"predictor '{kind}' is not registered; choose one of {sorted(PREDICTORS)}")
    return PREDICTORS[kind](**kwargs)
