"""run(cfg): collect -> fit -> evaluate -> report, each stage behind a flag and reading only the previous
stage's artifacts (targets/ folder, predictor checkpoint, results.jsonl)."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from .config import MULTI_PROCESS, gating_levels, sparsity_config, targets_config, trainer_kwargs, window_spec
from .criteria import get_criterion
from .data import check_spec, token_windows
from .distributed import FIT_TARGETS_ENV, fit_only_targets, is_rank_zero
from .errors import ConfigError
from .evaluate import stage_evaluate
from .gating import GatingConfig
from .llm import LLMConfig, check_context, load_llm, load_tokenizer, model_fingerprint
from .loggers import check_logger, make_loggers, wandb_init_kwargs
from .prune import sparsify_, squash_
from .report import RESULTS, plot_frontier, plot_quality, print_table, read_results
from .selectors import check_methods
from .targets import FORMAT as TARGETS_FORMAT
from .targets import collect, read_manifest
from .tasks import TASKS, task_examples

log = logging.getLogger("shadowsparse")


def targets_dir_for(cfg: DictConfig, model) -> Path:
    """Explicit paths.targets_dir, or a cache folder keyed by everything the targets depend on (so a sweep over
    predictor settings reuses one collection)."""
    if cfg.paths.get("targets_dir"):
        return Path(cfg.paths.targets_dir)
    key = {"format": TARGETS_FORMAT, "model": model_fingerprint(model)["hash"],
           "targets": targets_config(cfg).data_fields(),  # not devices/accelerator: 1 or 8 GPUs, same targets
           "calib": OmegaConf.to_container(cfg.data.calib, resolve=True), "seed": cfg.seed,
           "sparsity": OmegaConf.to_container(cfg.sparsity, resolve=True) if cfg.sparsity.metric else None}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return Path(cfg.paths.cache_dir) / "targets" / f"{cfg.targets.criterion}-{cfg.targets.granularity}-{digest}"


def static_mask_(cfg, model, tok) -> dict:
    """The config's static mask on ``model`` in place, calibrated on the first sparsity.calib_windows windows of the
    calibration text (seeded: load_gated recomputes a run's mask with it) -> sparsify_'s report ({} without one)."""
    scfg = sparsity_config(cfg)
    if scfg.metric is None:
        return {}
    windows = token_windows(tok, window_spec(cfg.data.calib), "data.calib")[: cfg.sparsity.calib_windows]
    return sparsify_(model, scfg, windows)


def stage_sparsify(cfg, model, tok, run_dir: Path) -> dict:
    """Static weight mask in place, calibrated on the calibration text; every later stage sees the masked model.
    Returns the fields its results rows carry (nm, metric, allocation, realized weight sparsity)."""
    if sparsity_config(cfg).metric is None:
        return {}
    t0 = time.time()
    report = static_mask_(cfg, model, tok)
    report["seconds"] = round(time.time() - t0, 1)
    (run_dir / "sparsity.json").write_text(json.dumps(report, indent=2))
    if cfg.sparsity.export:  # plain transformers weights; the in-memory model keeps its input gathers
        import copy
        plain = copy.deepcopy(model)
        squash_(plain)
        plain.save_pretrained(run_dir / "pruned_model")
        tok.save_pretrained(run_dir / "pruned_model")
    return {"nm": report["nm"], "sparsity_metric": report["metric"], "allocation": report["allocation"],
            "realized_weight_sparsity": round(report["realized_weight_sparsity"], 6)}


def stage_collect(cfg, model, tok, targets_dir: Path) -> None:
    if (targets_dir / "manifest.json").exists() and not cfg.targets_overwrite:
        log.info("targets: reusing %s", targets_dir)
        return
    check_targets_writable(cfg, targets_dir)
    task = cfg.data.calib.get("task")
    if task:  # task data: each example's loss covers its answer tokens only
        windows = task_examples(tok, task, cfg.data.calib.n_windows)
        desc = f"task {task}: {len(windows)} examples, loss on answer tokens"
    else:
        spec = window_spec(cfg.data.calib)
        windows = token_windows(tok, spec, "data.calib")
        desc = f"{spec.source.data_files or spec.source.path}: {len(windows)}x{spec.seq_len} tokens"
    tcfg = targets_config(cfg)
    # resumes a killed collection of this configuration; targets_overwrite also discards one of another
    if tcfg.world_size == 1:
        collect(model, windows, tcfg, targets_dir, data_desc=desc, seed=cfg.seed, overwrite=cfg.targets_overwrite)
    else:  # Lightning DDP: ranks > 0 are this script re-run by Lightning; they leave once the targets are written
        from .targets.collect_dp import collect_distributed
        collect_distributed(model, windows, tcfg, targets_dir, data_desc=desc, seed=cfg.seed,
                            overwrite=cfg.targets_overwrite)
    log.info("targets: wrote %s", targets_dir)


def stage_fit(cfg, model, targets_dir: Path, run_dir: Path) -> dict:
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from .system import (FIT_CHECKPOINTS, PREDICTOR_DIR, EpochSummary, PredictorSystem, TargetsDataModule,
                         export_predictor, resume_point)
    fit = cfg.predictor.fit
    m = read_manifest(targets_dir)
    dims = dict(d_model=m["hidden"], n_layers=m["n_layers"], n_heads=m["n_heads"], ffn=m["ffn"],
                feature_layer=m["feature_layer"])
    system = PredictorSystem(dims, OmegaConf.to_container(cfg.predictor.model, resolve=True),
                             OmegaConf.to_container(cfg.predictor.fit, resolve=True), manifest_model=m["model"],
                             targets_info={k: m[k] for k in ("criterion", "granularity", "feature_layer")})
    dm = TargetsDataModule(str(targets_dir), fit.batch_size, fit.val_fraction, model=model, seed=cfg.seed, eps=fit.eps,
                           input_key=system.predictor.input_key, normalize=fit.normalize)
    pred = system.predictor
    info = {"predictor_params": pred.n_params(), "predictor_flops_per_token": pred.flops_per_token()}
    log.info("predictor: %s parameters, %.1f MFLOP per token", f"{info['predictor_params']:,}",
             info["predictor_flops_per_token"] / 1e6)
    loggers = make_loggers(cfg, run_dir)
    for lg in loggers:
        lg.log_hyperparams(info)
    tkw = trainer_kwargs(cfg)
    if tkw["strategy"] in MULTI_PROCESS:  # the processes Lightning launches train only: tell them what on
        os.environ[FIT_TARGETS_ENV] = str(Path(targets_dir).absolute())
    # Lightning's own checkpoints (best validation loss, and the last epoch to resume a killed fit from); the
    # predictor itself is exported as safetensors + config.json (PREDICTOR_DIR) after the fit
    ckpt_dir = run_dir / FIT_CHECKPOINTS
    checkpoint = ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor="val/loss", mode="min", save_top_k=1,
                                 save_last=True, enable_version_counter=False)
    resume = resume_point(ckpt_dir, {"targets": str(Path(targets_dir).absolute()), "rows": m["n_rows"],
                                     "model": m["model"].get("hash"), "dims": dims, "seed": cfg.seed,
                                     **system.hparams_identity()})
    trainer = L.Trainer(**tkw, logger=loggers or False, default_root_dir=str(run_dir),
                        callbacks=[EpochSummary(), checkpoint])
    import inspect
    safe = {"weights_only": True} if "weights_only" in inspect.signature(trainer.fit).parameters else {}
    trainer.fit(system, datamodule=dm, ckpt_path=resume, **safe)  # weights_only: no code runs from the checkpoint
    export_predictor(trainer, system, run_dir / PREDICTOR_DIR)  # every rank calls it (FSDP gathers), rank 0 writes
    os.environ.pop(FIT_TARGETS_ENV, None)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if checkpoint.best_model_score is not None:
        metrics["fit/best_val_loss"] = float(checkpoint.best_model_score)
    return {**info, **metrics}


def needs_predictor(cfg: DictConfig) -> bool:
    """Whether the fit stage has a consumer: an evaluated method that reads the trained predictor, or no evaluation
    at all (a fit-only run makes the predictor for later)."""
    from .selectors import get_selector
    return not cfg.stages.evaluate or any(get_selector(m).needs_predictor for m in cfg.evaluate.methods)


def validate(cfg: DictConfig) -> None:
    """Cheap checks of the whole config before any model is loaded or artifact written (train.py runs them before
    Hydra makes the run folder, and on every job of a sweep before the first one runs: shadowsparse/preflight.py)."""
    missing = OmegaConf.missing_keys(cfg)
    if missing:
        key = sorted(missing)[0]
        raise ConfigError(f"{key} has no value (??? in its config file); give it, e.g. {key}=<value>"
                          + (" (a hub id or a local folder)" if key == "llm.name" else ""))
    for key in ("data.calib", "data.eval"):
        check_spec(window_spec(OmegaConf.select(cfg, key), key), key)
    for ffn, heads in gating_levels(cfg):
        GatingConfig(ffn_sparsity=ffn, head_sparsity=heads, granularity=cfg.gating.granularity,
                     budget=cfg.gating.budget, min_keep=cfg.gating.min_keep).validate()
    get_criterion(cfg.targets.criterion)
    if cfg.stages.collect:
        from .targets.collect_dp import validate_collect
        validate_collect(targets_config(cfg), cfg.llm.device)
    sparsity_config(cfg).validate()
    unknown_tasks = (set(cfg.evaluate.get("tasks") or []) | {cfg.data.calib.get("task") or "copa"}) - set(TASKS)
    if unknown_tasks:
        raise ConfigError(f"unknown task(s) {sorted(unknown_tasks)}; shipped tasks are {list(TASKS)}")
    for key, value in (("targets.granularity", cfg.targets.granularity), ("gating.granularity", cfg.gating.granularity)):
        if value not in ("token", "sequence"):
            raise ConfigError(f"{key} must be 'token' or 'sequence', got {value!r}")
    check_methods(cfg.evaluate.methods)
    from .teal_allocation import validate_teal_config
    validate_teal_config(cfg.evaluate.get("teal") or {"allocation": "uniform"}, [ffn for ffn, _ in gating_levels(cfg)] if "teal" in cfg.evaluate.methods
                         else [])
    from .lte import validate_lte
    validate_lte(cfg)
    from .distill import validate_distill
    validate_distill(cfg)
    if "lte" in cfg.evaluate.methods and cfg.sparsity.metric:
        raise ConfigError("lte fine-tunes the decoder weights, which would refill a static sparsity mask; evaluate lte "
                          "without sparsity= (sparsity=none), or the static mask with the other methods")
    from .predictor import PREDICTORS
    if cfg.predictor.model.kind not in PREDICTORS:  # else it would surface at fit, after the collection
        raise ConfigError(f"unknown predictor.model.kind {cfg.predictor.model.kind!r}; choose one of "
                          f"{sorted(PREDICTORS)} (e.g. predictor=per_layer)")
    if cfg.gating.budget != "local" and cfg.predictor.model.kind != "shared" and "predictor" in cfg.evaluate.methods:
        raise ConfigError(f"gating.budget={cfg.gating.budget} needs all layers' scores at once; the "
                          f"{cfg.predictor.model.kind} predictor scores one layer at a time: use budget=local")
    trainer_kwargs(cfg)
    check_logger(cfg)
    if cfg.predictor.fit.loss not in ("mse", "listnet", "bce"):
        raise ConfigError(f"predictor.fit.loss must be mse, listnet or bce, got {cfg.predictor.fit.loss!r}")
    # last: the other checks create nothing, this one probes the disk
    check_writable(cfg.paths.output_dir, "paths.output_dir")
    if cfg.stages.collect:
        check_targets_writable(cfg)


def check_targets_writable(cfg: DictConfig, targets_dir: Path | None = None) -> None:
    """The collect stage writes targets unless finished ones are there to reuse (targets_overwrite=false): a
    read-only cache or paths.targets_dir that holds them is only read, and is fine. A cache folder is named after the
    model's fingerprint, unknown before the model loads (``targets_dir`` None): a cache holding any finished
    targets passes here, and stage_collect checks again with the folder itself."""
    explicit = cfg.paths.get("targets_dir")
    key, root = ("paths.targets_dir", Path(explicit)) if explicit else ("paths.cache_dir", Path(cfg.paths.cache_dir))
    if not cfg.targets_overwrite:
        if targets_dir is not None:
            if (targets_dir / "manifest.json").exists():
                return
        elif (root / "manifest.json").exists() if explicit else any((root / "targets").glob("*/manifest.json")):
            return
    check_writable(root, key)


def check_writable(path, key: str) -> None:
    """Refuse a folder this run could not write, before hours of work are lost on it: a throwaway folder is made
    and removed in its nearest existing ancestor (permission bits alone mislead as root and on read-only mounts)."""
    import tempfile
    where = Path(path).expanduser().absolute()
    try:
        while not where.exists():
            where = where.parent
        if not where.is_dir():
            raise NotADirectoryError(f"'{where}' is a file")
        Path(tempfile.mkdtemp(prefix=".write-probe-", dir=where)).rmdir()
    except OSError as exc:
        raise ConfigError(f"{key}='{path}' is not writable ({exc.strerror or exc}); point {key} at a folder you "
                          "can write") from None


def run(cfg: DictConfig) -> dict:
    """The whole pipeline; returns a flat metric dict (for Hydra sweepers and tests)."""
    import lightning as L

    from .quiet import quiet_third_party_logs
    quiet_third_party_logs()
    t0 = time.time()
    validate(cfg)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    torch.set_num_threads(cfg.get("threads") or torch.get_num_threads())
    run_dir = Path(cfg.paths.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if fit_only_targets():  # a process Lightning launched for a multi-process fit: the training alone, no LLM
        return stage_fit(cfg, None, Path(fit_only_targets()), run_dir)
    from .targets.collect_dp import bind_rank_device
    bind_rank_device()  # in a process Lightning launched as a DDP rank: "cuda" is this rank's GPU from here on
    llm_cfg = LLMConfig(**OmegaConf.to_container(cfg.llm, resolve=True))
    tok = load_tokenizer(llm_cfg)  # the evaluation text is cut before the model loads: too short, refused in seconds
    eval_windows = token_windows(tok, window_spec(cfg.data.eval), "data.eval") if cfg.stages.evaluate else None
    model, tok = load_llm(llm_cfg, tokenizer=tok)
    check_context(model, {**({} if cfg.data.calib.get("task") else {"data.calib.seq_len": cfg.data.calib.seq_len}),
                          **({"data.eval.seq_len": cfg.data.eval.seq_len} if cfg.stages.evaluate else {}),
                          **({"distill.seq_len": cfg.distill.seq_len} if cfg.stages.distill else {})})
    static = stage_sparsify(cfg, model, tok, run_dir)
    metrics: dict = {}
    from .distill import load_run_distilled, stage_distill
    if cfg.stages.distill and is_rank_zero():  # the student replaces the model for every later stage
        model, distilled = stage_distill(cfg, model, tok, run_dir, eval_windows)
    else:  # a run directory with distilled/ evaluates it; a rank Lightning launched loads the one rank 0 saved
        distilled = load_run_distilled(run_dir, model)
        if distilled is None and cfg.stages.distill:
            raise ConfigError(f"this rank found no distilled model in '{run_dir}' (rank 0 saves it before launching "
                              "the others); run stages.distill=true in one process first, then the multi-process "
                              "stages with stages.distill=false on the same paths.output_dir")
    if distilled is not None:
        metrics.update(distilled)
        # every results row names the fine-tuned model: a report over several runs keeps its rows (and its dense
        # row, the "x dense" denominator) apart from the base model's
        static = {**static, "distilled": True, "model": f"{cfg.llm.name} (distilled)"}
    targets_dir = targets_dir_for(cfg, model)
    if cfg.stages.collect:
        stage_collect(cfg, model, tok, targets_dir)
    if cfg.stages.fit and needs_predictor(cfg):
        metrics.update(stage_fit(cfg, model, targets_dir, run_dir))
    elif cfg.stages.fit:
        log.info("fit: skipped, no evaluated method reads the predictor (evaluate.methods=%s)",
                 list(cfg.evaluate.methods))
    if cfg.stages.fit and "lte" in cfg.evaluate.methods:
        from .lte import stage_lte
        metrics.update(stage_lte(cfg, model, tok, run_dir))
    if not is_rank_zero():  # launched for a distributed stage: evaluation, report and metrics are rank 0's
        return metrics
    if cfg.stages.evaluate:
        extra = {k: metrics[k] for k in ("val/spearman_ffn", "val/recall_ffn") if k in metrics}
        rows = stage_evaluate(cfg, model, tok, targets_dir, run_dir, extra, static, windows=eval_windows)
        for r in rows:
            if r["metric"] == "ppl":  # task rows have their own metrics; these keys are perplexity (for sweepers)
                metrics[f"{r['method']}/ppl@ffn{r['ffn_sparsity']:.2f}_heads{r['head_sparsity']:.2f}"] = r["value"]
    if cfg.stages.report and (run_dir / RESULTS).exists():
        rows = read_results([run_dir / RESULTS])
        print_table(rows, title=f"{cfg.llm.name} — {cfg.data.eval.name} perplexity")
        plot_frontier(rows, run_dir / "frontier.png")
        plot_quality(rows, run_dir / "quality.png")
    if cfg.logger.kind == "wandb":  # the run the fit stage opened (or a new one) gets the table and plots, then ends
        from .report import log_wandb
        log_wandb(read_results([run_dir / RESULTS]) if (run_dir / RESULTS).exists() else [],
                  {"plots/quality": run_dir / "quality.png", "plots/frontier": run_dir / "frontier.png"},
                  wandb_init_kwargs(cfg, run_dir))
    metrics["wall_seconds"] = round(time.time() - t0, 1)
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    log.info("run dir: %s (%.0f s)", run_dir, metrics["wall_seconds"])
    return metrics
