"""Router warm start (our addition; the paper starts routers from scratch and trains far longer than a CPU run).

Before stage 1, each router is set by ridge regression from its layer's FFN input x to the token's per-expert
activation mass, z = z-score over experts of log sum_{n in expert} |a_n| (what the oracle ranks by, pooled per
expert). Stage 1 then starts from a router that already ranks experts roughly right, instead of from the random
ranking that drops important experts at random (perplexity in the tens of thousands at 50% on the embedded model).
One dense pass over a few calibration windows; X^T X and X^T Z are accumulated per layer, nothing per token kept.
"""
from __future__ import annotations

import math

import torch

from ..arch import ModelView
from .routers import Routers


@torch.no_grad()
def fit_routers_(model, routers: Routers, windows: torch.Tensor, init_score: float, ridge: float = 1e-2,
                 gain: float = 1.0) -> dict:
    """Set every router's weight and bias in place; returns the fit's R^2 per layer (mean over layers too).
    windows: (N, T) token ids, run one at a time through the unhooked model."""
    view = ModelView(model)
    d, n_exp = routers.d_model, routers.n_experts
    xtx = {i: torch.zeros(d + 1, d + 1, dtype=torch.float64) for i in routers.layers}  # [x, 1] Gram matrices
    xtz = {i: torch.zeros(d + 1, n_exp, dtype=torch.float64) for i in routers.layers}
    zz = {i: 0.0 for i in routers.layers}
    seen: dict[int, torch.Tensor] = {}

    def take_input(i):
        def hook(module, args):
            seen[i] = args[0].reshape(-1, d).double().cpu()  # (N, d): tokens of this forward
        return hook

    def take_activation(i):
        def hook(module, args):
            a = args[0].reshape(-1, routers.ffn).abs().double().cpu()  # (N, F)
            mass = torch.zeros(a.shape[0], n_exp, dtype=torch.float64).index_add_(
                1, routers.groups[routers.layers.index(i)].cpu(), a)  # (N, E)
            z = torch.log(mass + 1e-6)
            routed = view.routed_neurons(i)  # MoE: (N, F) the neurons each token computed; None for a dense FFN
            if routed is None:
                z = (z - z.mean(-1, keepdim=True)) / (z.std(-1, keepdim=True) + 1e-6)
            else:  # z-scored over each token's routed groups; the others (never kept) get the mean, 0
                ok = routers.routed_groups(i, routed.cpu()).double()  # (N, E)
                n = ok.sum(-1, keepdim=True).clamp(min=2)
                mean = (z * ok).sum(-1, keepdim=True) / n
                std = (((z - mean) ** 2 * ok).sum(-1, keepdim=True) / (n - 1)).sqrt()
                z = (z - mean) / (std + 1e-6) * ok
            xa = torch.cat([seen.pop(i), torch.ones(a.shape[0], 1, dtype=torch.float64)], 1)  # (N, d+1)
            xtx[i] += xa.T @ xa
            xtz[i] += xa.T @ z
            zz[i] += float((z * z).sum())
        return hook

    hooks = []
    for i in routers.layers:
        hooks.append(view.module(i, view.spec.ffn_in[0]).register_forward_pre_hook(take_input(i)))
        hooks.append(view.ffn_down(i).register_forward_pre_hook(take_activation(i)))
    device = next(model.parameters()).device
    try:
        for ids in windows:
            model(input_ids=ids[None].to(device))
    finally:
        for h in hooks:
            h.remove()
    offset = math.log(init_score / (1 - init_score))
    r2 = {}
    for i in routers.layers:
        g = xtx[i]
        reg = ridge * g.diagonal()[:-1].mean() * torch.eye(d + 1, dtype=torch.float64)
        reg[-1, -1] = 0.0  # the bias is not shrunk
        w = torch.linalg.solve(g + reg, xtz[i])  # (d+1, E)
        resid = zz[i] - 2 * float((w * xtz[i]).sum()) + float((w * (g @ w)).sum())  # |Z - XW|^2
        r2[i] = 1.0 - resid / max(zz[i], 1e-12)
        lin = routers.linears[str(i)]
        lin.weight.copy_((gain * w[:-1].T).to(lin.weight.dtype))
        lin.bias.copy_((gain * w[-1] + offset).to(lin.bias.dtype))
    return {"router_fit_r2": sum(r2.values()) / len(r2), "router_fit_r2_by_layer": r2}
