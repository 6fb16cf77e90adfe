"""LTEConfig: every knob of Learn-To-be-Efficient training and routing, one comment each, checked before any work."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..errors import ConfigError

ROUTES = ("topk", "threshold")
ROUTER_INITS = ("fit", "random")
GROUPINGS = ("cluster", "contiguous")
FINETUNES = ("full", "lora")


@dataclass
class LoraSettings:
    r: int = 16  # adapter rank
    alpha: float = 32.0  # LoRA scaling is alpha / r
    dropout: float = 0.0
    targets: list[str] | None = None  # module names to adapt; None: every decoder linear of the family (q,k,v,o,FFN)


@dataclass
class LTEConfig:
    ffn_sparsity: float = 0.5  # target fraction of FFN neurons skipped per token (stage 2 and evaluation)
    expert_size: int = 32  # neurons per expert (the paper's 32); must divide the FFN width
    grouping: str = "cluster"  # "cluster": balanced k-means of the FFN input rows; "contiguous": neuron order
    route: str = "topk"  # stage 2 / inference: "topk" keeps exactly 1 - s of the experts per token; "threshold"
    # keeps experts whose score exceeds tau (the paper's rule: realized sparsity is whatever the routers learned)
    tau: float = 0.5  # routing threshold of the sigmoid scores (separability pushes scores away from it)
    first_layer: int | None = None  # first routed layer; None: targets.feature_layer + 1, like every other method
    init_score: float = 0.5  # starting score of an average expert (the router bias offset). 0.5 = tau: with
    # router_init=fit the experts start split around tau by predicted importance (measured best); use ~0.9 with
    # router_init=random so that stage 1 starts near the dense model
    router_init: str = "fit"  # "fit": warm start by ridge regression on expert activation mass (ours, warmstart.py);
    # "random": the paper's from-scratch routers (small random weights)
    router_fit_windows: int = 16  # training windows used by the warm start's dense pass
    router_fit_gain: float = 3.0  # fitted logits = gain * predicted z + logit(init_score): with init_score = tau the
    # soft routing of stage 1 already splits experts around tau by predicted importance
    efficiency_weight: float = 1.0  # eta: weight of the efficiency loss (mean router score)
    separability_weight: float = 0.01  # lambda: weight of the separability loss (1 / ((s - tau)^2 + eps))
    separability_eps: float = 0.01  # keeps the separability loss finite at s = tau
    stage1_steps: int = 100  # soft routing: routers + model, LM + efficiency + separability losses
    stage2_steps: int = 100  # hard routing with frozen routers: the model adapts, LM loss only
    batch_size: int = 2  # windows per step
    seq_len: int = 256  # tokens per training window
    n_windows: int | None = None  # training windows; None: (stage1_steps + stage2_steps) * batch_size (one pass)
    val_windows: int = 4  # held-out windows (after the training ones): LM loss under hard routing
    val_every: int = 50  # validate every this many steps
    lr: float = 2.0e-5  # model learning rate (full fine-tuning; LoRA adapters use lora_lr)
    lora_lr: float = 2.0e-4  # adapter learning rate
    router_lr: float = 1.0e-2  # routers are tiny and start from scratch: a larger step
    weight_decay: float = 0.0
    warmup_steps: int = 10
    grad_clip: float = 1.0
    finetune: str = "full"  # "full": every decoder parameter; "lora": peft adapters on the decoder linears
    train_embeddings: bool = False  # full: also the (often tied) embeddings / LM head (the largest single tensor)
    lora: LoraSettings = field(default_factory=LoraSettings)
    ckpt: str | None = None  # evaluate this trained LTE folder instead of training one

    @classmethod
    def from_dict(cls, d: dict) -> "LTEConfig":
        d = dict(d)
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ConfigError(f"unknown lte option(s) {sorted(unknown)}; see conf/lte/default.yaml")
        lora = d.pop("lora", None) or {}
        return cls(**d, lora=LoraSettings(**lora)).validate()

    def validate(self) -> "LTEConfig":
        s = self.ffn_sparsity
        if not (isinstance(s, (int, float)) and 0.0 < s < 1.0):
            raise ConfigError(f"lte.ffn_sparsity must be in (0, 1) (the fraction of FFN neurons skipped; LTE needs "
                              f"something to skip), got {s!r}")
        for name, value, allowed in (("route", self.route, ROUTES), ("grouping", self.grouping, GROUPINGS),
                                     ("finetune", self.finetune, FINETUNES), ("router_init", self.router_init,
                                                                              ROUTER_INITS)):
            if value not in allowed:
                raise ConfigError(f"lte.{name} must be one of {', '.join(allowed)}, got {value!r}")
        if not 0.0 < self.tau < 1.0:
            raise ConfigError(f"lte.tau must be in (0, 1) (a sigmoid score), got {self.tau}")
        if not 0.0 < self.init_score < 1.0:
            raise ConfigError(f"lte.init_score must be in (0, 1) (a sigmoid score), got {self.init_score}")
        if self.expert_size < 1:
            raise ConfigError(f"lte.expert_size must be a positive number of neurons, got {self.expert_size}")
        if self.stage1_steps < 0 or self.stage2_steps < 0 or self.stage1_steps + self.stage2_steps == 0:
            raise ConfigError("lte.stage1_steps and lte.stage2_steps must be >= 0 and not both 0, got "
                              f"{self.stage1_steps} and {self.stage2_steps}")
        if min(self.efficiency_weight, self.separability_weight, self.separability_eps) < 0:
            raise ConfigError("lte.efficiency_weight, separability_weight and separability_eps must be >= 0")
        if self.batch_size < 1 or self.seq_len < 2 or self.val_windows < 1 or self.val_every < 1:
            raise ConfigError("lte.batch_size, val_windows and val_every must be >= 1 and lte.seq_len >= 2")
        if self.first_layer is not None and self.first_layer < 0:
            raise ConfigError(f"lte.first_layer must be >= 0 or null, got {self.first_layer}")
        if self.lora.r < 1:
            raise ConfigError(f"lte.lora.r must be >= 1, got {self.lora.r}")
        return self

    @property
    def total_steps(self) -> int:
        return self.stage1_steps + self.stage2_steps

    @property
    def train_windows(self) -> int:
        return self.n_windows if self.n_windows is not None else self.total_steps * self.batch_size

    def to_dict(self) -> dict:
        return asdict(self)
