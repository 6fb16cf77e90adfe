"""Scoring: run a batch of windows through the frozen model with the criterion's hooks and turn it into shard rows.

recording_hooks records every layer's out-projection, down-projection and decoder-layer inputs (and, for criteria
that need them, unit masks to differentiate); score_window turns them into head (B, T, L, H) and neuron (B, T, L, F)
scores; score_rows does one batch of a collection (score, sequence means, encode) for the 1-process driver
(collect.py) and every DDP rank (collect_dp.py) alike, so both write the same rows."""
from __future__ import annotations

from contextlib import contextmanager

import torch

from ..arch import ModelView
from ..criteria import Criterion, Signals
from ..llm import eager_attention
from .config import DTYPES, SCORE_DTYPE, TargetsConfig, encode_rows


@contextmanager
def recording_hooks(view: ModelView, feature_layer: int | None, inputs: dict, features: list,
                    masks: dict | None = None):
    """Hooks that record every layer's out-projection input (inputs[("head", l)], (B, T, H*D)), down-projection
    input (inputs[("neuron", l)], (B, T, F)), decoder-layer input (inputs[("layer", l)], (B, T, d_model)) and,
    optionally, the hidden state entering layer feature_layer + 1 (features, fp32).

    With ``masks`` given, each hooked input is multiplied by a unit mask of ones that requires grad (masks[key]:
    (..., H, 1) per head, like x per neuron), so ∂L/∂m can be taken; x * 1 leaves the forward unchanged.
    """
    handles = []
    n_heads = view.dims.n_heads

    def record(key):
        def pre_hook(module, args):
            x = args[0]
            inputs[key] = x
            if masks is None:
                return None
            shape = (*x.shape[:-1], n_heads, 1) if key[0] == "head" else x.shape
            m = torch.ones(shape, dtype=x.dtype, device=x.device, requires_grad=True)
            masks[key] = m
            gated = (x.unflatten(-1, (n_heads, -1)) * m).flatten(-2) if key[0] == "head" else x * m
            return (gated,) + tuple(args[1:])
        return pre_hook

    def layer_input(i):
        def hook(module, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]  # (B, T, d_model)
            inputs["layer", i] = h.detach()
            if feature_layer is not None and i == feature_layer + 1:
                features.append(h.detach().float().cpu())
        return hook

    for i in range(view.dims.n_layers):
        handles.append(view.layer(i).register_forward_pre_hook(layer_input(i), with_kwargs=True))
        handles.append(view.attn_out(i).register_forward_pre_hook(record(("head", i))))
        handles.append(view.ffn_down(i).register_forward_pre_hook(record(("neuron", i))))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def score_window(model, crit: Criterion, input_ids: torch.Tensor, feature_layer: int | None = None,
                 loss_mask: torch.Tensor | None = None, input_dtype: torch.dtype = SCORE_DTYPE,
                 with_layer_inputs: bool = True, on_device: bool = False):
    """Scores of one batch of windows: (heads (B, T, L, H), neurons (B, T, L, F), feature (B, T, d) | None,
    layer_inputs (B, T, L, d) in ``input_dtype`` | None). The last is the input of every decoder layer (per-layer
    predictors read it; None unless with_layer_inputs). On the host unless on_device: a collection encodes (casts,
    top-k) on the GPU first and moves only what it stores (OPT-13B: 3.4 GB of fp32 neuron scores per 1024 tokens).

    Gradient criteria differentiate the summed next-token loss with respect to the recorded inputs and unit masks
    themselves (torch.autograd.grad), so the frozen weights get no .grad and nothing outlives the call.
    loss_mask (B, T) bool, optional: only the tokens it marks are predicted in the loss (task data: the answer).
    """
    view = ModelView(model)
    L, H = view.dims.n_layers, view.dims.n_heads
    inputs: dict = {}
    masks: dict | None = {} if ({"mask_grad", "hvp"} & crit.needs) else None
    feats: list = []
    sig: dict = {}
    with recording_hooks(view, feature_layer, inputs, feats, masks), torch.set_grad_enabled(crit.needs_grad), \
            eager_attention(model, "hvp" in crit.needs):
        if crit.needs_grad:  # frozen weights: make the graph start at the embeddings' output
            emb_hook = view.model.get_input_embeddings().register_forward_hook(lambda m, i, o: o.requires_grad_(True))
            try:
                logits = model(input_ids=input_ids).logits
            finally:
                emb_hook.remove()
            nll = torch.nn.functional.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), input_ids[:, 1:].flatten().to(logits.device), reduction="none")
            if loss_mask is not None:  # token j is predicted at position j-1: keep the terms of masked tokens
                nll = nll * loss_mask[:, 1:].flatten().to(nll.device, nll.dtype)
            loss = nll.sum()
            keys = [k for k in inputs if k[0] != "layer"]
            wrt = [inputs[k] for k in keys] if "grad" in crit.needs else []
            wrt += [masks[k] for k in keys] if masks is not None else []
            grads = torch.autograd.grad(loss, wrt, create_graph="hvp" in crit.needs)
            n = len(keys) if "grad" in crit.needs else 0
            for j, k in enumerate(keys):
                sig[k] = {"g": grads[j].detach() if n else None,
                          "gm": grads[n + j] if masks is not None else None}
            if "hvp" in crit.needs:  # H g = ∂(g · stopgrad(g))/∂m
                gms = grads[n:]
                hvps = torch.autograd.grad(sum((gm * gm.detach()).sum() for gm in gms), [masks[k] for k in keys])
                for k, hv in zip(keys, hvps):
                    sig[k]["hgm"] = hv
            del logits, nll, loss, grads
        else:
            model(input_ids=input_ids)
    if len(inputs) != 3 * L:
        raise RuntimeError("a criterion hook did not fire on every layer; is the architecture spec right?")

    def signals(key) -> Signals:
        extra = {k: (v.detach().squeeze(-1) if k != "g" and key[0] == "head" and v is not None else
                     (v.detach() if v is not None else None)) for k, v in sig.get(key, {}).items()}
        return Signals(x=inputs[key].detach(), **extra)

    B, T = input_ids.shape  # some models (OPT) flatten tokens before the FFN: restore (B, T, U) per layer
    def put(t):  # layers of a model split over GPUs: gather on the input's device, or on the host
        return t.to(input_ids.device) if on_device else t.cpu()
    with torch.no_grad():
        heads = torch.stack([put(crit.head(signals(("head", i)), view.attn_out_weight(i), H).reshape(B, T, -1))
                             for i in range(L)], 2)
        neurons = torch.stack([put(crit.neuron(signals(("neuron", i))).reshape(B, T, -1)) for i in range(L)], 2)
        layer_inputs = torch.stack([put(inputs["layer", i].to(input_dtype)) for i in range(L)], 2) \
            if with_layer_inputs else None
    return heads, neurons, (feats[0] if feats else None), layer_inputs  # the feature is on the host (small)


def batch_step(windows, cfg: TargetsConfig) -> int:
    return 1 if isinstance(windows, (list, tuple)) else cfg.batch_size  # examples differ in length: one at a time


def score_rows(model, crit, windows, start: int, cfg: TargetsConfig, k: int | None, device) -> tuple[dict, int]:
    """Score the batch of windows starting at ``start``: (encode_rows() of it, the window after it)."""
    step = batch_step(windows, cfg)
    if isinstance(windows, (list, tuple)):
        ids, mask = (t.unsqueeze(0).to(device) for t in windows[start])
    else:
        ids, mask = windows[start:start + step].to(device), None
    heads, neurons, feat, layer_in = score_window(model, crit, ids, cfg.feature_layer, loss_mask=mask,
                                                  input_dtype=DTYPES[cfg.input_dtype],
                                                  with_layer_inputs=cfg.layer_inputs, on_device=True)
    if cfg.granularity == "sequence":  # one row per window: mean score, mean feature
        heads, neurons, feat, layer_in = (None if t is None else t.float().mean(1, keepdim=True)
                                          for t in (heads, neurons, feat, layer_in))
    # cast and top-k where the scores are (the GPU), then move only the stored rows to the host
    rows = {key: t.cpu() for key, t in encode_rows(heads, neurons, feat, layer_in, cfg, k).items()}
    return rows, min(start + step, len(windows))
