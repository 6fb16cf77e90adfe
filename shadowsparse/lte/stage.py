"""The pipeline's LTE pieces: config checks before any work, and the training stage (reads the calibration text,
writes <run>/lte/). Evaluation is the `lte` selector (shadowsparse/selectors/lte.py) through ``load_lte(...).applied(model)``."""
from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import OmegaConf

from ..data import TextSource, WindowSpec, token_windows
from ..errors import ConfigError
from .config import LTEConfig

log = logging.getLogger("shadowsparse")
LTE_DIR = "lte"


def lte_config(cfg) -> LTEConfig:
    node = cfg.get("lte")
    if node is None:
        raise ConfigError("evaluate.methods has lte but the config has no lte group; add `- lte: default` to the "
                          "defaults list (conf/train.yaml has it)")
    return LTEConfig.from_dict(OmegaConf.to_container(node, resolve=True))


def validate_lte(cfg) -> None:
    """Cheap checks of the lte group (only when lte is evaluated)."""
    if "lte" in cfg.evaluate.methods:
        lte_config(cfg)


def lte_folder(cfg, run_dir: Path) -> str:
    """The trained LTE to evaluate: lte.ckpt, or this run's lte/ folder."""
    return cfg.lte.get("ckpt") or str(Path(run_dir) / LTE_DIR)


def stage_lte(cfg, model, tok, run_dir: Path) -> dict:
    """Train LTE on the calibration text source and save it to <run>/lte/; skipped when lte.ckpt names one."""
    from ..loggers import make_loggers
    from .train import train_lte
    lcfg = lte_config(cfg)
    if lcfg.ckpt:
        log.info("lte: evaluating the trained LTE at %s (no training)", lcfg.ckpt)
        return {}
    first = lcfg.first_layer if lcfg.first_layer is not None else cfg.targets.feature_layer + 1
    source = TextSource(**OmegaConf.to_container(cfg.data.calib.source, resolve=True))
    windows = token_windows(tok, WindowSpec(lcfg.seq_len, lcfg.train_windows + lcfg.val_windows, source))
    if len(windows) < lcfg.train_windows + lcfg.val_windows:
        log.warning("lte: the calibration text holds %d windows of %d tokens, fewer than the %d asked; training "
                    "repeats them", len(windows), lcfg.seq_len, lcfg.train_windows + lcfg.val_windows)
    artifact, _ = train_lte(model, windows, lcfg, first, seed=cfg.seed,
                            trainer_cfg=OmegaConf.to_container(cfg.trainer, resolve=True),
                            loggers=make_loggers(cfg, Path(run_dir)), root_dir=str(run_dir))
    folder = artifact.save(Path(run_dir) / LTE_DIR)
    log.info("lte: wrote %s", folder)
    return {f"lte/{k}": v for k, v in artifact.summary.items()}
