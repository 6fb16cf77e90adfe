"""Mixture-of-experts FFNs: one neuron axis over all experts, so every stage gates MoE layers as it gates dense ones.

transformers (5.x) runs a layer's experts inside one module from fused 3-D parameters (Mixtral, Qwen3-MoE, OLMoE:
``experts.gate_up_proj`` (E, 2F, d), ``experts.down_proj`` (E, d, F)) with a Python loop over the experts a batch
hit: there is no per-expert down-projection module whose input a hook could gate. ``GateableExperts`` replaces that
module (``expose_expert_neurons``, done when a ModelView wraps the model), holding the *same* Parameter objects
(state dict, optimizer and device placement unchanged) and computing the same loop with the same operations, so
outputs are bit for bit those of transformers' eager experts path (its default grouped_mm path rounds otherwise:
2e-7 apart in fp32 on the tiny models). What it adds are three identity modules, the hook points:

  - ``gate_up_in``: input the FFN input x (N, d) of the experts (TEAL gates it; the router has read it already:
    the router's choice is not ours to change);
  - ``gate_pre``: input the gate pre-activations (N, E*F) of the routed experts, zero elsewhere (only built when a
    hook reads it: CATS, gate_verify);
  - ``down_in``: input the activations (N, E*F) of the routed experts, zero elsewhere: the FFN "down-projection
    input" of the ArchSpec. Neuron e*F + f is neuron f of expert e.

So the neuron axis of an MoE layer is E*F wide (targets, predictor heads and static scores have one entry per expert
neuron), while a token computes only the k routed experts' k*F neurons (``ModelDims.active_ffn``): FFN sparsity s
keeps round((1-s) k F) of those, chosen among the routed neurons only, and realized sparsity and bytes are counted
against them (gating.GatingHandle). ``gate_up_in.weight`` and ``down_in.weight`` read the experts' weights in the
dense layouts the ArchSpec helpers expect (a fused gate_up (2 E F, d): every expert's gate rows, then every expert's
up rows; the down projection (d, E F)) as copies: reading is supported, writing through them is not.

Static masks (prune/) write each expert's own matrices instead, through one more pair of hook points per expert:
``expert_gate_up[e]`` (input: the tokens routed to expert e, (n_e, d); ``weight``: gate_up_proj[e], (2F, d)) and
``expert_down[e]`` (input: their activations (n_e, F); ``weight``: down_proj[e], (d, F)). Each ``weight`` is a view of
the Parameter, so writes go through; each input is what that expert alone reads, so Wanda's norms and SparseGPT's
Hessians are per expert, over its routed tokens. LTE (lte/routers.py) clusters each expert's own gate rows into its
groups, so a group is routed exactly when its expert is.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .errors import ConfigError

MOE_FAMILIES = ("mixtral", "qwen3_moe", "olmoe")  # routed experts only, every layer an MoE layer
EXPERT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")


def n_experts(config) -> int:
    """Routed experts per layer (0 for a dense model)."""
    for key in EXPERT_KEYS:
        n = getattr(config, key, None)
        if isinstance(n, int) and n > 1:
            return n
    return 0


def moe_config_problem(config) -> str | None:
    """Why an MoE config of a registered family cannot get one neuron axis per layer (None: it can)."""
    if getattr(config, "shared_expert_intermediate_size", 0) or getattr(config, "n_shared_experts", 0):
        return "it has a shared expert beside the routed ones (a second FFN per layer, not one neuron axis)"
    if getattr(config, "mlp_only_layers", None) or getattr(config, "decoder_sparse_step", 1) != 1:
        return ("some of its layers are dense MLPs (mlp_only_layers / decoder_sparse_step), so the neuron axis would "
                "change width from layer to layer")
    return None


class _ExpertView(nn.Identity):
    """An identity hook point inside GateableExperts; ``weight`` reads the experts' weights in a dense layout."""

    def __init__(self, experts: "GateableExperts", layout: str):
        super().__init__()
        object.__setattr__(self, "_owner", experts)  # not a submodule: the owner holds this module
        self.layout = layout

    @property
    def param(self) -> nn.Parameter:
        """The fused (E, ., .) Parameter behind this view: byte counts and dtypes read it (no dense copy made)."""
        return self._owner.fused(self.layout)

    @property
    def nbytes(self) -> int:
        """Bytes of the experts' weights behind this view, counted on their own Parameters."""
        return self.param.numel() * self.param.element_size()

    @property
    def weight(self) -> torch.Tensor:
        e = self._owner
        E, Fe, d = e.num_experts, e.intermediate_dim, e.hidden_dim
        if self.layout == "gate_up":  # (2 E F, d): [gate of every expert; up of every expert]
            gu = e.gate_up_proj.detach()
            return torch.cat([gu[:, :Fe].reshape(E * Fe, d), gu[:, Fe:].reshape(E * Fe, d)])
        return e.down_proj.detach().permute(1, 0, 2).reshape(d, E * Fe)  # (d, E F): neuron e*F + f is column e*F + f

    def extra_repr(self) -> str:
        return f"layout={self.layout}"


class _ExpertLinear(nn.Identity):
    """One expert's projection as prune/ sees a linear: an identity on its input (hooks read and may gather it) and
    ``weight``, a view of that expert's slice of the fused Parameter in the (out, in) orientation (writes go through):
    gate_up_proj[e] (2F, d) for "gate_up", down_proj[e] (d, F) for "down"."""

    def __init__(self, experts: "GateableExperts", layout: str, index: int):
        super().__init__()
        object.__setattr__(self, "_owner", experts)  # not a submodule: the owner holds this module
        self.layout, self.index = layout, index

    @property
    def weight(self) -> torch.Tensor:
        return self._owner.fused(self.layout).detach()[self.index]

    def extra_repr(self) -> str:
        return f"expert={self.index}, layout={self.layout}"


class GateableExperts(nn.Module):
    """transformers' fused experts module with hook points on its neuron axis (module docstring)."""

    def __init__(self, experts: nn.Module):
        super().__init__()
        gu, down = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
        if not (isinstance(gu, nn.Parameter) and gu.dim() == 3 and isinstance(down, nn.Parameter) and down.dim() == 3):
            raise ConfigError(f"{type(experts).__name__} does not hold fused 3-D expert weights (gate_up_proj (E, 2F, "
                              "d), down_proj (E, d, F)); shadowsparse gates experts laid out as transformers' Mixtral")
        self.num_experts, two_f, self.hidden_dim = gu.shape
        self.intermediate_dim = two_f // 2
        self.gate_up_proj, self.down_proj = gu, down  # the same Parameters: nothing copied
        self.act_fn = experts.act_fn
        self.gate_up_in = _ExpertView(self, "gate_up")
        self.gate_pre = nn.Identity()
        self.down_in = _ExpertView(self, "down")
        E = self.num_experts  # per-expert hook points for static masks (module docstring)
        self.expert_gate_up = nn.ModuleList(_ExpertLinear(self, "gate_up", e) for e in range(E))
        self.expert_down = nn.ModuleList(_ExpertLinear(self, "down", e) for e in range(E))
        self.routed: torch.Tensor | None = None  # (N, E) bool: the experts each token of the last forward was sent to
        self._routed_neurons: torch.Tensor | None = None  # its (N, E*F) expansion, made once per forward

    def fused(self, layout: str) -> nn.Parameter:
        """The fused Parameter of a layout: "gate_up" (E, 2F, d) or "down" (E, d, F)."""
        return self.gate_up_proj if layout == "gate_up" else self.down_proj

    def routed_neurons(self) -> torch.Tensor:
        """(N, E*F) bool: the neurons each token of the last forward computed (several hooks of a forward ask: the
        gating mask, its counter, calibration samples; expanded once)."""
        if self._routed_neurons is None:
            self._routed_neurons = self.routed.repeat_interleave(self.intermediate_dim, dim=1)
        return self._routed_neurons

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        # hidden_states (N, d); top_k_index, top_k_weights (N, k): the router's experts and weights per token
        E, Fe = self.num_experts, self.intermediate_dim
        with torch.no_grad():
            expert_mask = F.one_hot(top_k_index, num_classes=E + 1).permute(2, 1, 0)  # (E + 1, k, N)
            hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
            self.routed = expert_mask[:E].any(1).T  # (N, E), set before any hook point runs
            self._routed_neurons = None
        x = self.gate_up_in(hidden_states)  # (N, d)
        want_gate = bool(self.gate_pre._forward_hooks or self.gate_pre._forward_pre_hooks)
        act = x.new_zeros(x.shape[0], E * Fe)  # (N, E*F): routed experts' activations, zero elsewhere
        gate_pre = x.new_zeros(x.shape[0], E * Fe) if want_gate else None
        rows = []
        for e in hit:  # the same operations as transformers' eager loop (bit-identical outputs)
            e = int(e[0])
            if e == E:
                continue
            top_k_pos, token_idx = torch.where(expert_mask[e])
            xe = self.expert_gate_up[e](x[token_idx])  # (n_e, d); E-Sparse may gather its channels here
            gate, up = F.linear(xe, self.gate_up_proj[e]).chunk(2, dim=-1)  # (n_e, F) each
            act[token_idx, e * Fe:(e + 1) * Fe] = self.act_fn(gate) * up
            if want_gate:
                gate_pre[token_idx, e * Fe:(e + 1) * Fe] = gate
            rows.append((e, top_k_pos, token_idx))
        if want_gate:
            self.gate_pre(gate_pre)
        act = self.down_in(act)  # gating hooks zero the skipped neurons here
        out = torch.zeros_like(hidden_states)
        for e, top_k_pos, token_idx in rows:
            h = F.linear(self.expert_down[e](act[token_idx, e * Fe:(e + 1) * Fe]), self.down_proj[e])
            h = h * top_k_weights[token_idx, top_k_pos, None]
            out.index_add_(0, token_idx, h.to(out.dtype))
        return out


def expose_expert_neurons(model: nn.Module, layers: nn.ModuleList, experts_path: str) -> None:
    """Swap every layer's fused experts module for a GateableExperts on the same Parameters (idempotent)."""
    problem = moe_config_problem(model.config)
    if problem is not None:
        raise ConfigError(f"'{model.config.model_type}' cannot be gated: {problem}. Supported mixture-of-experts "
                          f"families: {', '.join(MOE_FAMILIES)}")
    parent_path, _, name = experts_path.rpartition(".")
    for layer in layers:
        parent = layer
        for part in parent_path.split(".") if parent_path else []:
            parent = getattr(parent, part)
        experts = getattr(parent, name, None)
        if experts is None:
            raise ConfigError(f"'{model.config.model_type}': a decoder layer has no '{experts_path}' (the experts "
                              "module the ArchSpec names)")
        if not isinstance(experts, GateableExperts):
            setattr(parent, name, GateableExperts(experts))


def router_of(view, layer: int) -> nn.Module | None:
    """MoE layer ``layer``'s top-k router (transformers' ``<moe block>.gate``: x (N, d) -> (logits (N, E), weights
    (N, k), experts (N, k))), the module that decides what GateableExperts computes; None for a dense model."""
    if view.spec.experts is None:
        return None
    block = view.spec.experts.rpartition(".")[0]
    return view.module(layer, f"{block}.gate" if block else "gate")


def dense_ffn_only(view, what: str, fix: str) -> None:
    """Refuse a stage that writes FFN weights through the dense E*F layouts (a permutation of the whole axis) on an
    MoE model, naming the per-expert way (``fix``)."""
    if view.dims.experts:
        raise ConfigError(f"{what} is not implemented for mixture-of-experts models ('{view.model.config.model_type}'"
                          f", {view.dims.experts} experts per layer): it rewrites FFN weights, which an MoE layer "
                          f"holds per expert; {fix}")


def expert_paths(view, layer: int) -> dict[str, list[str]]:
    """An MoE layer's per-expert projections as module paths (prune/ reads and writes them as linears):
    {"gate_up": [experts.expert_gate_up.0, ...], "down": [experts.expert_down.0, ...]}."""
    n = view.module(layer, view.spec.experts).num_experts
    return {k: [f"{view.spec.experts}.expert_{k}.{e}" for e in range(n)] for k in ("gate_up", "down")}


@torch.no_grad()
def fold_expert_perm_(linear: _ExpertLinear, perm: torch.Tensor) -> None:
    """Permute one expert's neurons (E-Sparse): its down columns and its gate and up rows together, so the layer's
    function is unchanged without a run-time gather. ``linear``: that expert's expert_down hook point."""
    owner, e, Fe = linear._owner, linear.index, linear._owner.intermediate_dim
    perm = perm.to(owner.down_proj.device)
    down, gu = owner.down_proj.detach()[e], owner.gate_up_proj.detach()[e]  # (d, F), (2F, d)
    down.copy_(down[:, perm])
    gu.copy_(torch.cat([gu[:Fe][perm], gu[Fe:][perm]]))


__all__ = ["GateableExperts", "MOE_FAMILIES", "dense_ffn_only", "expert_paths", "expose_expert_neurons",
           "fold_expert_perm_", "moe_config_problem", "n_experts", "router_of"]
