"""Next-token choice for gated generation: greedy, or temperature / top-k / top-p sampling from one seeded generator,
and stop-string handling. Shared by every decoder (mask-path hooks and the decode engine), so both paths turn the
same logits into the same tokens."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .errors import ConfigError


@dataclass
class SamplingConfig:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy (argmax); > 0: sample from softmax(logits / temperature)
    top_p: float = 1.0  # nucleus: keep the smallest set of tokens whose probability reaches top_p
    top_k: int = 0  # keep the k most likely tokens (0: all)
    seed: int | None = None  # sampling is reproducible for a given seed
    stop: list[str] = field(default_factory=list)  # generation of a sequence ends at the first of these strings

    def validate(self) -> "SamplingConfig":
        if not (isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1):
            raise ConfigError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not self.temperature >= 0:
            raise ConfigError(f"temperature must be >= 0 (0 is greedy), got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            raise ConfigError(f"top_k must be an integer >= 0 (0: no top-k cut), got {self.top_k!r}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        return self


def next_tokens(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None) -> torch.Tensor:
    """logits (B, V) of the last position -> token ids (B,)."""
    if cfg.temperature == 0:
        return logits.argmax(-1)
    scores = logits.float() / cfg.temperature
    if cfg.top_k:
        kth = scores.topk(min(cfg.top_k, scores.shape[-1]), dim=-1).values[:, -1:]  # (B, 1)
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if cfg.top_p < 1:
        sorted_scores, order = scores.sort(-1, descending=True)
        probs = sorted_scores.softmax(-1)
        # drop a token when the tokens before it already reach top_p (the most likely one always stays)
        drop = probs.cumsum(-1) - probs >= cfg.top_p
        scores = scores.scatter(-1, order, sorted_scores.masked_fill(drop, float("-inf")))
    probs = scores.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """text cut before the earliest stop string, and whether one was found."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[:min(hits)], True) if hits else (text, False)
