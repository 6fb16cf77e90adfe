"""Predictor-gated generation from a finished run:

    python -m shadowsparse.generate run_dir=outputs/runs/<run> prompt="The capital of France is" \
        [ffn_sparsity=0.5] [head_sparsity=0.0] [max_new_tokens=40] [granularity=token]

Loads the run's model (its saved Hydra config) and predictor checkpoint, generates greedily with gating, and prints
the text and the realized sparsity counted by the hooks.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

from .errors import ConfigError
from .gating import GatingConfig, attach_gating
from .llm import LLMConfig, load_llm

DEFAULTS = {"run_dir": None, "prompt": None, "ffn_sparsity": 0.5, "head_sparsity": 0.0, "max_new_tokens": 40,
            "granularity": "token"}


def generate(run_dir: str, prompt: str, ffn_sparsity: float = 0.5, head_sparsity: float = 0.0,
             max_new_tokens: int = 40, granularity: str = "token") -> tuple[str, dict]:
    from .pipeline import PREDICTOR_CKPT
    from .system import load_predictor
    run = Path(run_dir)
    saved = run / ".hydra" / "config.yaml"
    if not saved.exists():
        raise ConfigError(f"'{run_dir}' is not a train.py run directory (no .hydra/config.yaml)")
    cfg = OmegaConf.load(saved)
    cfg.llm.seed = cfg.get("seed", 0)
    model, tok = load_llm(LLMConfig(**OmegaConf.to_container(cfg.llm, resolve=True)))
    predictor = load_predictor(str(run / PREDICTOR_CKPT), model).to(next(model.parameters()).device)
    gcfg = GatingConfig(ffn_sparsity=float(ffn_sparsity), head_sparsity=float(head_sparsity), granularity=granularity)
    enc = tok(prompt, return_tensors="pt")
    ids = enc["input_ids"].to(next(model.parameters()).device)
    with attach_gating(model, predictor, gcfg) as handle:
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=int(max_new_tokens),
                             do_sample=False, pad_token_id=tok.pad_token_id)
        stats = handle.stats()
    text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    return text, stats


def main(argv: list[str]) -> int:
    args = {**DEFAULTS, **OmegaConf.to_container(OmegaConf.from_dotlist(argv))}
    unknown = set(args) - set(DEFAULTS)
    if unknown or args["run_dir"] is None or args["prompt"] is None:
        print(f"usage: python -m shadowsparse.generate run_dir=<run> prompt=\"...\" [{' '.join(f'{k}=' for k in list(DEFAULTS)[2:])}]"
              + (f"\nunknown argument(s): {sorted(unknown)}" if unknown else ""), file=sys.stderr)
        return 2
    try:
        text, stats = generate(**{k: args[k] for k in DEFAULTS})
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(args["prompt"] + text)
    print(f"realized sparsity over {stats['gated_layers']} gated layers: FFN {stats['realized_ffn_sparsity']:.3f} "
          f"(requested {float(args['ffn_sparsity']):.3f}), heads {stats['realized_head_sparsity']:.3f} "
          f"(requested {float(args['head_sparsity']):.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
