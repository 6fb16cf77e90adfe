"""Lightning pieces for predictor training: a DataModule over a targets/ folder and a LightningModule with the
losses and held-out metrics (Spearman ρ, top-k recall at the gating sparsity)."""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from .errors import ConfigError
from .gating import n_keep
from .predictor import PredictorConfig, build_predictor
from .targets import load_targets

log = logging.getLogger("shadowsparse")


@dataclass
class FitConfig:
    loss: str = "mse"  # "mse" on normalized scores, "listnet" (softmax ranking), or "bce" on top-k membership
    lr: float = 1e-3
    weight_decay: float = 0.01
    batch_size: int = 256  # tokens per step
    val_fraction: float = 0.1  # held-out rows (the last windows of the collection)
    head_weight: float = 1.0  # weight of the head loss next to the neuron loss
    ffn_sparsity: float = 0.5  # sparsity at which top-k recall is reported and BCE labels are made
    head_sparsity: float = 0.3
    eps: float = 1e-3  # scores are normalized as log(s + eps * mean_row(s)), then z-scored
    normalize: str = "layer"  # z-score over each (token, layer) ("layer") or over a token's whole model ("token")
    # (the DataModule applies it; kept here so the checkpoint records it)


def normalize_scores(s: torch.Tensor, eps: float, over: str = "layer") -> torch.Tensor:
    """Standardized log scores: (N, L, U) -> (N, L, U).

    over="layer": mean 0 / std 1 over each (row, layer)'s U units — only the ranking within a layer is kept, which
    is all a local budget uses. over="token": over all L*U units of a row, so that scores stay comparable across
    layers, as global and hybrid budgets need. Raw scores span decades and differ between criteria; the log keeps
    the order and tames the scale.
    """
    s = s.float()
    dims = (-1,) if over == "layer" else (-2, -1)
    z = torch.log(s + eps * s.mean(dims, keepdim=True) + 1e-30)
    return (z - z.mean(dims, keepdim=True)) / (z.std(dims, keepdim=True) + 1e-6)


def spearman(pred: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """Mean Spearman ρ over rows: (..., U) pairs -> scalar (ties ranked by position)."""
    def ranks(t):
        return t.argsort(-1).argsort(-1).float()
    rp, rt = ranks(pred), ranks(true)
    rp, rt = rp - rp.mean(-1, keepdim=True), rt - rt.mean(-1, keepdim=True)
    return ((rp * rt).sum(-1) / (rp.norm(dim=-1) * rt.norm(dim=-1) + 1e-9)).mean()


def topk_recall(pred: torch.Tensor, true: torch.Tensor, k: int) -> torch.Tensor:
    """Fraction of the true top-k units of each row that the predicted top-k also keeps."""
    tp = torch.zeros_like(pred, dtype=torch.bool).scatter_(-1, pred.topk(k, -1).indices, True)
    tt = torch.zeros_like(true, dtype=torch.bool).scatter_(-1, true.topk(k, -1).indices, True)
    return (tp & tt).sum(-1).float().mean() / k


class TargetsDataModule(L.LightningDataModule):
    """Serves (feature, normalized head scores, normalized neuron scores) rows of a targets/ folder.

    Scores are normalized once here (normalize_scores, chunked, stored in bf16) rather than in every step.
    """

    def __init__(self, targets_dir: str, batch_size: int = 256, val_fraction: float = 0.1, model=None, seed: int = 0,
                 eps: float = 1e-3, input_key: str = "features", normalize: str = "layer"):
        super().__init__()
        self.targets_dir, self.batch_size, self.val_fraction, self.eps = targets_dir, batch_size, val_fraction, eps
        self.input_key = input_key  # "features" (shared predictor) or "layer_inputs" (per-layer predictors)
        if normalize not in ("layer", "token"):
            raise ConfigError(f"fit.normalize must be 'layer' or 'token', got {normalize!r}")
        self.normalize = normalize
        self.model, self.seed = model, seed
        self.manifest = None

    def setup(self, stage: str | None = None):
        if self.manifest is not None:
            return
        self.manifest, t = load_targets(self.targets_dir, self.model, keys=(self.input_key, "heads", "neurons"))
        for key in ("heads", "neurons"):
            scores = t[key]
            for start in range(0, scores.shape[0], 1024):  # in place, chunk by chunk: no second full-size copy
                chunk = normalize_scores(scores[start:start + 1024], self.eps, self.normalize)
                scores[start:start + 1024] = chunk.to(scores.dtype)
        x = t[self.input_key]
        n = x.shape[0]
        if n < 2:
            raise ConfigError(f"targets at '{self.targets_dir}' hold {n} row(s); collect more windows to train")
        n_val = max(1, int(round(n * self.val_fraction)))
        # Held-out rows are the last ones: whole windows the predictor never saw (neighbouring tokens are correlated).
        cut = n - n_val
        self.train_set = TensorDataset(x[:cut], t["heads"][:cut], t["neurons"][:cut])
        self.val_set = TensorDataset(x[cut:], t["heads"][cut:], t["neurons"][cut:])

    def train_dataloader(self):
        g = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, generator=g)

    def val_dataloader(self):
        return DataLoader(self.val_set, batch_size=self.batch_size)


class PredictorSystem(L.LightningModule):
    """Trains a predictor on normalized targets. Saves everything needed to rebuild it in the checkpoint."""

    def __init__(self, dims: dict, predictor: dict, fit: dict, manifest_model: dict | None = None,
                 targets_info: dict | None = None):
        super().__init__()
        self.save_hyperparameters()
        self.fit_cfg = FitConfig(**fit)
        pcfg = PredictorConfig(**predictor)
        self.predictor = build_predictor(pcfg.kind, cfg=pcfg, **dims)
        if self.fit_cfg.loss not in ("mse", "listnet", "bce"):
            raise ConfigError(f"fit.loss must be mse, listnet or bce, got {self.fit_cfg.loss!r}")

    def _unit_loss(self, pred: torch.Tensor, target: torch.Tensor, sparsity: float) -> torch.Tensor:
        c = self.fit_cfg
        if c.loss == "mse":
            return F.mse_loss(pred, target)
        if c.loss == "listnet":
            return -(target.softmax(-1) * pred.log_softmax(-1)).sum(-1).mean()
        k = n_keep(target.shape[-1], sparsity)
        labels = torch.zeros_like(target).scatter_(-1, target.topk(k, -1).indices, 1.0)
        return F.binary_cross_entropy_with_logits(pred, labels, pos_weight=torch.tensor((target.shape[-1] - k) / k))

    def _step(self, batch, stage: str):
        x, th, tn = batch  # (B, d) or (B, L, d), (B, L, H), (B, L, F); targets already normalized by the DataModule
        th, tn = th.float(), tn.float()
        c = self.fit_cfg
        ph, pn = self.predictor(x.float())
        loss = self._unit_loss(pn, tn, c.ffn_sparsity) + c.head_weight * self._unit_loss(ph, th, c.head_sparsity)
        self.log(f"{stage}/loss", loss, prog_bar=True, on_epoch=True, on_step=stage == "train")
        if stage == "val":
            if self.trainer.sanity_checking or self.current_epoch == self.trainer.max_epochs - 1:
                # full-row argsorts are costly on CPU: Spearman only on the final epoch (and the sanity check)
                self.log("val/spearman_ffn", spearman(pn, tn), on_epoch=True)
                self.log("val/spearman_heads", spearman(ph, th), on_epoch=True)
            self.log("val/recall_ffn", topk_recall(pn, tn, n_keep(tn.shape[-1], c.ffn_sparsity)), on_epoch=True,
                     prog_bar=True)
            self.log("val/recall_heads", topk_recall(ph, th, n_keep(th.shape[-1], c.head_sparsity)), on_epoch=True)
        return loss

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        return self._step(batch, "val")

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.predictor.parameters(), lr=self.fit_cfg.lr, weight_decay=self.fit_cfg.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = max(1, total // 20)

        def schedule(step: int) -> float:  # linear warm-up, then cosine decay to 0
            if step < warmup:
                return (step + 1) / warmup
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class EpochSummary(L.Callback):
    """One log line per validation epoch (progress bars vanish in non-interactive logs)."""

    def on_validation_epoch_end(self, trainer, pl_module):
        if trainer.sanity_checking:
            return
        m = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        log.info("epoch %d: %s", trainer.current_epoch, "  ".join(f"{k}={v:.4f}" for k, v in sorted(m.items())))


def load_predictor(ckpt_path: str, model=None):
    """Rebuild the predictor from a Lightning checkpoint; refuses a checkpoint made for another model."""
    from pathlib import Path
    from .targets import check_fingerprint
    if not Path(ckpt_path).exists():
        raise ConfigError(f"predictor checkpoint '{ckpt_path}' does not exist; run the fit stage first")
    system = PredictorSystem.load_from_checkpoint(ckpt_path, map_location="cpu", weights_only=False)
    if model is not None and system.hparams.manifest_model is not None:
        check_fingerprint(system.hparams.manifest_model, model, f"predictor checkpoint '{ckpt_path}'")
    pred = system.predictor.eval()
    pred.requires_grad_(False)
    # criterion / granularity / feature_layer of the targets it was trained on
    pred.targets_info = system.hparams.targets_info or {"feature_layer": pred.feature_layer, "criterion": None}
    return pred

