"""Are there FFN neurons the sketch could drop from its copy because they are (almost) never kept? (docs/research.md,
session 17.) For each layer of the embedded SmolLM2, the fraction of tokens on which each neuron is among the layer's
top 1 - s of |a| (a = act(gate)·up, the down projection's input; one threshold per layer over all tokens, the
quantile of a 200K sample), on the first 4 windows of 512 tokens of the shipped C4 sample (the calibration text).

    .venv/bin/python research/cold_neurons.py          (CPU, ~1 min)
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from shadowsparse.llm import LLMConfig, load_llm  # noqa: E402

C4 = Path(__file__).resolve().parent.parent / "data/c4_validation_sample/c4_validation_2k.jsonl"


def down_inputs(model, ids: torch.Tensor) -> dict[int, torch.Tensor]:
    """layer -> (tokens, F) |a| recorded by forward pre-hooks on every down_proj."""
    acts: dict[int, list] = {}

    def hook(i):
        def record(_mod, inp):
            acts.setdefault(i, []).append(inp[0].detach().reshape(-1, inp[0].shape[-1]).abs())
        return record
    hooks = [layer.mlp.down_proj.register_forward_pre_hook(hook(i)) for i, layer in enumerate(model.model.layers)]
    try:
        with torch.no_grad():
            for window in ids:
                model(window[None])
    finally:
        for h in hooks:
            h.remove()
    return {i: torch.cat(v) for i, v in acts.items()}


def main() -> None:
    model, tok = load_llm(LLMConfig())
    docs = [json.loads(line)["text"] for line in C4.open()][:60]
    ids = tok("\n\n".join(docs), return_tensors="pt").input_ids[0][: 4 * 512].view(4, 512)
    acts = down_inputs(model, ids)
    g = torch.Generator().manual_seed(0)
    for s in (0.5, 0.6):
        freqs = []
        for i in sorted(acts):
            a = acts[i]
            sample = a.flatten()[torch.randperm(a.numel(), generator=g)[:200_000]]
            freqs.append((a > torch.quantile(sample, s)).float().mean(0))  # (F,) keep frequency per neuron
        f = torch.stack(freqs)
        print(f"s={s}: share of neurons kept on < 1% / 2% / 5% / 10% of tokens: "
              + " / ".join(f"{(f < c).float().mean():.4f}" for c in (0.01, 0.02, 0.05, 0.1)))


if __name__ == "__main__":
    main()
