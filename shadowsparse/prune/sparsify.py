"""sparsify_(model, cfg, windows): static masks on every decoder linear, layer by layer, in place.

Layers are pruned in order and each layer is calibrated on the output of the already-pruned layers before it (as
SparseGPT and Wanda do), by running the decoder layers one at a time on cached hidden states instead of whole
forwards. Within a layer, every linear's statistics come from one pass of the still-dense layer; then all its
linears are pruned, and the pruned layer's outputs feed the next.

    report = sparsify_(model, SparsityConfig(metric="wanda", pattern="2:4"), calib_windows)
    squash_(model)            # plain weights: save_pretrained / from_pretrained without shadowsparse
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ..arch import ModelView
from ..errors import ConfigError
from ..moe import dense_ffn_only, expert_paths, fold_expert_perm_
from ..partial_forward import StopForward
from .esparse import DEFAULTS as ESPARSE_DEFAULTS
from .esparse import channel_importance, shuffle_for
from .allocation import ALLOCATIONS, hutchinson_traces, outlier_ratio, sensitivity_scores, spread
from .metrics import get_metric
from .patterns import Pattern, apply_mask_, keep_mask
from .sparsegpt import sparsegpt_prune
from .stats import InputStats

log = logging.getLogger("shadowsparse")
PERM_ATTR = "_shadowsparse_input_perm"  # the gather hook's handle, on a linear whose input is permuted
# (the permutation itself is its non-persistent buffer ss_input_perm)
PERM_DIM_ATTR = "_shadowsparse_input_dim"  # the weight's input dimension: 1 for nn.Linear (out, in), 0 for Conv1D


@dataclass
class SparsityConfig:
    metric: str | None = None  # magnitude | wanda | sparsegpt | esparse; None: no static mask
    pattern: str = "unstructured"  # "unstructured" (with ratio), "unstructured:0.5", or N:M such as "2:4", "4:8"
    ratio: float = 0.5  # mean fraction of weights zeroed (unstructured)
    allocation: str = "uniform"  # uniform | sensitivity | owl (unstructured only)
    alpha: float = 0.05  # allocation: densities within 1 - ratio ± alpha
    owl_m: float = 5.0  # owl: outlier threshold, in multiples of the layer mean score
    hutchinson_samples: int = 4  # sensitivity: Rademacher probes
    hutchinson_windows: int = 2  # sensitivity: calibration windows per probe
    modules: str = "all"  # "all" decoder linears, "ffn" (gate/up/down, fc1/fc2) or "attn"
    batch_size: int = 4  # calibration windows per layer call
    sparsegpt: dict = field(default_factory=lambda: {"blocksize": 128, "damp": 0.01})
    esparse: dict = field(default_factory=dict)  # overrides of esparse.DEFAULTS: bins, alpha, block, trials, ...
    seed: int = 0

    def validate(self) -> "SparsityConfig":
        if self.metric is None:
            return self
        get_metric(self.metric)
        pattern = self.parsed()
        if self.allocation not in ALLOCATIONS:
            raise ConfigError(f"unknown allocation {self.allocation!r}; use one of {', '.join(ALLOCATIONS)}")
        if pattern.is_nm and self.allocation != "uniform":
            raise ConfigError(f"allocation={self.allocation} spreads an unstructured ratio over matrices; an N:M "
                              f"pattern ({pattern.label}) is the same in every matrix: use allocation=uniform")
        if self.modules not in ("all", "ffn", "attn"):
            raise ConfigError(f"sparsity.modules must be all, ffn or attn, got {self.modules!r}")
        return self

    def parsed(self) -> Pattern:
        return Pattern.parse(self.pattern, self.ratio)


def target_linears(view: ModelView, layer: int, modules: str = "all") -> dict[str, nn.Module]:
    """The decoder linears of one layer, by path: attention q/k/v (or a fused qkv) and o, FFN gate/up (or a fused
    gate_up, or fc1) and down; in an MoE layer each expert's fused gate_up and its down (moe.expert_paths). Their
    weights are read and pruned as (out, in) through view.weight (GPT-2's Conv1D stores (in, out)); a fused
    projection is one matrix here: masks are per row, and N:M runs along its input."""
    spec = view.spec
    attn = list(spec.attn_in) + [spec.attn_out]
    if view.dims.experts:
        per_expert = expert_paths(view, layer)
        ffn = per_expert["gate_up"] + per_expert["down"]
    else:
        ffn = list(spec.ffn_in) + [spec.ffn_down]
    paths = {"all": attn + ffn, "ffn": ffn, "attn": attn}[modules]
    return {p: view.module(layer, p) for p in paths}


def input_groups(view: ModelView, linears: dict[str, nn.Linear]) -> list[tuple[str, ...]]:
    """The selected linears grouped by the tensor they read (attention inputs, out-projection, FFN inputs, down;
    each expert's projections read their own routed tokens: one group each)."""
    spec = view.spec
    groups = [spec.attn_in, (spec.attn_out,)]
    if view.dims.experts:
        groups += [(p,) for p in linears if p.startswith(f"{spec.experts}.expert_")]
    else:
        groups += [spec.ffn_in, (spec.ffn_down,)]
    return [g for g in (tuple(p for p in grp if p in linears) for grp in groups) if g]


def matrix_kind(path: str) -> str:
    """The report's kind of a linear's path: its last name (q_proj, down_proj, ...), an expert's its list's
    (expert_gate_up, expert_down)."""
    parts = path.split(".")
    return parts[-2] if parts[-1].isdigit() else parts[-1]


@torch.no_grad()
def record_layer_calls(model, view: ModelView, windows: torch.Tensor,
                       batch_size: int) -> list[tuple[torch.Tensor, list]]:
    """Per batch of windows: the hidden states entering layer 0 (B, T, d), and every layer's own other call arguments
    (positional after the hidden states, keywords). Recorded per layer because layers differ: Gemma-2/3 pass a
    sliding-window or a global mask (and Gemma-3 its own RoPE) per layer, GPT-2 passes its mask positionally. Costs
    one dense forward per batch (up to the last layer); the arguments are mostly the same tensors for every layer,
    held by reference."""
    calls: list[list] = []  # per batch: per layer (args after the hidden states, kwargs)
    first: list[torch.Tensor] = []

    def grab(i):
        def hook(module, args, kwargs):
            if i == 0:
                first.append(args[0] if args else kwargs["hidden_states"])
                calls.append([])
            calls[-1].append((tuple(args[1:]), {k: v for k, v in kwargs.items() if k != "hidden_states"}))
            if i == view.dims.n_layers - 1:
                raise StopForward  # the final norm and the LM head are not needed
        return hook

    handles = [view.layer(i).register_forward_pre_hook(grab(i), with_kwargs=True) for i in range(view.dims.n_layers)]
    device = next(model.parameters()).device
    try:
        for ids in windows.split(batch_size):
            try:
                model(input_ids=ids.to(device), use_cache=False)
            except StopForward:
                pass
    finally:
        for h in handles:
            h.remove()
    return list(zip(first, calls))


def run_layer(layer: nn.Module, i: int, batches: list[tuple[torch.Tensor, list]]) -> list[tuple[torch.Tensor, list]]:
    """Layer i on each batch's hidden states with that layer's own recorded arguments -> its outputs, same layout."""
    out = []
    for h, calls in batches:
        args, kw = calls[i]
        y = layer(h, *args, **kw)
        out.append((y[0] if isinstance(y, tuple) else y, calls))
    return out


def _gather_input(perm_name: str):
    def hook(module, args):
        return (args[0].index_select(-1, getattr(module, perm_name)),) + tuple(args[1:])
    return hook


def permute_input_(linear: nn.Module, perm: torch.Tensor, transposed: bool = False) -> None:
    """Store W[:, π] and gather x[..., π] in a pre-hook: the layer's function is unchanged. ``transposed``: the
    weight is stored (in, out) (Conv1D), so its rows are the input channels."""
    dim = 0 if transposed else 1
    with torch.no_grad():
        linear.weight.copy_(linear.weight.index_select(dim, perm.to(linear.weight.device)))
    linear.register_buffer("ss_input_perm", perm.to(linear.weight.device), persistent=False)
    setattr(linear, PERM_DIM_ATTR, dim)
    setattr(linear, PERM_ATTR, linear.register_forward_pre_hook(_gather_input("ss_input_perm")))


def fold_neuron_perm_(view: ModelView, layer: int, perm: torch.Tensor) -> None:
    """Permute the FFN's neurons: down-projection columns and the producers' rows (and biases) together — each
    F-row block on its own (gate and up of a fused gate_up), in the (out, in) orientation (writes go through)."""
    dense_ffn_only(view, "permuting FFN neurons along the E*F axis", "permute each expert's own neurons "
                   "(moe.fold_expert_perm_ on its expert_down hook point)")
    with torch.no_grad():
        down = view.weight(layer, view.spec.ffn_down)  # (d, F)
        down.copy_(down[:, perm])
        for w, b in view.ffn_in_rows(layer):  # (F, d), (F,): rows permute independently of any input gather
            w.copy_(w[perm])
            if b is not None:
                b.copy_(b[perm])


@torch.no_grad()
def squash_(model) -> int:
    """Undo every input gather by un-permuting the weight columns, and drop the hooks: the model is plain
    transformers again (same function; N:M groups then lie in the permuted order only). Returns how many."""
    n = 0
    for module in model.modules():
        handle = getattr(module, PERM_ATTR, None)
        if handle is None:
            continue
        perm, dim = module.ss_input_perm, getattr(module, PERM_DIM_ATTR, 1)
        module.weight.copy_(module.weight.index_select(dim, perm.argsort()))
        handle.remove()
        delattr(module, PERM_ATTR)
        if hasattr(module, PERM_DIM_ATTR):
            delattr(module, PERM_DIM_ATTR)
        del module._buffers["ss_input_perm"]
        n += 1
    return n


def weight_sparsity(model) -> dict:
    """Realized zeros over all decoder linears (counted), overall, per matrix kind and the per-matrix extremes."""
    view = ModelView(model)
    zeros, total, per_kind, per_matrix = 0, 0, {}, []
    for i in range(view.dims.n_layers):
        for path, lin in target_linears(view, i, "all").items():
            z, t = int((lin.weight == 0).sum()), lin.weight.numel()
            zeros, total = zeros + z, total + t
            per_matrix.append(z / t)
            kind = matrix_kind(path)
            pz, pt = per_kind.get(kind, (0, 0))
            per_kind[kind] = (pz + z, pt + t)
    return {"realized_weight_sparsity": zeros / total, "min_matrix_sparsity": min(per_matrix),
            "max_matrix_sparsity": max(per_matrix), "per_kind": {k: z / t for k, (z, t) in per_kind.items()}}


def _allocate(model, view, cfg: SparsityConfig, pattern: Pattern, windows, names) -> dict[str, float]:
    """Sparsity per (layer, path) key."""
    sizes = {k: view.module(k[0], k[1]).weight.numel() for k in names}
    if pattern.is_nm or cfg.allocation == "uniform":
        return {k: pattern.ratio for k in names}
    if cfg.allocation == "sensitivity":
        if view.dims.experts and cfg.modules != "attn":
            raise ConfigError("allocation=sensitivity needs each matrix's gradient, which an expert's slice of a fused "
                              "3-D Parameter does not have: use allocation=owl or uniform on a mixture-of-experts "
                              "model, or sparsity.modules=attn")
        params = {k: view.module(k[0], k[1]).weight for k in names}
        traces = hutchinson_traces(model, params, windows[: cfg.hutchinson_windows], cfg.hutchinson_samples,
                                   cfg.seed)
        scores = sensitivity_scores(traces)
    else:  # owl: Wanda scores of the dense model, one ratio per decoder layer
        stats = {k: InputStats(view.weight(*k).shape[1]) for k in names}
        handles = [view.module(k[0], k[1]).register_forward_pre_hook(stats[k].hook()) for k in names]
        device = next(model.parameters()).device
        try:
            with torch.no_grad():
                for ids in windows.split(cfg.batch_size):
                    model(input_ids=ids.to(device), use_cache=False)
        finally:
            for h in handles:
                h.remove()
        layer_scores = {}
        for i in sorted({k[0] for k in names}):
            cat = torch.cat([(view.weight(*k).abs().float().cpu() * stats[k].norm[None, :]).flatten()
                             for k in names if k[0] == i])
            layer_scores[i] = outlier_ratio(cat, cfg.owl_m)
        scores = {k: layer_scores[k[0]] for k in names}
    return spread(scores, sizes, pattern.ratio, cfg.alpha)


@torch.no_grad()
def _prune_layer(view, i: int, linears: dict[str, nn.Linear], stats: dict[str, InputStats], cfg: SparsityConfig,
                 pattern: Pattern, ratios: dict, gen: torch.Generator) -> None:
    metric = get_metric(cfg.metric)
    for path, lin in linears.items():
        w = view.weight(i, path)  # (O, I), a view of the parameter: the in-place writes below go through
        st = stats.get(path)
        if st is not None and st.n == 0:  # an expert no calibration token was routed to: nothing to weigh its
            # inputs by, so its weights' magnitude decides (within rows, as the metric compares)
            log.warning("layer %d %s: no calibration token reached it; pruned by weight magnitude", i, path)
            apply_mask_(w, keep_mask(get_metric("magnitude").score(w, None, {}), pattern, ratios[(i, path)],
                                     metric.group))
            continue
        if cfg.metric == "sparsegpt":
            w.copy_(sparsegpt_prune(w, st.hessian().to(w.device), pattern, ratios[(i, path)], **cfg.sparsegpt))
            continue
        scores = metric.score(w, st, cfg.esparse)  # (O, I)
        shuffle = cfg.metric == "esparse" and pattern.is_nm and {**ESPARSE_DEFAULTS, **cfg.esparse}["shuffle"]
        if shuffle and path != view.spec.attn_out:
            importance = channel_importance(st, cfg.esparse)
            perm = shuffle_for(scores, importance, pattern.n, pattern.m, cfg.esparse, gen)
            if path == view.spec.ffn_down:
                fold_neuron_perm_(view, i, perm)  # function-preserving without any run-time gather
            elif matrix_kind(path) == "expert_down":
                fold_expert_perm_(lin, perm)  # the same, inside one expert
            else:
                permute_input_(lin, perm, view.spec.transposed)
            scores = scores[:, perm]
        apply_mask_(w, keep_mask(scores, pattern, ratios[(i, path)], metric.group))


def sparsify_(model, cfg: SparsityConfig, windows: torch.Tensor) -> dict:
    """Prune ``model`` in place with calibration ``windows`` (N, T); returns the realized sparsity report."""
    cfg.validate()
    if cfg.metric is None:
        return {}
    pattern = cfg.parsed()
    view = ModelView(model)
    names = [(i, p) for i in range(view.dims.n_layers) for p in target_linears(view, i, cfg.modules)]
    for i, p in names:
        pattern.check_fits(view.weight(i, p).shape[1], f"layer {i} {p}")
    ratios = _allocate(model, view, cfg, pattern, windows, names)
    metric = get_metric(cfg.metric)
    gen = torch.Generator().manual_seed(cfg.seed)
    opts = {**ESPARSE_DEFAULTS, **cfg.esparse}
    batches = record_layer_calls(model, view, windows, cfg.batch_size) if metric.needs else None
    for i in tqdm(range(view.dims.n_layers), desc=f"prune {cfg.metric} {pattern.label}", unit="layer"):
        linears = target_linears(view, i, cfg.modules)
        stats: dict[str, InputStats] = {}
        if metric.needs:
            handles = []
            for group in input_groups(view, linears):  # q/k/v (gate/up) read one input: one statistic for all
                first = linears[group[0]]
                st = InputStats(view.weight(i, group[0]).shape[1], gram="gram" in metric.needs,
                                sample_rows=opts["sample_rows"] if "samples" in metric.needs else 0, seed=cfg.seed)
                stats.update({p: st for p in group})
                handles.append(first.register_forward_pre_hook(st.hook()))
            try:
                with torch.no_grad():
                    run_layer(view.layer(i), i, batches)
            finally:
                for h in handles:
                    h.remove()
        _prune_layer(view, i, linears, stats, cfg, pattern, ratios, gen)
        if batches is not None and i + 1 < view.dims.n_layers:
            with torch.no_grad():
                batches = run_layer(view.layer(i), i, batches)  # the pruned layer feeds the next
    report = weight_sparsity(model)
    sizes = {k: view.module(*k).weight.numel() for k in names}
    report.update(requested=pattern.ratio, nm=pattern.label, metric=cfg.metric, allocation=cfg.allocation,
                  allocated_mean=sum(ratios[k] * sizes[k] for k in names) / sum(sizes.values()))
    log.info("static %s %s (%s): %.4f of decoder-linear weights are zero", cfg.metric, pattern.label,
             cfg.allocation, report["realized_weight_sparsity"])
    return report
