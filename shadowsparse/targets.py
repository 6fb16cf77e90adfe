"""collect(): run calibration windows through a frozen LLM and record, per token (or per window),
  - the predictor input: the hidden state after decoder layer ``feature_layer``            (N, d_model)
  - an importance score for every attention head                                          (N, L, H)
  - an importance score for every FFN neuron                                              (N, L, F)
written as sharded safetensors + manifest.json (each shard with its sha256). Shards are written one by one into a
work folder, so a killed collection resumes after its last complete shard; the finished folder is renamed into place.
"""
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
SCORE_DTYPE = torch.bfloat16  # scores span many decades (gradient criteria): keep the exponent range of fp32


@dataclass
class TargetsConfig:
    criterion: str = "plainact"  # registered criterion name (shadowsparse.criteria.CRITERIA)
    granularity: str = "token"  # "token": one target per token; "sequence": one per window (ShadowLLM's original)
    feature_layer: int = 0  # predictor input = hidden state after this decoder layer; layers <= it run dense
    shard_tokens: int = 4096  # rows per safetensors shard
    batch_size: int = 1  # windows per forward pass


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
                 loss_mask: torch.Tensor | None = None):
    """Scores of one batch of windows: (heads (B, T, L, H), neurons (B, T, L, F), feature (B, T, d) | None,
    layer_inputs (B, T, L, d)). The last is the input of every decoder layer (per-layer predictors read it).

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
    with torch.no_grad():
        heads = torch.stack([crit.head(signals(("head", i)), view.attn_out(i).weight, H).reshape(B, T, -1).cpu()
                             for i in range(L)], 2)
        neurons = torch.stack([crit.neuron(signals(("neuron", i))).reshape(B, T, -1).cpu() for i in range(L)], 2)
        layer_inputs = torch.stack([inputs["layer", i].to(SCORE_DTYPE).cpu() for i in range(L)], 2)
    return heads, neurons, (feats[0] if feats else None), layer_inputs


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


def _resume_point(work: Path, identity: dict, overwrite: bool) -> list[dict]:
    """Complete shards an interrupted run of this very configuration left in ``work`` (the caller holds its lock).
    Anything after the first bad shard, and files no record names (a shard killed before its record was written),
    are deleted so the run recomputes them."""
    record = work / PROGRESS
    shards: list[dict] = []
    if record.exists():
        try:
            prev = json.loads(record.read_text())
        except ValueError:  # written atomically, so only a hand-edited record gets here: start over
            prev = {"identity": identity, "shards": []}
        if prev.get("identity") != identity:
            if not overwrite and prev.get("shards"):  # refuse only where there is work to lose
                differ = sorted(k for k in identity if prev.get("identity", {}).get(k) != identity[k])
                raise ConfigError(f"'{work}' holds an interrupted collection of another configuration (differs in "
                                  f"{differ}); rerun with targets_overwrite=true to discard it and collect afresh, "
                                  "or point paths.targets_dir elsewhere")
            log.warning("targets: discarding the work folder %s of another configuration", work)
        else:
            for shard in prev["shards"]:
                problem = shard_problem(work / shard["file"], shard)
                if problem:
                    log.warning("targets: shard %s %s; recomputing from window %d", shard["file"], problem,
                                shard["windows"][0])
                    break
                shards.append(shard)
    keep = {s["file"] for s in shards}
    for f in work.iterdir():
        if f.name not in keep:
            f.unlink()
    _atomic_write(record, lambda p: p.write_text(json.dumps({"identity": identity, "shards": shards}, indent=1)))
    return shards


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


def collect(model, windows, cfg: TargetsConfig, out_dir: str | Path, data_desc: str = "",
            seed: int = 0, overwrite: bool = False) -> Path:
    """Run ``windows`` through the model and write targets to ``out_dir``. Returns out_dir.

    windows: a (N, T) tensor of text windows (the loss covers every next token), or a list of task examples
    (ids (T,), answer_mask (T,)) of varying length whose loss covers the answer tokens only.

    Resumable: each complete shard is renamed into ``<out_dir>.partial/`` and recorded (windows covered, sha256) in
    its progress.json; a rerun of the same configuration after a crash or kill starts after the last complete shard.
    Shards end at the same windows either way, so the targets are byte-identical to an uninterrupted run. A work
    folder of another configuration is refused unless ``overwrite``. The finished folder is renamed into place.
    """
    if cfg.granularity not in ("token", "sequence"):
        raise ConfigError(f"granularity must be 'token' or 'sequence', got '{cfg.granularity}'")
    crit = get_criterion(cfg.criterion)
    view = ModelView(model)
    if not 0 <= cfg.feature_layer < view.dims.n_layers - 1:
        raise ConfigError(f"feature_layer must be in [0, {view.dims.n_layers - 2}] for a {view.dims.n_layers}-layer "
                          f"model, got {cfg.feature_layer}")
    out_dir = Path(out_dir)
    work = work_dir_for(out_dir)
    identity = json.loads(json.dumps({  # through JSON, to compare equal with the record read back
        "format": FORMAT, "model": model_fingerprint(model)["hash"], "config": asdict(cfg), "data": data_desc,
        "n_windows": len(windows), "windows_sha256": _windows_digest(windows), "seed": seed}))
    try:
        work.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create the targets work folder '{work}' ({exc.strerror}); point paths.cache_dir "
                          "or paths.targets_dir at a writable folder") from exc
    with _locked(work):
        return _collect_into(model, windows, cfg, crit, view, out_dir, work, identity, data_desc, seed, overwrite)


def _collect_into(model, windows, cfg, crit, view, out_dir, work, identity, data_desc, seed, overwrite) -> Path:
    shards = _resume_point(work, identity, overwrite)
    examples = isinstance(windows, (list, tuple))
    step = 1 if examples else cfg.batch_size  # examples differ in length: one at a time
    resumed_at = shards[-1]["windows"][1] if shards else 0
    if resumed_at:
        log.info("targets: resuming %s after %d complete shards (%d of %d windows)", out_dir, len(shards), resumed_at,
                 len(windows))
    device = next(model.parameters()).device
    buf: dict[str, list[torch.Tensor]] = {"features": [], "heads": [], "neurons": [], "layer_inputs": []}
    n_rows, buffered, first = sum(s["rows"] for s in shards), 0, resumed_at

    def flush(end: int):
        nonlocal buffered, first
        if not buffered:
            return
        name = f"shard-{len(shards):05d}.safetensors"
        tensors = {k: torch.cat(v).contiguous() for k, v in buf.items()}
        _atomic_write(work / name, lambda p: save_file(tensors, str(p)))
        shards.append({"file": name, "rows": tensors["features"].shape[0], "bytes": (work / name).stat().st_size,
                       "sha256": _sha256(work / name), "windows": [first, end]})
        # the record follows the shard: a kill in between leaves an unrecorded shard, recomputed on resume
        _atomic_write(work / PROGRESS,
                      lambda p: p.write_text(json.dumps({"identity": identity, "shards": shards}, indent=1)))
        for v in buf.values():
            v.clear()
        buffered, first = 0, end

    t0 = time.time()
    try:
        for start in tqdm(range(resumed_at, len(windows), step), desc=f"collect {cfg.criterion}", unit="batch"):
            if examples:
                ids, mask = (t.unsqueeze(0).to(device) for t in windows[start])
            else:
                ids, mask = windows[start:start + step].to(device), None
            heads, neurons, feat, layer_in = score_window(model, crit, ids, cfg.feature_layer, loss_mask=mask)
            if cfg.granularity == "sequence":  # one row per window: mean score, mean feature
                heads, neurons, feat, layer_in = (t.float().mean(1, keepdim=True) for t in (heads, neurons, feat, layer_in))
            buf["features"].append(feat.flatten(0, 1))
            buf["layer_inputs"].append(layer_in.flatten(0, 1).to(SCORE_DTYPE))
            buf["heads"].append(heads.flatten(0, 1).to(SCORE_DTYPE))
            buf["neurons"].append(neurons.flatten(0, 1).to(SCORE_DTYPE))
            rows = feat.shape[0] * feat.shape[1]
            n_rows += rows
            buffered += rows
            if buffered >= cfg.shard_tokens:
                flush(min(start + step, len(windows)))
        flush(len(windows))
    except BaseException:
        if not shards:  # nothing complete to resume from
            shutil.rmtree(work, ignore_errors=True)
        else:
            log.warning("targets: collection stopped; %d complete shards kept in %s: rerun the same command to "
                        "resume after window %d", len(shards), work, shards[-1]["windows"][1])
        raise
    d = view.dims
    manifest = {
        "format": FORMAT, "model": model_fingerprint(model), "criterion": cfg.criterion, "granularity": cfg.granularity,
        "feature_layer": cfg.feature_layer, "n_layers": d.n_layers, "n_heads": d.n_heads, "n_kv_heads": d.n_kv_heads,
        "ffn": d.ffn, "hidden": d.hidden, "score_dtype": str(SCORE_DTYPE).replace("torch.", ""),
        "feature_dtype": "float32", "n_rows": n_rows, "n_windows": len(windows),
        "seq_len": None if examples else windows.shape[1],
        "n_tokens": sum(len(w[0]) for w in windows) if examples else int(windows.numel()),
        "loss": "answer tokens" if examples else "every next token", "data": data_desc, "seed": seed, "shards": shards,
        "config": asdict(cfg), "seconds": round(time.time() - t0, 1), "resumed_at_window": resumed_at,
    }
    _atomic_write(work / MANIFEST, lambda p: p.write_text(json.dumps(manifest, indent=2)))
    if out_dir.exists():  # targets_overwrite: the old folder goes only once the new one is complete
        shutil.rmtree(out_dir)
    work.rename(out_dir)  # a kill before this line leaves a complete work folder: a rerun just renames it
    (out_dir / PROGRESS).unlink(missing_ok=True)
    return out_dir


def read_manifest(targets_dir: str | Path) -> dict:
    path = Path(targets_dir) / MANIFEST
    if not path.exists():
        raise ConfigError(f"no targets at '{targets_dir}' ({MANIFEST} missing); run the collect stage first "
                          "(stages.collect=true) or point targets_dir at a finished collection")
    return json.loads(path.read_text())


def load_targets(targets_dir: str | Path, model=None, verify: bool = True,
                 keys: tuple[str, ...] = ("features", "heads", "neurons", "layer_inputs")) -> tuple[dict, dict]:
    """(manifest, {"features": (N, d), "heads": (N, L, H), "neurons": (N, L, F), "layer_inputs": (N, L, d)}),
    only the requested keys; refuses another model's targets and corrupt shards."""
    from safetensors import safe_open
    targets_dir = Path(targets_dir)
    manifest = read_manifest(targets_dir)
    if model is not None:
        check_fingerprint(manifest["model"], model, f"targets at '{targets_dir}'")
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in keys}
    for shard in manifest["shards"]:
        path = targets_dir / shard["file"]
        problem = shard_problem(path, shard) if verify else None
        if problem:
            raise ConfigError(f"targets shard '{path}' {problem}; re-collect with targets_overwrite=true "
                              "(or delete the targets folder and rerun)")
        with safe_open(str(path), framework="pt") as f:
            missing = set(keys) - set(f.keys())
            if missing:
                raise ConfigError(f"targets at '{targets_dir}' lack {sorted(missing)} (collected by an older version); "
                                  "re-collect them with targets_overwrite=true")
            for k in keys:
                parts[k].append(f.get_tensor(k))
    return manifest, {k: torch.cat(v) for k, v in parts.items()}
