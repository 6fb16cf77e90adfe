"""The trained LTE model as files, and its inference path.

A folder holds
  routers.safetensors   every routed layer's router (weight (E, d), bias (E,)) and neuron -> expert map (F,)
  model.safetensors     full fine-tuning: the changed parameters, by their names in the model
  adapters.safetensors  LoRA: each adapted linear's A (r, in) and B (out, r)
  lte.json              the LTEConfig, the routed layers, the base model's fingerprint, training summary

``LTEArtifact.applied(model)`` swaps the fine-tuned weights into the base model (LoRA: W + (alpha/r) B A) and
yields the ScoreSource that routes it; leaving the block puts the original tensors back bit for bit, so the other
methods of an evaluation keep seeing the base model:

    lte = load_lte("outputs/runs/<run>/lte", model)
    with lte.applied(model) as source, attach_gating(model, source, GatingConfig(ffn_sparsity=0.5)) as handle:
        model(...)
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..arch import ModelView
from ..errors import ConfigError
from .config import LTEConfig
from .routers import LTEScores, Routers

FORMAT = 1
META, ROUTERS, WEIGHTS, ADAPTERS = "lte.json", "routers.safetensors", "model.safetensors", "adapters.safetensors"


@dataclass
class LTEArtifact:
    cfg: LTEConfig
    routers: Routers
    weights: dict[str, torch.Tensor] = field(default_factory=dict)  # full: parameter name -> tensor
    adapters: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = field(default_factory=dict)  # module -> A, B, scale
    model_fingerprint: dict | None = None
    summary: dict = field(default_factory=dict)  # training cost and final metrics

    # -- inference -----------------------------------------------------------------------------------------------
    def source(self) -> LTEScores:
        return LTEScores(self.routers, route=self.cfg.route, tau=self.cfg.tau, soft=False)

    @contextmanager
    def applied(self, model: nn.Module):
        """The base model with the LTE weights swapped in, and the LTEScores that routes it; restored on exit."""
        saved: dict[str, torch.Tensor] = {}
        try:
            yield self.apply_(model, saved)
        finally:
            with torch.no_grad():
                for name, original in saved.items():
                    model.get_parameter(name).copy_(original)

    @torch.no_grad()
    def apply_(self, model: nn.Module, saved: dict[str, torch.Tensor] | None = None) -> LTEScores:
        """Swap the LTE weights into ``model`` for good (load_gated serves the fine-tuned model; ``applied`` undoes
        it on exit); ``saved`` collects the originals by parameter name. Returns the LTEScores that routes it."""
        device = next(model.parameters()).device
        self.routers.to(device)
        saved = {} if saved is None else saved
        for name, value in self.weights.items():
            p = model.get_parameter(name)
            saved[name] = p.detach().clone()
            p.copy_(value.to(p.device, p.dtype))
        transposed = ModelView(model).spec.transposed if self.adapters else False
        for module_name, (a, b, scale) in self.adapters.items():
            w = model.get_submodule(module_name).weight  # (out, in); GPT-2's Conv1D stores (in, out)
            saved[module_name + ".weight"] = w.detach().clone()
            delta = b.float() @ a.float() * scale  # (out, r) @ (r, in)
            w.add_((delta.T if transposed else delta).to(w.device, w.dtype))
        return self.source()

    def router_bytes(self, model: nn.Module) -> int:
        """Weight bytes the routers read per token (in the model's dtype), subtracted from the bytes skipped."""
        return self.routers.n_params() * next(model.parameters()).element_size()

    def info(self) -> dict:
        """Extra keys for results.jsonl rows."""
        c = self.cfg
        return {"lte_finetune": c.finetune, "lte_trained_sparsity": c.ffn_sparsity, "lte_route": c.route,
                "lte_expert_size": c.expert_size, "lte_grouping": c.grouping, "router_params": self.routers.n_params(),
                **{f"lte_{k}": v for k, v in self.summary.items() if k in ("train_tokens", "train_seconds", "steps")}}

    # -- files ---------------------------------------------------------------------------------------------------
    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.routers.state_dict().items()}
        save_file(tensors, str(folder / ROUTERS))
        if self.weights:
            save_file({k: v.detach().cpu().contiguous() for k, v in self.weights.items()}, str(folder / WEIGHTS))
        if self.adapters:
            flat = {}
            for name, (a, b, _) in self.adapters.items():
                flat[f"{name}.lora_A"], flat[f"{name}.lora_B"] = a.detach().cpu().contiguous(), b.detach().cpu().contiguous()
            save_file(flat, str(folder / ADAPTERS))
        meta = {"format": FORMAT, "config": self.cfg.to_dict(), "routers": self.routers.meta(),
                "model": self.model_fingerprint, "adapter_scales": {k: v[2] for k, v in self.adapters.items()},
                "summary": self.summary}
        (folder / META).write_text(json.dumps(meta, indent=2))
        return folder


def load_lte(folder: str | Path, model: nn.Module | None = None) -> LTEArtifact:
    """Read an LTE folder; with ``model`` given, refuse one trained from another base model."""
    from ..llm import check_fingerprint
    folder = Path(folder)
    if not (folder / META).exists():
        raise ConfigError(f"no trained LTE at '{folder}' ({META} missing); train it (python train.py "
                          "experiment=lte_smollm2) or point lte.ckpt at a run's lte/ folder")
    fix = "re-run the LTE training (stages.fit=true with lte in evaluate.methods) or copy the whole lte/ folder again"
    try:
        meta = json.loads((folder / META).read_text())
    except (UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"'{folder / META}' is not an LTE config (empty, truncated or another file: {exc}); {fix}") \
            from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else None
        raise ConfigError(f"LTE folder '{folder}' has format {got}, this code reads {FORMAT}; {fix}")
    if model is not None and meta.get("model") is not None:
        check_fingerprint(meta["model"], model, f"LTE checkpoint '{folder}'")

    def tensors(name: str) -> dict:
        try:
            return load_file(str(folder / name))
        except Exception as exc:  # SafetensorError (empty, truncated), OSError (missing)
            raise ConfigError(f"'{folder / name}' could not be read as safetensors ({type(exc).__name__}: {exc}): "
                              f"the file is missing, empty or truncated; {fix}") from None
    try:
        cfg = LTEConfig.from_dict(meta["config"])
        r = meta["routers"]
        state = tensors(ROUTERS)
        routers = Routers(r["d_model"], r["ffn"], r["layers"], state["groups"], cfg.init_score)
        routers.load_state_dict(state)
        routers.requires_grad_(False)
        weights = tensors(WEIGHTS) if (folder / WEIGHTS).exists() else {}
        adapters = {}
        if (folder / ADAPTERS).exists():
            flat = tensors(ADAPTERS)
            for name, scale in meta["adapter_scales"].items():
                adapters[name] = (flat[f"{name}.lora_A"], flat[f"{name}.lora_B"], float(scale))
    except (KeyError, TypeError, RuntimeError) as exc:  # keys missing, shapes that do not match lte.json
        raise ConfigError(f"LTE folder '{folder}' is inconsistent ({type(exc).__name__}: {exc}); {fix}") from None
    return LTEArtifact(cfg, routers, weights, adapters, meta.get("model"), meta.get("summary") or {})
