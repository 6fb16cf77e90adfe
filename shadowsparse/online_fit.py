"""Predictor fitting with the frozen LLM in the loop: every epoch, each chunk of calibration windows is scored by the
model on its own device as the fit reads it, so no targets are stored.

Why: a stored collection holds every neuron's score per token (SmolLM2-135M: 30 x 1536 bf16, 92 KB a token), so
the ~1M calibration tokens a predictor wants are ~92 GB of disk and a CPU-side normalization pass every epoch,
while the model's forward over them is seconds on a GPU. Here each epoch re-runs the model (the pipeline's own
scoring, targets.score.score_window, and normalization, fitting.normalize_scores) and trains on the chunk at once.

Several predictors ("students") train in lockstep on the same chunks, so comparing designs costs one pass of the
LLM per epoch: the pipeline's ``shared`` and ``per_layer`` predictors (with PredictorSystem's losses: mse,
listnet, bce) and ``ffn_input``, predictor_verify's per-layer predictor that reads each FFN's own input
(verify_predictor.FFNInputPredictor; MSE on the neuron targets of the layers it predicts).

    students = [shared_student("shared", dims), ffn_input_student("ffn_r64", dims, layers=range(1, L))]
    history = fit_online(model, calib_windows, students, OnlineFitConfig(epochs=6), val_windows=heldout[:8])

Device memory: session 13 saw it grow by ~2.9 GB per chunk on an H100 until an 80 GB card stopped after ~25 chunks.
The cause (session 15, research/online_fit_memory.py with torch.cuda.memory._record_memory_history): on CUDA,
F.mse_loss's mean is a 0-dim view of its elementwise (rows, L, F) buffer, and the epoch's list of step losses kept
every step's buffer alive; the list now holds copies. A fit that still runs out of device memory stops (logged,
recorded as "stopped" in its epoch record) and keeps what it fitted.
"""
from __future__ import annotations

import gc
import logging
import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .arch import ModelView
from .ffn_io import ffn_input_module
from .fitting import normalize_scores
from .gating import n_keep

log = logging.getLogger("shadowsparse")


@dataclass
class OnlineFitConfig:
    epochs: int = 8
    chunk_windows: int = 32  # windows scored per forward of the LLM; their tokens are shuffled together
    batch_size: int = 1024  # tokens per optimizer step
    lr: float = 1e-3
    weight_decay: float = 0.01
    eps: float = 1e-3  # normalize_scores' eps, as predictor.fit.eps
    head_weight: float = 1.0
    ffn_sparsity: float = 0.5  # where held-out recall is measured and BCE labels are cut
    head_sparsity: float = 0.3
    criterion: str = "activation"
    feature_layer: int = 0
    seed: int = 0
    autocast: bool = True  # bf16 autocast for the students on CUDA (trainer=gpu's bf16-mixed)
    max_seconds: float | None = None  # after the first chunk, fewer epochs if the projected fit would take longer


@dataclass
class Student:
    """One predictor being fitted: ``kind`` "shared" / "per_layer" (``system``: a PredictorSystem holding the
    predictor and its loss) or "ffn_input" (``predictor``: an FFNInputPredictor)."""

    name: str
    kind: str
    predictor: nn.Module
    system: nn.Module | None = None
    lr: float | None = None  # None: OnlineFitConfig.lr
    opt: torch.optim.Optimizer | None = None
    sched: torch.optim.lr_scheduler.LambdaLR | None = None
    seconds: float = 0.0  # time spent in its steps
    losses: list = field(default_factory=list)

    @property
    def needs(self) -> str:
        return {"shared": "features", "per_layer": "layer_inputs", "ffn_input": "ffn_inputs"}[self.kind]


def shared_student(name: str, dims: dict, model: dict | None = None, loss: str = "mse", lr: float | None = None,
                   kind: str = "shared", fit: dict | None = None) -> Student:
    """A shared (or per_layer) predictor with PredictorSystem's objective; ``model``: PredictorConfig fields."""
    from .system import PredictorSystem
    system = PredictorSystem(dims, {"kind": kind, **(model or {})}, {"loss": loss, **(fit or {})})
    return Student(name, kind, system.predictor, system=system, lr=lr)


def ffn_input_student(name: str, dims: dict, layers, rank: int = 64, lr: float | None = None) -> Student:
    from .verify_predictor import FFNInputPredictor
    return Student(name, "ffn_input", FFNInputPredictor(dims["d_model"], dims["ffn"], list(layers), rank), lr=lr)


@torch.no_grad()
def score_chunk(model, ids: torch.Tensor, cfg: OnlineFitConfig, needs: set[str]) -> dict[str, torch.Tensor]:
    """Rows of one chunk of windows (B, T), on the model's device: normalized head (N, L, H) and neuron (N, L, F)
    scores in bf16, and what the students read: ``features`` (N, d) fp32, ``layer_inputs`` / ``ffn_inputs``
    (N, L, d) bf16 (every layer's decoder input / FFN input).

    Forward criteria only (activation: |a| per neuron, ‖W_o[:, h] x_h‖ per head, as targets.score records them);
    each layer's scores are normalized inside its hook, so no fp32 (N, L, F) block is ever held, and the model runs
    without a KV cache and with one position's logits."""
    from .arch import head_contribution_norm
    if cfg.criterion != "activation":
        raise ValueError(f"online fitting scores the forward criterion 'activation', not {cfg.criterion!r}")
    view = ModelView(model)
    L, H, F_, d = view.dims.n_layers, view.dims.n_heads, view.dims.ffn, view.dims.hidden
    n = ids.numel()
    dev = ids.device
    rows = {"heads": torch.empty(n, L, H, dtype=torch.bfloat16, device=dev),
            "neurons": torch.empty(n, L, F_, dtype=torch.bfloat16, device=dev)}
    for key in ("layer_inputs", "ffn_inputs"):
        if key in needs:
            rows[key] = torch.empty(n, L, d, dtype=torch.bfloat16, device=dev)

    def head_hook(layer):
        def hook(module, args):
            s = head_contribution_norm(args[0].reshape(n, -1), view.attn_out_weight(layer), H)
            rows["heads"][:, layer] = normalize_scores(s, cfg.eps).to(torch.bfloat16)
        return hook

    def neuron_hook(layer):
        def hook(module, args):
            rows["neurons"][:, layer] = normalize_scores(args[0].reshape(n, F_).float().abs(), cfg.eps).to(
                torch.bfloat16)
        return hook

    def copy_hook(key, layer):
        def hook(module, args, *rest):
            h = args[0] if args else rest[0]["hidden_states"]
            if key == "features":
                rows[key] = h.reshape(n, d).float().clone()
            else:
                rows[key][:, layer] = h.reshape(n, d).to(torch.bfloat16)
        return hook

    hooks = []
    for layer in range(L):
        hooks.append(view.attn_out(layer).register_forward_pre_hook(head_hook(layer)))
        hooks.append(view.ffn_down(layer).register_forward_pre_hook(neuron_hook(layer)))
        if "layer_inputs" in needs:
            hooks.append(view.layer(layer).register_forward_pre_hook(copy_hook("layer_inputs", layer),
                                                                      with_kwargs=True))
        if "ffn_inputs" in needs:
            hooks.append(ffn_input_module(view, layer).register_forward_pre_hook(copy_hook("ffn_inputs", layer)))
    if "features" in needs:  # the hidden state entering layer feature_layer + 1
        hooks.append(view.layer(cfg.feature_layer + 1).register_forward_pre_hook(copy_hook("features", 0),
                                                                                  with_kwargs=True))
    try:
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
    finally:
        for h in hooks:
            h.remove()
    return rows


def ffn_input_scores(pred: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """An FFNInputPredictor over all of its layers at once: x (N, len(layers), d) -> (N, len(layers), F), the same
    arithmetic as its predict_layer per layer."""
    h = torch.einsum("nld,ldr->nlr", x.to(pred.w_in.dtype), pred.w_in) + pred.b_in
    if pred.act == "gelu":
        h = F.gelu(h)
    return torch.einsum("nlr,lrf->nlf", h, pred.w_out) + pred.b_out


def student_loss(s: Student, batch: dict, cfg: OnlineFitConfig) -> torch.Tensor:
    tn = batch["neurons"]
    if s.kind == "ffn_input":
        layers = s.predictor.layers
        pred = ffn_input_scores(s.predictor, batch["ffn_inputs"][:, layers])
        return F.mse_loss(pred.float(), tn[:, layers].float())
    ph, pn = s.predictor(batch[s.needs])
    return (s.system._unit_loss(pn.float(), tn.float(), cfg.ffn_sparsity)
            + cfg.head_weight * s.system._unit_loss(ph.float(), batch["heads"].float(), cfg.head_sparsity))


@torch.no_grad()
def student_recall(s: Student, rows: dict, cfg: OnlineFitConfig, layers: list[int]) -> float:
    """Mean top-k recall of the FFN neurons at cfg.ffn_sparsity over ``layers`` (the gated ones) of ``rows``."""
    from .system import topk_recall
    was = s.predictor.training
    s.predictor.eval()
    if s.kind == "ffn_input":
        pn = ffn_input_scores(s.predictor, rows["ffn_inputs"][:, s.predictor.layers])
        pn = pn[:, [s.predictor.index[layer] for layer in layers]]
    else:
        pn = s.predictor(rows[s.needs])[1][:, layers]
    tn = rows["neurons"][:, layers]
    s.predictor.train(was)
    return float(topk_recall(pn.float(), tn.float(), n_keep(tn.shape[-1], cfg.ffn_sparsity)))


def _train_chunk(students: list[Student], rows: dict, perm: torch.Tensor, cfg: OnlineFitConfig, autocast: bool):
    device = perm.device
    for s in students:
        t = time.time()
        for idx in perm.split(cfg.batch_size):
            batch = {k: v[idx] for k, v in rows.items()}
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                loss = student_loss(s, batch, cfg)
            s.opt.zero_grad(set_to_none=True)
            loss.backward()
            s.opt.step()
            s.sched.step()
            # a copy, not the loss itself: on CUDA (torch 2.11) F.mse_loss's mean is a 0-dim view of its (rows, L, F)
            # elementwise buffer, so keeping the loss kept 182 MB per step alive (SmolLM2 shapes, 1024 rows): the
            # per-chunk device memory growth of docs/research.md session 13, found with research/online_fit_memory.py
            s.losses.append(loss.detach().clone())
        if device.type == "cuda":
            torch.cuda.synchronize()
        s.seconds += time.time() - t


def _shorten(plan: dict, per_epoch: float, cfg: OnlineFitConfig, tokens: int) -> None:
    """Fewer planned epochs (and LR-schedule steps) when cfg.epochs of ``per_epoch`` seconds exceed max_seconds."""
    fit_epochs = max(1, min(cfg.epochs, int(cfg.max_seconds // per_epoch)))
    if fit_epochs < plan["epochs"]:
        log.info("online fit: ~%.0f s per epoch, %d epochs fit max_seconds=%.0f (not %d)", per_epoch, fit_epochs,
                 cfg.max_seconds, cfg.epochs)
        plan.update(epochs=fit_epochs, total=fit_epochs * math.ceil(tokens / cfg.batch_size))


def _student_metrics(students: list[Student], val: dict | None, cfg: OnlineFitConfig, gated: list[int]) -> dict:
    """Mean train loss of the epoch and held-out recall per student (no recall without val rows, e.g. after an
    out-of-memory stop, when the device has no room for it)."""
    out = {}
    for s in students:
        out[f"{s.name}/train_loss"] = float(torch.stack(s.losses).float().mean()) if s.losses else None
        if val is not None:
            out[f"{s.name}/val_recall_ffn"] = round(student_recall(s, val, cfg, gated), 4)
    return out


def fit_online(model, windows: torch.Tensor, students: list[Student], cfg: OnlineFitConfig,
               val_windows: torch.Tensor | None = None, on_epoch=None) -> list[dict]:
    """Fit ``students`` on ``windows`` (N, T) for cfg.epochs epochs, scoring each chunk with the model as it goes;
    returns one record per epoch (wall time, mean train loss and held-out recall per student). ``on_epoch(record)``
    is called after each epoch."""
    device = next(model.parameters()).device
    view = ModelView(model)
    needs = {s.needs for s in students}
    gated = list(range(cfg.feature_layer + 1, view.dims.n_layers))
    for s in students:
        s.predictor.to(device).train()
        s.opt = torch.optim.AdamW(s.predictor.parameters(), lr=s.lr or cfg.lr, weight_decay=cfg.weight_decay)
    tokens = windows.shape[0] * windows.shape[1]
    plan = {"epochs": cfg.epochs, "total": cfg.epochs * math.ceil(tokens / cfg.batch_size)}

    def factor(step: int) -> float:  # warmup_cosine over the planned steps (which max_seconds may shorten)
        warm = max(1, plan["total"] // 20)
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, plan["total"] - warm))))
    for s in students:
        s.sched = torch.optim.lr_scheduler.LambdaLR(s.opt, factor)
    val = score_chunk(model, val_windows.to(device), cfg, needs) if val_windows is not None else None
    autocast = cfg.autocast and device.type == "cuda"
    g = torch.Generator().manual_seed(cfg.seed)
    history, t_start = [], time.time()
    epoch = 0
    while epoch < plan["epochs"]:
        t0, llm_s = time.time(), 0.0
        for s in students:
            s.losses = []
        order = torch.randperm(windows.shape[0], generator=g)
        stopped = None
        for c, first in enumerate(range(0, len(order), cfg.chunk_windows)):
            t = time.time()
            try:
                rows = score_chunk(model, windows[order[first:first + cfg.chunk_windows]].to(device), cfg, needs)
            except torch.OutOfMemoryError as exc:  # keep what was fitted so far: the caller evaluates it
                stopped = f"out of memory at epoch {epoch} chunk {c}: {str(exc)[:200]}"
                log.warning("online fit stopped: %s", stopped)
                break
            if device.type == "cuda":
                torch.cuda.synchronize()
                if epoch == 0 and c < 3:
                    log.info("online fit chunk %d scored: %.1f GB allocated", c, torch.cuda.memory_allocated() / 1e9)
            llm_s += time.time() - t
            n = rows["neurons"].shape[0]
            perm = torch.randperm(n, generator=g).to(device)
            try:
                _train_chunk(students, rows, perm, cfg, autocast)
            except torch.OutOfMemoryError as exc:
                stopped = f"out of memory at epoch {epoch} chunk {c}: {str(exc)[:200]}"
                log.warning("online fit stopped: %s", stopped)
                break
            del rows
            gc.collect()  # (a reference cycle must not keep a chunk's rows alive)
            if epoch == 0 and c < 6 and device.type == "cuda":
                log.info("online fit chunk %d: %.1f GB allocated", c, torch.cuda.memory_allocated() / 1e9)
            if epoch == 0 and c == 0 and cfg.max_seconds:  # project the whole fit from the first chunk
                _shorten(plan, (time.time() - t0) * math.ceil(len(order) / cfg.chunk_windows), cfg, tokens)
        record = {"epoch": epoch, "seconds": round(time.time() - t0, 1), "llm_seconds": round(llm_s, 1),
                  "tokens": tokens, "epochs_planned": plan["epochs"], **({"stopped": stopped} if stopped else {}),
                  **_student_metrics(students, None if stopped else val, cfg, gated)}
        history.append(record)
        log.info("online fit epoch %d: %s", epoch, record)
        if on_epoch is not None:
            on_epoch(record)
        epoch += 1
        if stopped:
            break
    for s in students:
        s.predictor.eval().requires_grad_(False)
        if s.kind == "ffn_input":
            s.predictor.train_tokens = tokens
    log.info("online fit: %d epochs of %d tokens in %.0f s", plan["epochs"], tokens, time.time() - t_start)
    return history
