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
scaled by sqrt(d), GeGLU with the tanh gelu, head_dim free of d / heads), Gemma-2 (Gemma's, plus sandwich norms: the
attention and FFN outputs normed before the residual add, soft-capped attention and final logits, a score scale of
query_pre_attn_scalar ** -0.5), Gemma-3 text (Gemma-2's without soft-caps, with Qwen3-style q/k norms of
factor 1 + w and a RoPE base per layer type); and OPT. Sliding-window layers (Mistral v0.1's every layer, Gemma-2's
local ones, Qwen2's above max_window_layers where enabled) attend only to their window, as transformers' sliding
mask. Mixture-of-experts FFNs (Mixtral; Qwen3-MoE, with Qwen3's q/k norms) are stacked on one neuron axis as the mask
path has them (moe.py), neuron e·F + f being neuron f of expert e: gate and up are read in place from transformers'
(E, 2F, d) gate_up_proj (w_in its (2·E·F, d) view, w_up the same view F rows further: neuron e·F + f's gate and up
are row e·2F + f of each, moe_in_rows), the down projection is one transposed copy down_t (E·F, d) (down_w its
view); the model's own router module picks each token's experts and weights in the step (DecodeEngine._ffn_moe).
The engine thus adds the down projections' bytes (a third of the experts) to the model's. Anything else is refused
by extract_weights with the reason (the mask path, shadowsparse.attach_gating, serves every registered family).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..arch import ModelView
from ..errors import ConfigError
from ..moe import router_of

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "gemma3_text", "mixtral", "qwen3_moe",
             "opt")
GEMMA = ("gemma", "gemma2", "gemma3_text")  # RMSNorm factors 1 + w (q/k norms too), embeddings scaled by sqrt(d)
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
    post_attn_norm_w: torch.Tensor | None = None  # (d,) Gemma-2: RMSNorm of the attention output before the add
    post_ffn_norm_w: torch.Tensor | None = None  # (d,) Gemma-2: the same for the FFN output (both 1 + w, fp32)
    router: nn.Module | None = None  # MoE: the model's top-k router, x (N, d) -> (logits, weights (N, k), experts
    # (N, k)); w_in is then the (2·E·F, d) view of gate_up_proj, w_up the view from row F (gate / up of neuron
    # e·F + f at row moe_in_rows: e·2F + f of each), down_t (E·F, d), down_w (d, E·F) a view of it

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
    layer_rope: list[tuple[float, float]] = field(default_factory=list)  # llama: each layer's RoPE (theta, linear
    # factor): one for all, or one per layer type (Gemma-3: local 1e4, global 1e6)
    pos_embed: torch.Tensor | None = None  # OPT: (max_pos + 2, d) learned positions, offset 2
    project_in: torch.Tensor | None = None  # OPT: (d, d_embed) when word_embed_proj_dim != hidden
    project_out: torch.Tensor | None = None  # OPT: (d_embed, d)
    norm_before: bool = True  # OPT: do_layer_norm_before (False for opt-350m)
    max_positions: int = 2048
    layer_windows: list[int | None] = field(default_factory=list)  # per layer: its sliding window (keys
    # s > position - W only) or None (full causal attention); empty: every layer full
    model_type: str = ""  # config.model_type: llama, mistral, qwen2, qwen3, phi3, gemma, opt
    embed_scale: torch.Tensor | None = None  # Gemma: sqrt(d) as a 0-dim tensor in the embedding's dtype (the
    # model scales the embedding rows by it, rounded in that dtype; the tied lm_head reads the unscaled rows)
    attn_scale: float | None = None  # the attention score scale; None: head_dim ** -0.5 (Gemma-2:
    # query_pre_attn_scalar ** -0.5)
    attn_softcap: float | None = None  # Gemma-2: scores soft-capped to softcap · tanh(s / softcap) before softmax
    logit_softcap: float | None = None  # Gemma-2: the same on the final logits
    experts: int = 0  # MoE: experts per layer (ffn = experts · F); 0: a dense FFN
    experts_per_token: int = 0  # MoE: experts the router sends each token to

    @property
    def active_ffn(self) -> int:
        """Neurons a token computes per layer: every one of a dense FFN's, its routed experts' in an MoE layer."""
        return self.ffn // self.experts * self.experts_per_token if self.experts else self.ffn

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
        # an MoE token reads its routed experts' rows only
        per_layer = {"q": H * D * d, "kv": 2 * KV * D * d, "o": H * D * d, "ffn": (n_in + 1) * self.active_ffn * d}
        out = {k: v * el * self.n_layers for k, v in per_layer.items()}
        out["lm_head"] = self.lm_head.numel() * el
        return out


def act_name(cfg) -> str:
    # Gemma-2 names its FFN activation hidden_activation (Gemma v1 reads it first too, when set)
    name = getattr(cfg, "hidden_activation", None) or getattr(cfg, "hidden_act", None) or \
        getattr(cfg, "activation_function", None)
    if name not in ACTS:
        raise ConfigError(f"FFN activation '{name}' is not supported by the decode engine; supported: {sorted(ACTS)}")
    return ACTS[name]


def _layer_rope(cfg, n_layers: int) -> list[tuple[float, float]]:
    """Each layer's RoPE as (theta, linear factor): one rope_parameters for every layer, or one per layer type where
    the config nests them so (Gemma-3: its local layers rotate with base 1e4, its global ones with 1e6 and, in the
    4B+ models, a linear factor of 8)."""
    params = getattr(cfg, "rope_parameters", None) or {}
    types = getattr(cfg, "layer_types", None) or []
    if types and all(isinstance(params.get(t), dict) for t in set(types)):
        per_type = {t: _rope_of(cfg, params[t]) for t in set(types)}
        return [per_type[t] for t in types]
    return [_rope_of(cfg, params)] * n_layers


def _rope_of(cfg, params: dict) -> tuple[float, float]:
    """(theta, factor) of one RoPE parameter set: "default" (factor 1) or "linear" (positions divided by factor, as
    inverse frequencies divided by it); anything else refused with the reason."""
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ("default", "linear"):
        raise ConfigError(f"RoPE type '{rope_type}' is not implemented in the decode engine (only 'default' and "
                          "'linear'); benchmark a model with default RoPE or add the scaling in "
                          "shadowsparse/runtime/ops.py")
    partial = params.get("partial_rotary_factor", getattr(cfg, "partial_rotary_factor", None))
    if partial is not None and partial != 1:
        raise ConfigError(f"partial rotary embeddings (partial_rotary_factor={partial}: RoPE on the first "
                          f"{partial:.0%} of each head's dims, e.g. Phi-4-mini) are not implemented in the decode "
                          "engine, whose RoPE kernels (kernels/rope_norm.rope_, kernels/kv_window) rotate whole "
                          "heads; use the mask path (shadowsparse.attach_gating) for this model")
    theta = float(params.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))
    return theta, float(params.get("factor", 1.0)) if rope_type == "linear" else 1.0


def _norm_factor(norm: nn.Module, unit_offset: bool) -> torch.Tensor:
    """(d,) what an RMSNorm multiplies the normalized row by: its weight (the model's tensor), or for Gemma 1 + w in
    fp32 (GemmaRMSNorm forms x̂ · (1 + w.float()) in fp32 and rounds once; kernels/rope_norm.rms_norm takes that
    order for an fp32 weight)."""
    return 1.0 + norm.weight.float() if unit_offset else norm.weight


def _attention_scale(model: nn.Module, view: ModelView) -> float | None:
    """The score scale every layer's attention uses (None: head_dim ** -0.5). Refuses what the engine's attention
    would compute differently: bidirectional attention (Gemma's embedding variant), or layers with different
    scales."""
    cfg = model.config
    if getattr(cfg, "use_bidirectional_attention", None):
        raise ConfigError(f"'{cfg.model_type}' with use_bidirectional_attention=True (an encoder, not a causal LM) "
                          "is not served by the decode engine, which attends causally; load the causal model")
    scales = {getattr(getattr(view.layer(i), "self_attn", None), "scaling", None) for i in range(view.dims.n_layers)}
    if len(scales) > 1:
        raise ConfigError(f"the layers' attention scales differ ({sorted(map(str, scales))}); the decode engine uses "
                          "one scale for every layer: use the mask path (shadowsparse.attach_gating) for this model")
    scale = scales.pop()
    return float(scale) if isinstance(scale, (float, int)) else None


def _embed_scale(model: nn.Module, cfg) -> torch.Tensor | None:
    """Gemma's embedding multiplier sqrt(d), a 0-dim tensor in the embedding's dtype, made as the loaded
    transformers makes it (GemmaTextScaledWordEmbedding's fp32 buffer cast to the weight's dtype, or older
    GemmaModel's torch.tensor(d ** 0.5, dtype=...)); None for other families."""
    if cfg.model_type not in GEMMA:
        return None
    emb = model.get_input_embeddings()
    buf = getattr(emb, "embed_scale", None)
    if isinstance(buf, torch.Tensor):
        return buf.to(device=emb.weight.device, dtype=emb.weight.dtype)
    return torch.tensor(cfg.hidden_size ** 0.5, dtype=emb.weight.dtype, device=emb.weight.device)


def _layer_windows(cfg, n_layers: int) -> list[int | None]:
    """Each layer's sliding window, as transformers masks it: config.layer_types where the family declares them
    ("sliding_attention" layers get the window, "full_attention" none; Gemma-2, Qwen2), else the window on every
    layer (Mistral). use_sliding_window=False (Qwen2's switch) or no window: every layer full."""
    window = getattr(cfg, "sliding_window", None)
    if window is None or getattr(cfg, "use_sliding_window", None) is False:
        return [None] * n_layers
    types = getattr(cfg, "layer_types", None)
    if not types:
        return [int(window)] * n_layers
    unknown = sorted(set(types) - {"sliding_attention", "full_attention"})
    if unknown:
        raise ConfigError(f"attention layer types {unknown} are not implemented in the decode engine (it serves "
                          "'full_attention' and 'sliding_attention'); use the mask path (shadowsparse.attach_gating)")
    return [int(window) if t == "sliding_attention" else None for t in types]


def moe_in_rows(neurons: torch.Tensor, expert_ffn: int) -> torch.Tensor:
    """Neuron ids e·F + f of an MoE layer -> their rows e·2F + f in the (2·E·F, d) view of gate_up_proj (w_in: the
    gate; w_up, F rows further: the up)."""
    return neurons + neurons // expert_ffn * expert_ffn


def _moe_ffn(view: ModelView, i: int):
    """(w_in, w_up, down_t) of MoE layer i: gate/up views of the experts' own gate_up_proj, down transposed once."""
    from ..moe import GateableExperts
    experts = view.module(i, view.spec.experts)
    if not isinstance(experts, GateableExperts):  # ModelView swaps it in (moe.expose_expert_neurons)
        raise ConfigError(f"layer {i}'s experts are a {type(experts).__name__}, not the GateableExperts ModelView "
                          "puts in place; build EngineWeights with extract_weights(model)")
    n_exp, f_e, d = experts.num_experts, experts.intermediate_dim, experts.hidden_dim
    gate_up = experts.gate_up_proj.detach().view(n_exp * 2 * f_e, d)  # (2EF, d): expert e's gate rows, then its up
    down_t = experts.down_proj.detach().transpose(1, 2).reshape(n_exp * f_e, d)  # (E, d, F) -> (EF, d): a copy
    return gate_up, gate_up[f_e:], down_t


def _opt(t: nn.Module | None, name: str):
    return None if t is None else getattr(t, name, None)


def _layer_weights(view: ModelView, i: int, family: str, unit_offset: bool) -> LayerWeights:
    """Decoder layer i in the engine's layout (module docstring): fused q/k/v, transposed o and down, the norms."""
    spec, dims = view.spec, view.dims
    layer = view.layer(i)
    if spec.qkv == "fused":  # Phi-3's qkv_proj: q heads, k heads, v heads, the engine's layout already
        m = view.module(i, spec.attn_in[0])
        qkv_w, qkv_b = m.weight, m.bias
    else:
        qkv = [view.module(i, p) for p in spec.attn_in]
        qkv_w = torch.cat([m.weight for m in qkv]).contiguous()
        qkv_b = torch.cat([m.bias for m in qkv]).contiguous() if qkv[0].bias is not None else None
    o, down = view.attn_out(i), view.ffn_down(i)  # o_proj / out_proj, down_proj / fc2
    post_attn = post_ffn = None
    if family == "llama":
        n1, n2 = layer.input_layernorm, layer.post_attention_layernorm
        if hasattr(layer, "pre_feedforward_layernorm"):  # Gemma-2's sandwich norms: post_attention_layernorm
            # norms the attention output (not the FFN input, as in Llama), pre_feedforward_layernorm the FFN's
            n2, post_attn = layer.pre_feedforward_layernorm, layer.post_attention_layernorm
            post_ffn = layer.post_feedforward_layernorm
        if dims.experts:  # in place (module docstring)
            w_in, w_up, down_t = _moe_ffn(view, i)
        else:
            (w_in, _), (w_up, _) = view.ffn_in_rows(i)  # gate, up (F, d): row views of a fused gate_up
            down_t = down.weight.t().contiguous()
        b_in = None
    else:
        n1, n2 = layer.self_attn_layer_norm, layer.final_layer_norm
        w_in, w_up, b_in = layer.fc1.weight, None, layer.fc1.bias
        down_t = down.weight.t().contiguous()
    q_norm, k_norm = (getattr(layer.self_attn, name, None) for name in ("q_norm", "k_norm"))  # Qwen3
    return LayerWeights(
        norm1_w=_norm_factor(n1, unit_offset), norm1_b=_opt(n1, "bias"), qkv_w=qkv_w, qkv_b=qkv_b,
        o_w=o.weight, o_t=o.weight.t().contiguous(), o_b=o.bias, norm2_w=_norm_factor(n2, unit_offset),
        norm2_b=_opt(n2, "bias"), w_in=w_in, w_up=w_up, b_in=b_in,
        down_w=down_t.t() if dims.experts else down.weight, down_t=down_t, b_out=getattr(down, "bias", None),
        router=router_of(view, i),
        q_norm_w=None if q_norm is None else _norm_factor(q_norm, unit_offset),  # Gemma-3: 1 + w
        k_norm_w=None if k_norm is None else _norm_factor(k_norm, unit_offset),
        post_attn_norm_w=None if post_attn is None else _norm_factor(post_attn, unit_offset),
        post_ffn_norm_w=None if post_ffn is None else _norm_factor(post_ffn, unit_offset))


def extract_weights(model: nn.Module) -> EngineWeights:
    """Read a loaded model (eval, any dtype, one device) into EngineWeights. Copies only fused qkv (not Phi-3's, fused
    already), o.T, down.T (and Gemma's 1 + w norm factors); an MoE model's gate/up are read in place."""
    cfg = model.config
    if cfg.model_type not in SUPPORTED:
        raise ConfigError(f"the decode engine supports {', '.join(SUPPORTED)}, not '{cfg.model_type}'; use the mask "
                          "path (shadowsparse.attach_gating, or load_gated(..., engine='hooks')) for other "
                          "architectures")
    view = ModelView(model)
    dims = view.dims
    attn_scale = _attention_scale(model, view)
    if getattr(cfg, "mlp_bias", False):
        raise ConfigError("mlp_bias=True (biases on gate/up) is not supported by the decode engine")
    devices = {p.device for p in model.parameters()}
    if len(devices) != 1:
        raise ConfigError(f"the decode engine needs the model on one device, found {sorted(map(str, devices))}")
    family = "opt" if cfg.model_type == "opt" else "llama"
    layer_rope = _layer_rope(cfg, dims.n_layers) if family == "llama" else []  # refused variants before any copy
    unit_offset = cfg.model_type in GEMMA  # RMSNorm scales by 1 + w (_norm_factor)
    lm_head = model.get_output_embeddings().weight
    common = dict(family=family, n_layers=dims.n_layers, n_heads=dims.n_heads, n_kv_heads=dims.n_kv_heads,
                  head_dim=dims.head_dim, hidden=dims.hidden, ffn=dims.ffn, vocab=lm_head.shape[0],
                  act=act_name(cfg), embed=model.get_input_embeddings().weight, lm_head=lm_head,
                  max_positions=getattr(cfg, "max_position_embeddings", 2048),
                  layer_windows=_layer_windows(cfg, dims.n_layers),
                  model_type=cfg.model_type, embed_scale=_embed_scale(model, cfg), attn_scale=attn_scale,
                  attn_softcap=getattr(cfg, "attn_logit_softcapping", None),
                  logit_softcap=getattr(cfg, "final_logit_softcapping", None), experts=dims.experts,
                  experts_per_token=dims.experts_per_token)
    with torch.no_grad():
        layers = [_layer_weights(view, i, family, unit_offset) for i in range(dims.n_layers)]
    if family == "llama":
        inner = model.model
        return EngineWeights(**common, eps=cfg.rms_norm_eps, final_norm_w=_norm_factor(inner.norm, unit_offset),
                             final_norm_b=None, layers=layers, layer_rope=layer_rope)
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
