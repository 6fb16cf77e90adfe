"""Lightning pieces for predictor training: a DataModule over a targets/ folder and a LightningModule with the
losses and held-out metrics (Spearman ρ, top-k recall at the gating sparsity)."""
from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, IterableDataset

from .errors import ConfigError
from .fitting import normalize_scores, warmup_cosine
from .gating import n_keep
from .predictor import PredictorConfig, build_predictor
from .targets import DTYPES, TargetsReader, read_manifest

log = logging.getLogger("shadowsparse")
PREDICTOR_DIR = "predictor"  # in the run directory: the fit stage's predictor (config.json + model.safetensors)
PREDICTOR_CKPT = PREDICTOR_DIR  # (the name paths.predictor_ckpt defaults to)
LEGACY_CKPT = "predictor.ckpt"  # the pickled Lightning checkpoint earlier versions wrote there
FIT_CHECKPOINTS = "checkpoints"  # Lightning's own checkpoints of the fit (best.ckpt, last.ckpt): resuming only
# StreamingRows defines __len__ (batches per rank, for the LR schedule) and runs in the main process (no workers),
# where Lightning's warning about IterableDataset lengths under multi-worker loading does not apply
warnings.filterwarnings("ignore", message="Your `IterableDataset` has `__len__` defined")
# the fit's checkpoint folder holds fit.json (resume_point) before Lightning writes there, and last.ckpt on a resume
warnings.filterwarnings("ignore", message="Checkpoint directory .* exists and is not empty")


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


def spearman(pred: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """Mean Spearman ρ over rows: (..., U) pairs -> scalar (torchmetrics; tied values share their mean rank)."""
    from torchmetrics.functional import spearman_corrcoef
    p, t = pred.detach().flatten(0, -2).float(), true.detach().flatten(0, -2).float()  # (rows, U)
    return spearman_corrcoef(p.T, t.T).mean()  # torchmetrics correlates columns: one per row here


def topk_recall(pred: torch.Tensor, true: torch.Tensor, k: int) -> torch.Tensor:
    """Fraction of the true top-k units of each row that the predicted top-k also keeps (torchmetrics' multilabel
    recall of the predicted top-k against the true top-k; every row has k positives, so micro = the row mean)."""
    from torchmetrics.functional.classification import multilabel_recall
    p, t = pred.detach().flatten(0, -2), true.detach().flatten(0, -2)  # (rows, U)
    tp = torch.zeros_like(p, dtype=torch.long).scatter_(-1, p.topk(k, -1).indices, 1)
    tt = torch.zeros_like(t, dtype=torch.long).scatter_(-1, t.topk(k, -1).indices, 1)
    return multilabel_recall(tp, tt, num_labels=p.shape[-1], average="micro", validate_args=False)


class StreamingRows(IterableDataset):
    """Batches (x, normalized head scores, normalized neuron scores) of rows [lo, hi) of a targets/ folder, read from
    its memory-mapped shards a chunk at a time (TargetsReader); at most one shuffle buffer of rows is in memory.

    Chunks are runs of at most ``chunk_rows`` rows inside one shard. Scores are normalized per chunk as they are read
    (normalize_scores works row by row, so this equals normalizing the whole collection) and kept in their stored
    dtype, as the in-memory path did. With ``shuffle``: chunk order is permuted every epoch (seed + epoch), then rows
    within a buffer of ``buffer_rows``. Data parallel: every rank walks the same permuted row stream and takes its own
    contiguous share of ``(hi - lo) // world`` rows (the remainder, < world rows, is left out that epoch), so every
    rank runs the same number of batches — DDP steps stay in lockstep.
    """

    def __init__(self, reader: TargetsReader, lo: int, hi: int, batch_size: int, input_key: str, eps: float,
                 normalize: str, shuffle: bool, seed: int = 0, chunk_rows: int = 1024, buffer_rows: int = 16384,
                 keep: bool = False):
        super().__init__()
        # keep: hold every chunk read (normalized) for later epochs — for a range that fits the memory budget, where
        # re-reading and re-normalizing each epoch would cost more than the training (the embedded model's 16K rows:
        # ~60 s per epoch on one core); the order and the rows served are the same either way
        self.kept: dict[tuple[int, int], tuple[torch.Tensor, ...]] | None = {} if keep else None
        self.reader, self.lo, self.hi, self.batch_size = reader, lo, hi, batch_size
        self.input_key, self.eps, self.normalize, self.shuffle, self.seed = input_key, eps, normalize, shuffle, seed
        self.buffer_rows = max(batch_size, buffer_rows)
        self.chunks = []  # (a, b) row ranges, each inside one shard
        a = lo
        while a < hi:
            end = min(hi, a + chunk_rows, reader.starts[reader.shard_of(a) + 1])
            self.chunks.append((a, end))
            a = end
        self.epoch = 0
        self.peak_rows = 0  # most rows held at once (tests: the dataset streams, it never holds the whole range)

    @staticmethod
    def rank_world() -> tuple[int, int]:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def rows_per_rank(self) -> int:
        return (self.hi - self.lo) // self.rank_world()[1]

    def __len__(self) -> int:  # batches per epoch on this rank (Lightning's schedule and progress bar read it)
        return math.ceil(self.rows_per_rank() / self.batch_size)

    def _read(self, a: int, b: int) -> tuple[torch.Tensor, ...]:
        if self.kept is not None and (a, b) in self.kept:
            return self.kept[a, b]
        x = self.reader.rows(self.input_key, a, b)  # (n, d) or (n, L, d)
        h, n = (self.reader.rows(k, a, b) for k in ("heads", "neurons"))  # (n, L, H), (n, L, F)
        rows = (x, normalize_scores(h, self.eps, self.normalize).to(h.dtype),
                normalize_scores(n, self.eps, self.normalize).to(n.dtype))
        if self.kept is not None:
            self.kept[a, b] = rows
        return rows

    def __iter__(self):
        rank, world = self.rank_world()
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)  # same on every rank: same chunk order
        self.epoch += 1
        order = [self.chunks[i] for i in torch.randperm(len(self.chunks), generator=g)] if self.shuffle else self.chunks
        per = self.rows_per_rank()
        mine = (rank * per, (rank + 1) * per)  # this rank's share, in positions of the epoch's row stream
        buf: list[tuple[torch.Tensor, ...]] = []
        held, pos = 0, 0
        for a, b in order:
            first, pos = pos, pos + b - a  # this chunk is stream positions [first, pos)
            s0, s1 = max(mine[0], first), min(mine[1], pos)  # the part of it that is ours
            if s0 >= s1:
                continue
            buf.append(self._read(a + s0 - first, a + s1 - first))
            held += s1 - s0
            self.peak_rows = max(self.peak_rows, held)
            if held >= self.buffer_rows:
                buf, held = yield from self._emit(buf, g, final=False)
        yield from self._emit(buf, g, final=True)

    def _emit(self, buf, g, final: bool):
        """Yield the buffer's full batches (and, if final, the last short one); return the rest as the new buffer."""
        if not buf:
            return [], 0
        cols = [torch.cat(c) for c in zip(*buf)] if len(buf) > 1 else list(buf[0])
        n = cols[0].shape[0]
        if self.shuffle:
            perm = torch.randperm(n, generator=g)
            cols = [c[perm] for c in cols]
        full = n if final else n - n % self.batch_size
        for i in range(0, full, self.batch_size):
            yield tuple(c[i:i + self.batch_size] for c in cols)
        if full == n:
            return [], 0
        return [tuple(c[full:] for c in cols)], n - full


class TargetsDataModule(L.LightningDataModule):
    """Serves (feature, normalized head scores, normalized neuron scores) rows of a targets/ folder, streamed from
    its memory-mapped shards (StreamingRows over TargetsReader): memory holds one shuffle buffer, not the targets.

    Held-out rows are the last ``val_fraction`` of the rows: whole windows the predictor never saw (neighbouring
    tokens are correlated). Under DDP each rank verifies its share of the shards' sha256 and streams its share of
    the rows.
    """

    def __init__(self, targets_dir: str, batch_size: int = 256, val_fraction: float = 0.1, model=None, seed: int = 0,
                 eps: float = 1e-3, input_key: str = "features", normalize: str = "layer", chunk_rows: int = 1024,
                 buffer_bytes: int = 1 << 30, keep_bytes: int = 4 << 30):
        super().__init__()
        self.targets_dir, self.batch_size, self.val_fraction, self.eps = targets_dir, batch_size, val_fraction, eps
        self.input_key = input_key  # "features" (shared predictor) or "layer_inputs" (per-layer predictors)
        if normalize not in ("layer", "token"):
            raise ConfigError(f"fit.normalize must be 'layer' or 'token', got {normalize!r}")
        self.normalize = normalize
        self.model, self.seed = model, seed
        self.chunk_rows, self.buffer_bytes = chunk_rows, buffer_bytes  # the shuffle buffer's memory budget
        self.keep_bytes = keep_bytes  # a rank's rows up to this size are kept in memory after the first epoch
        self.manifest = None

    def setup(self, stage: str | None = None):
        if self.manifest is not None:
            return
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer is not None else (0, 1)
        n_shards = len(read_manifest(self.targets_dir)["shards"])
        reader = TargetsReader(self.targets_dir, self.model, verify=list(range(rank, n_shards, world)),
                               keys=(self.input_key, "heads", "neurons"))
        self.manifest = m = reader.manifest
        n = reader.n_rows
        if n < 2:
            raise ConfigError(f"targets at '{self.targets_dir}' hold {n} row(s); collect more windows to train")
        n_val = max(1, int(round(n * self.val_fraction)))
        cut = n - n_val
        # bytes of one served row: input + heads + dense neurons, in their stored dtypes (top-k decodes to dense)
        L, dtype, in_dtype = m["n_layers"], DTYPES[m.get("score_dtype", "bfloat16")], m.get("input_dtype", "bfloat16")
        x_bytes = m["hidden"] * (4 if self.input_key == "features" else L * DTYPES[in_dtype].itemsize)
        row_bytes = x_bytes + L * (m["n_heads"] + m["ffn"]) * dtype.itemsize
        buffer_rows = int(min(1 << 16, max(self.batch_size, self.buffer_bytes // row_bytes)))
        # a chunk is normalized in float32 with a few temporaries (~8x its stored bytes): keep it a quarter of the
        # buffer (OPT-13B: 1.6 MB of neuron scores per row, 1 GiB buffer -> 646 rows, chunks of 161)
        chunk_rows = max(1, min(self.chunk_rows, buffer_rows // 4))
        keep = n * row_bytes // world <= self.keep_bytes  # small enough: read and normalize once, not every epoch
        kw = dict(batch_size=self.batch_size, input_key=self.input_key, eps=self.eps, normalize=self.normalize,
                  seed=self.seed, chunk_rows=chunk_rows, buffer_rows=buffer_rows, keep=keep)
        self.train_set = StreamingRows(reader, 0, cut, shuffle=True, **kw)
        self.val_set = StreamingRows(reader, cut, n, shuffle=False, **kw)

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=None)  # the dataset yields whole batches

    def val_dataloader(self):
        return DataLoader(self.val_set, batch_size=None)


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

    def hparams_identity(self) -> dict:
        """What a checkpoint of this fit must match to be resumed (the predictor's shape and objective)."""
        return {"predictor": dict(self.hparams.predictor), "fit": dict(self.hparams.fit)}

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
        # sync_dist: under DDP/FSDP each rank sees its share of the rows; epoch values are the mean over ranks
        sync = self.trainer.world_size > 1
        self.log(f"{stage}/loss", loss, prog_bar=True, on_epoch=True, on_step=stage == "train", sync_dist=sync)
        if stage == "val":
            if self.trainer.sanity_checking or self.current_epoch == self.trainer.max_epochs - 1:
                # full-row argsorts are costly on CPU: Spearman only on the final epoch (and the sanity check)
                self.log("val/spearman_ffn", spearman(pn, tn), on_epoch=True, sync_dist=sync)
                self.log("val/spearman_heads", spearman(ph, th), on_epoch=True, sync_dist=sync)
            self.log("val/recall_ffn", topk_recall(pn, tn, n_keep(tn.shape[-1], c.ffn_sparsity)), on_epoch=True,
                     prog_bar=True, sync_dist=sync)
            self.log("val/recall_heads", topk_recall(ph, th, n_keep(th.shape[-1], c.head_sparsity)), on_epoch=True,
                     sync_dist=sync)
        return loss

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        return self._step(batch, "val")

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.predictor.parameters(), lr=self.fit_cfg.lr, weight_decay=self.fit_cfg.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(max(1, total // 20), total))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class EpochSummary(L.Callback):
    """One log line per validation epoch (progress bars vanish in non-interactive logs)."""

    def on_validation_epoch_end(self, trainer, pl_module):
        if trainer.sanity_checking or not trainer.is_global_zero:  # one line per epoch, not one per rank
            return
        m = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        log.info("epoch %d: %s", trainer.current_epoch, "  ".join(f"{k}={v:.4f}" for k, v in sorted(m.items())))


def resume_point(ckpt_dir: Path, identity: dict) -> str | None:
    """``last.ckpt`` of a killed (or finished) fit of this same configuration in ``ckpt_dir``, to resume from; the
    checkpoints of another configuration are set aside (removed, with a log line) so the fit starts over. Records
    the identity in ``fit.json`` beside them. Lightning reads the checkpoint with weights_only=True: tensors and
    plain containers only, no code."""
    import json
    import shutil
    from .distributed import is_rank_zero
    ckpt_dir = Path(ckpt_dir)
    last, record = ckpt_dir / "last.ckpt", ckpt_dir / "fit.json"
    identity = json.loads(json.dumps(identity, sort_keys=True))  # as it reads back
    try:
        same = json.loads(record.read_text()) == identity
    except (OSError, ValueError):
        same = False
    if last.exists() and same:
        log.info("fit: resuming from %s", last)
        return str(last)
    if is_rank_zero():
        if ckpt_dir.exists():
            if last.exists():
                log.info("fit: %s holds the checkpoints of another fit configuration; starting over", ckpt_dir)
            shutil.rmtree(ckpt_dir)
        ckpt_dir.mkdir(parents=True)
        record.write_text(json.dumps(identity, indent=1, sort_keys=True))
    return None


def export_predictor(trainer: L.Trainer, system: "PredictorSystem", folder: Path) -> Path | None:
    """The fitted predictor as a save_pretrained folder. Every rank calls it (under FSDP the full state dict is
    gathered); rank 0 writes."""
    state = trainer.strategy.lightning_module_state_dict()
    if not trainer.is_global_zero:
        return None
    h = system.hparams  # (not system.predictor's attributes: under FSDP it may be a wrapper)
    pcfg = PredictorConfig(**h.predictor)
    pred = build_predictor(pcfg.kind, cfg=pcfg, **h.dims)
    pred.load_state_dict({k.removeprefix("predictor."): v for k, v in state.items() if k.startswith("predictor.")})
    return pred.save_pretrained(folder, model_fingerprint=h.manifest_model, targets_info=h.targets_info,
                                extra={"loss": h.fit["loss"], "normalize": h.fit.get("normalize"),
                                       "epochs": int(trainer.current_epoch)})


def load_predictor(path: str | Path, model=None, allow_pickle: bool = False):
    """The predictor at ``path``: a save_pretrained folder (config.json + model.safetensors; a run directory holding
    predictor/ also works). Refuses a predictor made for another model. An old pickled Lightning checkpoint
    (``predictor.ckpt``) is read only with ``allow_pickle=True`` and a warning, through torch's weights-only
    unpickler (no code from the file runs); ``.save_pretrained(folder)`` converts it."""
    from .predictor import CONFIG_NAME, PretrainedPredictor
    p = Path(path)
    if not p.exists() and p.name == LEGACY_CKPT and (p.parent / PREDICTOR_DIR / CONFIG_NAME).exists():
        log.info("predictor: %s is now the folder %s", p, p.parent / PREDICTOR_DIR)  # scripts of the old layout
        p = p.parent / PREDICTOR_DIR
    if p.is_dir() and not (p / CONFIG_NAME).exists():  # a run directory
        if (p / PREDICTOR_DIR).is_dir():
            p = p / PREDICTOR_DIR
        elif (p / LEGACY_CKPT).exists():
            p = p / LEGACY_CKPT
    if not p.exists() and p.name == PREDICTOR_DIR and (p.parent / LEGACY_CKPT).exists() and allow_pickle:
        p = p.parent / LEGACY_CKPT  # a run of the old layout, opted in
    if not p.exists():
        hint = ""
        if p.name == PREDICTOR_DIR and (p.parent / LEGACY_CKPT).exists():
            hint = (f" (the run holds an old pickled {LEGACY_CKPT}: set paths.allow_pickle=true if you made it "
                    "yourself)")
        raise ConfigError(f"predictor checkpoint '{path}' does not exist{hint}; run the fit stage first "
                          "(stages.fit=true) or point paths.predictor_ckpt at a run's predictor/ folder")
    if p.is_file():
        if p.name in (CONFIG_NAME, "model.safetensors"):
            p = p.parent
        else:
            return _load_legacy(p, model, allow_pickle)
    pred = PretrainedPredictor.from_pretrained(p, model)
    pred.targets_info = pred.info()
    return pred


def _load_legacy(path: Path, model, allow_pickle: bool):
    """An old pickled Lightning checkpoint: refused unless allow_pickle, then read with a warning."""
    import zipfile
    from .llm import check_fingerprint
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(4)
    fix = (f"re-run the fit stage (stages.fit=true), or point paths.predictor_ckpt at a predictor folder "
           f"(config.json + model.safetensors)")
    if size == 0:
        raise ConfigError(f"predictor checkpoint '{path}' is empty (0 bytes): an interrupted copy or save; {fix}")
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):  # torch's zip container, or a raw pickle
        raise ConfigError(f"predictor checkpoint '{path}' is neither a predictor folder nor a Lightning checkpoint "
                          f"(it starts with {head!r}); {fix}")
    if head.startswith(b"PK") and not zipfile.is_zipfile(path):
        raise ConfigError(f"predictor checkpoint '{path}' is truncated or corrupt (an incomplete zip archive, "
                          f"{size} bytes); {fix}")
    if not allow_pickle:
        raise ConfigError(f"predictor checkpoint '{path}' is a pickled Lightning checkpoint (the format before "
                          "safetensors): a pickle, so it is refused by default. To convert an old run's predictor, "
                          "load it once with paths.allow_pickle=true (load_predictor(..., "
                          "allow_pickle=True)) and convert it with .save_pretrained(folder); else " + fix)
    msg = (f"loading the old-format predictor checkpoint '{path}' (allow_pickle=True) with torch's weights-only "
           "unpickler (tensors and plain containers; a file that needs anything else is refused); convert it once "
           "with .save_pretrained(folder)")
    warnings.warn(msg, UserWarning, stacklevel=3)
    log.warning(msg)
    try:
        # weights_only=True: torch's restricted unpickler builds tensors, dicts, lists and numbers and refuses
        # every other global, so no code stored in the file can run even after the opt-in.
        ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
        h = ckpt["hyper_parameters"]
        system = PredictorSystem(h["dims"], h["predictor"], h["fit"], manifest_model=h.get("manifest_model"),
                                 targets_info=h.get("targets_info"))
        system.load_state_dict(ckpt["state_dict"])
    except Exception as exc:  # EOFError, UnpicklingError (incl. a refused global), RuntimeError (zip), KeyError
        text = str(exc)
        # torch's text leads with advice to turn the weights-only loader off, the one thing not to do: keep its reason
        if "WeightsUnpickler error:" in text:
            text = text.split("WeightsUnpickler error:", 1)[1].split("Check the documentation")[0]
        reason = " ".join(text.split())
        raise ConfigError(f"predictor checkpoint '{path}' could not be read ({type(exc).__name__}: {reason}): it is "
                          f"truncated, corrupt, not a predictor checkpoint, or holds objects other than tensors and "
                          f"plain containers; {fix}") from None
    if model is not None and system.hparams.manifest_model is not None:
        check_fingerprint(system.hparams.manifest_model, model, f"predictor checkpoint '{path}'")
    pred = system.predictor.eval()
    pred.requires_grad_(False)
    pred.model_fingerprint = system.hparams.manifest_model
    # criterion / granularity / feature_layer of the targets it was trained on
    pred.targets_info = system.hparams.targets_info or {"feature_layer": pred.feature_layer, "criterion": None}
    pred.source_path = str(path)
    return pred
