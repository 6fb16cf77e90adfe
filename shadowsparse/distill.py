"""Sparse self-distillation: fine-tune a model so that it tolerates contextual sparsity, with its own dense
outputs as the target.

The training-free selectors (sketch_teal, sketch_threshold, teal, threshold) choose per token which FFN neurons
and attention input channels to skip; past ~50% FFN sparsity the model's loss grows faster than the bytes saved.
Here a student copy runs with the sparsity the selectors approximate — the top-|a| fraction (1 - ffn) of each
token's FFN neurons kept, and the top-|x| fraction (1 - attn) of the attention inputs (q/k/v's input, o's input) —
and learns to match the frozen dense model's next-token distribution: KL(teacher || student) at every position.
The target is the dense model, not the text: the student gains nothing by fitting the calibration text's domain,
so its perplexity against the original dense model measures the sparsity loss it recovered (docs/research.md,
session 18). Afterwards any selector is built on the student's weights as on any model (the sketch's copy and
thresholds are calibrated then), and the decode engine runs it unchanged:

    student, summary = distill(model, windows, DistillConfig(ffn=0.7, attn=0.3, steps=1000))
    save_distilled(student, "out/distilled", model_fingerprint(model), cfg, summary)
    g = ss.load_gated(student, method="sketch_teal", ffn_sparsity=0.7, tokenizer=tok, calib=calib)

A folder holds ``model.safetensors`` (the changed parameters by name) and ``distill.json`` (the config, the base
model's fingerprint, the training summary); ``load_distilled`` refuses a folder made from another base model.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import lightning as L
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from .arch import ModelView
from .errors import ConfigError
from .fitting import trainer_args, warmup_cosine

log = logging.getLogger("shadowsparse")
FORMAT = 1
META, WEIGHTS = "distill.json", "model.safetensors"


@dataclass
class DistillConfig:
    ffn: float = 0.7  # fraction of each token's FFN neurons dropped in training (lowest |a| first)
    attn: float = 0.3  # fraction of the attention inputs' channels dropped (lowest |x| first); 0: attention dense
    first_layer: int = 1  # layers before it stay dense (the selectors' first gated layer)
    steps: int = 1000
    batch_size: int = 8  # windows per step
    lr: float = 5e-5
    warmup_steps: int = 20
    grad_clip: float = 1.0
    val_windows: int = 4  # the last windows, held out: KL and the student's dense loss at the end
    train_embeddings: bool = False  # the embeddings / LM head stay the base model's (tied in many families)

    def validate(self) -> None:
        for name in ("ffn", "attn"):
            v = getattr(self, name)
            if not 0.0 <= v < 1.0:
                raise ConfigError(f"distill.{name} (the fraction dropped in training) must be in [0, 1), got {v}")
        for name in ("steps", "batch_size", "val_windows"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"distill.{name} must be >= 1, got {getattr(self, name)}")
        if not (self.lr > 0 and self.grad_clip > 0 and self.warmup_steps >= 0 and self.first_layer >= 0):
            raise ConfigError("distill.lr and distill.grad_clip must be > 0, warmup_steps and first_layer >= 0; got "
                              f"lr={self.lr} grad_clip={self.grad_clip} warmup_steps={self.warmup_steps} "
                              f"first_layer={self.first_layer}")


def keep_top(x: torch.Tensor, keep: float) -> torch.Tensor:
    """x (..., n) with all but its round(keep·n) largest |x| per row zeroed. The mask is a constant to autograd:
    gradients flow through the kept entries, as the sparse step computes only them."""
    k = max(1, round(keep * x.shape[-1]))
    idx = x.detach().abs().topk(k, dim=-1).indices
    return x * torch.zeros_like(x, dtype=torch.bool).scatter_(-1, idx, True)


def attach_topk(model: nn.Module, ffn: float, attn: float, first_layer: int = 1) -> list:
    """Pre-hooks from first_layer on: the down projection's input keeps its top (1 - ffn) neurons, each of q/k/v's
    inputs (the same tensor, so the same channels) and o's input their top (1 - attn) channels. Returns the hook
    handles (remove them to run dense again). Dense FFNs only: an MoE layer's routed neurons have no one down
    projection input."""
    view = ModelView(model)
    if view.dims.experts:
        raise ConfigError("sparse distillation gates dense FFNs; this model has mixture-of-experts layers "
                          "(use lte for MoE models)")
    if not 0 <= first_layer < view.dims.n_layers:
        raise ConfigError(f"distill.first_layer must be in [0, {view.dims.n_layers - 1}], got {first_layer}")

    def pre(keep):
        return lambda module, args: (keep_top(args[0], keep),) + tuple(args[1:])

    spec, hooks = view.spec, []
    paths = ([spec.ffn_down] if ffn > 0 else []), ([*spec.attn_in, spec.attn_out] if attn > 0 else [])
    for i in range(first_layer, view.dims.n_layers):
        hooks += [view.module(i, p).register_forward_pre_hook(pre(1 - ffn)) for p in paths[0]]
        hooks += [view.module(i, p).register_forward_pre_hook(pre(1 - attn)) for p in paths[1]]
    return hooks


def kl_to_teacher(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) per position, averaged: logits (B, T, V)."""
    s = F.log_softmax(student_logits.float(), -1).flatten(0, 1)
    t = F.log_softmax(teacher_logits.float(), -1).flatten(0, 1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean")


class DistillSystem(L.LightningModule):
    """The student (trained, sparse through its hooks) and the frozen dense teacher (kept out of the module tree:
    not trained, not checkpointed)."""

    def __init__(self, student: nn.Module, teacher: nn.Module, cfg: DistillConfig):
        super().__init__()
        self.student, self.cfg = student, cfg
        self._teacher = (teacher,)

    def _kl(self, ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            t = self._teacher[0](input_ids=ids).logits
        return kl_to_teacher(self.student(input_ids=ids).logits, t)

    def training_step(self, batch, batch_idx):
        loss = self._kl(batch[0])
        self.log("train/kl", loss, on_step=True, prog_bar=True)
        return loss

    def configure_optimizers(self):
        c = self.cfg
        opt = torch.optim.AdamW([p for p in self.student.parameters() if p.requires_grad], lr=c.lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(c.warmup_steps, c.steps))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def frozen_parameter_ids(model: nn.Module, train_embeddings: bool) -> set[int]:
    """ids of the parameters distillation leaves alone: the input embeddings and the LM head unless asked (a tied
    head is the embedding)."""
    if train_embeddings:
        return set()
    return {id(p) for emb in (model.get_input_embeddings(), model.get_output_embeddings()) if emb is not None
            for p in emb.parameters()}


def make_trainable(model: nn.Module, train_embeddings: bool) -> None:
    frozen = frozen_parameter_ids(model, train_embeddings)
    for p in model.parameters():
        p.requires_grad_(id(p) not in frozen)


@contextmanager
def topk_sparsity(model: nn.Module, cfg: DistillConfig):
    """The training sparsity of cfg (attach_topk's hooks) for the duration of the block."""
    hooks = attach_topk(model, cfg.ffn, cfg.attn, cfg.first_layer)
    try:
        yield hooks
    finally:
        for h in hooks:
            h.remove()


@torch.no_grad()
def sparse_kl(student: nn.Module, teacher: nn.Module, ids: torch.Tensor, cfg: DistillConfig,
              sparsity: Callable | None = None) -> float:
    """Mean KL(teacher || student) over windows (N, T) with the training sparsity on the student (``sparsity``:
    distill's)."""
    with (sparsity or (lambda m: topk_sparsity(m, cfg)))(student):
        kls = [kl_to_teacher(student(input_ids=w[None]).logits, teacher(input_ids=w[None]).logits) for w in ids]
    return float(torch.stack(kls).mean())


@torch.no_grad()
def dense_lm_loss(model: nn.Module, ids: torch.Tensor) -> float:
    """Mean next-token cross-entropy of the model, dense, over windows (N, T)."""
    losses = [F.cross_entropy(model(input_ids=w[None]).logits[0, :-1].float(), w[1:]) for w in ids]
    return float(torch.stack(losses).mean())


def distill(model: nn.Module, windows: torch.Tensor, cfg: DistillConfig, seed: int = 0,
            trainer_cfg: dict | None = None, sparsity: Callable | None = None) -> tuple[nn.Module, dict]:
    """Fine-tune a copy of ``model`` on token windows (N, T) (the last cfg.val_windows held out) to match the
    model's dense outputs under the training sparsity. ``trainer_cfg``: Lightning Trainer keys (devices, precision,
    max_time: a wall-clock cap that keeps what was trained). ``sparsity(student)``: a context manager that gates
    the student while it trains and while its held-out KL is measured (default: cfg's top-|a| / top-|x|, i.e.
    topk_sparsity; e.g. a selector's own hooks, to train through its decisions). Returns (the student in eval mode,
    hooks removed, gradients off; a summary with the held-out KL before and after)."""
    sparsity = sparsity or (lambda m: topk_sparsity(m, cfg))
    cfg.validate()
    if windows.dim() != 2 or len(windows) <= cfg.val_windows:
        raise ConfigError(f"distill needs (N, T) token windows with N > distill.val_windows={cfg.val_windows}, got "
                          f"{tuple(windows.shape)}; give more calibration text")
    t0 = time.time()
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    if ModelView(model).dims.experts:  # before the copy (attach_topk says the same)
        raise ConfigError("sparse distillation gates dense FFNs; this model has mixture-of-experts layers "
                          "(use lte for MoE models)")
    teacher = model.eval()
    # an fp16/bf16 model trains as an fp32 copy (AdamW's small steps vanish in half precision, fp16 overflows) and
    # is cast back at the end; the teacher stays as loaded
    student = copy.deepcopy(model)
    if dtype in (torch.float16, torch.bfloat16):  # nn.Module's cast: transformers refuses .float() on a model it
        nn.Module.float(student)                  # marks quantized (a GGUF load, dequantized to fp32 already)
    train_ids, val_ids = windows[:-cfg.val_windows], windows[-cfg.val_windows:].to(device)
    kl_before = sparse_kl(student, teacher, val_ids, cfg, sparsity)
    make_trainable(student, cfg.train_embeddings)
    student.train()
    torch.manual_seed(seed)
    loader = DataLoader(TensorDataset(train_ids), batch_size=cfg.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(seed), drop_last=len(train_ids) >= cfg.batch_size)
    args = trainer_args(trainer_cfg, also=("max_time",))
    accelerator = "gpu" if device.type == "cuda" else "cpu"  # where the model is, whatever the trainer config says
    if args.get("accelerator", accelerator) != accelerator:
        log.info("distill: trains on the model's device (%s), not trainer.accelerator=%s", device, args["accelerator"])
    trainer = L.Trainer(**{"devices": 1, "enable_progress_bar": False, **args, "accelerator": accelerator},
                        max_steps=cfg.steps, max_epochs=-1, logger=False, enable_checkpointing=False,
                        enable_model_summary=False, gradient_clip_val=cfg.grad_clip, limit_val_batches=0)
    with sparsity(student):
        trainer.fit(DistillSystem(student, teacher, cfg), train_dataloaders=loader)
    nn.Module.to(student, device, dtype).eval().requires_grad_(False)  # Lightning's teardown leaves it on the CPU
    summary = {"steps": int(trainer.global_step), "train_tokens": int(trainer.global_step) * cfg.batch_size
               * windows.shape[1], "train_seconds": round(time.time() - t0, 1), "val_kl_sparse_before": kl_before,
               "val_dense_lm_loss_student": dense_lm_loss(student, val_ids),
               "val_dense_lm_loss_teacher": dense_lm_loss(teacher, val_ids),
               "val_kl_sparse": sparse_kl(student, teacher, val_ids, cfg, sparsity)}
    log.info("distill: %d steps (%d tokens) in %.0f s; held-out KL under ffn %.2f / attn %.2f: %.4f -> %.4f; "
             "dense LM loss %.4f (base %.4f)", summary["steps"], summary["train_tokens"], summary["train_seconds"],
             cfg.ffn, cfg.attn, kl_before, summary["val_kl_sparse"], summary["val_dense_lm_loss_student"],
             summary["val_dense_lm_loss_teacher"])
    return student, summary


def changed_parameters(student: nn.Module, cfg: DistillConfig) -> dict[str, torch.Tensor]:
    """The parameters distillation trains, by name (what a folder stores; the student's own requires_grad flags
    are off after training)."""
    frozen = frozen_parameter_ids(student, cfg.train_embeddings)
    return {n: p.detach().cpu().contiguous() for n, p in student.named_parameters() if id(p) not in frozen}


def save_distilled(student: nn.Module, folder: str | Path, base_fingerprint: dict, cfg: DistillConfig,
                   summary: dict) -> Path:
    """The student's trained parameters (safetensors) and distill.json; written to a temporary name first, so a
    folder never holds half a model."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / (WEIGHTS + ".tmp")
    save_file(changed_parameters(student, cfg), str(tmp))
    tmp.replace(folder / WEIGHTS)
    meta = {"format": FORMAT, "config": asdict(cfg), "model": base_fingerprint, "summary": summary}
    (folder / META).write_text(json.dumps(meta, indent=2))
    return folder


@torch.no_grad()
def load_distilled(folder: str | Path, model: nn.Module, fix: str | None = None) -> dict:
    """Swap a distilled folder's parameters into ``model`` (the base model it was made from; another is refused).
    Returns the folder's distill.json. ``fix``: what the error messages tell the user to do."""
    from .llm import check_fingerprint
    folder = Path(folder)
    fix = fix or "distill the model again (research/sparse_distill.py) or copy the whole folder"
    try:
        meta = json.loads((folder / META).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"no readable distilled model at '{folder}' ({META}: {exc}); {fix}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ConfigError(f"'{folder / META}' is not a distilled model of format {FORMAT}; {fix}")
    check_fingerprint(meta.get("model") or {}, model, f"distilled model '{folder}'")
    try:
        weights = load_file(str(folder / WEIGHTS))
    except Exception as exc:  # SafetensorError (empty, truncated), OSError (missing)
        raise ConfigError(f"'{folder / WEIGHTS}' could not be read as safetensors ({type(exc).__name__}: {exc}); "
                          f"{fix}") from None
    params = dict(model.named_parameters())
    wrong = sorted(n for n, v in weights.items() if n not in params or params[n].shape != v.shape)
    if wrong:
        raise ConfigError(f"distilled model '{folder}' does not fit this model (parameters {wrong[:3]}); {fix}")
    for n, v in weights.items():
        params[n].copy_(v.to(params[n].device, params[n].dtype))
    return meta


# ---- the pipeline's stage: stages.distill=true trains <run>/distilled/; a run directory that has it loads it ----

DISTILLED_DIR = "distilled"  # in a run directory
RUN_KEYS = ("seq_len", "n_windows", "split")  # the distill node's keys that cut the training text, not DistillConfig's


def distill_config(cfg) -> DistillConfig:
    """DistillConfig from the composed config's distill node."""
    from omegaconf import OmegaConf
    node = OmegaConf.to_container(cfg.distill, resolve=True)
    return DistillConfig(**{k: v for k, v in node.items() if k not in RUN_KEYS})


def validate_distill(cfg) -> None:
    """Checks before any model loads (pipeline.validate): the config's values, and no static mask with it."""
    if not cfg.stages.get("distill"):
        return
    distill_config(cfg).validate()
    node = cfg.distill
    if node.seq_len < 2 or (node.n_windows is not None and node.n_windows <= node.val_windows):
        raise ConfigError(f"distill.seq_len must be >= 2 and distill.n_windows null or > distill.val_windows="
                          f"{node.val_windows}; got seq_len={node.seq_len} n_windows={node.n_windows}")
    from .distributed import launched_all_at_once
    if launched_all_at_once():
        raise ConfigError("stages.distill under a launcher that starts every rank at once (torchrun, SLURM): run the "
                          "distill stage in one process first (stages.collect=false stages.fit=false "
                          "stages.evaluate=false), then launch the multi-process stages on the same paths.output_dir "
                          "with stages.distill=false (they load its distilled/)")
    if cfg.sparsity.metric:
        raise ConfigError("stages.distill fine-tunes every decoder weight, which would refill a static sparsity mask; "
                          "run it without sparsity= (sparsity=none), or the static mask without stages.distill")


def stage_distill(cfg, model: nn.Module, tok, run_dir: Path,
                  eval_windows: torch.Tensor | None = None) -> tuple[nn.Module, dict]:
    """Distill ``model`` on the calibration text's source and save the student to <run>/distilled/ -> (the student,
    the metrics); the base model is dropped by the caller (the student replaces it for every later stage).
    eval_windows (N, T): the base model's dense perplexity on them is recorded (distill/eval_ppl_base), since the
    evaluation's dense row is then the student's own."""
    from omegaconf import OmegaConf

    from .data import TextSource, WindowSpec, token_windows
    from .llm import model_fingerprint
    dcfg = distill_config(cfg)
    want = cfg.distill.n_windows or dcfg.steps * dcfg.batch_size + dcfg.val_windows
    calib_source = OmegaConf.to_container(cfg.data.calib.source, resolve=True)
    source = TextSource(**{**calib_source, **({"split": cfg.distill.split} if cfg.distill.split else {})})
    text = {"seq_len": cfg.distill.seq_len, "n_windows": want, "source": calib_source, "split": cfg.distill.split,
            "seed": cfg.seed}
    fingerprint = model_fingerprint(model)  # the base model's: load_distilled refuses the folder for another
    if reusable(run_dir / DISTILLED_DIR, fingerprint, dcfg, text):  # a rerun (e.g. after a later stage failed)
        log.info("distill: reusing %s (same base model, settings and text)", run_dir / DISTILLED_DIR)
        return model, load_run_distilled(run_dir, model)
    windows = token_windows(tok, WindowSpec(cfg.distill.seq_len, want, source), "data.calib")
    if len(windows) < want:
        log.warning("distill: the calibration text holds %d windows of %d tokens, fewer than the %d asked; the "
                    "steps revisit them", len(windows), cfg.distill.seq_len, want)
    trainer = OmegaConf.to_container(cfg.trainer, resolve=True)
    if trainer.get("devices") not in (None, 1, "auto"):
        log.info("distill: trains on one device (trainer.devices=%s is for the predictor's fit)", trainer["devices"])
    trainer["devices"] = 1  # a multi-process launch would re-run the whole pipeline in every process
    student, summary = distill(model, windows, dcfg, seed=cfg.seed, trainer_cfg=trainer)
    if eval_windows is not None:
        summary["eval_ppl_base"] = dense_perplexity(model, eval_windows)
        summary["eval_ppl_student"] = dense_perplexity(student, eval_windows)
        log.info("distill: dense perplexity on the evaluation text, base %.4f, distilled %.4f",
                 summary["eval_ppl_base"], summary["eval_ppl_student"])
    summary["text"] = text
    save_distilled(student, run_dir / DISTILLED_DIR, fingerprint, dcfg, summary)
    return student, {f"distill/{k}": v for k, v in summary.items() if k != "text"}


def reusable(folder: Path, fingerprint: dict, dcfg: DistillConfig, text: dict) -> bool:
    """Whether ``folder`` holds a finished student made from this base model with these settings and this training
    text (else it is trained again and replaced)."""
    try:
        meta = json.loads((folder / META).read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    summary = meta.get("summary") if isinstance(meta, dict) else None
    same = (isinstance(summary, dict) and meta.get("format") == FORMAT and meta.get("config") == asdict(dcfg)
            and summary.get("text") == text and (meta.get("model") or {}).get("hash") == fingerprint["hash"])
    return same and (folder / WEIGHTS).exists()


def dense_perplexity(model: nn.Module, windows: torch.Tensor) -> float:
    """exp of the mean next-token NLL over windows (N, T), one window at a time (perplexity.window_nll)."""
    from .perplexity import window_nll
    device = next(model.parameters()).device
    nll = sum(window_nll(model, w[None].to(device)) for w in windows)
    return math.exp(nll / (windows.shape[0] * (windows.shape[1] - 1)))


def load_run_distilled(run_dir: Path, model: nn.Module) -> dict | None:
    """Swap in the run's distilled weights if the run has them (<run>/distilled/) -> its metrics (distill/...), or
    None without a folder."""
    folder = Path(run_dir) / DISTILLED_DIR
    if not folder.exists():
        return None
    fix = (f"delete '{folder}' and rerun with stages.distill=true, or give a fresh paths.output_dir "
           "(a run directory's distilled/ is loaded whenever its model is)")
    summary = load_distilled(folder, model, fix).get("summary") or {}
    log.info("distill: the model is the run's distilled one (%s; held-out KL %s -> %s)", folder,
             summary.get("val_kl_sparse_before"), summary.get("val_kl_sparse"))
    return {f"distill/{k}": v for k, v in summary.items() if k != "text"}
