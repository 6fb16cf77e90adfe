"""collect(): run calibration windows through a frozen LLM and record, per token (or per window),
  - the predictor input: the hidden state after decoder layer ``feature_layer``            (N, d_model)
  - an importance score for every attention head                                          (N, L, H)
  - an importance score for every FFN neuron                                              (N, L, F)
written as sharded safetensors + manifest.json (each shard with its sha256). Shards are written one by one into a
work folder, so a killed collection resumes after its last complete shard; the finished folder is renamed into place.
The on-disk contract (shard keys, dtypes, top-k neuron encoding, progress records, DDP layout) is
docs/targets-format.md; the data-parallel collection through Lightning lives in collect_dp.py and shares the
work-folder code below. Readers stream rows from the memory-mapped shards (TargetsReader)."""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .arch import ModelView
from .criteria import Criterion, Signals, get_criterion
from .errors import ConfigError

MANIFEST = "manifest.json"
PROGRESS = "progress.json"  # in the work folder: the complete shards so far
WORK_SUFFIX = ".partial"  # <targets>.partial/ holds an unfinished collection
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
    return torch.int16 if ffn <= torch.iinfo(torch.int16).max else torch.int32


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


def model_fingerprint(model) -> dict:
    """Identity of a model for artifact checks: its name, architecture dims and a checksum of a few weights."""
    view = ModelView(model)
    probe = [view.ffn_down(0).weight, view.attn_out(view.dims.n_layers - 1).weight]
    checksum = float(sum(p.detach().float().abs().sum().item() for p in probe))
    fp = {"name": getattr(model.config, "_name_or_path", "") or "", **view.config_fingerprint(),
          "vocab_size": model.config.vocab_size, "weight_checksum": round(checksum, 3)}
    # the name is shown, not hashed: the same GGUF or hub model loaded from another folder is the same model
    ident = {k: v for k, v in fp.items() if k != "name"}
    fp["hash"] = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    return fp


def check_fingerprint(found: dict, model, what: str) -> None:
    expected = model_fingerprint(model)
    if found.get("hash") != expected["hash"]:
        raise ConfigError(f"{what} was made from another model ({found.get('name')!r}, hash {found.get('hash')}) "
                          f"than the one loaded ({expected['name']!r}, hash {expected['hash']}); "
                          "re-run the stage that makes it for this model, or load the matching model")


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


@contextmanager
def eager_attention(model, needed: bool):
    """Double backward (Hessian-vector products) is not implemented for fused SDPA kernels: switch to the eager
    attention for the duration, then restore."""
    current = getattr(model.config, "_attn_implementation", None)
    if not needed or current in (None, "eager"):
        yield
        return
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(current)


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
        heads = torch.stack([put(crit.head(signals(("head", i)), view.attn_out(i).weight, H).reshape(B, T, -1))
                             for i in range(L)], 2)
        neurons = torch.stack([put(crit.neuron(signals(("neuron", i))).reshape(B, T, -1)) for i in range(L)], 2)
        layer_inputs = torch.stack([put(inputs["layer", i].to(input_dtype)) for i in range(L)], 2) \
            if with_layer_inputs else None
    return heads, neurons, (feats[0] if feats else None), layer_inputs  # the feature is on the host (small)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def work_dir_for(out_dir: Path) -> Path:
    """Where an unfinished collection keeps its complete shards: next to the targets folder, so the final rename
    stays on one filesystem."""
    return out_dir.with_name(out_dir.name + WORK_SUFFIX)


def _atomic_write(path: Path, write) -> None:
    """write(tmp) then rename over ``path``: a kill leaves the old file or the new one, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)  # the rename must not reach the disk before the bytes do
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _windows_digest(windows) -> str:
    """sha256 of the exact token ids (and answer masks) collected: the data part of a work folder's identity."""
    h = hashlib.sha256()
    for item in (windows if isinstance(windows, (list, tuple)) else [(windows,)]):
        for t in item:
            t = t.detach().cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.numpy().tobytes())
    return h.hexdigest()


def shard_problem(path: Path, shard: dict) -> str | None:
    """Why a shard on disk is not the one its record describes (missing, truncated, corrupted), or None."""
    if not path.is_file():
        return "is missing"
    size = path.stat().st_size
    if shard.get("bytes") is not None and size != shard["bytes"]:
        return f"is truncated or overwritten ({size} bytes, {shard['bytes']} recorded)"
    if _sha256(path) != shard["sha256"]:
        return "is corrupted (its sha256 does not match the record)"
    return None


@contextmanager
def _locked(folder: Path):
    """An exclusive lock on the work folder: two runs filling one folder would interleave their shards. The kernel
    drops it when the process dies, kill -9 included, so a rerun is never locked out by a dead run."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(f"another process is collecting into '{folder}'; wait for it to finish, or give this "
                              "run its own paths.targets_dir") from None
        yield
    finally:
        os.close(fd)


def _read_record(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except ValueError:  # records are written atomically, so only a hand-edited one gets here: nothing to resume
        return None


def _layout_name(rec: dict) -> str:
    ws = rec.get("world_size")
    return f"{ws}-process collection (targets.devices x targets.num_nodes = {ws})" if ws else \
        "1-process collection (targets.devices=1)"


def _records(work: Path) -> dict[str, dict | None]:
    return {f.name: _read_record(f) for f in sorted(work.glob("progress*.json"))} if work.is_dir() else {}


def check_work(work: Path, identity: dict, layout: dict[str, dict], overwrite: bool) -> None:
    """Refuse a work folder holding complete shards of another configuration or process layout (unless
    ``overwrite``); reads only, so every DDP process can check before any is launched."""
    for name, rec in _records(work).items():
        if not rec or not rec.get("shards") or overwrite:  # refuse only where there is work to lose
            continue
        if rec.get("identity") != identity:
            differ = sorted(k for k in identity if rec.get("identity", {}).get(k) != identity[k])
            raise ConfigError(f"'{work}' holds an interrupted collection of another configuration (differs in "
                              f"{differ}); rerun with targets_overwrite=true to discard it and collect afresh, "
                              "or point paths.targets_dir elsewhere")
        if name not in layout or any(rec.get(k) != v for k, v in layout[name].items()):
            raise ConfigError(f"'{work}' holds an interrupted {_layout_name(rec)} of this configuration; rerun "
                              "with that process layout to resume it, or with targets_overwrite=true to discard it")


def prepare_work(work: Path, identity: dict, layout: dict[str, dict], overwrite: bool) -> dict[str, list[dict]]:
    """Make the work folder ready for a run whose progress records are ``layout`` (record file name -> the fields
    it carries besides the identity: {} for one process; world_size, rank and windows for DDP rank r); the caller
    holds the folder's lock. Returns, per record, the complete shards an interrupted run of this very configuration
    and process layout left. Before anything is changed, a folder holding complete shards of another configuration
    or another process layout is refused unless ``overwrite`` (check_work). Then shards after a record's first bad
    one, and files no record names (a shard killed before its record was written), are deleted so the run
    recomputes them."""
    check_work(work, identity, layout, overwrite)  # decide first: a refusal leaves the folder untouched
    records = _records(work)
    kept: dict[str, list[dict]] = {}
    for name, extra in layout.items():
        rec, shards = records.get(name), []
        if rec and rec.get("identity") == identity and all(rec.get(k) == v for k, v in extra.items()):
            for shard in rec.get("shards", []):
                problem = shard_problem(work / shard["file"], shard)
                if problem:
                    log.warning("targets: shard %s %s; recomputing from window %d", shard["file"], problem,
                                shard["windows"][0])
                    break
                shards.append(shard)
        kept[name] = shards
    if any(rec and rec.get("shards") for name, rec in records.items()
           if name not in layout or rec.get("identity") != identity):
        log.warning("targets: discarding the interrupted collection of another configuration or layout in %s", work)
    keep = {s["file"] for shards in kept.values() for s in shards}
    for f in work.iterdir():
        if f.name not in keep:
            f.unlink()
    for name, extra in layout.items():
        _write_record(work / name, {"identity": identity, **extra, "shards": kept[name]})
    return kept


def _write_record(path: Path, record: dict) -> None:
    _atomic_write(path, lambda p: p.write_text(json.dumps(record, indent=1)))


def recorded_bytes(work: Path, identity: dict) -> int:
    """Bytes of the shards an interrupted run of this configuration recorded in ``work`` (unverified: only for the
    disk-space estimate, made before the folder is locked)."""
    if not work.is_dir():
        return 0
    recs = [_read_record(f) for f in work.glob("progress*.json")]
    return sum(s.get("bytes") or 0 for r in recs if r and r.get("identity") == identity for s in r.get("shards", []))


class ShardWriter:
    """Buffers the encoded rows of consecutive windows and writes them as shards into the work folder, each shard
    followed by its progress record: a kill between the two leaves an unrecorded shard, recomputed on resume.
    A shard ends at the first window that brings it to ``shard_tokens`` rows, so where shards end depends only on
    the windows: a resumed run cuts them where an uninterrupted one does."""

    def __init__(self, work: Path, record: str, header: dict, shards: list[dict], first: int, shard_tokens: int,
                 rank: int | None = None):
        self.work, self.record, self.header, self.shards = work, record, header, shards
        self.first, self.shard_tokens, self.rank = first, shard_tokens, rank
        self.prefix = "shard-" if rank is None else f"shard-r{rank}-"  # per-rank names: ranks never collide
        self.buf: dict[str, list[torch.Tensor]] = {}
        self.buffered = 0
        self.n_rows = sum(s["rows"] for s in shards)

    def add(self, rows: dict[str, torch.Tensor], end: int) -> None:
        """rows: encode_rows() of the windows up to ``end`` (exclusive)."""
        for key, t in rows.items():
            self.buf.setdefault(key, []).append(t)
        n = rows["features"].shape[0]
        self.n_rows += n
        self.buffered += n
        if self.buffered >= self.shard_tokens:
            self.flush(end)

    def flush(self, end: int) -> None:
        if not self.buffered:
            return
        name = f"{self.prefix}{len(self.shards):05d}.safetensors"
        tensors = {k: torch.cat(v).contiguous() for k, v in self.buf.items()}
        path = self.work / name
        _atomic_write(path, lambda p: save_file(tensors, str(p)))
        entry = {"file": name, "rows": tensors["features"].shape[0], "bytes": path.stat().st_size,
                 "sha256": _sha256(path), "windows": [self.first, end]}
        if self.rank is not None:
            entry["rank"] = self.rank
        self.shards.append(entry)
        _write_record(self.work / self.record, {**self.header, "shards": self.shards})
        self.buf.clear()
        self.buffered, self.first = 0, end


def collection_identity(model, windows, cfg: TargetsConfig, data_desc: str, seed: int) -> dict:
    """What a work folder's shards depend on: an interrupted run resumes only into a folder of the same identity."""
    return json.loads(json.dumps({  # through JSON, to compare equal with the record read back
        "format": FORMAT, "model": model_fingerprint(model)["hash"], "config": cfg.data_fields(), "data": data_desc,
        "n_windows": len(windows), "windows_sha256": _windows_digest(windows), "seed": seed}))


def n_rows_of(windows, granularity: str) -> int:
    if granularity == "sequence":
        return len(windows)
    return sum(len(w[0]) for w in windows) if isinstance(windows, (list, tuple)) else int(windows.numel())


def checked_setup(model, windows, cfg: TargetsConfig, out_dir, data_desc: str, seed: int):
    """Checks shared by the 1-process and the DDP collection, all before any forward pass: the config, the feature
    layer, and the disk (storage plan logged). Returns (criterion, view, out_dir, work, identity)."""
    cfg.validate()
    crit = get_criterion(cfg.criterion)
    view = ModelView(model)
    if not 0 <= cfg.feature_layer < view.dims.n_layers - 1:
        raise ConfigError(f"feature_layer must be in [0, {view.dims.n_layers - 2}] for a {view.dims.n_layers}-layer "
                          f"model, got {cfg.feature_layer}")
    out_dir = Path(out_dir)
    work = work_dir_for(out_dir)
    identity = collection_identity(model, windows, cfg, data_desc, seed)
    check_disk(cfg, view.dims, n_rows_of(windows, cfg.granularity), len(windows), work,
               recorded_bytes(work, identity))
    return crit, view, out_dir, work, identity


def make_work_dir(work: Path) -> None:
    try:
        work.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create the targets work folder '{work}' ({exc.strerror}); point paths.cache_dir "
                          "or paths.targets_dir at a writable folder") from exc


def collect(model, windows, cfg: TargetsConfig, out_dir: str | Path, data_desc: str = "",
            seed: int = 0, overwrite: bool = False) -> Path:
    """Run ``windows`` through the model in this process and write targets to ``out_dir``. Returns out_dir.
    (collect_dp.collect_distributed does the same over Lightning DDP ranks.)

    windows: a (N, T) tensor of text windows (the loss covers every next token), or a list of task examples
    (ids (T,), answer_mask (T,)) of varying length whose loss covers the answer tokens only.

    Resumable: each complete shard is renamed into ``<out_dir>.partial/`` and recorded (windows covered, sha256) in
    its progress.json; a rerun of the same configuration after a crash or kill starts after the last complete shard.
    Shards end at the same windows either way, so the targets are byte-identical to an uninterrupted run. A work
    folder of another configuration is refused unless ``overwrite``. The finished folder is renamed into place.
    The storage plan is logged and a disk too small for it refused before any forward pass.
    """
    crit, view, out_dir, work, identity = checked_setup(model, windows, cfg, out_dir, data_desc, seed)
    make_work_dir(work)
    with _locked(work):
        return _collect_into(model, windows, cfg, crit, view, out_dir, work, identity, data_desc, seed, overwrite)


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


def _collect_into(model, windows, cfg, crit, view, out_dir, work, identity, data_desc, seed, overwrite) -> Path:
    shards = prepare_work(work, identity, {PROGRESS: {}}, overwrite)[PROGRESS]
    resumed_at = shards[-1]["windows"][1] if shards else 0
    if resumed_at:
        log.info("targets: resuming %s after %d complete shards (%d of %d windows)", out_dir, len(shards), resumed_at,
                 len(windows))
    device = next(model.parameters()).device
    writer = ShardWriter(work, PROGRESS, {"identity": identity}, shards, resumed_at, cfg.shard_tokens)
    k = cfg.topk(view.dims.ffn)
    t0 = time.time()
    try:
        for start in tqdm(range(resumed_at, len(windows), batch_step(windows, cfg)), desc=f"collect {cfg.criterion}",
                          unit="batch"):
            writer.add(*score_rows(model, crit, windows, start, cfg, k, device))
        writer.flush(len(windows))
    except BaseException:
        if not shards:  # nothing complete to resume from
            shutil.rmtree(work, ignore_errors=True)
        else:
            log.warning("targets: collection stopped; %d complete shards kept in %s: rerun the same command to "
                        "resume after window %d", len(shards), work, shards[-1]["windows"][1])
        raise
    manifest = build_manifest(model, windows, cfg, view, shards, writer.n_rows, data_desc, seed,
                              seconds=time.time() - t0, resumed_at_window=resumed_at)
    publish(work, out_dir, manifest)
    return out_dir


def build_manifest(model, windows, cfg: TargetsConfig, view, shards: list[dict], n_rows: int, data_desc: str,
                   seed: int, seconds: float, resumed_at_window, **more) -> dict:
    """manifest.json (docs/targets-format.md): shards in global window order, dtypes, encoding, storage."""
    examples = isinstance(windows, (list, tuple))
    d = view.dims
    k = cfg.topk(d.ffn)
    plan = storage_plan(cfg, d, n_rows)
    return {
        "format": FORMAT, "model": model_fingerprint(model), "criterion": cfg.criterion, "granularity": cfg.granularity,
        "feature_layer": cfg.feature_layer, "n_layers": d.n_layers, "n_heads": d.n_heads, "n_kv_heads": d.n_kv_heads,
        "ffn": d.ffn, "hidden": d.hidden, "score_dtype": cfg.score_dtype, "input_dtype": cfg.input_dtype,
        "feature_dtype": "float32", "layer_inputs": cfg.layer_inputs,
        "neuron_encoding": "dense" if k is None else "topk", "neuron_topk": k,
        "neuron_fill": None if k is None else NEURON_FILL,
        "index_dtype": None if k is None else str(index_dtype(d.ffn)).replace("torch.", ""),
        "bytes_per_row": plan["bytes_per_row_total"], "bytes_per_row_by_key": plan["bytes_per_row"],
        "total_bytes": sum(s["bytes"] for s in shards), "n_rows": n_rows, "n_windows": len(windows),
        "seq_len": None if examples else windows.shape[1],
        "n_tokens": sum(len(w[0]) for w in windows) if examples else int(windows.numel()),
        "loss": "answer tokens" if examples else "every next token", "data": data_desc, "seed": seed, "shards": shards,
        "config": cfg.data_fields(), "seconds": round(seconds, 1), "resumed_at_window": resumed_at_window, **more,
    }


def publish(work: Path, out_dir: Path, manifest: dict) -> None:
    """Write the manifest into the complete work folder and rename it into place (the caller holds its lock)."""
    _atomic_write(work / MANIFEST, lambda p: p.write_text(json.dumps(manifest, indent=2)))
    if out_dir.exists():  # targets_overwrite: the old folder goes only once the new one is complete
        shutil.rmtree(out_dir)
    work.rename(out_dir)  # a kill before this line leaves a complete work folder: a rerun just renames it
    for f in out_dir.glob("progress*.json"):
        f.unlink()


def read_manifest(targets_dir: str | Path) -> dict:
    path = Path(targets_dir) / MANIFEST
    if not path.exists():
        raise ConfigError(f"no targets at '{targets_dir}' ({MANIFEST} missing); run the collect stage first "
                          "(stages.collect=true) or point targets_dir at a finished collection")
    return json.loads(path.read_text())


ALL_KEYS = ("features", "heads", "neurons", "layer_inputs")


class TargetsReader:
    """Rows of a targets/ folder, read on demand from memory-mapped shards (safetensors ``safe_open``): opening it
    reads only the manifest and the shard headers; ``rows(key, a, b)`` copies rows [a, b) out of the shards they lie
    in and nothing else. Top-k neuron shards are decoded to dense (N, L, F) here (decode_neurons), so readers see
    one format. The global row order is the manifest's shard order (window order, whatever the number of ranks)."""

    MAX_OPEN = 8  # open shard handles kept (each an mmap; pages are the kernel's cache, not this process' heap)

    def __init__(self, targets_dir: str | Path, model=None, verify: bool | list[int] = True,
                 keys: tuple[str, ...] = ALL_KEYS):
        """verify: True checks every shard's size and sha256 (reads each file once, streaming), a list only those
        shard indices (DDP ranks split the work), False none."""
        self.dir = Path(targets_dir)
        self.manifest = m = read_manifest(self.dir)
        if model is not None:
            check_fingerprint(m["model"], model, f"targets at '{self.dir}'")
        self.keys, self.ffn = keys, m["ffn"]
        self.topk = m.get("neuron_topk") if m.get("neuron_encoding") == "topk" else None
        self.fill = m.get("neuron_fill") or NEURON_FILL
        self.shards = m["shards"]
        self.starts = [0]
        for s in self.shards:  # row offset of each shard: shard i holds rows [starts[i], starts[i+1])
            self.starts.append(self.starts[-1] + s["rows"])
        self.n_rows = self.starts[-1]
        self._open: dict[int, object] = {}
        self.rows_read = 0  # rows copied out so far (tests check that reading streams)
        check = range(len(self.shards)) if verify is True else (verify or [])
        for i in check:
            path = self.dir / self.shards[i]["file"]
            problem = shard_problem(path, self.shards[i])
            if problem:
                raise ConfigError(f"targets shard '{path}' {problem}; re-collect with targets_overwrite=true "
                                  "(or delete the targets folder and rerun)")
        if self.shards:
            stored = set(self._handle(0).keys())
            need = {("neuron_idx" if k == "neurons" and self.topk else k) for k in keys}
            missing = need - stored
            if "layer_inputs" in missing and m.get("layer_inputs") is False:
                raise ConfigError(f"targets at '{self.dir}' were collected with targets.layer_inputs=false; the "
                                  "per-layer predictor reads them: re-collect with targets.layer_inputs=true "
                                  "targets_overwrite=true, or use predictor=shared")
            if missing:
                raise ConfigError(f"targets at '{self.dir}' lack {sorted(missing)} (collected by an older version); "
                                  "re-collect them with targets_overwrite=true")

    def _handle(self, i: int):
        from safetensors import safe_open
        if i not in self._open:
            if len(self._open) >= self.MAX_OPEN:
                self._open.pop(next(iter(self._open)))  # the oldest; its mmap closes with it
            self._open[i] = safe_open(str(self.dir / self.shards[i]["file"]), framework="pt")
        return self._open[i]

    def shard_of(self, row: int) -> int:
        import bisect
        return bisect.bisect_right(self.starts, row) - 1

    def rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of ``key`` ("features" (n, d), "heads" (n, L, H), "neurons" (n, L, F), "layer_inputs"
        (n, L, d)) in their stored dtype."""
        parts = []
        i = self.shard_of(start)
        while start < stop:
            a, b = start - self.starts[i], min(stop, self.starts[i + 1]) - self.starts[i]
            f = self._handle(i)
            if key == "neurons" and self.topk:
                parts.append(decode_neurons(f.get_slice("neuron_idx")[a:b], f.get_slice("neuron_val")[a:b], self.ffn,
                                            self.fill))
            else:
                parts.append(f.get_slice(key)[a:b])
            start = self.starts[i + 1]
            i += 1
        out = parts[0] if len(parts) == 1 else torch.cat(parts)
        self.rows_read += out.shape[0]
        return out

    def close(self) -> None:
        self._open.clear()


def mean_scores(targets_dir: str | Path, model=None, chunk_rows: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean head (L, H) and neuron (L, F) scores over every row (what a static mask ranks), streamed a chunk of
    ``chunk_rows`` at a time with float64 sums: memory holds one chunk, not the (N, L, F) neuron scores."""
    reader = TargetsReader(targets_dir, model, verify=False, keys=("heads", "neurons"))
    sums = {"heads": 0.0, "neurons": 0.0}
    for i in range(len(reader.shards)):
        for a in range(reader.starts[i], reader.starts[i + 1], chunk_rows):
            b = min(a + chunk_rows, reader.starts[i + 1])
            for key in sums:
                sums[key] = sums[key] + reader.rows(key, a, b).double().sum(0)
    reader.close()
    n = max(1, reader.n_rows)
    return (sums["heads"] / n).float(), (sums["neurons"] / n).float()


def load_targets(targets_dir: str | Path, model=None, verify: bool = True,
                 keys: tuple[str, ...] = ALL_KEYS) -> tuple[dict, dict]:
    """(manifest, {"features": (N, d), "heads": (N, L, H), "neurons": (N, L, F), "layer_inputs": (N, L, d)}), only
    the requested keys, all in memory (top-k neurons decoded to dense); refuses another model's targets and corrupt
    shards. Training streams instead (system.TargetsDataModule over TargetsReader)."""
    reader = TargetsReader(targets_dir, model, verify=verify, keys=keys)
    out = {k: torch.cat([reader.rows(k, reader.starts[i], reader.starts[i + 1]) for i in range(len(reader.shards))])
           for k in keys}
    reader.close()
    return reader.manifest, out
