"""Structured-config schemas of conf/ groups, registered in Hydra's ConfigStore: a value of the wrong type
(``gating.ffn_sparsity=abc``) or an unknown key (``gating.ffn_sparsty=0.5``) is refused when the config is composed,
before any model loads. Ranges and cross-key rules are checked by pipeline.validate."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore


@dataclass
class LevelNode:
    ffn: float = 0.0  # fraction of FFN neurons skipped per token
    heads: float = 0.0  # fraction of attention heads skipped per token


@dataclass
class GatingNode:
    ffn_sparsity: Optional[float] = None  # set (or head_sparsity): evaluate that single level instead of levels
    head_sparsity: Optional[float] = None
    granularity: str = "token"  # token | sequence
    levels: List[LevelNode] = field(default_factory=list)
    budget: str = "local"  # local | global | hybrid
    min_keep: float = 0.1  # hybrid: fraction of each layer's units always kept


@dataclass
class EvaluateNode:
    methods: List[str] = field(default_factory=list)  # registered selectors (shadowsparse/selectors/)
    threshold_windows: int = 8
    tasks: List[str] = field(default_factory=list)
    task_limit: Optional[int] = None
    task_batch_size: int = 8
    verify: Dict[str, Any] = field(default_factory=dict)  # keys of shadowsparse.verify.VerifyConfig (checked there)


def register_schemas() -> None:
    cs = ConfigStore.instance()
    cs.store(group="gating", name="gating_schema", node=GatingNode)
    cs.store(group="evaluate", name="evaluate_schema", node=EvaluateNode)


register_schemas()
