"""What a collection stores and how much of it: TargetsConfig (and its validation), the on-disk dtypes, the top-k
neuron encoding (encode_rows / decode_neurons, kept together because a reader must undo exactly what the writer
did) and the storage plan checked against the free disk before any forward pass (docs/targets-format.md)."""
from __future__ import annotations

import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..errors import ConfigError

log = logging.getLogger("shadowsparse")
FORMAT = 2  # bump when the shard layout changes (2: layer_inputs added), so caches made before are not reused
SCORE_DTYPE = torch.bfloat16  # default: scores span many decades (gradient criteria): keep the exponent range of fp32
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
NEURON_FILL = 0.5  # top-k targets: an unkept neuron reads as this fraction of its row's smallest kept score
RUN_KEYS = ("devices", "accelerator", "strategy", "num_nodes")  # how a collection runs, not what it holds
ACCELERATORS = ("cpu", "gpu", "cuda")


@dataclass
class TargetsConfig:
    criterion: str = "plainact"  # registered criterion name (shadowsparse.criteria.CRITERIA)
    granularity: str = "token"  # "token": one target per token; "sequence": one per window (ShadowLLM's original)
    feature_layer: int = 0  # predictor input = hidden state after this decoder layer; layers <= it run dense
    shard_tokens: int = 4096  # rows per safetensors shard
    batch_size: int = 1  # windows per forward pass
    score_dtype: str = "bfloat16"  # heads/neurons on disk: bfloat16 (fp32's range), float16 (0 below 6e-8), float32
    input_dtype: str = "bfloat16"  # layer_inputs on disk (hidden states: float16 is fine unless they exceed 65504)
    layer_inputs: bool = True  # store every layer's input (N, L, d): per-layer predictors need them, shared ones not
    neuron_topk: int | float | None = None  # None: dense (N, L, F); k or a fraction of F: top-k indices + values per
    # (row, layer); the rest decode to NEURON_FILL x the row's k-th value
    devices: int = 1  # processes per node for a data-parallel collection (Lightning DDP); 1: in this process
    accelerator: str = "cpu"  # cpu | gpu: where each DDP rank runs the model
    strategy: str = "ddp"  # Lightning strategy of a multi-process collection (each rank holds the whole model)
    num_nodes: int = 1  # nodes of a multi-node collection (the targets folder must be on a filesystem they share)

    def validate(self) -> None:
        """Cheap checks, no model needed; each message names the key to change."""
        if self.granularity not in ("token", "sequence"):
            raise ConfigError(f"granularity must be 'token' or 'sequence', got '{self.granularity}'")
        for key in ("score_dtype", "input_dtype"):
            if getattr(self, key) not in DTYPES:
                raise ConfigError(f"targets.{key} must be one of {list(DTYPES)}, got {getattr(self, key)!r}")
        k = self.neuron_topk
        if k is not None and (isinstance(k, bool) or not isinstance(k, (int, float)) or k <= 0
                              or (isinstance(k, float) and k >= 1)):
            raise ConfigError(f"targets.neuron_topk must be null (dense), a count >= 1 or a fraction in (0, 1), "
                              f"got {k!r}")
        for key in ("shard_tokens", "batch_size", "devices", "num_nodes"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"targets.{key} must be an integer >= 1, got {v!r}")
        if self.accelerator not in ACCELERATORS:
            raise ConfigError(f"targets.accelerator must be one of {list(ACCELERATORS)}, got {self.accelerator!r}")
        if self.world_size > 1 and self.strategy != "ddp":
            raise ConfigError(f"targets.strategy={self.strategy!r}: a multi-process collection runs with "
                              "targets.strategy=ddp (each rank scores its own windows with a whole model)")

    @property
    def world_size(self) -> int:
        return self.devices * self.num_nodes

    def data_fields(self) -> dict:
        """The fields the targets depend on (identity, manifest, cache key): the run keys are left out, so a
        collection on 2 GPUs is the same targets as one on 1."""
        return {k: v for k, v in asdict(self).items() if k not in RUN_KEYS}

    def topk(self, ffn: int) -> int | None:
        """Neurons kept per (row, layer), or None for dense storage."""
        k = self.neuron_topk
        if k is None:
            return None
        k = max(1, round(k * ffn)) if isinstance(k, float) else int(k)
        if k >= ffn:
            raise ConfigError(f"targets.neuron_topk={self.neuron_topk} keeps {k} of {ffn} neurons: no smaller than "
                              "dense; use targets.neuron_topk=null, or a smaller count or fraction")
        return k


def index_dtype(ffn: int) -> torch.dtype:
    """dtype of the stored top-k neuron indices: int16 while every index of F fits it, else int32."""
    return torch.int16 if ffn <= torch.iinfo(torch.int16).max else torch.int32


def encode_rows(heads, neurons, feat, layer_in, cfg: TargetsConfig, k: int | None) -> dict[str, torch.Tensor]:
    """One scored batch as shard rows. heads (B, T, L, H), neurons (B, T, L, F), feat (B, T, d), layer_in
    (B, T, L, d) -> {"features": (N, d) fp32, "heads": (N, L, H), "neurons": (N, L, F) | "neuron_idx",
    "neuron_val": (N, L, k), "layer_inputs": (N, L, d)} with N = B*T rows. Dense defaults keep the key order and
    bytes of format 2."""
    sd = DTYPES[cfg.score_dtype]
    out = {"features": feat.flatten(0, 1), "heads": heads.flatten(0, 1).to(sd)}
    n = neurons.flatten(0, 1)  # (N, L, F)
    if k is None:
        out["neurons"] = n.to(sd)
    else:  # top-k of the full-precision scores, values in descending order: val[..., -1] is the row's k-th
        val, idx = n.float().topk(k, -1)
        out["neuron_idx"] = idx.to(index_dtype(n.shape[-1]))
        out["neuron_val"] = val.to(sd)
    if cfg.layer_inputs:
        out["layer_inputs"] = layer_in.flatten(0, 1).to(DTYPES[cfg.input_dtype])
    return out


def decode_neurons(idx: torch.Tensor, val: torch.Tensor, ffn: int, fill: float = NEURON_FILL) -> torch.Tensor:
    """Top-k neuron targets back to dense: idx, val (N, L, k) -> (N, L, F) in val's dtype.

    Unkept neurons get ``fill`` x the row's k-th (smallest kept) value: strictly below every kept one, so the
    ranking and top-k (k' <= k) are those of the dense scores; close to the kept scale, so normalize_scores'
    log(s + eps * mean) is not dominated by an arbitrary gap to 0 and the row mean stays near the dense one.
    """
    v = val.float()
    dense = (v[..., -1:] * fill).expand(*v.shape[:-1], ffn).clone()  # (N, L, F)
    dense.scatter_(-1, idx.long(), v)
    return dense.to(val.dtype)


def storage_plan(cfg: TargetsConfig, dims, n_rows: int) -> dict:
    """Bytes the targets will take, from the config alone: per row (a token, or a window at sequence granularity)
    and in total, by shard key. Safetensors headers (a few hundred bytes per shard) are left out."""
    L, H, F, d = dims.n_layers, dims.n_heads, dims.ffn, dims.hidden
    sb, ib = DTYPES[cfg.score_dtype].itemsize, DTYPES[cfg.input_dtype].itemsize
    per_row = {"features": d * 4, "heads": L * H * sb}  # features stay fp32: (d,), (L, H)
    k = cfg.topk(F)
    if k is None:
        per_row["neurons"] = L * F * sb  # (L, F)
    else:
        per_row["neuron_idx"] = L * k * index_dtype(F).itemsize  # (L, k)
        per_row["neuron_val"] = L * k * sb  # (L, k)
    if cfg.layer_inputs:
        per_row["layer_inputs"] = L * d * ib  # (L, d)
    total = sum(per_row.values())
    return {"rows": n_rows, "bytes_per_row": per_row, "bytes_per_row_total": total, "total_bytes": total * n_rows,
            "neuron_topk": k}


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def check_disk(cfg: TargetsConfig, dims, n_rows: int, n_windows: int, work: Path, done_bytes: int = 0) -> dict:
    """Log the storage plan and refuse (ConfigError naming the fixes) when the filesystem that will hold ``work``
    has less free space than the targets still to write (``done_bytes``: complete shards a resumed run keeps)."""
    plan = storage_plan(cfg, dims, n_rows)
    per_row = plan["bytes_per_row_total"]
    log.info("targets: %d rows x %s bytes per %s (%s) = %s", n_rows, f"{per_row:,}",
             "token" if cfg.granularity == "token" else "window",
             ", ".join(f"{k} {v:,}" for k, v in plan["bytes_per_row"].items()), _gb(plan["total_bytes"]))
    where = Path(work).expanduser().absolute()
    while not where.exists():
        where = where.parent
    free = shutil.disk_usage(where).free
    need = max(0, plan["total_bytes"] - done_bytes)
    margin = 1.05  # safetensors headers, the manifest, filesystem slack
    if free >= need * margin:
        return plan
    fixes = []
    fit = int(free / margin / max(1, plan["total_bytes"]) * n_windows) if n_windows else 0
    fixes.append(f"fewer windows (data.calib.n_windows={max(1, fit)} would fit)" if fit else "fewer windows")
    alt = {}
    if cfg.score_dtype == "float32":
        alt["targets.score_dtype=bfloat16"] = {"score_dtype": "bfloat16"}
    if cfg.input_dtype == "float32" and cfg.layer_inputs:
        alt["targets.input_dtype=bfloat16"] = {"input_dtype": "bfloat16"}
    if cfg.layer_inputs:
        alt["targets.layer_inputs=false (shared predictor only)"] = {"layer_inputs": False}
    if cfg.neuron_topk is None or (isinstance(cfg.neuron_topk, float) and cfg.neuron_topk > 0.1):
        alt["targets.neuron_topk=0.1"] = {"neuron_topk": 0.1}
    for text, change in alt.items():
        other = TargetsConfig(**{**asdict(cfg), **change})
        fixes.append(f"{text} ({_gb(storage_plan(other, dims, n_rows)['total_bytes'])})")
    fixes.append("another filesystem (paths.cache_dir or paths.targets_dir)")
    raise ConfigError(f"the targets need {_gb(need)} ({n_rows} rows x {per_row:,} bytes) but '{where}' has "
                      f"{_gb(free)} free; collect with " + ", or ".join(fixes))
