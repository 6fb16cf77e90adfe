"""collect(): run calibration windows through a frozen LLM in this process and write their targets, per token (or per
window):
  - the predictor input: the hidden state after decoder layer ``feature_layer``            (N, d_model)
  - an importance score for every attention head                                          (N, L, H)
  - an importance score for every FFN neuron                                              (N, L, F)
as sharded safetensors + manifest.json in a resumable work folder (store.py). Also the checks and the manifest that
the DDP collection (collect_dp.py) shares with it."""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from pathlib import Path

from tqdm.auto import tqdm

from ..arch import ModelView
from ..criteria import get_criterion
from ..errors import ConfigError
from ..llm import model_fingerprint
from .config import FORMAT, NEURON_FILL, TargetsConfig, check_disk, index_dtype, storage_plan
from .score import batch_step, score_rows
from .store import (PROGRESS, ShardWriter, locked, make_work_dir, prepare_work, publish, recorded_bytes,
                    work_dir_for)

log = logging.getLogger("shadowsparse")


def _windows_digest(windows) -> str:
    """sha256 of the exact token ids (and answer masks) collected: the data part of a work folder's identity."""
    h = hashlib.sha256()
    for item in (windows if isinstance(windows, (list, tuple)) else [(windows,)]):
        for t in item:
            t = t.detach().cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.numpy().tobytes())
    return h.hexdigest()


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
    with locked(work):
        return _collect_into(model, windows, cfg, crit, view, out_dir, work, identity, data_desc, seed, overwrite)


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
