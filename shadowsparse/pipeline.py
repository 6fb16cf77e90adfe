"""run(cfg): collect -> fit -> evaluate -> report, each stage behind a flag and reading only the previous
stage's artifacts (targets/ folder, predictor checkpoint, results.jsonl)."""
from __future__ import annotations

import contextlib
import hashlib
import math
import json
import logging
import os
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from .accounting import weight_bytes_skipped
from .arch import ModelView
from .criteria import get_criterion
from .data import TextSource, WindowSpec, token_windows
from .distributed import FIT_TARGETS_ENV, fit_only_targets, is_rank_zero
from .errors import ConfigError
from .gating import GatingConfig, SparsityCounter, StaticScores, TensorScores, attach_gating, n_keep
from .llm import LLMConfig, check_context, load_llm
from .methods import Level, evaluate_levels, window_nll
from .progress import progress
from .prune import SparsityConfig, sparsify_, squash_
from .report import RESULTS, append_result, plot_frontier, plot_quality, print_table, read_results
from .targets import FORMAT as TARGETS_FORMAT
from .targets import TargetsConfig, collect, mean_scores, model_fingerprint, read_manifest, score_window
from .tasks import TASKS, evaluate_tasks, task_examples
from .teal import TealThresholds, attach_teal
from .training_free import GateScores, LiveActivationScores, ThresholdScores

log = logging.getLogger("shadowsparse")
PREDICTOR_CKPT = "predictor.ckpt"


def window_spec(node) -> WindowSpec:
    return WindowSpec(seq_len=node.seq_len, n_windows=node.n_windows,
                      source=TextSource(**OmegaConf.to_container(node.source, resolve=True)))


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


def sparsity_config(cfg) -> SparsityConfig:
    node = OmegaConf.to_container(cfg.sparsity, resolve=True)
    return SparsityConfig(**{k: v for k, v in node.items() if k not in ("calib_windows", "export")}, seed=cfg.seed)


def stage_sparsify(cfg, model, tok, run_dir: Path) -> dict:
    """Static weight mask in place, calibrated on the calibration text; every later stage sees the masked model.
    Returns the fields its results rows carry (nm, metric, allocation, realized weight sparsity)."""
    scfg = sparsity_config(cfg)
    if scfg.metric is None:
        return {}
    spec = window_spec(cfg.data.calib)
    windows = token_windows(tok, spec)[: cfg.sparsity.calib_windows]
    t0 = time.time()
    report = sparsify_(model, scfg, windows)
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
    task = cfg.data.calib.get("task")
    if task:  # task data: each example's loss covers its answer tokens only
        windows = task_examples(tok, task, cfg.data.calib.n_windows)
        desc = f"task {task}: {len(windows)} examples, loss on answer tokens"
    else:
        spec = window_spec(cfg.data.calib)
        windows = token_windows(tok, spec)
        desc = f"{spec.source.data_files or spec.source.path}: {len(windows)}x{spec.seq_len} tokens"
    tcfg = targets_config(cfg)
    # resumes a killed collection of this configuration; targets_overwrite also discards one of another
    if tcfg.world_size == 1:
        collect(model, windows, tcfg, targets_dir, data_desc=desc, seed=cfg.seed, overwrite=cfg.targets_overwrite)
    else:  # Lightning DDP: ranks > 0 are this script re-run by Lightning; they leave once the targets are written
        from .collect_dp import collect_distributed
        collect_distributed(model, windows, tcfg, targets_dir, data_desc=desc, seed=cfg.seed,
                            overwrite=cfg.targets_overwrite)
    log.info("targets: wrote %s", targets_dir)


def targets_config(cfg) -> TargetsConfig:
    return TargetsConfig(**OmegaConf.to_container(cfg.targets, resolve=True))


def stage_fit(cfg, model, targets_dir: Path, run_dir: Path) -> dict:
    import lightning as L
    from .system import EpochSummary, PredictorSystem, TargetsDataModule
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
    trainer = L.Trainer(**tkw, logger=loggers or False, default_root_dir=str(run_dir), enable_checkpointing=False,
                        callbacks=[EpochSummary()])
    trainer.fit(system, datamodule=dm)
    trainer.save_checkpoint(str(run_dir / PREDICTOR_CKPT))  # every rank calls it (FSDP gathers), rank 0 writes
    os.environ.pop(FIT_TARGETS_ENV, None)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    return {**info, **metrics}


STRATEGIES = ("auto", "ddp", "fsdp")  # conf/trainer/{cpu,gpu,ddp,fsdp}.yaml
MULTI_PROCESS = ("ddp", "fsdp")


def trainer_kwargs(cfg) -> dict:
    """Lightning Trainer arguments from cfg.trainer, refused before any work when they cannot run."""
    tkw = OmegaConf.to_container(cfg.trainer, resolve=True)
    tkw.setdefault("strategy", "auto")
    strategy, accel = tkw["strategy"], tkw.get("accelerator", "auto")
    if strategy not in STRATEGIES:
        hint = (" (ddp_spawn would pickle the DataModule, which holds the frozen LLM, into every process)"
                if str(strategy).startswith("ddp_") else "")
        raise ConfigError(f"trainer.strategy={strategy!r} is not supported{hint}; use trainer=ddp or trainer=fsdp "
                          f"(or trainer.strategy= one of {', '.join(STRATEGIES)})")
    if strategy == "fsdp" and accel == "cpu":
        raise ConfigError("trainer=fsdp needs GPUs (FSDP shards parameters over CUDA devices; on CPU use "
                          "trainer=ddp trainer.accelerator=cpu): set trainer.accelerator=gpu")
    if strategy in MULTI_PROCESS and accel == "gpu" and torch.cuda.is_available() and \
            isinstance(tkw.get("devices"), int) and tkw["devices"] > torch.cuda.device_count():
        raise ConfigError(f"trainer.devices={tkw['devices']} but {torch.cuda.device_count()} GPU(s) are visible; "
                          f"set trainer.devices to at most {torch.cuda.device_count()}")
    return tkw


def make_loggers(cfg, run_dir: Path) -> list:
    from lightning.pytorch.loggers import CSVLogger, WandbLogger
    kind = cfg.logger.kind
    if kind == "none":
        return []
    if kind == "csv":
        return [CSVLogger(str(run_dir), name="logs")]
    if kind == "wandb":
        kw = wandb_init_kwargs(cfg, run_dir)
        return [WandbLogger(save_dir=kw.pop("dir"), **kw)]
    raise ConfigError(f"logger.kind must be none, csv or wandb, got {kind!r}")


def check_logger(cfg) -> None:
    """logger.kind and (wandb) logger.mode, checked before the collection rather than when the fit opens them."""
    if cfg.logger.kind not in ("none", "csv", "wandb"):
        raise ConfigError(f"logger.kind must be none, csv or wandb, got {cfg.logger.kind!r} (e.g. logger=wandb)")
    if cfg.logger.kind == "wandb" and (cfg.logger.get("mode") or "offline") not in ("online", "offline", "disabled"):
        raise ConfigError(f"logger.mode must be online, offline or disabled, got {cfg.logger.mode!r}")


def wandb_init_kwargs(cfg, run_dir: Path) -> dict:
    """wandb.init arguments of this run: project, mode, the run directory, and the whole resolved config. An online
    run with no API key (WANDB_API_KEY or a `wandb login`) goes offline instead of failing at the first log call;
    `wandb sync <run dir>/wandb/offline-run-*` uploads it later."""
    check_logger(cfg)
    mode = cfg.logger.get("mode") or "offline"
    if mode == "online" and os.environ.get("WANDB_MODE") not in ("offline", "disabled"):
        import netrc
        try:
            logged_in = bool(netrc.netrc().authenticators("api.wandb.ai"))
        except (OSError, netrc.NetrcParseError):
            logged_in = False
        if not (os.environ.get("WANDB_API_KEY") or logged_in):
            log.warning("wandb: no API key (WANDB_API_KEY or `wandb login`): logging offline to %s/wandb", run_dir)
            mode = "offline"
    return dict(project=cfg.logger.project, mode=mode, dir=str(run_dir),
                config=OmegaConf.to_container(cfg, resolve=True))


def gating_levels(cfg) -> list[tuple[float, float]]:
    g = cfg.gating
    if g.get("ffn_sparsity") is not None:  # a single level, e.g. from a sweep: gating.ffn_sparsity=0.3,0.5,0.7
        levels = [(float(g.ffn_sparsity), float(g.get("head_sparsity") or 0.0))]
    else:
        levels = [(float(lv.ffn), float(lv.heads)) for lv in g.levels]
    for f, h in levels:
        if not (0 <= f < 1 and 0 <= h < 1):
            raise ConfigError(f"sparsity must be in [0, 1) (the fraction skipped); got ffn={f}, heads={h}: set "
                              "gating.ffn_sparsity / gating.head_sparsity (or gating.levels) to fractions in [0, 1)")
    return levels


def ffn_only_levels(cfg, method: str) -> list[tuple[float, float]]:
    """The levels without head sparsity, for a method that selects FFN neurons only; the others are named in the log
    (the method has no head axis to compose with, so those levels get no row of it)."""
    levels = gating_levels(cfg)
    skipped = [f"ffn={f:.2f} heads={h:.2f}" for f, h in levels if h]
    if skipped:
        log.info("%s selects FFN neurons only: level(s) %s skipped for it", method, ", ".join(skipped))
    return [(f, h) for f, h in levels if not h]


METHODS = ("dense", "predictor", "oracle", "static", "threshold", "gate", "teal", "lte", "predictor_verify",
           "gate_verify", "sketch", "sketch_verify")


def stage_evaluate(cfg, model, tok, targets_dir: Path, run_dir: Path, extra: dict,
                   static: dict | None = None) -> list[dict]:
    """Every configured method's rows; ``static`` (from stage_sparsify) labels them with the static mask under."""
    from .system import load_predictor
    view = ModelView(model)
    methods = list(cfg.evaluate.methods)
    pred = None
    if "predictor" in methods:  # checked first: a checkpoint of another model is refused before any work
        ckpt = cfg.paths.get("predictor_ckpt") or str(run_dir / PREDICTOR_CKPT)
        pred = load_predictor(ckpt, model).to(next(model.parameters()).device)
    # what was collected: from the targets, or (predictor alone) from the checkpoint that was trained on them
    # (training-free methods alone need neither: the configured criterion and feature layer say what is gated)
    if {"static", "oracle"} & set(methods):
        info = read_manifest(targets_dir)
    elif pred is not None:
        info = pred.targets_info
    else:
        info = {"criterion": cfg.targets.criterion, "feature_layer": cfg.targets.feature_layer}
    windows = token_windows(tok, window_spec(cfg.data.eval))
    first_layer = info["feature_layer"] + 1  # every method gates the same layers: those after the feature
    gran = cfg.gating.granularity
    base = {"criterion": info["criterion"], "nm": None, "granularity": gran, "dataset": cfg.data.eval.name,
            "metric": "ppl", "model": cfg.llm.name, "first_gated_layer": first_layer, "seed": cfg.seed,
            **(static or {})}
    rows = []

    tasks = list(cfg.evaluate.get("tasks") or [])

    def record(method, lv_ffn, lv_heads, counter, dataset, metric, value, n_tokens, granularity, budget,
               selector_bytes, more, stats_extra=None):
        stats = counter.stats(view.dims.n_heads, view.dims.ffn, view.dims.n_kv_heads)
        if stats_extra is not None:  # counts a source keeps itself (predict-then-verify: its candidate sparsity)
            stats.update(stats_extra(lv_ffn))
            more = {**more, **{k: v for k, v in stats.items() if k.startswith("realized_candidate")}}
        row = {**base, "method": method, "granularity": granularity, "budget": budget, "ffn_sparsity": lv_ffn,
               "head_sparsity": lv_heads, "dataset": dataset, "metric": metric, "value": value,
               "realized_ffn_sparsity": stats["realized_ffn_sparsity"],
               "realized_head_sparsity": stats["realized_head_sparsity"],
               "weight_bytes_skipped": weight_bytes_skipped(view, method, stats, selector_bytes),
               "n_tokens": n_tokens, **more}
        append_result(run_dir, row)
        rows.append(row)
        log.info("%s ffn=%.2f heads=%.2f %s %s=%.4f (realized ffn %.3f, heads %.3f)", method, lv_ffn, lv_heads,
                 dataset, metric, value, row["realized_ffn_sparsity"], row["realized_head_sparsity"])

    def evaluate(method: str, source, granularity: str = gran, selector_bytes: int = 0, before_batch=None,
                 levels: list[tuple[float, float]] | None = None, budget: str = cfg.gating.budget,
                 task_source="same", stats_extra=None, **more):
        """Perplexity (and lm-eval tasks) of one method at every level; task_source: the selector to use inside
        lm-eval (None: skip tasks for this method, e.g. an oracle that needs its own dense pass)."""
        levels = [Level(f, h) for f, h in (levels if levels is not None else gating_levels(cfg))]
        # granularity None labels selectors with no per-input choice (dense, static); their hooks run per token
        gating_kw = dict(budget=budget, min_keep=cfg.gating.min_keep)
        evaluate_levels(model, windows, source, levels, first_layer, granularity or "token", cfg.data.eval.batch_size,
                        before_batch=before_batch, desc=method, **gating_kw)
        for lv in levels:
            record(method, lv.ffn, lv.heads, lv.counter, cfg.data.eval.name, "ppl", lv.ppl, lv.tokens, granularity,
                   budget, selector_bytes, more, stats_extra)
        task_source = source if task_source == "same" else task_source
        if not tasks or (task_source is None and source is not None):
            return
        for lv in levels:
            counter = SparsityCounter()
            gcfg = GatingConfig(ffn_sparsity=lv.ffn, head_sparsity=lv.heads, granularity=granularity or "token",
                                first_layer=first_layer, **gating_kw)
            with (attach_gating(model, task_source, gcfg, counter=counter) if task_source is not None
                  else contextlib.nullcontext()):
                results = evaluate_tasks(model, tok, tasks, limit=cfg.evaluate.task_limit,
                                         batch_size=cfg.evaluate.task_batch_size)
            for task, res in results.items():
                for metric, value in res.items():
                    if metric != "n":
                        record(method, lv.ffn, lv.heads, counter, task, metric, value, None, granularity, budget,
                               selector_bytes, {**more, "n_examples": res["n"], "task_limit": cfg.evaluate.task_limit},
                               stats_extra)

    if "dense" in methods:
        evaluate("dense", None, granularity=None, levels=[(0.0, 0.0)], criterion=None, budget=None)
    if pred is not None:
        kind = pred.cfg.kind
        evaluate("predictor" if kind == "shared" else kind, pred,
                 selector_bytes=pred.n_params() * next(model.parameters()).element_size(), predictor=kind,
                 predictor_params=pred.n_params(), predictor_flops_per_token=pred.flops_per_token(), **extra)
    if "static" in methods:
        static = StaticScores(*mean_scores(targets_dir, model))  # (L, H), (L, F): streamed, not loaded whole
        evaluate("static", static, granularity=None)  # one mask for every input
    if "oracle" in methods:
        crit = get_criterion(info["criterion"])
        oracle = TensorScores()

        def score(ids):  # the true criterion scores of these very tokens, from a dense pass
            heads, neurons, _, _ = score_window(model, crit, ids)
            if gran == "sequence":
                heads, neurons = heads.mean(1, keepdim=True), neurons.mean(1, keepdim=True)
            oracle.set(heads, neurons)
        live = LiveActivationScores() if info["criterion"] == "activation" else None  # lm-eval runs its own batches
        if live is None and tasks:
            log.warning("oracle on lm-eval tasks needs the activation criterion (read live); skipped for %s",
                        info["criterion"])
        evaluate("oracle", oracle, before_batch=score, task_source=live)
    if "threshold" in methods:  # calibrated on the calibration text, never on the evaluation windows
        calib = token_windows(tok, window_spec(cfg.data.calib))[: cfg.evaluate.threshold_windows]
        evaluate("threshold", ThresholdScores.calibrate(model, calib, cfg.seed), granularity="token", criterion=None,
                 budget="local")  # per-layer thresholds are its budget
    if "teal" in methods:  # input-channel sparsity on every projection; one sparsity for all of them
        calib = token_windows(tok, window_spec(cfg.data.calib))[: cfg.evaluate.threshold_windows]
        thresholds = TealThresholds.calibrate(model, calib, cfg.seed)
        for ffn, _ in ffn_only_levels(cfg, "teal"):  # TEAL has no head axis
            with attach_teal(model, thresholds, ffn, first_layer) as handle:
                nll, n = 0.0, 0
                for ids in progress(windows.split(cfg.data.eval.batch_size), desc=f"teal s={ffn:.2f}", unit="batch"):
                    nll += window_nll(model, ids.to(next(model.parameters()).device))
                    n += ids[:, 1:].numel()
                st = handle.stats()
                row = {**base, "method": "teal", "criterion": None, "granularity": "token", "budget": "local",
                       "ffn_sparsity": ffn, "head_sparsity": 0.0, "value": math.exp(nll / n),
                       "realized_ffn_sparsity": st["realized_ffn_out_sparsity"], "realized_head_sparsity": 0.0,
                       "realized_input_sparsity": st, "weight_bytes_skipped": handle.weight_bytes_skipped(),
                       "n_tokens": n}
                append_result(run_dir, row)
                rows.append(row)
                log.info("teal s=%.2f wikitext ppl=%.4f (realized inputs %s)", ffn, row["value"],
                         {k: round(v, 3) for k, v in st.items()})
    if "gate" in methods:
        if not view.spec.glu:
            log.warning("gate (CATS) needs a gated FFN; %s has none: skipped", view.spec.family)
        else:
            evaluate("gate", GateScores(), granularity="token", criterion=None, budget="local",
                     levels=ffn_only_levels(cfg, "gate"))
    if "lte" in methods:  # its fine-tuned weights are swapped into the model for this method only, then restored
        from .lte import load_lte, lte_folder
        lte = load_lte(lte_folder(cfg, run_dir), model)
        with lte.applied(model) as source:
            evaluate("lte", source, granularity="token", criterion=None, budget="local",
                     selector_bytes=lte.router_bytes(model), levels=ffn_only_levels(cfg, "lte"),
                     **lte.info())
    verify_methods = [m for m in ("predictor_verify", "gate_verify", "sketch", "sketch_verify") if m in methods]
    if verify_methods:  # selection before / around the FFN (verify.py), FFN levels only
        from .verify import VerifyScores, sketch_bytes, verify_config, verify_predictor_for
        vcfg = verify_config(cfg)
        qcache: dict = {}  # the low-bit copies, quantized once for sketch and sketch_verify
        hessians = None
        if vcfg.quantizer == "gptq" and {"sketch", "sketch_verify"} & set(methods) and view.spec.glu:
            from .verify import ffn_input_hessians  # calibrated on the calibration text, never the evaluation windows
            calib = token_windows(tok, window_spec(cfg.data.calib))[: vcfg.calib_windows]
            hessians = ffn_input_hessians(model, calib, list(range(first_layer, view.dims.n_layers)))
        for method in verify_methods:
            if method != "predictor_verify" and not view.spec.glu:
                log.warning("%s needs a gated FFN (SwiGLU) to sketch or read the gate; %s has none: skipped", method,
                            view.spec.family)
                continue
            levels = ffn_only_levels(cfg, method)
            vp = verify_predictor_for(cfg, model, tok, first_layer, run_dir) if method == "predictor_verify" else None
            esize = next(model.parameters()).element_size()
            proposer = {"predictor_verify": "predictor", "gate_verify": "gate"}.get(method, "sketch")
            sel_bytes = {"predictor": vp.n_params() * esize if vp is not None else 0, "gate": 0,
                         "sketch": sketch_bytes(view, view.dims.n_layers - first_layer, vcfg)}[proposer]
            more_q = {"verify_bits": vcfg.bits, "verify_group": vcfg.group, "verify_sketch": vcfg.sketch,
                      "verify_quantizer": vcfg.quantizer} if proposer == "sketch" else {}
            # sketch: the proposal is the keep set (q = 0 proposes no more than 1 - s), no verify stage
            for q in ([0.0] if method == "sketch" else vcfg.qs):
                q_levels = levels
                if method == "sketch_verify" and "sketch" in methods:  # no verify stage = the sketch row again
                    same = [(f, h) for f, h in levels if round(q * view.dims.ffn) <= n_keep(view.dims.ffn, f)]
                    if same:
                        log.info("sketch_verify q=%.2f proposes no more than it keeps at ffn=%s: the same selection "
                                 "as the sketch row, not evaluated again", q, ", ".join(f"{f:.2f}" for f, _ in same))
                    q_levels = [lv for lv in levels if lv not in same]
                if not q_levels:
                    continue
                src = VerifyScores(q, vp, proposer, vcfg.final, sketch=vcfg, qcache=qcache, hessians=hessians)
                evaluate(method, src, granularity="token", criterion=None, budget="local", levels=q_levels,
                         selector_bytes=sel_bytes, **more_q,
                         stats_extra=lambda f, src=src: {"realized_candidate_sparsity": src.candidate_sparsity(
                             f, view.dims.ffn)}, **({} if method == "sketch" else {"verify_q": q}),
                         verify_final=vcfg.final,
                         **({"predictor_params": vp.n_params(), "verify_rank": vcfg.rank, "verify_target": vcfg.target,
                             "verify_train_tokens": vp.train_tokens} if vp is not None else {}))
    return rows


def validate(cfg: DictConfig) -> None:
    """Cheap checks of the whole config before any model is loaded or artifact written."""
    for ffn, heads in gating_levels(cfg):
        GatingConfig(ffn_sparsity=ffn, head_sparsity=heads, granularity=cfg.gating.granularity,
                     budget=cfg.gating.budget, min_keep=cfg.gating.min_keep).validate()
    get_criterion(cfg.targets.criterion)
    if cfg.stages.collect:
        from .collect_dp import validate_collect
        validate_collect(targets_config(cfg), cfg.llm.device)
    sparsity_config(cfg).validate()
    unknown_tasks = (set(cfg.evaluate.get("tasks") or []) | {cfg.data.calib.get("task") or "copa"}) - set(TASKS)
    if unknown_tasks:
        raise ConfigError(f"unknown task(s) {sorted(unknown_tasks)}; shipped tasks are {list(TASKS)}")
    for key, value in (("targets.granularity", cfg.targets.granularity), ("gating.granularity", cfg.gating.granularity)):
        if value not in ("token", "sequence"):
            raise ConfigError(f"{key} must be 'token' or 'sequence', got {value!r}")
    unknown = set(cfg.evaluate.methods) - set(METHODS)
    if unknown:
        raise ConfigError(f"unknown evaluation method(s) {sorted(unknown)}; use {', '.join(METHODS)}")
    from .lte import validate_lte
    validate_lte(cfg)
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
        key = "paths.targets_dir" if cfg.paths.get("targets_dir") else "paths.cache_dir"
        check_writable(cfg.paths.get("targets_dir") or cfg.paths.cache_dir, key)


def check_writable(path, key: str) -> None:
    """Refuse a folder this run could not write, before hours of work are lost on it: a throwaway folder is made
    and removed in its nearest existing ancestor (permission bits alone mislead as root and on read-only mounts)."""
    import tempfile
    where = Path(path).expanduser().absolute()
    while not where.exists():
        where = where.parent
    try:
        if not where.is_dir():
            raise NotADirectoryError(f"'{where}' is a file")
        Path(tempfile.mkdtemp(prefix=".write-probe-", dir=where)).rmdir()
    except OSError as exc:
        raise ConfigError(f"{key}='{path}' is not writable ({exc.strerror or exc}); point {key} at a folder you "
                          "can write") from None


def run(cfg: DictConfig) -> dict:
    """The whole pipeline; returns a flat metric dict (for Hydra sweepers and tests)."""
    import lightning as L
    t0 = time.time()
    validate(cfg)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    torch.set_num_threads(cfg.get("threads") or torch.get_num_threads())
    run_dir = Path(cfg.paths.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if fit_only_targets():  # a process Lightning launched for a multi-process fit: the training alone, no LLM
        return stage_fit(cfg, None, Path(fit_only_targets()), run_dir)
    from .collect_dp import bind_rank_device
    bind_rank_device()  # in a process Lightning launched as a DDP rank: "cuda" is this rank's GPU from here on
    model, tok = load_llm(LLMConfig(**OmegaConf.to_container(cfg.llm, resolve=True)))
    check_context(model, {**({} if cfg.data.calib.get("task") else {"data.calib.seq_len": cfg.data.calib.seq_len}),
                          **({"data.eval.seq_len": cfg.data.eval.seq_len} if cfg.stages.evaluate else {})})
    static = stage_sparsify(cfg, model, tok, run_dir)
    targets_dir = targets_dir_for(cfg, model)
    metrics: dict = {}
    if cfg.stages.collect:
        stage_collect(cfg, model, tok, targets_dir)
    if cfg.stages.fit:
        metrics.update(stage_fit(cfg, model, targets_dir, run_dir))
    if cfg.stages.fit and "lte" in cfg.evaluate.methods:
        from .lte import stage_lte
        metrics.update(stage_lte(cfg, model, tok, run_dir))
    if not is_rank_zero():  # launched for a distributed stage: evaluation, report and metrics are rank 0's
        return metrics
    if cfg.stages.evaluate:
        extra = {k: metrics[k] for k in ("val/spearman_ffn", "val/recall_ffn") if k in metrics}
        rows = stage_evaluate(cfg, model, tok, targets_dir, run_dir, extra, static)
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
