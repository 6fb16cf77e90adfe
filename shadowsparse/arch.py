"""Per-architecture spec: where decoder layers, the attention out-projection and the FFN down-projection live.

Shapes (heads, kv-heads, head_dim, FFN width) are read from ``model.config`` and checked against the weights, never
taken from YAML. The hook points are the *inputs* of the out-projection (all query heads side by side, (B, T, H*D))
and of the down-projection (the FFN activation, (B, T, F)): one place per layer where a head or a neuron can be
skipped, for every family below.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .errors import ConfigError


@dataclass(frozen=True)
class ArchSpec:
    family: str  # "llama" (SwiGLU, GQA) or "opt" (ReLU, MHA)
    layers_path: str  # dotted path from the CausalLM to the ModuleList of decoder layers
    attn_out: str  # dotted path inside a layer: the attention output projection (gate its input per head)
    ffn_down: str  # dotted path inside a layer: the FFN down projection (gate its input per neuron)
    ffn_in: tuple[str, ...]  # FFN input projections whose rows a skipped neuron need not read (gate+up, or fc1)
    attn_in: tuple[str, ...]  # q/k/v projections, for the byte accounting of skipped heads
    glu: bool  # SwiGLU-style FFN (gate * up) or a plain activation
    ffn_gate: str | None = None  # the gate projection of a GLU FFN (its activation is CATS' selector)
    ffn_act: str | None = None  # the activation module applied to the gate


# model_type -> spec. Llama-family models share module names; add a row to support a new family.
_LLAMA = ArchSpec("llama", "model.layers", "self_attn.o_proj", "mlp.down_proj", ("mlp.gate_proj", "mlp.up_proj"),
                  ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), True, "mlp.gate_proj", "mlp.act_fn")
_OPT = ArchSpec("opt", "model.decoder.layers", "self_attn.out_proj", "fc2", ("fc1",),
                ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), False)
ARCHS: dict[str, ArchSpec] = {
    "llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA, "qwen3": _LLAMA, "smollm3": _LLAMA, "olmo2": _LLAMA,
    "opt": _OPT,
}


@dataclass(frozen=True)
class ModelDims:
    n_layers: int
    n_heads: int  # query heads per layer
    n_kv_heads: int
    head_dim: int
    hidden: int
    ffn: int  # FFN width (neurons per layer)


def _get(module: nn.Module, dotted: str) -> nn.Module:
    for part in dotted.split("."):
        module = getattr(module, part)
    return module


class ModelView:
    """Read-only view of a causal LM through its ArchSpec: layers, hook modules and dimensions."""

    def __init__(self, model: nn.Module):
        model_type = getattr(model.config, "model_type", None)
        if model_type not in ARCHS:
            raise ConfigError(
                f"architecture '{model_type}' is not registered; supported: {sorted(ARCHS)}. "
                "Add an ArchSpec row in shadowsparse/arch.py for its module names.")
        self.model = model
        self.spec = ARCHS[model_type]
        self.layers: nn.ModuleList = _get(model, self.spec.layers_path)
        self.dims = self._read_dims(model.config)

    def _read_dims(self, cfg) -> ModelDims:
        n_heads = cfg.num_attention_heads
        hidden = cfg.hidden_size
        head_dim = getattr(cfg, "head_dim", None) or hidden // n_heads
        n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
        ffn = getattr(cfg, "intermediate_size", None) or getattr(cfg, "ffn_dim")
        dims = ModelDims(len(self.layers), n_heads, n_kv, head_dim, hidden, ffn)
        # The config is the source of truth, but a mismatch with the weights means the spec is wrong.
        o = self.attn_out(0).weight
        d = self.ffn_down(0).weight
        if o.shape[1] != n_heads * head_dim or d.shape[1] != ffn:
            raise ConfigError(f"config of '{cfg.model_type}' disagrees with its weights: o_proj {tuple(o.shape)}, "
                              f"down {tuple(d.shape)} vs heads*head_dim={n_heads * head_dim}, ffn={ffn}")
        return dims

    def layer(self, i: int) -> nn.Module:
        return self.layers[i]

    def attn_out(self, i: int) -> nn.Linear:
        return _get(self.layers[i], self.spec.attn_out)

    def ffn_down(self, i: int) -> nn.Linear:
        return _get(self.layers[i], self.spec.ffn_down)

    def module(self, i: int, path: str) -> nn.Module:
        return _get(self.layers[i], path)

    def config_fingerprint(self) -> dict:
        d = self.dims
        return {"model_type": self.model.config.model_type, "n_layers": d.n_layers, "n_heads": d.n_heads,
                "n_kv_heads": d.n_kv_heads, "head_dim": d.head_dim, "hidden": d.hidden, "ffn": d.ffn}


def head_contribution_norm(x: torch.Tensor, o_weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """‖W_o[:, h] · x_h‖ per head: how much each head adds to the residual stream.

    x: (..., H*D) out-projection input; o_weight: (d_model, H*D). Returns (..., H).
    """
    head_dim = x.shape[-1] // n_heads
    xh = x.unflatten(-1, (n_heads, head_dim))  # (..., H, D)
    w = o_weight.unflatten(1, (n_heads, head_dim)).to(x.dtype)  # (d_model, H, D)
    contrib = torch.einsum("...hd,ohd->...ho", xh, w)  # (..., H, d_model)
    return contrib.float().norm(dim=-1)


