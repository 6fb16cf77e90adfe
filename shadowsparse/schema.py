"""Structured-config schemas of conf/ groups, registered in Hydra's ConfigStore: a value of the wrong type
(``gating.ffn_sparsity=abc``, ``data.eval.n_windows=many``) or an unknown key (``gating.ffn_sparsty=0.5``) is refused
when the config is composed, before any model loads (train.py turns the refusal into one ``error:`` line, exit 2:
shadowsparse/preflight.py). Ranges and cross-key rules are checked by pipeline.validate.

Each schema lists exactly the keys of its YAML files: a schema adds its fields to the composed node, and the
targets' cache key hashes data.calib and the targets node (a new key there would re-collect every cache)."""
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
class TealNode:  # the teal method's allocation of sparsity over each layer's inputs (shadowsparse/teal_allocation.py)
    allocation: str = "uniform"  # uniform: every input at s | greedy: TEAL's block-wise greedy allocation
    windows: int = 2  # greedy: calibration windows its block forwards run on
    step: float = 0.05  # greedy: the raise of one input's sparsity per try
    max_sparsity: float = 0.8  # greedy: the largest layer sparsity allocated (levels above it are refused)
    sketch_attn: float = 0.3  # sketch_teal: teal's sparsity on the attention inputs (q/k/v and o), uniform


@dataclass
class EvaluateNode:
    methods: List[str] = field(default_factory=list)  # registered selectors (shadowsparse/selectors/)
    threshold_windows: int = 8
    teal: TealNode = field(default_factory=TealNode)
    tasks: List[str] = field(default_factory=list)
    task_limit: Optional[int] = None
    task_batch_size: int = 8
    verify: Dict[str, Any] = field(default_factory=dict)  # keys of shadowsparse.verify.VerifyConfig (checked there)


@dataclass
class CalibNode:
    task: Optional[str] = None  # a shipped task: collect on its examples (n_windows of them)
    seq_len: int = 512  # tokens per window
    n_windows: Optional[int] = 32  # windows (or task examples) kept; null: every one of the text
    source: Dict[str, Any] = field(default_factory=dict)  # shadowsparse.data.TextSource (checked there)


@dataclass
class EvalNode:
    name: str = "wikitext2"  # the dataset column of the results rows
    seq_len: int = 512
    n_windows: Optional[int] = 32  # null: every window of the text (the full-test-set protocol)
    batch_size: int = 1
    source: Dict[str, Any] = field(default_factory=dict)


@dataclass
class DataNode:
    calib: CalibNode = field(default_factory=CalibNode)
    eval: EvalNode = field(default_factory=EvalNode)


@dataclass
class TargetsNode:  # shadowsparse.targets.config.TargetsConfig, whose validate() checks the values
    criterion: str = "plainact"
    granularity: str = "token"
    feature_layer: int = 0
    shard_tokens: int = 4096
    batch_size: int = 1
    score_dtype: str = "bfloat16"
    input_dtype: str = "bfloat16"
    layer_inputs: bool = True
    neuron_topk: Any = None  # null, a count (int) or a fraction (float): TargetsConfig.validate checks it
    devices: int = 1
    accelerator: str = "cpu"
    strategy: str = "ddp"
    num_nodes: int = 1


@dataclass
class FitNode:
    loss: str = "mse"  # mse | listnet | bce
    lr: float = 1.0e-3
    weight_decay: float = 0.01
    batch_size: int = 256
    val_fraction: float = 0.1
    head_weight: float = 1.0
    ffn_sparsity: float = 0.5
    head_sparsity: float = 0.3
    eps: float = 1.0e-3
    normalize: str = "layer"  # layer | token


@dataclass
class PredictorNode:
    model: Dict[str, Any] = field(default_factory=dict)  # keys depend on model.kind (shadowsparse/predictor.py)
    fit: FitNode = field(default_factory=FitNode)


@dataclass
class DistillNode:  # shadowsparse.distill.DistillConfig (validate() checks the values), plus the training text's cut
    ffn: float = 0.7
    attn: float = 0.3
    first_layer: int = 1
    steps: int = 100
    batch_size: int = 8
    lr: float = 5.0e-5
    warmup_steps: int = 10
    grad_clip: float = 1.0
    val_windows: int = 4
    train_embeddings: bool = False
    seq_len: int = 256
    n_windows: Optional[int] = None
    split: Optional[str] = None


def register_schemas() -> None:
    cs = ConfigStore.instance()
    cs.store(group="gating", name="gating_schema", node=GatingNode)
    cs.store(group="evaluate", name="evaluate_schema", node=EvaluateNode)
    cs.store(group="data", name="data_schema", node=DataNode)
    cs.store(group="targets", name="targets_schema", node=TargetsNode)
    cs.store(group="predictor", name="predictor_schema", node=PredictorNode)
    cs.store(group="distill", name="distill_schema", node=DistillNode)


register_schemas()
