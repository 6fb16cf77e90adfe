"""Gated generation from a finished run on the command line (a Hydra app over conf/generate.yaml):

    python -m shadowsparse.generate run_dir=outputs/runs/<run> prompt="The capital of France is" \
        [method=predictor|sketch|sketch_threshold|threshold|...] [ffn_sparsity=0.5] [head_sparsity=0.0] \
        [max_new_tokens=40] [temperature=0.0] [top_p=1.0] [top_k=0] [seed=null] [chat=false] [device=null] \
        [fallback=measured|never|<rows>]
    python -m shadowsparse.generate --help

Prints the continuation, the realized sparsity counted by the hooks, and tokens/s (shadowsparse.generation).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import List, Optional

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from .errors import ConfigError


@dataclass
class GenerateConfig:
    """The schema of conf/generate.yaml: a value of the wrong type is refused before any model loads."""
    run_dir: str = MISSING  # a train.py run directory (holds .hydra/config.yaml and the selector's artifacts)
    prompt: str = MISSING
    method: str = "predictor"  # a registered selector (evaluate.methods); training-free ones need no fit
    ffn_sparsity: float = 0.5  # fraction of FFN neurons skipped per token
    head_sparsity: float = 0.0  # fraction of attention heads skipped per token
    max_new_tokens: int = 40
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0
    seed: Optional[int] = None
    stop: List[str] = field(default_factory=list)
    chat: bool = False  # wrap the prompt in the model's chat template
    device: Optional[str] = None  # null: the run's llm.device
    engine: str = "auto"
    # the engine's dense fallback (runtime/dispatch.py): "measured" (a step runs dense where its path was measured
    # slower than dense), "never" (every step gated), or a number N (steps of more than N token rows run dense)
    fallback: str = "measured"


ConfigStore.instance().store(name="generate_schema", node=GenerateConfig)


@hydra.main(version_base="1.3", config_path="../conf", config_name="generate")
def main(cfg) -> None:
    missing = [k for k in ("run_dir", "prompt") if OmegaConf.is_missing(cfg, k)]
    if missing:
        print(f"error: {' and '.join(missing)} must be given, e.g. python -m shadowsparse.generate "
              "run_dir=outputs/runs/<run> prompt=\"The capital of France is\" (--help lists every key)", file=sys.stderr)
        sys.exit(2)
    from .generation import load_gated
    try:
        g = load_gated(cfg.run_dir, method=cfg.method, ffn_sparsity=cfg.ffn_sparsity,
                       head_sparsity=cfg.head_sparsity, device=cfg.device, engine=cfg.engine,
                       fallback=int(cfg.fallback) if str(cfg.fallback).isdigit() else cfg.fallback)
        text = g.generate(cfg.prompt, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                          top_p=cfg.top_p, top_k=cfg.top_k, seed=cfg.seed, stop=list(cfg.stop), chat=cfg.chat)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    st = g.stats()
    print(cfg.prompt + text)
    print(f"{cfg.method} ({st['engine']}): realized sparsity over {st['gated_layers']} gated layers: FFN "
          f"{st['realized_ffn_sparsity']:.3f} (requested {cfg.ffn_sparsity:.3f}), heads "
          f"{st['realized_head_sparsity']:.3f} (requested {cfg.head_sparsity:.3f}); "
          f"{st.get('tokens_per_s', 0.0):.1f} tokens/s")
    if st.get("dense_fallback_tokens"):
        print(f"{st['dense_fallback_tokens']} of the tokens ran dense (fallback: {st['fallback']})")


if __name__ == "__main__":
    main()
