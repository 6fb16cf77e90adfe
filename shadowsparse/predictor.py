"""Plain nn.Module predictors (no Lightning here). They read one early hidden state per token and emit raw scores
for every layer's heads (B, T, L, H) and neurons (B, T, L, F); higher = more important. Only the ranking within a
(token, layer) row matters to the gating hooks.

On disk a predictor is a folder, peft style (``save_pretrained`` / ``from_pretrained``; nothing is unpickled):
  config.json        format name and version, kind, dims, PredictorConfig, the fingerprint of the LLM it was
                     trained for (shadowsparse.llm.model_fingerprint) and what its targets were (criterion, ...)
  model.safetensors  its state dict

    pred.save_pretrained("outputs/runs/<run>/predictor")
    pred = SharedPredictor.from_pretrained("outputs/runs/<run>/predictor", model=model)  # refuses another model's
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torch import nn

from .errors import ConfigError

FORMAT = "shadowsparse-predictor"
FORMAT_VERSION = 1  # bump when config.json or the tensor names change; from_pretrained refuses newer versions
CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"
REFIT = "re-run the fit stage (python train.py ... stages.fit=true) or copy the whole predictor folder again"


@dataclass
class PredictorConfig:
    kind: str = "shared"  # "shared" (ShadowLLM: one MLP from an early layer) or "per_layer" (DejaVu)
    hidden: int = 1024  # shared: trunk width
    depth: int = 2  # shared: trunk Linear+GELU blocks
    rank: int = 64  # shared: neuron code size per layer; per_layer: bottleneck width of each layer's MLP
    dropout: float = 0.0
    lookahead: int = 0  # per_layer: layer l reads the input of layer l - lookahead (DejaVu overlaps it with l - 1)


class PretrainedPredictor(nn.Module):
    """What both predictor families share: sizes, the model they belong to, and the safetensors folder format."""

    kind = ""  # "shared" | "per_layer" (the key of PREDICTORS, written to config.json)
    model_fingerprint: dict | None = None  # the LLM it was trained for (None: built by hand, checked by dims only)
    targets_info: dict | None = None  # criterion, granularity, feature_layer of the targets it was trained on
    source_path: str | None = None  # the folder it was loaded from

    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def export(self) -> dict:
        return {"dims": self.dims, "cfg": asdict(self.cfg)}

    def info(self) -> dict:
        """criterion / granularity / feature_layer of its targets (criterion None when unknown)."""
        return self.targets_info or {"feature_layer": self.feature_layer, "criterion": None}

    # -- the model it belongs to ---------------------------------------------------------------------------------
    def check_model(self, model: nn.Module, what: str = "predictor") -> None:
        """Refuse a model this predictor was not made for: by fingerprint when it has one (names both models),
        else by its dimensions."""
        from .arch import ModelView
        from .llm import check_fingerprint, describe_model, model_fingerprint
        if self.model_fingerprint is not None:
            check_fingerprint(self.model_fingerprint, model, what)
            return
        d = ModelView(model).dims
        have = {"d_model": d.hidden, "n_layers": d.n_layers, "n_heads": d.n_heads, "ffn": d.ffn}
        mine = {k: self.dims[k] for k in have}
        if mine != have:
            fmt = ", ".join
            raise ConfigError(f"{what} was built for a model with {fmt(f'{k}={v}' for k, v in mine.items())}, but "
                              f"the model it is attached to, {describe_model(model_fingerprint(model))}, has "
                              f"{fmt(f'{k}={v}' for k, v in have.items())}; use a predictor trained for this model")

    # -- files ---------------------------------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | Path, model_fingerprint: dict | None = None,
                        targets_info: dict | None = None, extra: dict | None = None) -> Path:
        """Write ``config.json`` + ``model.safetensors`` into ``save_directory`` (made or replaced whole: the files
        are written to a sibling folder first and moved in, so a killed save leaves the old folder or nothing).
        ``model_fingerprint`` / ``targets_info`` default to the predictor's own; ``extra`` is recorded as "fit"."""
        from safetensors.torch import save_file
        folder = Path(save_directory)
        fp = model_fingerprint if model_fingerprint is not None else self.model_fingerprint
        info = targets_info if targets_info is not None else self.targets_info
        config = {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": self.kind, "dims": self.dims,
                  "config": {**asdict(self.cfg), "kind": self.kind}, "model": fp, "targets": info,
                  "n_params": self.n_params(), "dtype": str(next(self.parameters()).dtype).removeprefix("torch."),
                  **({"fit": extra} if extra else {})}
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in self.state_dict().items()}
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = folder.parent / f".{folder.name}.partial-{os.getpid()}"
        old = folder.parent / f".{folder.name}.old-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
            (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2))
            if folder.exists():
                folder.rename(old)
            tmp.rename(folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(old, ignore_errors=True)
        self.model_fingerprint, self.targets_info = fp, info
        return folder

    @classmethod
    def from_pretrained(cls, pretrained_path: str | Path, model: nn.Module | None = None,
                        device: str | torch.device | None = None) -> "PretrainedPredictor":
        """Rebuild a predictor from a save_pretrained folder (safetensors + JSON: no code runs). With ``model``,
        refuse a predictor made for another model. Called on PretrainedPredictor, returns whichever kind it is."""
        folder = Path(pretrained_path)
        config = read_config(folder)
        kind = config["kind"]
        if cls is not PretrainedPredictor and kind != cls.kind:
            raise ConfigError(f"predictor '{folder}' is a {kind} predictor, not {cls.kind}; load it with "
                              f"{PREDICTORS[kind].__name__}.from_pretrained (or shadowsparse.system.load_predictor)")
        try:
            cfg = PredictorConfig(**{k: v for k, v in config["config"].items()
                                     if k in {f.name for f in fields(PredictorConfig)}})
            pred = PREDICTORS[kind](**config["dims"], cfg=cfg)
        except (TypeError, KeyError) as exc:
            raise ConfigError(f"'{folder / CONFIG_NAME}' does not describe a {kind} predictor ({exc}); {REFIT}") \
                from None
        state = read_weights(folder / WEIGHTS_NAME)
        expected = {k: tuple(v.shape) for k, v in pred.state_dict().items()}
        found = {k: tuple(v.shape) for k, v in state.items()}
        if found != expected:
            diff = sorted(set(found.items()) ^ set(expected.items()))[:4]
            raise ConfigError(f"'{folder / WEIGHTS_NAME}' does not match its {CONFIG_NAME} (tensors differ: {diff}); "
                              f"{REFIT}")
        pred.load_state_dict(state)
        pred.model_fingerprint = config.get("model")
        pred.targets_info = config.get("targets") or None
        pred.source_path = str(folder)
        if model is not None:
            pred.check_model(model, f"predictor checkpoint '{folder}'")
        pred.eval().requires_grad_(False)
        return pred.to(device) if device is not None else pred


def read_config(folder: Path) -> dict:
    """config.json of a predictor folder, checked: the format, a version this code reads, the keys it needs."""
    if not folder.exists():
        raise ConfigError(f"predictor '{folder}' does not exist; run the fit stage first (stages.fit=true) or point "
                          "paths.predictor_ckpt at a run's predictor/ folder")
    if not folder.is_dir():
        raise ConfigError(f"predictor '{folder}' is a file, not a predictor folder ({CONFIG_NAME} + {WEIGHTS_NAME}, "
                          "written by save_pretrained); point at the folder")
    path = folder / CONFIG_NAME
    if not path.exists():
        raise ConfigError(f"'{folder}' holds no {CONFIG_NAME}, so it is not a predictor folder (save_pretrained "
                          f"writes {CONFIG_NAME} + {WEIGHTS_NAME}); {REFIT}")
    try:
        config = json.loads(path.read_text())
    except (UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"'{path}' is not a predictor config (empty, truncated or another file: {exc}); {REFIT}") \
            from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ConfigError(f"'{path}' is not a shadowsparse predictor config (no \"format\": \"{FORMAT}\"); {REFIT}")
    version = config.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ConfigError(f"'{path}' has format_version {version!r}; this shadowsparse reads up to {FORMAT_VERSION}: "
                          "upgrade shadowsparse, or re-run the fit stage with this version")
    missing = [k for k in ("kind", "dims", "config") if k not in config]
    if missing or config["kind"] not in PREDICTORS:
        raise ConfigError(f"'{path}' lacks {missing or ['a known kind']} (kind {config.get('kind')!r}; known: "
                          f"{sorted(PREDICTORS)}); {REFIT}")
    return config


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a model.safetensors; a missing, empty, truncated or foreign file is refused with the fix."""
    from safetensors.torch import load_file
    if not path.exists():
        raise ConfigError(f"'{path}' is missing: the predictor folder is incomplete; {REFIT}")
    try:
        return load_file(str(path))
    except Exception as exc:  # SafetensorError (header, truncation), OSError
        raise ConfigError(f"'{path}' could not be read as safetensors ({type(exc).__name__}: {exc}): the file is "
                          f"empty, truncated or not a predictor; {REFIT}") from None


class SharedPredictor(PretrainedPredictor):
    """ShadowLLM's shared predictor: one MLP from the hidden state after ``feature_layer`` to all layers' scores.

    neurons[l, f] = <z_l, E[l, :, f]> + b[l, f], with z = U · trunk(x) reshaped to (L, rank): the factorized output
    keeps the head at L*rank*(hidden + F) parameters instead of hidden*L*F.
    """

    kind = "shared"
    input_key = "features"  # which targets tensor it reads: (N, d_model)

    def __init__(self, d_model: int, n_layers: int, n_heads: int, ffn: int, feature_layer: int,
                 cfg: PredictorConfig | None = None):
        super().__init__()
        cfg = cfg or PredictorConfig()
        self.cfg = cfg
        self.dims = dict(d_model=d_model, n_layers=n_layers, n_heads=n_heads, ffn=ffn, feature_layer=feature_layer)
        self.feature_layer = feature_layer
        blocks: list[nn.Module] = [nn.LayerNorm(d_model)]
        width = d_model
        for _ in range(cfg.depth):
            blocks += [nn.Linear(width, cfg.hidden), nn.GELU(), nn.Dropout(cfg.dropout)]
            width = cfg.hidden
        self.trunk = nn.Sequential(*blocks)
        self.head_out = nn.Linear(width, n_layers * n_heads)
        self.neuron_code = nn.Linear(width, n_layers * cfg.rank)
        self.neuron_table = nn.Parameter(torch.randn(n_layers, cfg.rank, ffn) / cfg.rank ** 0.5)
        self.neuron_bias = nn.Parameter(torch.zeros(n_layers, ffn))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (..., d_model) -> heads (..., L, H), neurons (..., L, F)."""
        L, H = self.dims["n_layers"], self.dims["n_heads"]
        h = self.trunk(x.to(self.head_out.weight.dtype))
        heads = self.head_out(h).unflatten(-1, (L, H))
        z = self.neuron_code(h).unflatten(-1, (L, self.cfg.rank))  # (..., L, r)
        neurons = torch.einsum("...lr,lrf->...lf", z, self.neuron_table) + self.neuron_bias
        return heads, neurons

    def flops_per_token(self) -> int:
        """Multiply-adds x2 of one token's prediction (LayerNorm and activations ignored)."""
        mats = [m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear)]
        return 2 * (sum(mats) + self.neuron_table.numel())


class PerLayerPredictor(PretrainedPredictor):
    """DejaVu-style: a small bottleneck MLP per layer reading that layer's input hidden state (or, with lookahead k,
    the input of layer l - k), emitting layer l's head and neuron scores. All layers' weights are stacked so that
    training runs every layer in one batched einsum; at inference each layer is predicted from its own hook.
    """

    kind = "per_layer"
    input_key = "layer_inputs"  # (N, L, d_model): the input of every decoder layer

    def __init__(self, d_model: int, n_layers: int, n_heads: int, ffn: int, feature_layer: int,
                 cfg: PredictorConfig | None = None):
        super().__init__()
        cfg = cfg or PredictorConfig(kind="per_layer", rank=128)
        self.cfg = cfg
        self.dims = dict(d_model=d_model, n_layers=n_layers, n_heads=n_heads, ffn=ffn, feature_layer=feature_layer)
        self.feature_layer = feature_layer
        L, r = n_layers, cfg.rank
        self.norm_weight = nn.Parameter(torch.ones(L, d_model))
        self.w_in = nn.Parameter(torch.randn(L, d_model, r) / d_model ** 0.5)
        self.b_in = nn.Parameter(torch.zeros(L, r))
        self.w_out = nn.Parameter(torch.randn(L, r, n_heads + ffn) / r ** 0.5)
        self.b_out = nn.Parameter(torch.zeros(L, n_heads + ffn))
        # layer l reads source layer max(0, l - lookahead)
        self.register_buffer("source", (torch.arange(L) - cfg.lookahead).clamp(min=0), persistent=False)

    def _mlp(self, x: torch.Tensor, layers: slice | int) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (..., l, d) for the layers selected -> heads (..., l, H), neurons (..., l, F)."""
        x = torch.nn.functional.rms_norm(x.to(self.w_in.dtype), (x.shape[-1],)) * self.norm_weight[layers]
        h = torch.nn.functional.gelu(torch.einsum("...ld,ldr->...lr", x, self.w_in[layers]) + self.b_in[layers])
        out = torch.einsum("...lr,lro->...lo", h, self.w_out[layers]) + self.b_out[layers]
        H = self.dims["n_heads"]
        return out[..., :H], out[..., H:]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (..., L, d_model) every layer's input -> heads (..., L, H), neurons (..., L, F)."""
        return self._mlp(x.index_select(-2, self.source), slice(None))

    def predict_layer(self, layer: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (..., d_model), the input of layer ``layer - lookahead`` -> heads (..., H), neurons (..., F)."""
        h, n = self._mlp(x.unsqueeze(-2), slice(layer, layer + 1))
        return h.squeeze(-2), n.squeeze(-2)

    def flops_per_token(self) -> int:
        return 2 * (self.w_in.numel() + self.w_out.numel())


PREDICTORS = {"shared": SharedPredictor, "per_layer": PerLayerPredictor}


def build_predictor(kind: str, **kwargs) -> nn.Module:
    if kind not in PREDICTORS:
        raise ConfigError(f"predictor '{kind}' is not registered; choose one of {sorted(PREDICTORS)}")
    return PREDICTORS[kind](**kwargs)
