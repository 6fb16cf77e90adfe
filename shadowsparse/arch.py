"""Per-architecture spec: where decoder layers, the attention out-projection and the FFN down-projection live, and how
fused or transposed projections lay out their rows.

Shapes (heads, kv-heads, head_dim, FFN width) are read from ``model.config`` and checked against the weights, never
taken from YAML. The hook points are the *inputs* of the out-projection (all query heads side by side, (B, T, H*D))
and of the down-projection (the FFN activation, (B, T, F)): one place per layer where a head or a neuron can be
skipped, for every family below. Everything else the mask path reads of a layer's weights goes through ModelView's
helpers (``weight``, ``ffn_in_rows``, ``attn_in_weights``, ``hook_gate_activation``), which undo the family's
layout: a fused gate_up or q/k/v projection is split by row ranges, a GPT-2 ``Conv1D`` weight (in, out) is read
transposed, so no other module special-cases a family.

A family that is not listed is added with ``register_arch(model_type, ArchSpec(...))`` (README: "Adding a model
family"). Mixture-of-experts layers (Mixtral, Qwen3-MoE, OLMoE) get one neuron axis over all their experts
(shadowsparse/moe.py: ``ArchSpec.experts`` names the experts module, which is swapped for one with hook points);
other MoE layouts are refused (``moe_refusal``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Callable

import torch
from torch import nn

from .errors import ConfigError

# How the q/k/v rows of the attention input projections lie (ArchSpec.qkv):
QKV_LAYOUTS = {
    "separate": "three modules, attn_in = (q, k, v)",
    "fused": "one module: every query head's rows, then the kv heads' key rows, then their value rows (Phi-3 "
             "qkv_proj, GPT-2 c_attn, Falcon-7B's multi-query query_key_value)",
    "grouped": "one module, kv group after kv group: the group's query heads, then its key head, then its value "
               "head (GPT-NeoX query_key_value, one query per group; Falcon-40B)",
}
# How the gate and up rows of a gated FFN lie (ArchSpec.gate_up):
GATE_UP_LAYOUTS = {
    "separate": "two modules, ffn_in = (gate, up)",
    "fused": "one module, ffn_in = (gate_up,): rows [0, F) the gate, [F, 2F) up, as transformers' .chunk(2) splits "
             "them (Phi-3 gate_up_proj)",
}
_PATH = re.compile(r"[A-Za-z_]\w*(\.\w+)*")


@dataclass(frozen=True)
class ArchSpec:
    family: str  # a label for messages, e.g. "llama" (gated FFN, GQA) or "opt" (ReLU, MHA)
    layers_path: str  # dotted path from the CausalLM to the ModuleList of decoder layers
    attn_out: str  # dotted path inside a layer: the attention output projection (gate its input per head)
    ffn_down: str  # dotted path inside a layer: the FFN down projection (gate its input per neuron)
    ffn_in: tuple[str, ...]  # FFN input projections whose rows a skipped neuron need not read: (gate, up), (gate_up,)
    # or (fc1,)
    attn_in: tuple[str, ...]  # q/k/v projections (q, k, v) or the one fused qkv projection
    glu: bool  # gated FFN, act(gate) * up (SwiGLU, GeGLU), or a plain activation
    ffn_gate: str | None = None  # the module whose output holds the gate of a gated FFN (CATS and the sketch read it)
    ffn_act: str | None = None  # the activation module applied to the gate
    qkv: str = "separate"  # QKV_LAYOUTS
    gate_up: str = "separate"  # GATE_UP_LAYOUTS
    transposed: bool = False  # weights stored (in, out), as GPT-2's Conv1D; ModelView.weight reads them as (out, in)
    experts: str | None = None  # MoE: dotted path of the fused experts module (moe.GateableExperts replaces it);
    # the FFN paths then name its hook points (moe_spec)

    @property
    def ffn_in_blocks(self) -> int:
        """Row blocks of F rows a neuron owns in the FFN inputs: gate and up (fused or not), or fc1 alone."""
        return 2 if self.glu else 1


def _spec_problems(spec: ArchSpec) -> list[str]:
    """Everything structurally wrong with a spec (its module paths are checked against a model by ModelView)."""
    bad = []
    if not isinstance(spec.family, str) or not spec.family:
        bad.append(f"family must be a non-empty label, got {spec.family!r}")
    for name in ("layers_path", "attn_out", "ffn_down"):
        value = getattr(spec, name)
        if not isinstance(value, str) or not _PATH.fullmatch(value):
            bad.append(f"{name} must be a dotted module path such as 'mlp.down_proj', got {value!r}")
    for name in ("ffn_in", "attn_in"):
        value = getattr(spec, name)
        if not isinstance(value, tuple) or not value or not all(isinstance(p, str) and _PATH.fullmatch(p)
                                                                for p in value):
            bad.append(f"{name} must be a non-empty tuple of dotted module paths, got {value!r}")
    if spec.qkv not in QKV_LAYOUTS:
        bad.append(f"qkv must be one of {sorted(QKV_LAYOUTS)}, got {spec.qkv!r}")
    elif isinstance(spec.attn_in, tuple) and len(spec.attn_in) != (3 if spec.qkv == "separate" else 1):
        bad.append(f"qkv={spec.qkv!r} takes attn_in={'(q, k, v)' if spec.qkv == 'separate' else '(qkv,)'}, "
                   f"got {len(spec.attn_in)} paths")
    if spec.gate_up not in GATE_UP_LAYOUTS:
        bad.append(f"gate_up must be one of {sorted(GATE_UP_LAYOUTS)}, got {spec.gate_up!r}")
    if not isinstance(spec.glu, bool) or not isinstance(spec.transposed, bool):
        bad.append(f"glu and transposed must be True or False, got {spec.glu!r}, {spec.transposed!r}")
    if spec.glu is True and spec.gate_up in GATE_UP_LAYOUTS and isinstance(spec.ffn_in, tuple):
        want = 2 if spec.gate_up == "separate" else 1
        if not spec.ffn_gate or not spec.ffn_act:
            bad.append("a gated FFN (glu=True) needs ffn_gate (the module computing the gate) and ffn_act (its "
                       "activation module)")
        elif len(spec.ffn_in) != want or spec.ffn_in[0] != spec.ffn_gate:
            bad.append(f"glu=True with gate_up={spec.gate_up!r} takes ffn_in="
                       f"{'(gate, up)' if want == 2 else '(gate_up,)'} with ffn_gate=ffn_in[0], got ffn_in="
                       f"{spec.ffn_in}, ffn_gate={spec.ffn_gate!r}")
    if spec.glu is False and (spec.ffn_gate is not None or spec.gate_up != "separate"
                              or (isinstance(spec.ffn_in, tuple) and len(spec.ffn_in) != 1)):
        bad.append(f"a plain FFN (glu=False) takes ffn_in=(fc1,), no ffn_gate and gate_up='separate', got ffn_in="
                   f"{spec.ffn_in}, ffn_gate={spec.ffn_gate!r}, gate_up={spec.gate_up!r}")
    if spec.experts is not None and spec != moe_spec(spec.family, spec.layers_path, spec.attn_out, spec.attn_in,
                                                     spec.experts, spec.qkv):
        bad.append(f"experts={spec.experts!r} (a mixture-of-experts FFN) takes the hook points of its GateableExperts: "
                   f"build the spec with moe_spec(family, layers_path, attn_out, attn_in, experts_path)")
    if isinstance(spec.ffn_in, tuple) and spec.ffn_down in spec.ffn_in or \
            isinstance(spec.attn_in, tuple) and spec.attn_out in spec.attn_in:
        bad.append("ffn_down / attn_out must be other modules than ffn_in / attn_in (the hook reads their input)")
    return bad


def validate_spec(spec: ArchSpec, model_type: str) -> ArchSpec:
    if not isinstance(spec, ArchSpec):
        raise ConfigError(f"register_arch('{model_type}', ...) needs an ArchSpec (or a function of the model's config "
                          f"returning one), got {type(spec).__name__}")
    bad = _spec_problems(spec)
    if bad:
        raise ConfigError(f"ArchSpec for '{model_type}' is invalid: {'; '.join(bad)}. Fix the register_arch call "
                          "(README: Adding a model family)")
    return spec


# -- the registry ---------------------------------------------------------------------------------------------------
_LLAMA = ArchSpec("llama", "model.layers", "self_attn.o_proj", "mlp.down_proj", ("mlp.gate_proj", "mlp.up_proj"),
                  ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), True, "mlp.gate_proj", "mlp.act_fn")
_OPT = ArchSpec("opt", "model.decoder.layers", "self_attn.out_proj", "fc2", ("fc1",),
                ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), False)
_GEMMA = replace(_LLAMA, family="gemma")  # GeGLU: the same modules, act_fn a gelu-tanh
_PHI3 = ArchSpec("phi3", "model.layers", "self_attn.o_proj", "mlp.down_proj", ("mlp.gate_up_proj",),
                 ("self_attn.qkv_proj",), True, "mlp.gate_up_proj", "mlp.activation_fn", qkv="fused", gate_up="fused")
_GPT_NEOX = ArchSpec("gpt_neox", "gpt_neox.layers", "attention.dense", "mlp.dense_4h_to_h", ("mlp.dense_h_to_4h",),
                     ("attention.query_key_value",), False, qkv="grouped")  # (B, T, H, 3D): q, k, v per head


def moe_spec(family: str, layers_path: str, attn_out: str, attn_in: tuple[str, ...], experts: str,
             qkv: str = "separate") -> ArchSpec:
    """The spec of a family whose FFN is transformers' fused experts module at ``experts`` (moe.py): the FFN input
    is its gate_up_in hook point (a fused gate_up over all experts' neurons), the down-projection input its down_in."""
    return ArchSpec(family, layers_path, attn_out, f"{experts}.down_in", (f"{experts}.gate_up_in",), attn_in, True,
                    f"{experts}.gate_up_in", f"{experts}.act_fn", qkv=qkv, gate_up="fused", experts=experts)


_MIXTRAL = moe_spec("mixtral", "model.layers", "self_attn.o_proj", ("self_attn.q_proj", "self_attn.k_proj",
                                                                    "self_attn.v_proj"), "mlp.experts")
_GPT2 = ArchSpec("gpt2", "transformer.h", "attn.c_proj", "mlp.c_proj", ("mlp.c_fc",), ("attn.c_attn",), False,
                 qkv="fused", transposed=True)  # c_attn splits its output in q | k | v; Conv1D weights are (in, out)


def _falcon(config) -> ArchSpec:
    """Falcon's fused QKV follows its config: Falcon-7B (multi_query) holds every query head, then one key and one
    value head ("fused"); Falcon-40B/180B (new_decoder_architecture) and the multi-head variants interleave them
    per kv group ("grouped"). Its blocks run attention and FFN in parallel off the same residual: two hook points
    per layer as in every family."""
    grouped = bool(getattr(config, "new_decoder_architecture", False)) or not getattr(config, "multi_query", True)
    return ArchSpec("falcon", "transformer.h", "self_attention.dense", "mlp.dense_4h_to_h", ("mlp.dense_h_to_4h",),
                    ("self_attention.query_key_value",), False, qkv="grouped" if grouped else "fused")


# model_type -> spec, or a function of the model's config returning one (a family whose layout its config decides).
# tests/test_archs.py runs every entry of it (a tiny model each, shadowsparse.llm.tiny_config).
ARCHS: dict[str, ArchSpec | Callable] = {
    "llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA, "qwen3": _LLAMA, "smollm3": _LLAMA, "olmo2": _LLAMA,
    "stablelm": replace(_LLAMA, family="stablelm"), "gemma": _GEMMA, "gemma2": _GEMMA, "gemma3_text": _GEMMA,
    "phi3": _PHI3, "gpt_neox": _GPT_NEOX, "falcon": _falcon, "gpt2": _GPT2, "opt": _OPT,
    "mixtral": _MIXTRAL, "qwen3_moe": replace(_MIXTRAL, family="qwen3_moe"), "olmoe": replace(_MIXTRAL, family="olmoe"),
}


def register_arch(model_type: str, spec: ArchSpec | Callable) -> None:
    """Make ``model_type`` (``model.config.model_type``) a supported family: every stage reads its layers through
    ``spec``. ``spec`` is an ArchSpec, or a function of the model's config returning one. A spec is checked here
    (structure) and again against the model's weights when a model is wrapped (paths exist, shapes agree). A later
    call for the same model_type replaces the earlier row."""
    if not isinstance(model_type, str) or not model_type:
        raise ConfigError(f"register_arch needs the model's config.model_type as a non-empty string, got "
                          f"{model_type!r}")
    if not callable(spec) or isinstance(spec, ArchSpec):
        validate_spec(spec, model_type)
    ARCHS[model_type] = spec


def moe_refusal(config) -> str | None:
    """Why a mixture-of-experts model of an unregistered family is refused (None for a dense model): shadowsparse
    gates the experts' neurons of the MoE layouts in moe.MOE_FAMILIES (one neuron axis over all experts), and a
    shared expert or a mix of dense and MoE layers does not fit one axis."""
    from .moe import MOE_FAMILIES, moe_config_problem, n_experts
    n = n_experts(config)
    if not n:
        return None
    problem = moe_config_problem(config) or "its experts' layout has not been checked against shadowsparse.moe"
    return (f"'{config.model_type}' is a mixture-of-experts model ({n} experts per layer) that shadowsparse does not "
            f"gate: {problem}. Supported mixture-of-experts families: {', '.join(MOE_FAMILIES)} (routed experts "
            f"only, every layer MoE); dense families: {', '.join(sorted(set(ARCHS) - set(MOE_FAMILIES)))}")


_EXAMPLE = ("ArchSpec(family='{t}', layers_path='model.layers', attn_out='self_attn.o_proj', ffn_down='mlp.down_proj',"
            " ffn_in=('mlp.gate_proj', 'mlp.up_proj'), attn_in=('self_attn.q_proj', 'self_attn.k_proj', "
            "'self_attn.v_proj'), glu=True, ffn_gate='mlp.gate_proj', ffn_act='mlp.act_fn')")


def unknown_arch_message(config, model: nn.Module | None = None) -> str:
    """One line: the model_type is not registered, and the register_arch call that adds it (with this model's own
    decoder-layer modules when the model is at hand)."""
    model_type = getattr(config, "model_type", None)
    moe = moe_refusal(config)
    if moe is not None:
        return moe
    found = f" This model's {_inventory(model, config)}." if model is not None else ""
    return (f"architecture '{model_type}' is not registered (supported: {', '.join(sorted(ARCHS))}). Add it before "
            f"loading: from shadowsparse import register_arch, ArchSpec; register_arch('{model_type}', "
            f"{_EXAMPLE.format(t=model_type)}), with the module paths of its decoder layer (a fused q/k/v or gate/up "
            f"projection: qkv='fused' or 'grouped', gate_up='fused'; Conv1D weights: transposed=True).{found} "
            "README: Adding a model family")


def _inventory(model: nn.Module, config) -> str:
    """Where the decoder layers seem to be (the ModuleList as long as the config's layer count) and the 2-D weights
    of the first one: what a spec's paths are written from."""
    n = getattr(config, "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n and n:
            weights = [f"{p} {tuple(m.weight.shape)}" for p, m in module[0].named_modules()
                       if isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() == 2]
            return f"decoder layers are '{name}' ({n} x {type(module[0]).__name__}), with 2-D weights " + \
                ", ".join(weights)
    return f"module tree has no ModuleList of its {n} layers at the top: print(model) shows where they are"


def spec_for(config) -> ArchSpec:
    """The registered spec of a model's config (resolved and checked), or the ConfigError that says how to add it."""
    entry = ARCHS.get(getattr(config, "model_type", None))
    if entry is None:
        raise ConfigError(unknown_arch_message(config))
    spec = entry if isinstance(entry, ArchSpec) else entry(config)
    return validate_spec(spec, config.model_type)


# -- dimensions -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelDims:
    n_layers: int
    n_heads: int  # query heads per layer
    n_kv_heads: int
    head_dim: int
    hidden: int
    ffn: int  # FFN width: neurons per layer (an MoE layer: every expert's, E * expert width)
    experts: int = 0  # MoE: routed experts per layer (0: a dense FFN)
    experts_per_token: int = 0  # MoE: experts each token is routed to (k)

    @property
    def active_ffn(self) -> int:
        """Neurons a token computes per layer: all of a dense FFN's, its k experts' in an MoE layer. FFN sparsity
        is a fraction of these."""
        return self.ffn // self.experts * self.experts_per_token if self.experts else self.ffn


def config_dims(cfg, n_layers: int | None = None) -> ModelDims:
    """A model's dimensions from its config alone (no weights: experiment configs are checked with it). The FFN
    width is intermediate_size (Llama, Phi-3, Gemma, GPT-NeoX), ffn_dim (OPT), ffn_hidden_size (Falcon) or n_inner
    (GPT-2), and 4 * hidden where a config leaves it unset (GPT-2's n_inner=None). An MoE layer's width is all its
    experts' neurons: E * (moe_intermediate_size, else intermediate_size)."""
    from .moe import n_experts
    n_heads = cfg.num_attention_heads
    hidden = cfg.hidden_size
    head_dim = getattr(cfg, "head_dim", None) or hidden // n_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads  # Falcon-7B sets 1 (multi-query)
    ffn = next((v for k in ("intermediate_size", "ffn_dim", "ffn_hidden_size", "n_inner")
                if isinstance(v := getattr(cfg, k, None), int) and v > 0), 4 * hidden)
    n_exp = n_experts(cfg)
    if n_exp:
        ffn = n_exp * (getattr(cfg, "moe_intermediate_size", None) or ffn)
    return ModelDims(n_layers if n_layers is not None else cfg.num_hidden_layers, n_heads, n_kv, head_dim, hidden,
                     ffn, n_exp, getattr(cfg, "num_experts_per_tok", 0) if n_exp else 0)


def _get(module: nn.Module, dotted: str) -> nn.Module:
    for part in dotted.split("."):
        module = getattr(module, part)
    return module


def split_qkv(t: torch.Tensor, layout: str, d: ModelDims) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The q, k and v rows of one fused projection's weight ((H + 2 KV) * D, d_in) or bias ((H + 2 KV) * D,), in head
    order: q (H*D, ...), k (KV*D, ...), v (KV*D, ...). Views where the rows are contiguous ("fused"), gathered
    copies where they interleave ("grouped")."""
    q_rows, kv_rows = d.n_heads * d.head_dim, d.n_kv_heads * d.head_dim
    if layout == "fused":
        return t[:q_rows], t[q_rows:q_rows + kv_rows], t[q_rows + kv_rows:]
    per_group = d.n_heads // d.n_kv_heads
    g = t.unflatten(0, (d.n_kv_heads, per_group + 2, d.head_dim))  # (KV, r + 2, D, ...)
    return g[:, :per_group].flatten(0, 2), g[:, per_group].flatten(0, 1), g[:, per_group + 1].flatten(0, 1)


class ModelView:
    """Read-only view of a causal LM through its ArchSpec: layers, hook modules, dimensions, and the weights in the
    canonical (out, in) orientation with fused projections split by rows."""

    def __init__(self, model: nn.Module):
        config = model.config
        if getattr(config, "model_type", None) not in ARCHS:
            raise ConfigError(unknown_arch_message(config, model))
        self.model = model
        self.spec = spec_for(config)
        try:
            self.layers: nn.ModuleList = _get(model, self.spec.layers_path)
        except AttributeError:
            raise ConfigError(f"ArchSpec for '{config.model_type}': the model has no '{self.spec.layers_path}' "
                              f"(layers_path); its {_inventory(model, config)}") from None
        self.dims = config_dims(config, len(self.layers))
        if self.spec.experts is not None:  # hook points on the experts' neuron axis (moe.py); outputs unchanged
            from .moe import expose_expert_neurons
            expose_expert_neurons(model, self.layers, self.spec.experts)
        self._check_weights()

    def _check_weights(self) -> None:
        """The config is the source of truth for the dimensions, but a module the spec names that is missing, or a
        weight whose shape disagrees with them, means the spec is wrong for this model: say which and how."""
        s, d = self.spec, self.dims
        qkv = (d.n_heads + 2 * d.n_kv_heads) * d.head_dim
        want = {s.attn_out: (d.hidden, d.n_heads * d.head_dim), s.ffn_down: (d.hidden, d.ffn)}
        want.update({p: (d.ffn * (2 if s.gate_up == "fused" else 1), d.hidden) for p in s.ffn_in})
        want.update(dict(zip(s.attn_in, [(d.n_heads * d.head_dim, d.hidden)] + [(d.n_kv_heads * d.head_dim,
                                                                                   d.hidden)] * 2))
                    if s.qkv == "separate" else {s.attn_in[0]: (qkv, d.hidden)})
        where = f"ArchSpec for '{self.model.config.model_type}'"
        if s.qkv == "grouped" and d.n_heads % d.n_kv_heads:
            raise ConfigError(f"{where}: qkv='grouped' needs the heads ({d.n_heads}) in whole kv groups "
                              f"({d.n_kv_heads})")
        for path in [*want, *([s.ffn_act] if s.glu else [])]:
            try:
                module = self.module(0, path)
            except AttributeError:
                raise ConfigError(f"{where}: layer 0 has no module '{path}'; its "
                                  f"{_inventory(self.model, self.model.config)}") from None
            if path == s.ffn_act:
                continue
            w = getattr(module, "weight", None)
            if not isinstance(w, torch.Tensor) or w.dim() != 2:
                raise ConfigError(f"{where}: '{path}' is a {type(module).__name__} without a 2-D weight; the spec "
                                  "must name linear projections (nn.Linear, or Conv1D with transposed=True)")
            if s.transposed and isinstance(module, nn.Linear):
                raise ConfigError(f"{where}: transposed=True but '{path}' is an nn.Linear (weight (out, in)); "
                                  "set transposed=False")
            got = tuple(self.weight(0, path).shape)
            if got != want[path]:
                raise ConfigError(f"{where}: '{path}' reads as {got} (out, in) but the config's dimensions give "
                                  f"{want[path]} (heads {d.n_heads}, kv heads {d.n_kv_heads}, head_dim {d.head_dim}, "
                                  f"hidden {d.hidden}, FFN {d.ffn}); check the path, qkv/gate_up layout and "
                                  "transposed")

    def layer(self, i: int) -> nn.Module:
        return self.layers[i]

    def attn_out(self, i: int) -> nn.Module:
        return _get(self.layers[i], self.spec.attn_out)

    def ffn_down(self, i: int) -> nn.Module:
        return _get(self.layers[i], self.spec.ffn_down)

    def module(self, i: int, path: str) -> nn.Module:
        return _get(self.layers[i], path)

    # -- weights in the (out, in) orientation ------------------------------------------------------------------------
    def weight(self, i: int, path: str) -> torch.Tensor:
        """The module's weight as (out, in): the parameter itself, or its transpose (a view: writes go through) where
        the family stores (in, out)."""
        w = self.module(i, path).weight
        return w.T if self.spec.transposed else w

    def bias(self, i: int, path: str) -> torch.Tensor | None:
        return getattr(self.module(i, path), "bias", None)

    def attn_out_weight(self, i: int) -> torch.Tensor:
        """(d_model, H*D): column block h is what head h adds to the residual stream."""
        return self.weight(i, self.spec.attn_out)

    def ffn_in_rows(self, i: int) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """Each FFN input projection's rows of the F neurons, as (weight (F, d), bias (F,) | None) views of the
        parameters (writes go through): [gate, up] of a gated FFN (a fused gate_up split at row F), [fc1] else."""
        s, F = self.spec, self.dims.ffn
        if s.gate_up == "fused":
            w, b = self.weight(i, s.ffn_in[0]), self.bias(i, s.ffn_in[0])
            return [(w[:F], None if b is None else b[:F]), (w[F:], None if b is None else b[F:])]
        return [(self.weight(i, p), self.bias(i, p)) for p in s.ffn_in]

    def attn_in_weights(self, i: int) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
        """q, k, v as (weight (rows, d), bias | None), heads in order: q (H*D, d), k and v (KV*D, d) — split from a
        fused projection by its layout (split_qkv)."""
        s = self.spec
        if s.qkv == "separate":
            return {name: (self.weight(i, p), self.bias(i, p)) for name, p in zip("qkv", s.attn_in)}
        w, b = self.weight(i, s.attn_in[0]), self.bias(i, s.attn_in[0])
        ws = split_qkv(w, s.qkv, self.dims)
        bs = split_qkv(b, s.qkv, self.dims) if b is not None else (None, None, None)
        return {name: (ws[j], bs[j]) for j, name in enumerate("qkv")}

    def hook_gate_activation(self, i: int, fn: Callable[[torch.Tensor], None]):
        """A forward hook calling fn(act(gate)) with the gate pre-activation (B, T, F) of layer i — the gate module's
        output, or its first F columns for a fused gate_up. Gated FFNs only; returns the hook handle."""
        s = self.spec
        if not s.glu:
            raise ConfigError(f"'{s.family}' has no gated FFN: nothing computes a gate to read")
        if s.experts is not None:  # the routed experts' gate pre-activations (N, E*F), zero elsewhere
            act = self.module(i, s.ffn_act)
            return self.module(i, f"{s.experts}.gate_pre").register_forward_hook(lambda m, args, out: fn(act(out)))
        act, F, fused = self.module(i, s.ffn_act), self.dims.ffn, s.gate_up == "fused"
        return self.module(i, s.ffn_gate).register_forward_hook(
            lambda m, args, out: fn(act(out[..., :F] if fused else out)))

    def routed_neurons(self, i: int) -> torch.Tensor | None:
        """(N, E*F) bool, the neurons each token of the running forward computes in MoE layer i (set by the experts
        module before its down_in hook point runs); None for a dense FFN (every neuron)."""
        if self.spec.experts is None:
            return None
        return self.module(i, self.spec.experts).routed_neurons()

    def decoder_linears(self) -> tuple[str, ...]:
        """The paths of every decoder linear of a layer the spec names (q/k/v, o, FFN inputs, down)."""
        s = self.spec
        return (*s.attn_in, s.attn_out, *s.ffn_in, s.ffn_down)

    def config_fingerprint(self) -> dict:
        d = self.dims
        return {"model_type": self.model.config.model_type, "n_layers": d.n_layers, "n_heads": d.n_heads,
                "n_kv_heads": d.n_kv_heads, "head_dim": d.head_dim, "hidden": d.hidden, "ffn": d.ffn}


def head_contribution_norm(x: torch.Tensor, o_weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """‖W_o[:, h] · x_h‖ per head: how much each head adds to the residual stream.

    x: (..., H*D) out-projection input; o_weight: (d_model, H*D) (ModelView.attn_out_weight). Returns (..., H).
    """
    head_dim = x.shape[-1] // n_heads
    xh = x.unflatten(-1, (n_heads, head_dim))  # (..., H, D)
    w = o_weight.unflatten(1, (n_heads, head_dim)).to(x.dtype)  # (d_model, H, D)
    contrib = torch.einsum("...hd,ohd->...ho", xh, w)  # (..., H, d_model)
    return contrib.float().norm(dim=-1)


__all__ = ["ArchSpec", "ARCHS", "GATE_UP_LAYOUTS", "ModelDims", "ModelView", "QKV_LAYOUTS", "config_dims",
           "head_contribution_norm", "moe_refusal", "moe_spec", "register_arch", "spec_for", "split_qkv", "unknown_arch_message",
           "validate_spec"]
