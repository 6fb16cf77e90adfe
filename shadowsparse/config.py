"""Composed Hydra config -> the dataclasses and plain values each stage takes.

Stages never read a DictConfig node themselves for these: one adapter each, so a key's meaning lives in one place.
"""
from __future__ import annotations

import logging

import torch
from omegaconf import OmegaConf

from .data import TextSource, WindowSpec
from .errors import ConfigError
from .prune import SparsityConfig
from .targets.config import TargetsConfig
from .verify import VerifyConfig

log = logging.getLogger("shadowsparse")
STRATEGIES = ("auto", "ddp", "fsdp")  # conf/trainer/{cpu,gpu,ddp,fsdp}.yaml
MULTI_PROCESS = ("ddp", "fsdp")


def window_spec(node, key: str = "") -> WindowSpec:
    """data.calib / data.eval (``key``, for the message) -> the windows to cut from that text source."""
    source = OmegaConf.to_container(node.source, resolve=True)
    unknown = set(source) - set(TextSource.__dataclass_fields__)
    if unknown:
        where = f"{key}.source" if key else "source"
        raise ConfigError(f"unknown {where} key(s) {sorted(unknown)}; known: {sorted(TextSource.__dataclass_fields__)}")
    return WindowSpec(seq_len=node.seq_len, n_windows=node.n_windows, source=TextSource(**source))


def targets_config(cfg) -> TargetsConfig:
    return TargetsConfig(**OmegaConf.to_container(cfg.targets, resolve=True))


def sparsity_config(cfg) -> SparsityConfig:
    node = OmegaConf.to_container(cfg.sparsity, resolve=True)
    return SparsityConfig(**{k: v for k, v in node.items() if k not in ("calib_windows", "export")}, seed=cfg.seed)


def verify_config(cfg) -> VerifyConfig:
    """VerifyConfig from the composed config's optional ``evaluate.verify`` node (defaults where absent)."""
    node = cfg.evaluate.get("verify")
    values = OmegaConf.to_container(node, resolve=True) if node is not None else {}
    unknown = set(values) - set(VerifyConfig.__dataclass_fields__)
    if unknown:
        raise ConfigError(f"unknown evaluate.verify key(s) {sorted(unknown)}; known: "
                          f"{sorted(VerifyConfig.__dataclass_fields__)}")
    return VerifyConfig(**values).validate()


def gating_levels(cfg) -> list[tuple[float, float]]:
    """(ffn, heads) sparsity levels to evaluate: gating.levels, or the single level that gating.ffn_sparsity and/or
    gating.head_sparsity name (a sweep sets one of them; the other defaults to 0)."""
    g = cfg.gating
    ffn, heads = g.get("ffn_sparsity"), g.get("head_sparsity")
    if ffn is not None or heads is not None:
        levels = [(_fraction(ffn, "gating.ffn_sparsity"), _fraction(heads, "gating.head_sparsity"))]
    else:
        levels = [(_fraction(lv.ffn, "gating.levels[].ffn"), _fraction(lv.heads, "gating.levels[].heads"))
                  for lv in g.levels]
    for f, h in levels:
        if not (0 <= f < 1 and 0 <= h < 1):
            raise ConfigError(f"sparsity must be in [0, 1) (the fraction skipped); got ffn={f}, heads={h}: set "
                              "gating.ffn_sparsity / gating.head_sparsity (or gating.levels) to fractions in [0, 1)")
    return levels


def _fraction(value, key: str) -> float:
    if value is None:
        return 0.0
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}={value!r} is not a number; set it to a fraction in [0, 1), e.g. {key}=0.5") from None


def ffn_only_levels(cfg, method: str) -> list[tuple[float, float]]:
    """The levels without head sparsity, for a method that selects FFN neurons only; the others are named in the log
    (the method has no head axis to compose with, so those levels get no row of it)."""
    levels = gating_levels(cfg)
    skipped = [f"ffn={f:.2f} heads={h:.2f}" for f, h in levels if h]
    if skipped:
        log.info("%s selects FFN neurons only: level(s) %s skipped for it", method, ", ".join(skipped))
    return [(f, h) for f, h in levels if not h]


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
