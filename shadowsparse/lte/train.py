"""LTE training (Lightning): stage 1 soft routing with LM + efficiency + separability losses, routers and model
trained together; stage 2 routers frozen, hard routing at the target sparsity, the model adapts with the LM loss.

``train_lte`` trains a deep copy of the given model (full fine-tuning, or LoRA adapters injected by peft), so the
caller's model stays the base model the other methods are evaluated on.
"""
from __future__ import annotations

import copy
import logging
import math
import time

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ..arch import ModelView
from ..errors import ConfigError
from ..fitting import trainer_args, warmup_cosine
from ..gating import GatingConfig, attach_gating
from ..moe import router_of
from .artifact import LTEArtifact
from .config import LTEConfig
from .routers import LTEScores, Routers, efficiency_loss, group_neurons, separability_loss
from .warmstart import fit_routers_

log = logging.getLogger("shadowsparse")


def lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy. logits (B, T, V), ids (B, T)."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


class LTESystem(L.LightningModule):
    """The model being made efficient, its routers, and the routing source the gating hooks call."""

    def __init__(self, model: nn.Module, routers: Routers, cfg: LTEConfig):
        super().__init__()
        self.model, self.routers, self.cfg = model, routers, cfg
        self.source = LTEScores(routers, route=cfg.route, tau=cfg.tau, soft=cfg.stage1_steps > 0)
        self.stage = 1 if cfg.stage1_steps > 0 else 2
        if self.stage == 2:
            self.routers.requires_grad_(False)
        self.stage1_summary: dict = {}

    def _enter_stage2(self) -> None:
        s = torch.cat([v.detach().flatten() for v in self.source.scores.values()]) if self.source.scores else None
        if s is not None:  # how far stage 1 got by LTE's own rule (experts below tau are off)
            self.stage1_summary = {"stage1_mean_score": float(s.mean()),
                                   "stage1_below_tau": float((s <= self.cfg.tau).float().mean())}
        self.routers.requires_grad_(False)  # frozen: AdamW skips parameters without gradients
        self.source.soft = False
        self.stage = 2
        log.info("lte: stage 2 from step %d (routers frozen, hard %s routing at %.2f)%s", self.global_step,
                 self.cfg.route, self.cfg.ffn_sparsity,
                 "".join(f", {k}={v:.3f}" for k, v in self.stage1_summary.items()))

    def on_train_batch_start(self, batch, batch_idx):
        if self.stage == 1 and self.global_step >= self.cfg.stage1_steps:
            self._enter_stage2()

    def training_step(self, batch, batch_idx):
        (ids,) = batch  # (B, T)
        lm = lm_loss(self.model(input_ids=ids).logits, ids)
        loss = lm
        if self.stage == 1:
            scores = [self.source.scores[i] for i in self.routers.layers]  # each (B, T, E) or (B*T, E)
            eff = efficiency_loss(scores)
            sep = separability_loss(scores, self.cfg.tau, self.cfg.separability_eps)
            loss = lm + self.cfg.efficiency_weight * eff + self.cfg.separability_weight * sep
            self.log_dict({"train/efficiency": eff, "train/separability": sep}, on_step=True)
        self.log_dict({"train/lm_loss": lm, "train/loss": loss, "train/stage": float(self.stage)}, on_step=True,
                      prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        (ids,) = batch
        soft, self.source.soft = self.source.soft, False  # always measured as it will run: hard routing
        try:
            lm = lm_loss(self.model(input_ids=ids).logits, ids)
        finally:
            self.source.soft = soft
        realized = 1.0 - torch.stack(list(self.source.kept.values())).mean()
        self.log_dict({"val/lm_loss": lm, "val/realized_sparsity": realized}, on_epoch=True, batch_size=ids.shape[0])

    def on_validation_epoch_end(self):
        m = {k: float(v) for k, v in self.trainer.callback_metrics.items() if k.startswith("val/")}
        if m:
            log.info("lte step %d (stage %d): val lm %.4f (ppl %.2f), realized sparsity %.3f", self.global_step,
                     self.stage, m["val/lm_loss"], math.exp(m["val/lm_loss"]), m["val/realized_sparsity"])

    def configure_optimizers(self):
        c = self.cfg
        model_params = [p for p in self.model.parameters() if p.requires_grad]
        groups = [{"params": model_params, "lr": c.lora_lr if c.finetune == "lora" else c.lr,
                   "weight_decay": c.weight_decay}]
        if self.stage == 1:
            groups.append({"params": list(self.routers.parameters()), "lr": c.router_lr, "weight_decay": 0.0})
        opt = torch.optim.AdamW(groups)
        # linear warm-up, then cosine to 10% (stage 2 still needs a step size)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(c.warmup_steps, max(1, c.total_steps), floor=0.1))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def make_trainable(model: nn.Module, cfg: LTEConfig) -> None:
    """Full: every parameter but (unless asked) the embeddings / LM head, and an MoE model's own routers (which
    experts a token computes stays the base model's choice); LoRA: peft adapters on the decoder linears (an MoE
    model's attention: its experts are 3-D Parameters, not linears peft wraps), base weights frozen (peft creates the
    adapters trainable)."""
    model.requires_grad_(False)
    view = ModelView(model)
    if cfg.finetune == "full":
        model.requires_grad_(True)
        if not cfg.train_embeddings:
            for emb in (model.get_input_embeddings(), model.get_output_embeddings()):
                if emb is not None:
                    emb.requires_grad_(False)
        for i in range(view.dims.n_layers):
            router = router_of(view, i)
            if router is not None:
                router.requires_grad_(False)
        return
    from peft import LoraConfig, inject_adapter_in_model
    spec = view.spec
    linears = (*spec.attn_in, spec.attn_out) if view.dims.experts else \
        (*spec.attn_in, spec.attn_out, *spec.ffn_in, spec.ffn_down)
    targets = cfg.lora.targets or sorted({p.split(".")[-1] for p in linears})
    inject_adapter_in_model(LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                                       target_modules=targets, fan_in_fan_out=spec.transposed), model)  # Conv1D


def changed_weights(model: nn.Module, cfg: LTEConfig) -> tuple[dict, dict]:
    """What a checkpoint must hold besides the routers: (full-FT parameters by name, LoRA adapters by module)."""
    if cfg.finetune == "full":
        return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}, {}
    from peft.tuners.lora import LoraLayer
    adapters = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and "default" in module.lora_A:
            adapters[name] = (module.lora_A["default"].weight.detach().cpu().clone(),  # (r, in)
                              module.lora_B["default"].weight.detach().cpu().clone(),  # (out, r)
                              float(module.scaling["default"]))
    return {}, adapters


def train_lte(model: nn.Module, windows: torch.Tensor, cfg: LTEConfig, first_layer: int, seed: int = 0,
              trainer_cfg: dict | None = None, loggers: list | None = None, root_dir: str | None = None
              ) -> tuple[LTEArtifact, nn.Module]:
    """Train LTE on a copy of ``model`` over token windows (N, T): the last cfg.val_windows are held out.
    Returns the artifact (routers + changed weights) and the trained copy (hooks removed)."""
    from ..llm import model_fingerprint
    cfg.validate()
    view = ModelView(model)  # refuses unregistered architectures with the fix
    n_layers = view.dims.n_layers
    if not 0 <= first_layer < n_layers:
        raise ConfigError(f"lte first routed layer must be in [0, {n_layers - 1}], got {first_layer}")
    if len(windows) <= cfg.val_windows:
        raise ConfigError(f"LTE got {len(windows)} windows, needs more than lte.val_windows={cfg.val_windows}; "
                          "give more text or lower lte.seq_len")
    t0 = time.time()
    layers = list(range(first_layer, n_layers))
    groups = group_neurons(view, layers, cfg.expert_size, cfg.grouping, seed)  # (Lr, F)
    fingerprint = model_fingerprint(model)
    work = copy.deepcopy(model)
    make_trainable(work, cfg)
    work.train()  # load_llm hands out eval mode; fine-tuning runs dropout (if the family has any)
    torch.manual_seed(seed)
    device = next(model.parameters()).device
    routers = Routers(view.dims.hidden, view.dims.ffn, layers, groups, cfg.init_score).to(device)
    train_ids, val_ids = windows[:-cfg.val_windows], windows[-cfg.val_windows:]
    warm = {}
    if cfg.router_init == "fit":
        warm = fit_routers_(model, routers, train_ids[:cfg.router_fit_windows], cfg.init_score, gain=cfg.router_fit_gain)
        log.info("lte: routers warm-started on %d windows (ridge R^2 of expert mass %.3f)",
                 min(len(train_ids), cfg.router_fit_windows), warm["router_fit_r2"])
    with torch.no_grad():  # the reference the held-out losses below compare to: the base model, dense
        dense_val = float(torch.stack([lm_loss(model(input_ids=ids).logits, ids)
                                       for ids in val_ids.to(device).split(1)]).mean())
    log.info("lte: held-out LM loss of the dense base model %.4f (ppl %.2f)", dense_val, math.exp(dense_val))
    system = LTESystem(work, routers, cfg)
    g = torch.Generator().manual_seed(seed)
    train = DataLoader(TensorDataset(train_ids), batch_size=cfg.batch_size, shuffle=True, generator=g,
                       drop_last=len(train_ids) >= cfg.batch_size)
    val = DataLoader(TensorDataset(val_ids), batch_size=cfg.batch_size)
    trainer = L.Trainer(**{"accelerator": "cpu", "devices": 1, "enable_progress_bar": False, **trainer_args(trainer_cfg)},
                        max_steps=cfg.total_steps, max_epochs=-1, logger=loggers or False, enable_checkpointing=False,
                        enable_model_summary=False, gradient_clip_val=cfg.grad_clip, num_sanity_val_steps=0,
                        val_check_interval=min(cfg.val_every, cfg.total_steps), check_val_every_n_epoch=None,
                        limit_val_batches=1.0, default_root_dir=root_dir)
    gcfg = GatingConfig(ffn_sparsity=cfg.ffn_sparsity, first_layer=first_layer, count=False)
    with attach_gating(work, system.source, gcfg):
        trainer.fit(system, train_dataloaders=train, val_dataloaders=val)
        if system.stage == 1:  # stage 2 was empty: the artifact still routes hard
            system._enter_stage2()
        final = trainer.validate(system, dataloaders=val, verbose=False)[0]
    work.eval()
    weights, adapters = changed_weights(work, cfg)
    summary = {"steps": int(trainer.global_step), "train_tokens": int(trainer.global_step) * cfg.batch_size * cfg.seq_len,
               "train_seconds": round(time.time() - t0, 1), "val_lm_loss": float(final["val/lm_loss"]),
               "val_dense_lm_loss": dense_val,
               "val_realized_sparsity": float(final["val/realized_sparsity"]), "first_layer": first_layer,
               "trainable_params": int(sum(v.numel() for v in weights.values())
                                       + sum(a.numel() + b.numel() for a, b, _ in adapters.values())),
               **system.stage1_summary, **{k: v for k, v in warm.items() if k == "router_fit_r2"}}
    log.info("lte: trained %d steps (%d tokens) in %.0f s; held-out LM loss %.4f at realized sparsity %.3f",
             summary["steps"], summary["train_tokens"], summary["train_seconds"], summary["val_lm_loss"],
             summary["val_realized_sparsity"])
    routers.requires_grad_(False)
    return LTEArtifact(cfg, routers.cpu(), weights, adapters, fingerprint, summary), work
