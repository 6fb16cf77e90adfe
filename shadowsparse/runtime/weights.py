"""Pull a loaded Hugging Face causal LM's weights into the layout the decode engine reads.

Layout choices (why):
  - q, k and v are fused into one (H·D + 2·KV·D, d) matrix: the dense step reads them in one GEMV, and the gated
    step slices it into W_q (rows of query heads, gathered per selected head) and W_kv (always dense: every token's
    K/V enter the cache, so a head skipped now and selected later still finds its keys and values). Phi-3's
    qkv_proj already is this matrix (used as is); its fused gate_up_proj is read as two row views, gate [0, F) and
    up [F, 2F).
  - the out-projection and the FFN down projection are also stored transposed, (H·D, d) and (F, d): a head or a
    neuron is then a block of contiguous rows, which the gathered kernels read. The dense path multiplies by the
    model's own (d, H·D) and (d, F) tensors, the layout cuBLAS's GEMV streams fastest: the baseline is not slowed
    down by the layout the sparse path needs.
  - everything else (gate/up or fc1, norms, embeddings, lm_head) is the model's own tensor, not copied; except
    Gemma's RMSNorm weights, stored as the factor 1 + w in fp32 (d floats per norm), the product GemmaRMSNorm forms.

Families ("llama" below is the engine's structure: RMSNorm, RoPE, a gated or plain FFN): Llama, Mistral, Qwen2,
Qwen3 (RMSNorm over each q and k head before RoPE), Phi-3 (fused q/k/v and gate/up), Gemma (1 + w norms, embeddings
scaled by sqrt(d), GeGLU with the tanh gelu, head_dim free of d / heads); and OPT. Anything else is refused by
extract_weights with the reason (the mask path, shadowsparse.attach_gating, serves every registered family).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..arch import ModelView
from ..errors import ConfigError

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "opt")
# config activation name -> the kernels' (kernels/ffn.ACTIVATIONS); gelu_pytorch_tanh: Gemma's GeGLU
ACTS = {"silu": "silu", "swish": "silu", "relu": "relu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh"}


@dataclass
class LayerWeights:
    norm1_w: torch.Tensor  # (d,) RMSNorm / LayerNorm before attention (OPT 350m-style: after); Gemma: 1 + w, fp32
    norm1_b: torch.Tensor | None  # (d,) LayerNorm bias (OPT)
    qkv_w: torch.Tensor  # (H*D + 2*KV*D, d) rows: q heads, then k heads, then v heads
    qkv_b: torch.Tensor | None  # (H*D + 2*KV*D,)
    o_w: torch.Tensor  # (d, H*D) the model's out projection (dense path: cuBLAS's best layout for a GEMV)
    o_t: torch.Tensor  # (H*D, d) out projection transposed: head h is rows h*D .. h*D+D-1 (gated path)
    o_b: torch.Tensor | None  # (d,)
    norm2_w: torch.Tensor  # (d,)
    norm2_b: torch.Tensor | None
    w_in: torch.Tensor  # (F, d) gate_proj (Llama), rows [0, F) of gate_up_proj (Phi-3) or fc1 (OPT)
    w_up: torch.Tensor | None  # (F, d) up_proj (Llama), rows [F, 2F) of gate_up_proj (Phi-3), None for OPT
    b_in: torch.Tensor | None  # (F,) fc1 bias (OPT)
    down_w: torch.Tensor  # (d, F) the model's down_proj / fc2 (dense path)
    down_t: torch.Tensor  # (F, d) down_proj / fc2 transposed: neuron f is row f (gated path)
    b_out: torch.Tensor | None  # (d,) fc2 bias (OPT)
    q_norm_w: torch.Tensor | None = None  # (D,) Qwen3: RMSNorm weight over each query head, before RoPE
    k_norm_w: torch.Tensor | None = None  # (D,) Qwen3: the same over each key head

    def q_w(self, n_q: int) -> torch.Tensor:
        return self.qkv_w[:n_q]  # contiguous row range: a view, no copy

    def kv_w(self, n_q: int) -> torch.Tensor:
        return self.qkv_w[n_q:]


@dataclass
class EngineWeights:
    family: str  # "llama" (RMSNorm, RoPE, SwiGLU/GeGLU, GQA: every family but OPT) or "opt" (LayerNorm, learned
    # positions, ReLU); model_type below names the model's own family
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden: int
    ffn: int
    vocab: int
    act: str  # FFN activation: silu / relu / gelu / gelu_tanh
    eps: float  # norm epsilon
    embed: torch.Tensor  # (V, d_embed)
    lm_head: torch.Tensor  # (V, d_out)
    final_norm_w: torch.Tensor | None  # (d,) (Gemma: 1 + w, fp32)
    final_norm_b: torch.Tensor | None
    layers: list[LayerWeights] = field(default_factory=list)
    rope_theta: float = 10000.0  # llama: default RoPE base
    pos_embed: torch.Tensor | None = None  # OPT: (max_pos + 2, d) learned positions, offset 2
    project_in: torch.Tensor | None = None  # OPT: (d, d_embed) when word_embed_proj_dim != hidden
    project_out: torch.Tensor | None = None  # OPT: (d_embed, d)
    norm_before: bool = True  # OPT: do_layer_norm_before (False for opt-350m)
    max_positions: int = 2048
    sliding_window: int | None = None  # Mistral-style local attention: exact in the engine while max_len <= this
    model_type: str = ""  # config.model_type: llama, mistral, qwen2, qwen3, phi3, gemma, opt
    embed_scale: torch.Tensor | None = None  # Gemma: sqrt(d) as a 0-dim tensor in the embedding's dtype (the
    # model scales the embedding rows by it, rounded in that dtype; the tied lm_head reads the unscaled rows)

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
    partial = params.get("partial_rotary_factor", getattr(cfg, "partial_rotary_factor", None))
    if partial is not None and partial != 1:
        raise ConfigError(f"partial rotary embeddings (partial_rotary_factor={partial}: RoPE on the first "
                          f"{partial:.0%} of each head's dims, e.g. Phi-4-mini) are not implemented in the decode "
                          "engine, whose RoPE kernels (kernels/rope_norm.rope_, kernels/kv_window) rotate whole "
                          "heads; use the mask path (shadowsparse.attach_gating) for this model")
    return float(params.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))


def _norm_factor(norm: nn.Module, unit_offset: bool) -> torch.Tensor:
    """(d,) what an RMSNorm multiplies the normalized row by: its weight (the model's tensor), or for Gemma 1 + w in
    fp32 (GemmaRMSNorm forms x̂ · (1 + w.float()) in fp32 and rounds once; kernels/rope_norm.rms_norm takes that
    order for an fp32 weight)."""
    return 1.0 + norm.weight.float() if unit_offset else norm.weight


def _check_attention(model: nn.Module, view: ModelView) -> None:
    """Refuse what the engine's attention would compute differently: bidirectional attention (Gemma's embedding
    variant) or a score scale other than head_dim ** -0.5."""
    cfg, D = model.config, view.dims.head_dim
    if getattr(cfg, "use_bidirectional_attention", None):
        raise ConfigError(f"'{cfg.model_type}' with use_bidirectional_attention=True (an encoder, not a causal LM) "
                          "is not served by the decode engine, which attends causally; load the causal model")
    scaling = getattr(getattr(view.layer(0), "self_attn", None), "scaling", None)
    if isinstance(scaling, float) and abs(scaling - D ** -0.5) > 1e-9 * D ** -0.5:
        raise ConfigError(f"attention scale {scaling} differs from head_dim ** -0.5 = {D ** -0.5} (head_dim {D}); "
                          "the decode engine scales scores by head_dim ** -0.5 only: use the mask path "
                          "(shadowsparse.attach_gating) for this model")


def _embed_scale(model: nn.Module, cfg) -> torch.Tensor | None:
    """Gemma's embedding multiplier sqrt(d), a 0-dim tensor in the embedding's dtype, made as the loaded
    transformers makes it (GemmaTextScaledWordEmbedding's fp32 buffer cast to the weight's dtype, or older
    GemmaModel's torch.tensor(d ** 0.5, dtype=...)); None for other families."""
    if cfg.model_type != "gemma":
        return None
    emb = model.get_input_embeddings()
    buf = getattr(emb, "embed_scale", None)
    if isinstance(buf, torch.Tensor):
        return buf.to(device=emb.weight.device, dtype=emb.weight.dtype)
    return torch.tensor(cfg.hidden_size ** 0.5, dtype=emb.weight.dtype, device=emb.weight.device)


def _opt(t: nn.Module | None, name: str):
    return None if t is None else getattr(t, name, None)


def extract_weights(model: nn.Module) -> EngineWeights:
    """Read a loaded model (eval, any dtype, one device) into EngineWeights. Copies only fused qkv (not Phi-3's, fused
    already), o.T, down.T (and Gemma's 1 + w norm factors)."""
    cfg = model.config
    if cfg.model_type not in SUPPORTED:
        raise ConfigError(f"the decode engine supports {', '.join(SUPPORTED)}, not '{cfg.model_type}'; use the mask "
                          "path (shadowsparse.attach_gating, or load_gated(..., engine='hooks')) for other "
                          "architectures")
    view = ModelView(model)
    dims = view.dims
    _check_attention(model, view)
    if getattr(cfg, "mlp_bias", False):
        raise ConfigError("mlp_bias=True (biases on gate/up) is not supported by the decode engine")
    # a sliding window only changes attention at positions beyond it: the engine refuses a max_len above it
    window = getattr(cfg, "sliding_window", None) if getattr(cfg, "use_sliding_window", True) else None
    devices = {p.device for p in model.parameters()}
    if len(devices) != 1:
        raise ConfigError(f"the decode engine needs the model on one device, found {sorted(map(str, devices))}")
    family = "opt" if cfg.model_type == "opt" else "llama"
    rope_theta = _rope_theta(cfg) if family == "llama" else 10000.0  # refused RoPE variants before any copy
    unit_offset = cfg.model_type == "gemma"  # RMSNorm scales by 1 + w (_norm_factor)
    spec = view.spec
    lm_head = model.get_output_embeddings().weight
    common = dict(family=family, n_layers=dims.n_layers, n_heads=dims.n_heads, n_kv_heads=dims.n_kv_heads,
                  head_dim=dims.head_dim, hidden=dims.hidden, ffn=dims.ffn, vocab=lm_head.shape[0],
                  act=act_name(cfg), embed=model.get_input_embeddings().weight, lm_head=lm_head,
                  max_positions=getattr(cfg, "max_position_embeddings", 2048), sliding_window=window,
                  model_type=cfg.model_type, embed_scale=_embed_scale(model, cfg))
    layers = []
    with torch.no_grad():
        for i in range(dims.n_layers):
            layer = view.layer(i)
            if spec.qkv == "fused":  # Phi-3's qkv_proj: q heads, k heads, v heads, the engine's layout already
                m = view.module(i, spec.attn_in[0])
                qkv_w, qkv_b = m.weight, m.bias
            else:
                qkv = [view.module(i, p) for p in spec.attn_in]
                qkv_w = torch.cat([m.weight for m in qkv]).contiguous()
                qkv_b = torch.cat([m.bias for m in qkv]).contiguous() if qkv[0].bias is not None else None
            o, down = view.attn_out(i), view.ffn_down(i)  # o_proj / out_proj, down_proj / fc2
            if family == "llama":
                n1, n2 = layer.input_layernorm, layer.post_attention_layernorm
                (w_in, _), (w_up, _) = view.ffn_in_rows(i)  # gate, up (F, d): row views of a fused gate_up
                b_in = None
            else:
                n1, n2 = layer.self_attn_layer_norm, layer.final_layer_norm
                w_in, w_up, b_in = layer.fc1.weight, None, layer.fc1.bias
            q_norm, k_norm = (getattr(layer.self_attn, name, None) for name in ("q_norm", "k_norm"))  # Qwen3
            layers.append(LayerWeights(
                norm1_w=_norm_factor(n1, unit_offset), norm1_b=_opt(n1, "bias"), qkv_w=qkv_w, qkv_b=qkv_b,
                o_w=o.weight, o_t=o.weight.t().contiguous(), o_b=o.bias, norm2_w=_norm_factor(n2, unit_offset),
                norm2_b=_opt(n2, "bias"), w_in=w_in, w_up=w_up, b_in=b_in, down_w=down.weight,
                down_t=down.weight.t().contiguous(), b_out=down.bias, q_norm_w=_opt(q_norm, "weight"),
                k_norm_w=_opt(k_norm, "weight")))
    if family == "llama":
        inner = model.model
        return EngineWeights(**common, eps=cfg.rms_norm_eps, final_norm_w=_norm_factor(inner.norm, unit_offset),
                             final_norm_b=None, layers=layers, rope_theta=rope_theta)
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
