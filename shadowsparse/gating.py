"""Runtime gating: per token, keep each gated layer's top (1-s) heads and FFN neurons by some score and skip the rest.

Hook points (docs/design.md): a forward pre-hook on the attention out-projection input (B, T, H*D) zeroes skipped heads;
one on the FFN down-projection input (B, T, F) zeroes skipped neurons. Scores come from a ScoreSource: a learned
predictor (run once per forward on the hidden state after its feature layer), precomputed tensors (the oracle), or
a fixed vector (a static mask). This multiply-by-mask path is the reference every fast kernel must match.

    handle = attach_gating(model, predictor, GatingConfig(ffn_sparsity=0.5, head_sparsity=0.3))
    model.generate(...)
    handle.remove()   # back to the dense model, bit for bit
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import nn

from .arch import ModelView
from .errors import ConfigError


@dataclass
class GatingConfig:
    ffn_sparsity: float = 0.5  # fraction of FFN neurons skipped per token in every gated layer
    head_sparsity: float = 0.0  # fraction of query heads skipped per token in every gated layer
    granularity: str = "token"  # "token": a mask per token; "sequence": one mask per prompt, reused while decoding
    first_layer: int | None = None  # first gated layer; None: the predictor's feature_layer + 1 (0 without one)
    count: bool = True  # count realized sparsity (one small reduction per hook)
    budget: str = "local"  # "local": s of every layer; "global": s of all gated layers' units together, per token;
    # "hybrid": global, but every layer keeps at least min_keep of its units
    min_keep: float = 0.1  # hybrid: fraction of each layer's units always kept

    def validate(self) -> "GatingConfig":
        for name in ("ffn_sparsity", "head_sparsity"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and 0.0 <= v < 1.0):
                raise ConfigError(f"{name} must be in [0, 1) (the fraction skipped), got {v!r}")
        if self.granularity not in ("token", "sequence"):
            raise ConfigError(f"granularity must be 'token' or 'sequence', got {self.granularity!r}")
        if self.budget not in ("local", "global", "hybrid"):
            raise ConfigError(f"budget must be 'local', 'global' or 'hybrid', got {self.budget!r}")
        if not 0.0 <= self.min_keep <= 1.0 - max(self.ffn_sparsity, self.head_sparsity):
            raise ConfigError(f"min_keep must be in [0, 1 - sparsity] so the budget can be met, got {self.min_keep}")
        return self


def n_keep(units: int, sparsity: float) -> int:
    """Units kept per row: the skipped count is round(s * units), never all of them."""
    return max(1, units - int(round(sparsity * units)))


def align_rows(scores: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Scores (B|1, T|1, U) or (U,) shaped to broadcast against x. Some models (OPT) flatten tokens before the FFN,
    so the down-projection sees x as (B*T, F): then scores become (B*T, U) in the same row order."""
    if x.dim() == 2 and scores.dim() == 3:
        rows = x.shape[0]
        b = scores.shape[0] if scores.shape[0] > 1 else 1
        scores = scores.expand(b, rows // b, scores.shape[-1]).reshape(rows, scores.shape[-1])
    return scores


def topk_mask(scores: torch.Tensor, k: int, dtype: torch.dtype) -> torch.Tensor:
    """1 at the k largest scores of each row (last dim), 0 elsewhere. scores: (..., U) -> (..., U)."""
    idx = scores.topk(k, dim=-1, sorted=False).indices
    return torch.zeros(scores.shape, dtype=dtype, device=scores.device).scatter_(-1, idx, 1)


def only_routed(scores: torch.Tensor, routed: torch.Tensor | None) -> torch.Tensor:
    """Scores of an MoE layer's neurons that a token does not compute set to -inf, so a top-k never picks them
    (scores (N|1, U) or (U,), routed (N, U) bool; None: a dense FFN, scores unchanged)."""
    return scores if routed is None else scores.float().masked_fill(~routed, float("-inf"))


class ScoreSource:
    """Where gating scores come from. heads(l) -> broadcastable to (B, T, H); neurons(l) -> to (B, T, F)."""

    feature_layer: int | None = None

    def attach(self, view: ModelView, cfg: GatingConfig) -> list:
        return []

    def heads(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def neurons(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def all_layers(self, kind: str) -> torch.Tensor:
        """Every layer's scores at once, (B|1, T|1, L, U), for global budgets; kind is "heads" or "neurons"."""
        raise ConfigError(f"{type(self).__name__} scores one layer at a time; global and hybrid budgets need a "
                          "selector that scores all layers at once (shared predictor, oracle, static)")

    # The masks: top-k of the scores by default; a source may decide differently (e.g. per-layer thresholds).
    def head_mask(self, layer: int, x: torch.Tensor, k: int) -> torch.Tensor:
        """x: (B, T, H*D) -> 0/1 mask broadcastable to (B, T, H)."""
        return topk_mask(align_rows(self.heads(layer, x), x), k, x.dtype)

    def neuron_mask(self, layer: int, x: torch.Tensor, k: int, routed: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, T, F) or (B*T, F) -> 0/1 mask broadcastable to x. routed (N, F) bool: an MoE layer's neurons that
        each token computes (its routed experts'; None for a dense FFN): the k are chosen among them."""
        return topk_mask(only_routed(align_rows(self.neurons(layer, x), x), routed), k, x.dtype)


class PredictorScores(ScoreSource):
    """A predictor reading the hidden state after ``feature_layer``; predicts all layers at once per forward."""

    def __init__(self, predictor: nn.Module):
        self.predictor = predictor
        self.feature_layer = predictor.feature_layer
        self._heads = self._neurons = None

    def attach(self, view, cfg):
        check_predictor(self.predictor, view, cfg)
        if self.feature_layer + 1 >= view.dims.n_layers:
            raise ConfigError(f"predictor reads layer {self.feature_layer}, but the model has {view.dims.n_layers}")
        sequence = cfg.granularity == "sequence"
        self._heads = self._neurons = None  # a new attach never reuses the masks of an earlier one
        layer = self.feature_layer + 1

        def predict(module, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]  # (B, T, d_model)
            if sequence:
                if reuses_prompt_mask(h, kwargs, layer, self._heads):
                    return  # decoding: keep the prompt's mask
                h = h.mean(1, keepdim=True)  # (B, 1, d_model)
            with torch.no_grad():  # (h moves to the predictor's device: a model split over GPUs by device_map)
                self._heads, self._neurons = self.predictor(h.to(_device_of(self.predictor)))  # (B,T,L,H), (B,T,L,F)

        return [view.layer(layer).register_forward_pre_hook(predict, with_kwargs=True)]

    def heads(self, layer, x):  # .to: a no-op unless device_map put this layer on another GPU
        return self._heads[:, :, layer].to(x.device)

    def neurons(self, layer, x):
        return self._neurons[:, :, layer].to(x.device)

    def all_layers(self, kind):
        return self._heads if kind == "heads" else self._neurons


def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def reuses_prompt_mask(h: torch.Tensor, kwargs: dict, layer: int, stored: torch.Tensor | None) -> bool:
    """Sequence masks: whether this forward is a decode step of the prompt the stored mask was made for (reuse it)
    rather than a new prompt (recompute). A new prompt is a forward of more than one token, one of another batch
    size than the stored mask, or one whose positions start again at 0 (cache_position / position_ids, else an
    empty KV cache at this layer); a forward that says nothing about positions continues the last prompt."""
    if stored is None or h.shape[1] != 1 or stored.shape[0] != h.shape[0]:
        return False
    for key in ("cache_position", "position_ids"):
        pos = kwargs.get(key)
        if isinstance(pos, torch.Tensor) and pos.numel():
            return bool(pos.max() > 0)
    cache = next((kwargs[k] for k in ("cache", "past_key_values", "past_key_value") if kwargs.get(k) is not None),
                 None)
    if cache is not None and hasattr(cache, "get_seq_length"):
        try:
            return cache.get_seq_length(layer) > 0
        except (TypeError, IndexError, AttributeError):
            pass
    return True


def check_predictor(predictor: nn.Module, view: ModelView, cfg: GatingConfig) -> None:
    """At attach time, before any hook: the predictor belongs to this model (its fingerprint, or its dims), and
    no layer is gated before its scores exist (layers up to its feature layer run before it predicts)."""
    check = getattr(predictor, "check_model", None)
    if check is not None:
        check(view.model, "predictor")
    fl = predictor.feature_layer
    if cfg.first_layer is not None and cfg.first_layer <= fl and not hasattr(predictor, "predict_layer"):
        raise ConfigError(f"first_layer={cfg.first_layer} gates layer {cfg.first_layer}, but the predictor reads the "
                          f"hidden state after layer {fl} (its feature_layer), so it has no scores yet when layers "
                          f"0..{fl} run; set first_layer to at least {fl + 1} (or leave it None: feature_layer + 1)")


class PerLayerScores(ScoreSource):
    """A per-layer predictor: the pre-hook of layer j predicts layer j + lookahead from j's input hidden state."""

    def __init__(self, predictor: nn.Module):
        self.predictor = predictor
        self.feature_layer = predictor.feature_layer
        self.lookahead = predictor.cfg.lookahead
        self._heads: dict[int, torch.Tensor] = {}
        self._neurons: dict[int, torch.Tensor] = {}

    def attach(self, view, cfg):
        check_predictor(self.predictor, view, cfg)
        sequence = cfg.granularity == "sequence"
        first = cfg.first_layer if cfg.first_layer is not None else self.feature_layer + 1
        self._heads.clear()  # a new attach never reuses the masks of an earlier one
        self._neurons.clear()
        hooks = []
        for target in range(first, view.dims.n_layers):
            src = max(0, target - self.lookahead)

            def predict(module, args, kwargs, target=target, src=src):
                h = args[0] if args else kwargs["hidden_states"]  # (B, T, d_model)
                if sequence:
                    if reuses_prompt_mask(h, kwargs, src, self._heads.get(target)):
                        return
                    h = h.mean(1, keepdim=True)
                with torch.no_grad():
                    self._heads[target], self._neurons[target] = self.predictor.predict_layer(
                        target, h.to(_device_of(self.predictor)))
            hooks.append(view.layer(src).register_forward_pre_hook(predict, with_kwargs=True))
        return hooks

    def heads(self, layer, x):
        return self._heads[layer].to(x.device)

    def neurons(self, layer, x):
        return self._neurons[layer].to(x.device)


def scores_for(predictor: nn.Module) -> ScoreSource:
    """The ScoreSource that runs a predictor module of either family inside the model's forward."""
    return PerLayerScores(predictor) if hasattr(predictor, "predict_layer") else PredictorScores(predictor)


class TensorScores(ScoreSource):
    """Precomputed scores, e.g. the oracle's true criterion scores: set(heads (B, T, L, H), neurons (B, T, L, F))
    before each forward. Shapes must match the tokens of that forward (or broadcast, T=1 for sequence masks)."""

    def __init__(self, heads: torch.Tensor | None = None, neurons: torch.Tensor | None = None):
        self.set(heads, neurons)

    def set(self, heads, neurons):
        self._heads, self._neurons = heads, neurons

    def heads(self, layer, x):
        return self._heads[:, :, layer].to(x.device)

    def neurons(self, layer, x):
        return self._neurons[:, :, layer].to(x.device)

    def all_layers(self, kind):
        return self._heads if kind == "heads" else self._neurons


class StaticScores(ScoreSource):
    """One score vector per layer for every input: heads (L, H), neurons (L, F) -> a static mask."""

    def __init__(self, heads: torch.Tensor, neurons: torch.Tensor):
        self._heads, self._neurons = heads, neurons
        self._all = {"heads": heads[None, None], "neurons": neurons[None, None]}  # (1, 1, L, U), one object each

    def heads(self, layer, x):
        return self._heads[layer].to(x.device)

    def neurons(self, layer, x):
        return self._neurons[layer].to(x.device)

    def all_layers(self, kind):
        return self._all[kind]


class SparsityCounter:
    """Counts skipped units per applied mask; one counter can span several handles (e.g. one per window)."""

    KEYS = ("heads", "neurons", "kv_groups")

    def __init__(self):
        self.skipped: dict = {k: 0.0 for k in self.KEYS}  # tensors on the model's device once counting starts
        self.rows = {k: 0 for k in self.KEYS}  # (token, layer) rows seen
        self.gated_layers = 0
        self.layer_neurons: dict[int, list] = {}  # layer -> [skipped neurons, tokens] (FFN only)

    def add(self, key: str, mask: torch.Tensor, tokens: int, layer: int | None = None) -> None:
        skipped = (mask == 0).sum(-1)  # (B|1, T|1) skipped units per row
        # stays on the model's device: no host sync per hook (on the first layer's device when device_map splits the
        # model over GPUs: tensors of two GPUs do not add)
        inc, total = skipped.double().mean().detach() * tokens, self.skipped[key]
        self.skipped[key] = total + (inc.to(total.device) if isinstance(total, torch.Tensor) else inc)
        self.rows[key] += tokens
        if key == "neurons" and layer is not None:  # each layer's own count (its device: no sync, no transfer)
            tally = self.layer_neurons.setdefault(layer, [0.0, 0])
            tally[0], tally[1] = tally[0] + inc, tally[1] + tokens

    def stats(self, n_heads: int, ffn: int, n_kv_heads: int) -> dict:
        """Realized sparsity over the gated layers, counted from the masks actually applied (not assumed)."""
        units = {"heads": n_heads, "neurons": ffn, "kv_groups": n_kv_heads}
        out = {}
        for key, name in (("neurons", "ffn"), ("heads", "head"), ("kv_groups", "kv_group")):
            rows = self.rows[key]
            out[f"realized_{name}_sparsity"] = float(self.skipped[key]) / (rows * units[key]) if rows else 0.0
        if self.layer_neurons:  # per gated layer, in layer order
            out["realized_ffn_sparsity_per_layer"] = [float(sk) / (n * ffn) if n else 0.0 for _, (sk, n) in
                                                      sorted(self.layer_neurons.items())]
        out["gated_layers"] = self.gated_layers
        return out


class HookHandle:
    """Owns a list of hook handles (self._hooks); remove() or leaving the with-block takes them all off."""

    _hooks: list

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()
        return False


_ATTACHED: "weakref.WeakKeyDictionary[nn.Module, GatingHandle]" = weakref.WeakKeyDictionary()  # model -> handle


class GatingHandle(HookHandle):
    """Owns the hooks of one attach_gating call; remove() (or leaving the with-block) restores the dense model.
    One handle per model at a time: a second attach_gating before remove() is refused (the hooks would stack)."""

    def __init__(self, model: nn.Module, view: ModelView, source: ScoreSource, cfg: GatingConfig,
                 counter: SparsityCounter | None = None):
        self._hooks: list = []
        earlier = _ATTACHED.get(model)
        if earlier is not None and earlier._hooks:
            c = earlier.cfg
            raise ConfigError(f"this model is already gated by an earlier attach_gating (ffn_sparsity={c.ffn_sparsity}"
                              f", head_sparsity={c.head_sparsity}), still attached: the hooks would stack (both masks "
                              "applied) while stats() counts one; call .remove() on the earlier handle (or leave its "
                              "with-block) before attaching again")
        self.model, self.view, self.source, self.cfg = model, view, source, cfg
        self.counter = counter or SparsityCounter()
        d = view.dims
        self.first_layer = cfg.first_layer if cfg.first_layer is not None else (
            source.feature_layer + 1 if source.feature_layer is not None else 0)
        if not 0 <= self.first_layer < d.n_layers:
            raise ConfigError(f"first_layer must be in [0, {d.n_layers - 1}], got {self.first_layer}")
        self.gated_layers = list(range(self.first_layer, d.n_layers))
        self.k_heads = n_keep(d.n_heads, cfg.head_sparsity)
        self.k_neurons = n_keep(d.active_ffn, cfg.ffn_sparsity)  # of the neurons a token computes (MoE: k experts')
        if d.experts and cfg.budget != "local" and cfg.ffn_sparsity > 0:
            raise ConfigError(f"budget={cfg.budget!r} is not implemented for mixture-of-experts models (a token's "
                              "routed experts differ from layer to layer); use budget='local'")
        self._budget_cache: dict = {}  # kind -> (the scores tensor it was made from, masks of all gated layers)
        self.counter.gated_layers = len(self.gated_layers)
        gate_heads, gate_ffn = self.k_heads < d.n_heads, self.k_neurons < d.active_ffn
        try:
            if gate_heads or gate_ffn:  # with nothing to skip, no hook at all: the model stays dense bit for bit
                self._hooks += source.attach(view, cfg)
            for layer in self.gated_layers:
                if gate_heads:
                    self._hooks.append(view.attn_out(layer).register_forward_pre_hook(self._head_hook(layer)))
                if gate_ffn:
                    self._hooks.append(view.ffn_down(layer).register_forward_pre_hook(self._neuron_hook(layer)))
        except BaseException:  # a refused attach leaves no hook behind
            self.remove()
            raise
        if self._hooks:
            _ATTACHED[model] = self

    # -- hooks ---------------------------------------------------------------------------------------------------
    def _count(self, key: str, mask: torch.Tensor, tokens: int, layer: int | None = None) -> None:
        if self.cfg.count:
            self.counter.add(key, mask, tokens, layer)

    def _mask(self, kind: str, layer: int, x: torch.Tensor) -> torch.Tensor:
        if self.cfg.budget == "local":
            if kind == "heads":
                return self.source.head_mask(layer, x, self.k_heads)
            return self.source.neuron_mask(layer, x, self.k_neurons, self.view.routed_neurons(layer))
        scores = self.source.all_layers(kind)  # (B|1, T|1, L, U)
        cached = self._budget_cache.get(kind)
        if cached is None or cached[0] is not scores:  # new scores (a new forward): one mask for all gated layers
            self._budget_cache[kind] = (scores, self._budget_masks(kind, scores))
        mask = self._budget_cache[kind][1][..., layer - self.first_layer, :].to(x.device)  # (B|1, T|1, U)
        return align_rows(mask, x).to(x.dtype)

    def _budget_masks(self, kind: str, scores: torch.Tensor) -> torch.Tensor:
        """Global / hybrid top-k over every gated layer's units of each token: (B|1, T|1, Lg, U) 0/1."""
        s = scores[..., self.first_layer:, :].float()
        n_layers, units = s.shape[-2], s.shape[-1]
        sparsity = self.cfg.head_sparsity if kind == "heads" else self.cfg.ffn_sparsity
        k_total = n_keep(n_layers * units, sparsity)
        keep = torch.zeros_like(s, dtype=torch.bool)
        if self.cfg.budget == "hybrid":  # every layer keeps its own top min_keep first, the rest goes globally
            k_min = int(self.cfg.min_keep * units)
            if k_min > 0:
                keep.scatter_(-1, s.topk(k_min, -1).indices, True)
                k_total = max(0, k_total - n_layers * k_min)
                s = s.masked_fill(keep, float("-inf"))
        flat = s.flatten(-2)  # (B|1, T|1, Lg*U)
        keep |= torch.zeros_like(flat, dtype=torch.bool).scatter_(-1, flat.topk(k_total, -1).indices, True).view_as(keep)
        return keep

    def _head_hook(self, layer: int):
        d = self.view.dims

        def hook(module, args):
            x = args[0]  # (B, T, H*D): all query heads side by side (also under GQA)
            mask = self._mask("heads", layer, x)  # (B|1, T|1, H)
            tokens = x.numel() // x.shape[-1]
            self._count("heads", mask, tokens)
            if self.cfg.count and d.n_kv_heads < d.n_heads:  # a kv head is unneeded once its whole group is off
                groups = mask.unflatten(-1, (d.n_kv_heads, d.n_heads // d.n_kv_heads)).amax(-1)  # (B|1, T|1, KV)
                self._count("kv_groups", groups, tokens)
            gated = (x.unflatten(-1, (d.n_heads, d.head_dim)) * mask.unsqueeze(-1)).flatten(-2)
            return (gated,) + tuple(args[1:])
        return hook

    def _neuron_hook(self, layer: int):
        def hook(module, args):
            x = args[0]  # (B, T, F), or (B*T, F) where the model flattens tokens (OPT and MoE layers: E*F wide)
            mask = self._mask("neurons", layer, x)  # broadcastable to x
            routed = self.view.routed_neurons(layer)  # MoE: (N, E*F), skipped = routed and not kept
            self._count("neurons", mask if routed is None else torch.where(routed, mask, 1), x.numel() // x.shape[-1],
                        layer)
            return (x * mask,) + tuple(args[1:])
        return hook

    # -- stats and lifetime ----------------------------------------------------------------------------------------
    def reset_stats(self) -> None:
        self.counter = SparsityCounter()
        self.counter.gated_layers = len(self.gated_layers)

    def stats(self) -> dict:
        d = self.view.dims
        return self.counter.stats(d.n_heads, d.active_ffn, d.n_kv_heads)

    def remove(self) -> None:
        super().remove()
        if _ATTACHED.get(self.model) is self:
            del _ATTACHED[self.model]



def attach_gating(model: nn.Module, scores: nn.Module | ScoreSource, config: GatingConfig | None = None,
                  counter: SparsityCounter | None = None, **overrides) -> GatingHandle:
    """Gate ``model`` in place with hooks. ``scores``: a predictor module (has ``feature_layer``) or a ScoreSource."""
    cfg = config or GatingConfig()
    if overrides:
        cfg = GatingConfig(**{**cfg.__dict__, **overrides})
    cfg.validate()
    source = scores if isinstance(scores, ScoreSource) else scores_for(scores)
    return GatingHandle(model, ModelView(model), source, cfg, counter)


gated = attach_gating  # context-manager twin: `with gated(model, predictor, cfg) as handle: ...`
