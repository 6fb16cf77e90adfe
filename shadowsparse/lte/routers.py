"""LTE routers: per FFN layer, a linear map from the FFN input to one sigmoid score per expert (a group of neurons).

Experts. LTE decides per group of neurons, not per neuron: a kernel then reads whole blocks of W_gate/W_up rows and
W_down columns, and the router is E = F / expert_size outputs wide instead of F. How neurons are grouped matters:
neuron order in a trained FFN carries no meaning, so contiguous groups mix unrelated neurons and a router cannot
drop one without dropping important company. ``cluster`` (default; MoEfication's parameter clustering, which the
paper follows) runs balanced k-means on the unit-normalized rows of the FFN's first input projection (W_gate for
SwiGLU, W_fc1 for OPT): neurons whose rows point the same way respond to the same inputs, so they tend to be on or
off together. Balanced, because every expert must hold exactly expert_size neurons for a fixed-shape kernel.

Routing, as a ScoreSource for ``attach_gating`` (the same hooks every method uses): a pre-hook on the FFN input
projection computes s = sigmoid(W_r x + b) (B, T, E); the neuron hook on the down-projection input multiplies by
  soft  (stage 1):  s expanded to neurons, so FFN(x) = sum_i s_i E_i(x), differentiable in the router and model;
  hard  (stage 2 and inference): a 0/1 mask of kept experts: top-k of s per token, or s > tau.

Mixture-of-experts models (moe.py: one neuron axis over the model's E experts, neuron e*F + f). LTE's groups lie
inside the model's experts (clustered expert by expert, numbered expert by expert), so a group is routed for a
token exactly when the model's router sent the token to the group's expert; the router's choice is the model's.
LTE's hard routing keeps a share of each token's *routed* groups (top-k among them, or the routed ones above tau),
as every other selector keeps a share of the routed neurons.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..arch import ModelView
from ..errors import ConfigError
from ..gating import GatingConfig, ScoreSource, align_rows, n_keep


def balanced_kmeans(rows: torch.Tensor, n_groups: int, iters: int = 10, seed: int = 0) -> torch.Tensor:
    """Cosine k-means with every cluster holding exactly N / n_groups rows. rows: (N, d) -> group id per row (N,).

    The balanced assignment is greedy: (row, centroid) pairs are taken in order of decreasing similarity and a row
    joins the first centroid that still has room.
    """
    n = rows.shape[0]
    if n % n_groups:
        raise ConfigError(f"{n} neurons cannot form {n_groups} equal experts")
    size = n // n_groups
    x = torch.nn.functional.normalize(rows.detach().float(), dim=-1)  # (N, d)
    g = torch.Generator().manual_seed(seed)
    centroids = x[torch.randperm(n, generator=g)[:n_groups].to(x.device)]  # (G, d)
    for _ in range(iters):
        sim = x @ centroids.T  # (N, G)
        order = sim.flatten().argsort(descending=True).tolist()
        room = [size] * n_groups
        group = [-1] * n  # plain lists: this loop runs up to N*G times
        placed = 0
        for flat in order:  # stops once every row has a group (usually long before the end of the list)
            row, grp = divmod(flat, n_groups)
            if group[row] < 0 and room[grp] > 0:
                group[row] = grp
                room[grp] -= 1
                placed += 1
                if placed == n:
                    break
        assign = torch.tensor(group, device=x.device)  # on the rows' device (a model on a GPU: cuda)
        new = torch.zeros_like(centroids).index_add_(0, assign, x)  # (G, d) sums of each cluster's rows
        centroids = torch.nn.functional.normalize(new, dim=-1)
    return assign.cpu()  # expert ids live with the Routers, which are moved to the model's device as a whole


def group_neurons(view: ModelView, layers: list[int], expert_size: int, grouping: str, seed: int = 0) -> torch.Tensor:
    """Expert id of every neuron of every routed layer: (len(layers), F) int64. An MoE layer (F = E * F_e): groups
    within each of the model's experts (none spans two), numbered expert by expert (module docstring)."""
    ffn, n_moe = view.dims.ffn, view.dims.experts
    width = ffn // n_moe if n_moe else ffn  # the neurons one group set covers: an MoE expert's, or the whole FFN
    if width % expert_size:
        divisors = [k for k in (8, 16, 32, 64, 128) if width % k == 0]
        where = f"each expert's FFN width {width}" if n_moe else f"the FFN width {width}"
        raise ConfigError(f"lte.expert_size={expert_size} does not divide {where}; pick one that does "
                          f"(e.g. {divisors or [1]})")
    if grouping == "contiguous":  # expert_size divides an MoE expert's width: no group crosses two
        return (torch.arange(ffn) // expert_size).expand(len(layers), ffn).clone()
    if grouping != "cluster":
        raise ConfigError(f"lte.grouping must be 'cluster' or 'contiguous', got {grouping!r}")
    per = width // expert_size

    def layer_groups(i: int) -> torch.Tensor:
        if not n_moe:  # W_gate (a fused gate_up's gate half) or W_fc1: (F, d), read (out, in) whatever the storage
            return balanced_kmeans(view.ffn_in_rows(i)[0][0], per, seed=seed + i)
        gate_up = view.module(i, view.spec.experts).gate_up_proj.detach()  # (E, 2 F_e, d): the gate rows first
        return torch.cat([balanced_kmeans(gate_up[e, :width], per, seed=seed + i) + e * per for e in range(n_moe)])
    return torch.stack([layer_groups(i) for i in layers])


class Routers(nn.Module):
    """One Linear(d_model -> E) per routed layer, plus each layer's neuron -> expert map (a buffer, saved with it)."""

    def __init__(self, d_model: int, ffn: int, layers: list[int], groups: torch.Tensor, init_score: float = 0.9):
        super().__init__()
        if groups.shape != (len(layers), ffn):
            raise ConfigError(f"groups must be (routed layers, F) = ({len(layers)}, {ffn}), got {tuple(groups.shape)}")
        self.layers = list(layers)
        self.d_model, self.ffn = d_model, ffn
        self.n_experts = int(groups.max()) + 1
        self.register_buffer("groups", groups.long())  # (Lr, F) expert id of each neuron
        # (Lr, E) one neuron of each expert (group): an MoE layer's groups lie in one of its experts, so that neuron's
        # routing is the group's (routed_groups); derived from groups, not saved
        neuron = torch.arange(ffn).expand(len(self.layers), ffn)
        self.register_buffer("group_neuron", torch.empty(len(self.layers), self.n_experts, dtype=torch.long)
                             .scatter_(1, self.groups, neuron), persistent=False)
        self.linears = nn.ModuleDict({str(i): nn.Linear(d_model, self.n_experts) for i in layers})
        bias = math.log(init_score / (1 - init_score))  # sigmoid(bias) = init_score: start close to dense
        for lin in self.linears.values():
            # logits spread ~0.1 for unit-RMS inputs: a ranking from the start, scores still close to init_score
            nn.init.normal_(lin.weight, std=0.1 / math.sqrt(d_model))
            nn.init.constant_(lin.bias, bias)

    @property
    def first_layer(self) -> int:
        return self.layers[0]

    def scores(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """x: (..., d_model) FFN input -> (..., E) sigmoid scores."""
        lin = self.linears[str(layer)]
        return torch.sigmoid(lin(x.to(lin.weight.dtype)))

    def to_neurons(self, layer: int, expert_values: torch.Tensor) -> torch.Tensor:
        """(..., E) per-expert values -> (..., F) per-neuron values."""
        return expert_values.index_select(-1, self.groups[self.layers.index(layer)])

    def routed_groups(self, layer: int, routed: torch.Tensor) -> torch.Tensor:
        """An MoE layer's routed neurons (N, F) bool -> its routed groups (N, E) bool: a group's neurons lie in one of
        the model's experts, so any one of them tells (group_neurons)."""
        return routed.index_select(-1, self.group_neuron[self.layers.index(layer)].to(routed.device))

    def n_params(self) -> int:
        return sum(p.numel() for p in self.linears.parameters())

    def meta(self) -> dict:
        return {"layers": self.layers, "d_model": self.d_model, "ffn": self.ffn, "n_experts": self.n_experts}


def efficiency_loss(scores: list[torch.Tensor]) -> torch.Tensor:
    """Mean router score over layers, tokens and experts: lowering it turns experts off (LTE's L_efficiency)."""
    return torch.stack([s.float().mean() for s in scores]).mean()


def separability_loss(scores: list[torch.Tensor], tau: float, eps: float) -> torch.Tensor:
    """Mean of 1 / ((s - tau)^2 + eps): large near the threshold, so scores are pushed to either side of it and the
    hard 0/1 routing of stage 2 changes the soft model as little as possible (LTE's L_separability)."""
    return torch.stack([(1.0 / ((s.float() - tau) ** 2 + eps)).mean() for s in scores]).mean()


class LTEScores(ScoreSource):
    """Router-driven FFN gating for ``attach_gating``; ``soft`` scales by the scores (stage 1), else 0/1 masks.

    After each forward, ``scores[layer]`` holds that layer's router scores (..., E) — with autograd in soft mode,
    for the efficiency and separability losses — and ``kept[layer]`` the fraction of experts kept (hard mode).
    """

    def __init__(self, routers: Routers, route: str = "topk", tau: float = 0.5, soft: bool = False):
        self.routers, self.route, self.tau, self.soft = routers, route, tau, soft
        self.feature_layer = routers.first_layer - 1  # attach_gating's default first gated layer = the first router
        self.scores: dict[int, torch.Tensor] = {}
        self.kept: dict[int, torch.Tensor] = {}
        self._k_experts = routers.n_experts

    def attach(self, view: ModelView, cfg: GatingConfig) -> list:
        if cfg.head_sparsity > 0:
            raise ConfigError("LTE routes FFN neurons only; evaluate it at head_sparsity=0")
        if view.dims.ffn != self.routers.ffn or view.dims.hidden != self.routers.d_model:
            raise ConfigError(f"LTE routers were made for d_model={self.routers.d_model}, F={self.routers.ffn}; the "
                              f"model has {view.dims.hidden}, {view.dims.ffn}: load the model they were trained on")
        first = cfg.first_layer if cfg.first_layer is not None else self.routers.first_layer
        missing = [i for i in range(first, view.dims.n_layers) if i not in self.routers.layers]
        if missing:
            raise ConfigError(f"LTE routers cover layers {self.routers.layers[0]}..{self.routers.layers[-1]} but "
                              f"gating starts at layer {first}; set lte.first_layer to the first gated layer")
        # a share of the groups a token computes: all of a dense FFN's, its routed experts' in an MoE layer
        self._k_experts = n_keep(self.routers.n_experts * view.dims.active_ffn // view.dims.ffn, cfg.ffn_sparsity)
        self.scores.clear()
        self.kept.clear()
        hooks = []
        for i in range(first, view.dims.n_layers):
            def route(module, args, i=i):
                x = args[0]  # (B, T, d) or (B*T, d) (OPT flattens tokens): the FFN input
                if self.soft:
                    self.scores[i] = self.routers.scores(i, x)
                else:
                    with torch.no_grad():
                        self.scores[i] = self.routers.scores(i, x)
            hooks.append(view.module(i, view.spec.ffn_in[0]).register_forward_pre_hook(route))
        return hooks

    def expert_mask(self, layer: int, ok: torch.Tensor | None = None) -> torch.Tensor:
        """0/1 mask of kept experts (..., E) from this forward's scores; ok (..., E) bool: an MoE layer's routed
        groups (Routers.routed_groups), the groups kept among them only."""
        s = self.scores[layer]
        if self.route == "threshold":
            keep = s > self.tau
            return (keep if ok is None else keep & ok).to(s.dtype)
        ranked = s if ok is None else s.masked_fill(~ok, float("-inf"))
        idx = ranked.topk(self._k_experts, dim=-1, sorted=False).indices
        return torch.zeros_like(s).scatter_(-1, idx, 1.0)

    def neurons(self, layer, x):
        return self.routers.to_neurons(layer, self.scores[layer])

    def neuron_mask(self, layer, x, k, routed=None):
        if self.soft:  # stage 1: expert outputs scaled by their scores, differentiable (unrouted neurons are zero)
            return align_rows(self.neurons(layer, x), x).to(x.dtype)
        ok = None if routed is None else self.routers.routed_groups(layer, routed).reshape(self.scores[layer].shape)
        mask = self.expert_mask(layer, ok)  # (..., E)
        computed = mask.numel() if ok is None else ok.sum().clamp(min=1)  # the groups the tokens compute
        self.kept[layer] = (mask.sum() / computed).detach()
        return align_rows(self.routers.to_neurons(layer, mask), x).to(x.dtype)
