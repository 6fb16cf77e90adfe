"""The predict-then-verify proposer `predictor_verify` learns: a per-layer low-rank predictor that reads each FFN's
own input and ranks its neurons, trained layer by layer on a recording of FFN inputs and activations
(shadowsparse/ffn_io.py) of calibration text."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch
from torch import nn

from .arch import ModelView
from .errors import ConfigError
from .ffn_io import load_layer, record_ffn_io
from .fitting import normalize_scores, warmup_cosine
from .verify import VerifyConfig, down_column_norms

log = logging.getLogger("shadowsparse")
FORMAT, FORMAT_VERSION = "shadowsparse-verify-predictor", 1  # in the safetensors metadata


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
        return layer_scores(x.to(self.w_in.dtype), self.w_in[i], self.b_in[i], self.w_out[i], self.b_out[i],
                             self.act)

    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def save(self, path: str | Path, model_fingerprint: dict | None = None) -> None:
        """One safetensors file; its JSON metadata holds the format version, dims and the model's fingerprint."""
        from safetensors.torch import save_file
        path = Path(path)
        tmp = path.with_name(f".{path.name}.partial")
        meta = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "dims": json.dumps(self.dims),
                "train_tokens": str(self.train_tokens), "model": json.dumps(model_fingerprint)}
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, str(tmp), metadata=meta)
        tmp.replace(path)  # whole or not at all

    @classmethod
    def load(cls, path: str | Path, model=None) -> "FFNInputPredictor":
        """Read a saved verify predictor (safetensors: nothing unpickled); with ``model``, refuse one trained for
        another model (files from before the fingerprint was recorded are accepted)."""
        from safetensors import safe_open
        from safetensors.torch import load_file
        fix = "delete it (it is retrained) or point paths.verify_ckpt at a verify predictor of this model"
        if not Path(path).exists():
            raise ConfigError(f"verify predictor '{path}' does not exist")
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
            state = load_file(str(path))
            version = int(meta.get("format_version", 0))
            pred = cls(**json.loads(meta["dims"]))
        except Exception as exc:  # SafetensorError (empty, truncated), missing or malformed metadata
            raise ConfigError(f"verify predictor '{path}' could not be read ({type(exc).__name__}: {exc}): it is "
                              f"truncated, corrupt or not a verify predictor; {fix}") from None
        if version > FORMAT_VERSION:
            raise ConfigError(f"verify predictor '{path}' has format_version {version}; this shadowsparse reads up to "
                              f"{FORMAT_VERSION}: upgrade shadowsparse or {fix}")
        fingerprint = json.loads(meta.get("model") or "null")
        if model is not None and fingerprint is not None:
            from .llm import check_fingerprint
            check_fingerprint(fingerprint, model, f"verify predictor '{path}'")
        pred.train_tokens = int(meta.get("train_tokens", 0))
        try:
            pred.load_state_dict(state)
        except RuntimeError as exc:
            raise ConfigError(f"verify predictor '{path}' does not match its own dims ({exc}); {fix}") from None
        pred.eval().requires_grad_(False)
        return pred


def normalized_target(a: torch.Tensor, eps: float, col_norm: torch.Tensor | None = None) -> torch.Tensor:
    """(N, F) activations -> z-scored log importance per row (|a|, or |a| * ||W_down col|| with col_norm), the
    shared predictor's target normalization (constant rows read 0)."""
    s = a.float().abs()
    if col_norm is not None:
        s = s * col_norm
    return normalize_scores(s, eps, over="layer")


def layer_scores(x: torch.Tensor, w_in, b_in, w_out, b_out, act: str) -> torch.Tensor:
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
    steps = cfg.epochs * -(-n // cfg.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(max(1, steps // 20), steps))
    g = torch.Generator().manual_seed(seed + layer)
    loss = torch.tensor(float("nan"))
    for _ in range(cfg.epochs):
        for idx in torch.randperm(n, generator=g).split(cfg.batch_size):
            loss = torch.nn.functional.mse_loss(layer_scores(x[idx].float(), *params, pred.act), target[idx])
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


def train_verify_predictor(model, windows: torch.Tensor, cfg: VerifyConfig, layers: list[int], work_dir: Path,
                           seed: int = 0) -> FFNInputPredictor:
    """Record the FFN inputs/activations of ``windows`` into work_dir (removed afterwards) and fit the predictor."""
    rec = Path(work_dir)
    try:
        record_ffn_io(model, windows, layers, rec, desc="verify: record ffn io")
        return fit_from_recording(rec, layers, cfg, model=model, seed=seed)
    finally:
        shutil.rmtree(rec, ignore_errors=True)
