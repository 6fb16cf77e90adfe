"""Experiment loggers of a run (none | csv | wandb, offline-safe), shared by the predictor fit and the LTE stage."""
from __future__ import annotations

import logging
import os
from pathlib import Path

from omegaconf import OmegaConf

from .errors import ConfigError

log = logging.getLogger("shadowsparse")
KINDS = ("none", "csv", "wandb")


def check_logger(cfg) -> None:
    """logger.kind and (wandb) logger.mode, checked before the collection rather than when the fit opens them."""
    if cfg.logger.kind not in KINDS:
        raise ConfigError(f"logger.kind must be none, csv or wandb, got {cfg.logger.kind!r} (e.g. logger=wandb)")
    if cfg.logger.kind == "wandb" and (cfg.logger.get("mode") or "offline") not in ("online", "offline", "disabled"):
        raise ConfigError(f"logger.mode must be online, offline or disabled, got {cfg.logger.mode!r}")


def make_loggers(cfg, run_dir: Path) -> list:
    from lightning.pytorch.loggers import CSVLogger, WandbLogger
    check_logger(cfg)
    kind = cfg.logger.kind
    if kind == "none":
        return []
    if kind == "csv":
        return [CSVLogger(str(run_dir), name="logs")]
    kw = wandb_init_kwargs(cfg, run_dir)
    return [WandbLogger(save_dir=kw.pop("dir"), **kw)]


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
