"""Predict-then-verify FFN selection (two stages per token and layer), evaluated as four methods:

1. propose: a selector ranks the layer's neurons and keeps the top ``q`` fraction as candidates —
   ``predictor_verify``: a per-layer low-rank predictor reading the FFN input itself (the vector gate and up read);
   ``sketch_verify``: a low-bit copy of the FFN's own weights, |act(Q(W_gate) x) * Q(W_up) x| (sketch "act") or
   |act(Q(W_gate) x)| (sketch "gate"), read instead of the real weights (docs/research.md: the best proposer here);
   ``gate_verify``: the real gate projection in full, CATS-style;
   ``sketch``: the ``sketch_verify`` proposer with nothing to verify (q = 1 - s at every level): a selector that
   decides before the FFN runs (in the default run, next to ``sketch_verify`` with q = 0.6).
2. verify: gate and up are computed for the candidates only; the final keep set is the top (1 - s) of the
   candidates by their true |a| (optionally |a| * ||W_down[:, i]||, the neuron's output contribution). With
   q <= 1 - s there is nothing to verify: the proposal is the keep set, decided before the FFN runs.

A real kernel reads, per token, the candidates' gate and up rows and the kept neurons' down columns, so the bytes
skipped are (1 - q) of gate + up (of up alone for gate_verify) plus s of down, minus the proposer's own bytes
(shadowsparse.accounting, sketch_bytes). Here it runs through the gating hooks' mask path: the activation is
computed densely and every neuron outside the final set is zeroed, which equals the sliced computation exactly
because non-candidates are never eligible (tests/test_verify.py checks it against a hand-sliced forward).
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from .arch import ModelView
from .errors import ConfigError
from .ffn_io import ffn_input_module, load_layer
from .gating import GatingConfig, ScoreSource, n_keep, topk_mask

log = logging.getLogger("shadowsparse")


@dataclass
class VerifyConfig:
    q: float | list = 0.7  # fraction of each layer's neurons proposed per token (gate/up computed for them); a list
    # evaluates each (one predictor); fewer than the final keep (1 - s) are never proposed
    rank: int = 64  # predictor bottleneck per layer: rank * (d_model + F) parameters per layer
    act: str = "gelu"  # predictor nonlinearity between its two matrices: "gelu" or "none" (a low-rank linear map)
    target: str = "activation"  # what the predictor learns to rank: "activation" |a| or "contribution" |a|*||W_down col||
    final: str = "activation"  # how the verify stage ranks the candidates: "activation" or "contribution"
    train_windows: int = 32  # calibration windows (of the calibration text) the predictor is trained on
    epochs: int = 4
    lr: float = 3e-3
    batch_size: int = 512
    weight_decay: float = 0.0
    eps: float = 1e-3  # targets are log(s + eps * mean_row(s)), z-scored per row (as the shared predictor's)
    sketch: str = "act"  # sketch_verify's proposer: "act" |act(Q(W_gate) x) * Q(W_up) x| (an |a| estimate) or "gate"
    # |act(Q(W_gate) x)| alone (half the bytes, weaker: docs/research.md)
    bits: int = 3  # sketch_verify: bits per weight of the low-bit copy (1 = sign times the group's mean |w|)
    group: int = 64  # sketch_verify: input channels sharing one 16-bit scale
    quantizer: str = "midrise"  # sketch_verify: "midrise" (2**bits levels, MSE-fitted clip), "symmetric" (with 0) or
    # "gptq" (midrise levels, GPTQ error feedback in act order on calibration inputs of each FFN)
    calib_windows: int = 32  # quantizer gptq: calibration windows (of the calibration text) for X^T X per layer

    @property
    def qs(self) -> list[float]:
        return [float(v) for v in (self.q if isinstance(self.q, (list, tuple)) else [self.q])]

    def validate(self) -> "VerifyConfig":
        if not self.qs or not all(0.0 < q <= 1.0 for q in self.qs):
            raise ConfigError(f"verify.q must be in (0, 1] (the fraction proposed), got {self.q}")
        for key, allowed in (("act", ("gelu", "none")), ("target", ("activation", "contribution")),
                             ("final", ("activation", "contribution")),
                             ("quantizer", ("midrise", "symmetric", "gptq"))):
            if getattr(self, key) not in allowed:
                raise ConfigError(f"verify.{key} must be one of {allowed}, got {getattr(self, key)!r}")
        if self.sketch not in ("gate", "act") or not 1 <= self.bits <= 8 or self.group < 1:
            raise ConfigError(f"verify.sketch must be gate or act, bits in [1, 8], group >= 1; got {self.sketch!r}, "
                              f"{self.bits}, {self.group}")
        if self.rank < 1 or self.train_windows < 1 or self.epochs < 1 or self.calib_windows < 1:
            raise ConfigError("verify.rank, verify.train_windows, verify.epochs and verify.calib_windows must be "
                              "positive")
        return self


class FFNInputPredictor(nn.Module):
    """Per-layer bottleneck from the FFN input x (B, T, d) to neuron scores (B, T, F):
    s = W_out · act(W_in · x + b_in) + b_out, one (W_in, W_out) per predicted layer (stacked for storage)."""

    def __init__(self, d_model: int, ffn: int, layers: list[int], rank: int = 64, act: str = "gelu"):
        super().__init__()
        self.layers = list(layers)
        self.index = {l: i for i, l in enumerate(self.layers)}
        self.dims = dict(d_model=d_model, ffn=ffn, layers=self.layers, rank=rank, act=act)
        n = len(self.layers)
        self.w_in = nn.Parameter(torch.randn(n, d_model, rank) / d_model ** 0.5)
        self.b_in = nn.Parameter(torch.zeros(n, rank))
        self.w_out = nn.Parameter(torch.randn(n, rank, ffn) / rank ** 0.5)
        self.b_out = nn.Parameter(torch.zeros(n, ffn))
        self.act = act
        self.train_tokens = 0  # rows it was trained on (recorded in its file)

    def predict_layer(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """x: (..., d_model) FFN input of ``layer`` -> scores (..., F)."""
        i = self.index[layer]
        return _layer_scores(x.to(self.w_in.dtype), self.w_in[i], self.b_in[i], self.w_out[i], self.b_out[i],
                             self.act)

    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file
        save_file({k: v.detach().contiguous() for k, v in self.state_dict().items()}, str(path),
                  metadata={"dims": json.dumps(self.dims), "train_tokens": str(self.train_tokens)})

    @classmethod
    def load(cls, path: str | Path) -> "FFNInputPredictor":
        from safetensors import safe_open
        from safetensors.torch import load_file
        if not Path(path).exists():
            raise ConfigError(f"verify predictor '{path}' does not exist")
        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        pred = cls(**json.loads(meta["dims"]))
        pred.train_tokens = int(meta.get("train_tokens", 0))
        pred.load_state_dict(load_file(str(path)))
        pred.eval().requires_grad_(False)
        return pred


def quantize_rows(w: torch.Tensor, bits: int, group: int, mode: str = "midrise") -> torch.Tensor:
    """Low-bit copy of w (F, d), each group of ``group`` consecutive input channels with one scale; returned
    dequantized, in w's dtype.

    mode "midrise": 2**bits levels ±(k + 1/2)·Δ (no zero level: every code is used), Δ = clip / 2**(bits-1) with the
    clip chosen per group from a grid of fractions of max|w| to minimise the squared error.
    mode "symmetric": round-to-nearest on 2**bits - 1 levels k·Δ with Δ = max|w| / (2**(bits-1) - 1).
    bits=1 in both modes: sign(w)·mean|w| (the least-squares 1-bit code).
    """
    F, d = w.shape
    if d % group:
        raise ConfigError(f"verify.group={group} must divide the FFN input width {d}")
    g = w.detach().float().reshape(F, d // group, group)
    amax = g.abs().amax(-1, keepdim=True).clamp(min=1e-12)
    if mode == "symmetric":
        if bits == 1:
            q = g.sign() * g.abs().mean(-1, keepdim=True)
        else:
            levels = 2 ** (bits - 1) - 1
            scale = amax / levels
            q = (g / scale).round().clamp(-levels, levels) * scale
        return q.reshape(F, d).to(w.dtype)
    if mode != "midrise":
        raise ConfigError(f"quantizer mode must be midrise or symmetric, got {mode!r}")
    if bits == 1:  # sign · mean|w| is the exact least-squares 1-bit code
        return (g.sign() * g.abs().mean(-1, keepdim=True)).reshape(F, d).to(w.dtype)
    return _midrise(g, midrise_step(g, bits), bits).reshape(F, d).to(w.dtype)


def _midrise(g: torch.Tensor, step: torch.Tensor, bits: int) -> torch.Tensor:
    """Values on the 2**bits midrise levels ±(k + 1/2)·step nearest to g (step broadcasts over g's last axis)."""
    half = 2 ** (bits - 1)
    return ((g / step).floor().clamp(-half, half - 1) + 0.5) * step


def midrise_step(g: torch.Tensor, bits: int) -> torch.Tensor:
    """(..., group) -> (..., 1): the midrise step of each group, clip = a fraction of max|w| from a grid of 17,
    the one with the least squared error."""
    amax = g.abs().amax(-1, keepdim=True).clamp(min=1e-12)
    best_step, best_err = None, None
    for frac in torch.linspace(0.2, 1.0, 17).tolist():
        step = amax * frac / 2 ** (bits - 1)
        err = (_midrise(g, step, bits) - g).pow(2).sum(-1, keepdim=True)
        if best_step is None:
            best_step, best_err = step, err
        else:
            better = err < best_err
            best_step, best_err = torch.where(better, step, best_step), torch.where(better, err, best_err)
    return best_step


def gptq_act_order(w: torch.Tensor, hessian: torch.Tensor, bits: int, group: int, damp: float = 0.01) -> torch.Tensor:
    """gptq_rows with the input channels taken in order of decreasing diag(H) (the most active first; groups are
    formed in that order, so a kernel gathers x by one fixed permutation); the copy is returned in w's own order."""
    perm = torch.argsort(torch.diag(hessian), descending=True)
    q = torch.empty_like(w)
    q[:, perm] = gptq_rows(w[:, perm], hessian[perm][:, perm], bits, group, damp)
    return q


@torch.no_grad()
def ffn_input_hessians(model, windows: torch.Tensor, layers: list[int]) -> dict[int, torch.Tensor]:
    """X^T X (d, d) of each layer's FFN input over the tokens of windows (N, T), one dense pass (float64 sums)."""
    view = ModelView(model)
    out = {l: torch.zeros(view.dims.hidden, view.dims.hidden, dtype=torch.float64) for l in layers}

    def add(module, args, l):
        x = args[0].reshape(-1, args[0].shape[-1]).float()
        out[l] += (x.T @ x).double().cpu()  # one window's sum in fp32, the running sum in fp64
    hooks = [ffn_input_module(view, l).register_forward_pre_hook(lambda m, a, l=l: add(m, a, l)) for l in layers]
    device = next(model.parameters()).device
    try:
        for ids in windows.split(1):
            model(input_ids=ids.to(device))
    finally:
        for h in hooks:
            h.remove()
    return out


def gptq_rows(w: torch.Tensor, hessian: torch.Tensor, bits: int, group: int, damp: float = 0.01) -> torch.Tensor:
    """GPTQ (arXiv 2210.17323) with the midrise groups of quantize_rows: input channels are quantized in order and
    each one's rounding error, weighted by the inverse of H = X^T X (calibration inputs x, (d, d)), is moved onto the
    channels not yet quantized, so the copy's *outputs* on inputs like x stay close (||(Q - W) x||), not its weights.
    A group's step is chosen when the group is reached, from the error-updated weights. Returns the dequantized
    copy (F, d) in w's dtype."""
    F, d = w.shape
    if d % group:
        raise ConfigError(f"verify.group={group} must divide the FFN input width {d}")
    W = w.detach().float().clone()
    H = hessian.to(W.device, torch.float64).clone()
    dead = torch.diag(H) == 0  # channels never active in the calibration: nothing to preserve there
    H[dead, dead] = 1.0
    H += damp * torch.diag(H).mean() * torch.eye(d, dtype=H.dtype, device=H.device)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True).float()  # H^-1 = U^T U
    Q = torch.zeros_like(W)
    for j0 in range(0, d, group):  # one group at a time; its errors reach the later groups in one product
        j1 = j0 + group
        blk, err = W[:, j0:j1].clone(), W.new_zeros(F, group)
        step = midrise_step(blk, bits) if bits > 1 else None  # (F, 1), from the error-updated weights
        scale = blk.abs().mean(-1, keepdim=True)
        for i in range(group):
            col = blk[:, i:i + 1]
            q = col.sign() * scale if bits == 1 else _midrise(col, step, bits)
            Q[:, j0 + i:j0 + i + 1] = q
            err[:, i:i + 1] = (col - q) / U[j0 + i, j0 + i]
            blk[:, i + 1:] -= err[:, i:i + 1] @ U[j0 + i:j0 + i + 1, j0 + i + 1:j1]
        W[:, j1:] -= err @ U[j0:j1, j1:]
    return Q.to(w.dtype)


def sketch_bytes(view: ModelView, layers: int, cfg: VerifyConfig) -> int:
    """Bytes a kernel reads for the low-bit proposer, per token, in the units of the model's own weights: a b-bit
    copy with one 16-bit scale per group costs (b + 16/group)/16 of a 16-bit matrix of the same shape."""
    d, F = view.dims.hidden, view.dims.ffn
    esize = view.ffn_down(0).weight.element_size()
    mats = 2 if cfg.sketch == "act" else 1
    return int(layers * mats * F * d * (cfg.bits + 16 / cfg.group) / 16 * esize)


def down_column_norms(view: ModelView, layer: int) -> torch.Tensor:
    """||W_down[:, i]|| per neuron (F,): what one unit of activation adds to the residual stream."""
    return view.ffn_down(layer).weight.detach().float().norm(dim=0)


def normalized_target(a: torch.Tensor, eps: float, col_norm: torch.Tensor | None = None) -> torch.Tensor:
    """(N, F) activations -> z-scored log importance per row (|a|, or |a| * ||W_down col|| with col_norm)."""
    s = a.float().abs()
    if col_norm is not None:
        s = s * col_norm
    z = torch.log(s + eps * s.mean(-1, keepdim=True) + 1e-30)
    return (z - z.mean(-1, keepdim=True)) / (z.std(-1, keepdim=True) + 1e-6)


def _layer_scores(x: torch.Tensor, w_in, b_in, w_out, b_out, act: str) -> torch.Tensor:
    h = x @ w_in + b_in
    if act == "gelu":
        h = torch.nn.functional.gelu(h)
    return h @ w_out + b_out


def fit_layer(pred: FFNInputPredictor, layer: int, x: torch.Tensor, target: torch.Tensor, cfg: VerifyConfig,
              seed: int = 0) -> float:
    """Train one layer's slice of ``pred`` with MSE on (x (N, d) fp16, target (N, F) fp32); returns the last loss.
    The slice is trained as its own tensors (the optimizer never touches other layers) and copied back."""
    i = pred.index[layer]
    params = [nn.Parameter(t[i].detach().clone()) for t in (pred.w_in, pred.b_in, pred.w_out, pred.b_out)]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    n = x.shape[0]
    steps = cfg.epochs * math.ceil(n / cfg.batch_size)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(  # linear warm-up, cosine decay to 0
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    g = torch.Generator().manual_seed(seed + layer)
    loss = torch.tensor(float("nan"))
    for _ in range(cfg.epochs):
        for idx in torch.randperm(n, generator=g).split(cfg.batch_size):
            loss = torch.nn.functional.mse_loss(_layer_scores(x[idx].float(), *params, pred.act), target[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    with torch.no_grad():
        for t, p in zip((pred.w_in, pred.b_in, pred.w_out, pred.b_out), params):
            t[i] = p
    return float(loss.detach())


def fit_from_recording(rec_dir: str | Path, layers: list[int], cfg: VerifyConfig, model=None,
                       rows: slice | None = None, seed: int = 0) -> FFNInputPredictor:
    """Train a predictor for ``layers`` from a shadowsparse.ffn_io recording (first ``rows`` of it), layer by layer
    (one layer's rows in RAM at a time). ``model`` is needed for the contribution target (W_down column norms)."""
    meta = json.loads((Path(rec_dir) / "meta.json").read_text())
    pred = FFNInputPredictor(meta["d"], meta["ffn"], layers, cfg.rank, cfg.act)
    view = ModelView(model) if model is not None else None
    if cfg.target == "contribution" and view is None:
        raise ConfigError("verify.target=contribution needs the model (W_down column norms)")
    for l in layers:
        x = load_layer(rec_dir, "x", l, rows)
        col = down_column_norms(view, l) if cfg.target == "contribution" else None
        t = normalized_target(load_layer(rec_dir, "a", l, rows), cfg.eps, col)
        loss = fit_layer(pred, l, x, t, cfg, seed)
        log.info("verify predictor layer %d: %d rows, final loss %.4f", l, x.shape[0], loss)
        del x, t
    pred.train_tokens = len(range(meta["n"])[rows]) if rows is not None else meta["n"]
    pred.eval().requires_grad_(False)
    return pred


class VerifyScores(ScoreSource):
    """The two-stage selector as a ScoreSource: the hook before the FFN proposes candidates (top q by the proposer),
    the down-projection hook keeps the top-k of the candidates by their own activation. FFN only.

    candidate_stats[ffn_sparsity] = [non-candidate neurons summed over rows, rows], counted from the candidate masks.
    """

    def __init__(self, q: float, predictor: FFNInputPredictor | None = None, proposer: str = "predictor",
                 final: str = "activation", sketch: VerifyConfig | None = None, qcache: dict | None = None,
                 hessians: dict | None = None):
        if proposer not in ("predictor", "gate", "sketch"):
            raise ConfigError(f"verify proposer must be 'predictor', 'gate' or 'sketch', got {proposer!r}")
        self.sketch = sketch or VerifyConfig()  # sketch proposer: bits, group and what is sketched
        # (layer, which, bits, group, quantizer) -> dequantized low-bit copy, made once; sources may share one dict
        self._qweights: dict = {} if qcache is None else qcache
        self.hessians = hessians  # quantizer gptq: layer -> X^T X of its FFN input (ffn_input_hessians)
        if proposer == "sketch" and self.sketch.quantizer == "gptq" and hessians is None:
            raise ConfigError("verify.quantizer=gptq needs calibration inputs (ffn_input_hessians)")
        if proposer == "predictor" and predictor is None:
            raise ConfigError("the predictor proposer needs a trained FFNInputPredictor")
        self.q, self.predictor, self.proposer, self.final = q, predictor, proposer, final
        first = min(predictor.layers) if predictor is not None else 0
        self.feature_layer = first - 1 if first > 0 else None  # so a default first_layer gates what was trained
        self._cand: dict[int, torch.Tensor] = {}
        self._col: dict[int, torch.Tensor] = {}
        self.candidate_stats: dict[float, list] = {}

    def attach(self, view: ModelView, cfg: GatingConfig) -> list:
        spec = view.spec
        if cfg.head_sparsity > 0:
            raise ConfigError("predict-then-verify selects FFN neurons only; set head_sparsity=0 for it")
        if self.proposer in ("gate", "sketch") and (not spec.glu or spec.ffn_gate is None):
            raise ConfigError(f"gate_verify needs a gated FFN (SwiGLU); '{spec.family}' has none")
        F = view.dims.ffn
        k_final = n_keep(F, cfg.ffn_sparsity)
        self._k_cand = max(k_final, int(round(self.q * F)))  # never fewer candidates than the final keep
        first = cfg.first_layer if cfg.first_layer is not None else (self.feature_layer or -1) + 1
        stats = self.candidate_stats.setdefault(cfg.ffn_sparsity, [0.0, 0])
        hooks = []
        for l in range(first, view.dims.n_layers):
            if self.final == "contribution":
                self._col[l] = down_column_norms(view, l)
            if self.proposer == "predictor":
                if l not in self.predictor.index:
                    raise ConfigError(f"the verify predictor has no layer {l} (trained for {self.predictor.layers})")

                def propose(module, args, l=l):
                    with torch.no_grad():
                        self._set(l, self.predictor.predict_layer(l, args[0]), stats)
                hooks.append(ffn_input_module(view, l).register_forward_pre_hook(propose))
            elif self.proposer == "sketch":
                act = view.module(l, spec.ffn_act)
                qg = self._qweight(view, l, spec.ffn_gate)
                qu = self._qweight(view, l, spec.ffn_in[-1]) if self.sketch.sketch == "act" else None

                def propose_q(module, args, l=l, act=act, qg=qg, qu=qu):
                    with torch.no_grad():
                        x = args[0]
                        est = act(x @ qg.T)
                        if qu is not None:
                            est = est * (x @ qu.T)
                        self._set(l, est.abs(), stats)
                hooks.append(ffn_input_module(view, l).register_forward_pre_hook(propose_q))
            else:
                act = view.module(l, spec.ffn_act)

                def propose_gate(module, args, out, l=l, act=act):
                    with torch.no_grad():
                        self._set(l, act(out).abs(), stats)
                hooks.append(view.module(l, spec.ffn_gate).register_forward_hook(propose_gate))
        return hooks

    def _qweight(self, view: ModelView, layer: int, path: str) -> torch.Tensor:
        key = (layer, path, self.sketch.bits, self.sketch.group, self.sketch.quantizer)
        if key not in self._qweights:
            w = view.module(layer, path).weight
            if self.sketch.quantizer == "gptq":
                h = self.hessians[layer].to(w.device)
                self._qweights[key] = gptq_act_order(w, h, self.sketch.bits, self.sketch.group)
            else:
                self._qweights[key] = quantize_rows(w, self.sketch.bits, self.sketch.group, self.sketch.quantizer)
        return self._qweights[key]

    def _set(self, layer: int, scores: torch.Tensor, stats: list) -> None:
        cand = topk_mask(scores, self._k_cand, torch.bool)  # (..., F)
        rows = cand.numel() // cand.shape[-1]
        stats[0] += float((~cand).sum())
        stats[1] += rows
        self._cand[layer] = cand

    def neuron_mask(self, layer: int, x: torch.Tensor, k: int) -> torch.Tensor:
        cand = self._cand.pop(layer)  # from this very forward's FFN input
        if self._k_cand <= k:  # nothing to verify: the candidates are the keep set (skips a masked top-k)
            return cand.reshape(x.shape).to(x.dtype)
        s = x.abs().float()
        if self.final == "contribution":
            s = s * self._col[layer].to(x.device)
        s = s.masked_fill(~cand.reshape(s.shape), float("-inf"))
        return topk_mask(s, k, x.dtype)

    def candidate_sparsity(self, ffn_sparsity: float, ffn: int) -> float:
        skipped, rows = self.candidate_stats.get(ffn_sparsity, (0.0, 0))
        return skipped / (rows * ffn) if rows else 0.0


def train_verify_predictor(model, windows: torch.Tensor, cfg: VerifyConfig, layers: list[int], work_dir: Path,
                           seed: int = 0) -> FFNInputPredictor:
    """Record the FFN inputs/activations of ``windows`` into work_dir (removed afterwards) and fit the predictor."""
    import shutil
    from .ffn_io import record_ffn_io
    rec = Path(work_dir)
    try:
        record_ffn_io(model, windows, layers, rec, desc="verify: record ffn io")
        return fit_from_recording(rec, layers, cfg, model=model, seed=seed)
    finally:
        shutil.rmtree(rec, ignore_errors=True)


def config_dict(cfg: VerifyConfig) -> dict:
    return asdict(cfg)


def verify_config(cfg) -> VerifyConfig:
    """VerifyConfig from the composed config's optional ``evaluate.verify`` node (defaults where absent)."""
    from omegaconf import OmegaConf
    node = cfg.evaluate.get("verify")
    values = OmegaConf.to_container(node, resolve=True) if node is not None else {}
    unknown = set(values) - set(VerifyConfig.__dataclass_fields__)
    if unknown:
        raise ConfigError(f"unknown evaluate.verify key(s) {sorted(unknown)}; known: "
                          f"{sorted(VerifyConfig.__dataclass_fields__)}")
    return VerifyConfig(**values).validate()


def verify_predictor_for(cfg, model, tok, first_layer: int, run_dir: Path) -> FFNInputPredictor:
    """The predict-then-verify predictor: ``paths.verify_ckpt`` or run_dir/verify_predictor.safetensors when it
    exists, else trained now on the first ``evaluate.verify.train_windows`` windows of the calibration text."""
    from .data import WindowSpec, token_windows
    from .pipeline import window_spec
    vcfg = verify_config(cfg)
    ckpt = Path(cfg.paths.get("verify_ckpt") or Path(run_dir) / "verify_predictor.safetensors")
    view = ModelView(model)
    layers = list(range(first_layer, view.dims.n_layers))
    if ckpt.exists():
        pred = FFNInputPredictor.load(ckpt)
        missing = set(layers) - set(pred.layers)
        if missing or pred.dims["d_model"] != view.dims.hidden or pred.dims["ffn"] != view.dims.ffn:
            raise ConfigError(f"verify predictor '{ckpt}' does not fit this model (layers {pred.layers}, dims "
                              f"{pred.dims}); delete it or point paths.verify_ckpt at a matching one")
        log.info("verify predictor: loaded %s", ckpt)
        return pred.to(next(model.parameters()).device)
    spec = window_spec(cfg.data.calib)
    windows = token_windows(tok, WindowSpec(spec.seq_len, vcfg.train_windows, spec.source))
    pred = train_verify_predictor(model, windows, vcfg, layers, Path(run_dir) / "verify_ffn_io", seed=cfg.seed)
    pred.save(ckpt)
    log.info("verify predictor: %s parameters, trained on %d tokens, saved to %s", f"{pred.n_params():,}",
             windows.numel(), ckpt)
    return pred.to(next(model.parameters()).device)
