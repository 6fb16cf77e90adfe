"""Pull a loaded Hugging Face causal LM's weights into the layout the decode engine reads.

Layout choices (why):
  - q, k and v are fused into one (H·D + 2·KV·D, d) matrix: the dense step reads them in one GEMV, and the gated
    step slices it into W_q (rows of query heads, gathered per selected head) and W_kv (always dense: every token's
    K/V enter the cache, so a head skipped now and selected later still finds its keys and values).
  - the out-projection and the FFN down projection are also stored transposed, (H·D, d) and (F, d): a head or a
    neuron is then a block of contiguous rows, which the gathered kernels read. The dense path multiplies by the
    model's own (d, H·D) and (d, F) tensors, the layout cuBLAS's GEMV streams fastest: the baseline is not slowed
    down by the layout the sparse path needs.
  - everything else (gate/up or fc1, norms, embeddings, lm_head) is the model's own tensor, not copied.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..arch import ModelView
from ..errors import ConfigError

SUPPORTED = ("llama", "mistral", "qwen2", "opt")
ACTS = {"silu": "silu", "swish": "silu", "relu": "relu", "gelu": "gelu"}


@dataclass
class LayerWeights:
    norm1_w: torch.Tensor  # (d,) RMSNorm / LayerNorm before attention (OPT 350m-style: after)
    norm1_b: torch.Tensor | None  # (d,) LayerNorm bias (OPT)
    qkv_w: torch.Tensor  # (H*D + 2*KV*D, d) rows: q heads, then k heads, then v heads
    qkv_b: torch.Tensor | None  # (H*D + 2*KV*D,)
    o_w: torch.Tensor  # (d, H*D) the model's out projection (dense path: cuBLAS's best layout for a GEMV)
    o_t: torch.Tensor  # (H*D, d) out projection transposed: head h is rows h*D .. h*D+D-1 (gated path)
    o_b: torch.Tensor | None  # (d,)
    norm2_w: torch.Tensor  # (d,)
    norm2_b: torch.Tensor | None
    w_in: torch.Tensor  # (F, d) gate_proj (Llama) or fc1 (OPT)
    w_up: torch.Tensor | None  # (F, d) up_proj (Llama), None for OPT
    b_in: torch.Tensor | None  # (F,) fc1 bias (OPT)
    down_w: torch.Tensor  # (d, F) the model's down_proj / fc2 (dense path)
    down_t: torch.Tensor  # (F, d) down_proj / fc2 transposed: neuron f is row f (gated path)
    b_out: torch.Tensor | None  # (d,) fc2 bias (OPT)

    def q_w(self, n_q: int) -> torch.Tensor:
        return self.qkv_w[:n_q]  # contiguous row range: a view, no copy

    def kv_w(self, n_q: int) -> torch.Tensor:
        return self.qkv_w[n_q:]


@dataclass
class EngineWeights:
    family: str  # "llama" (RMSNorm, RoPE, SwiGLU, GQA) or "opt" (LayerNorm, learned positions, ReLU)
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden: int
    ffn: int
    vocab: int
    act: str  # FFN activation: silu / relu / gelu
    eps: float  # norm epsilon
    embed: torch.Tensor  # (V, d_embed)
    lm_head: torch.Tensor  # (V, d_out)
    final_norm_w: torch.Tensor | None  # (d,)
    final_norm_b: torch.Tensor | None
    layers: list[LayerWeights] = field(default_factory=list)
    rope_theta: float = 10000.0  # llama: default RoPE base
    pos_embed: torch.Tensor | None = None  # OPT: (max_pos + 2, d) learned positions, offset 2
    project_in: torch.Tensor | None = None  # OPT: (d, d_embed) when word_embed_proj_dim != hidden
    project_out: torch.Tensor | None = None  # OPT: (d_embed, d)
    norm_before: bool = True  # OPT: do_layer_norm_before (False for opt-350m)
    max_positions: int = 2048

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.dtype

    @property
    def device(self) -> torch.device:
        return self.lm_head.device

    def decoder_bytes(self) -> dict:
        """Bytes of one token's dense weight reads, by part (the bandwidth accounting of the benchmark)."""
        el = self.lm_head.element_size()
        d, D, H, KV, F_ = self.hidden, self.head_dim, self.n_heads, self.n_kv_heads, self.ffn
        n_in = 2 if self.family == "llama" else 1
        per_layer = {"q": H * D * d, "kv": 2 * KV * D * d, "o": H * D * d, "ffn": (n_in + 1) * F_ * d}
        out = {k: v * el * self.n_layers for k, v in per_layer.items()}
        out["lm_head"] = self.lm_head.numel() * el
        return out


def act_name(cfg) -> str:
    name = getattr(cfg, "hidden_act", None) or getattr(cfg, "activation_function", None)
    if name not in ACTS:
        raise ConfigError(f"FFN activation '{name}' is not supported by the decode engine; supported: {sorted(ACTS)}")
    return ACTS[name]


def _rope_theta(cfg) -> float:
    params = getattr(cfg, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise ConfigError(f"RoPE type '{rope_type}' is not implemented in the decode engine (only 'default'); "
                          "benchmark a model with default RoPE or add the scaling in shadowsparse/runtime/ops.py")
    return float(params.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))


def _opt(t: nn.Module | None, name: str):
    return None if t is None else getattr(t, name, None)


def extract_weights(model: nn.Module) -> EngineWeights:
    """Read a loaded model (eval, any dtype, one device) into EngineWeights. Copies only fused qkv, o.T, down.T."""
    cfg = model.config
    if cfg.model_type not in SUPPORTED:
        raise ConfigError(f"the decode engine supports {SUPPORTED}, not '{cfg.model_type}'; use the mask path "
                          "(shadowsparse.attach_gating) for other architectures")
    view = ModelView(model)
    dims = view.dims
    if getattr(cfg, "mlp_bias", False):
        raise ConfigError("mlp_bias=True (biases on gate/up) is not supported by the decode engine")
    window = getattr(cfg, "sliding_window", None)
    if window is not None and getattr(cfg, "use_sliding_window", True):
        raise ConfigError(f"sliding-window attention (window {window}) is not implemented in the decode engine; "
                          "load the model with sliding_window=None")
    devices = {p.device for p in model.parameters()}
    if len(devices) != 1:
        raise ConfigError(f"the decode engine needs the model on one device, found {sorted(map(str, devices))}")
    family = "opt" if cfg.model_type == "opt" else "llama"
    lm_head = model.get_output_embeddings().weight
    common = dict(family=family, n_layers=dims.n_layers, n_heads=dims.n_heads, n_kv_heads=dims.n_kv_heads,
                  head_dim=dims.head_dim, hidden=dims.hidden, ffn=dims.ffn, vocab=lm_head.shape[0],
                  act=act_name(cfg), embed=model.get_input_embeddings().weight, lm_head=lm_head,
                  max_positions=getattr(cfg, "max_position_embeddings", 2048))
    layers = []
    with torch.no_grad():
        for i in range(dims.n_layers):
            layer = view.layer(i)
            att = layer.self_attn
            qkv = [att.q_proj, att.k_proj, att.v_proj]
            qkv_w = torch.cat([m.weight for m in qkv]).contiguous()
            qkv_b = torch.cat([m.bias for m in qkv]).contiguous() if att.q_proj.bias is not None else None
            if family == "llama":
                o = att.o_proj
                n1, n2 = layer.input_layernorm, layer.post_attention_layernorm
                w_in, w_up, b_in, down = layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight, None, layer.mlp.down_proj
            else:
                o = att.out_proj
                n1, n2 = layer.self_attn_layer_norm, layer.final_layer_norm
                w_in, w_up, b_in, down = layer.fc1.weight, None, layer.fc1.bias, layer.fc2
            layers.append(LayerWeights(
                norm1_w=n1.weight, norm1_b=_opt(n1, "bias"), qkv_w=qkv_w, qkv_b=qkv_b,
                o_w=o.weight, o_t=o.weight.t().contiguous(), o_b=o.bias, norm2_w=n2.weight, norm2_b=_opt(n2, "bias"),
                w_in=w_in, w_up=w_up, b_in=b_in, down_w=down.weight, down_t=down.weight.t().contiguous(),
                b_out=down.bias))
    if family == "llama":
        inner = model.model
        return EngineWeights(**common, eps=cfg.rms_norm_eps, final_norm_w=inner.norm.weight, final_norm_b=None,
                             layers=layers, rope_theta=_rope_theta(cfg))
    dec = model.model.decoder
    fnorm = dec.final_layer_norm
    if not cfg.layer_norm_elementwise_affine:
        raise ConfigError("OPT with layer_norm_elementwise_affine=False is not supported by the decode engine")
    return EngineWeights(**common, eps=view.layer(0).self_attn_layer_norm.eps,
                         final_norm_w=_opt(fnorm, "weight"), final_norm_b=_opt(fnorm, "bias"), layers=layers,
                         pos_embed=dec.embed_positions.weight,
                         project_in=None if dec.project_in is None else dec.project_in.weight,
                         project_out=None if dec.project_out is None else dec.project_out.weight,
                         norm_before=cfg.do_layer_norm_before)
