"""A decode step captured in a CUDA graph: greedy decoding with no host work between tokens.

The graph runs engine.step on static buffers (ids (B, 1), pos (1,), and the given scores if any), writes the
argmax token back into ids and advances pos, so replaying it N times decodes N tokens. The dense baseline is
captured the same way, so dense and gated are compared under identical launch overheads.
"""
from __future__ import annotations

import torch

from .engine import DecodeEngine


class GraphedDecoder:
    def __init__(self, engine: DecodeEngine, heads: torch.Tensor | None = None, neurons: torch.Tensor | None = None,
                 warmup: int = 2):
        """heads (B, 1, L, H) / neurons (B, 1, L, F): fixed scores for an engine without a predictor (benchmarks
        with given index sets: the top-k still runs in every step)."""
        if engine.device.type != "cuda":
            raise RuntimeError("CUDA graphs need the engine on a CUDA device")
        self.engine = engine
        B = engine.batch
        self.ids = torch.zeros(B, 1, dtype=torch.long, device=engine.device)
        self.pos = torch.zeros(1, dtype=torch.long, device=engine.device)
        self.heads, self.neurons = heads, neurons
        # warm-up steps write the cache at the last positions, out of the way of a prompt already prefilled
        self.pos.fill_(max(0, engine.max_len - warmup))
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # compile the Triton kernels and let the allocator settle before capture
            for _ in range(warmup):
                self._body()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._body()
        engine.reset_counts()  # the warm-up steps ran no real token

    def _body(self) -> torch.Tensor:
        logits = self.engine.step(self.ids, self.pos, heads=self.heads, neurons=self.neurons)  # (B, 1, V)
        self.ids.copy_(logits[:, -1:].argmax(-1))
        self.pos.add_(1)
        return logits

    def start(self, last_ids: torch.Tensor, pos: int) -> None:
        """Decode from token ids (B, 1) at position pos (the cache holds positions < pos)."""
        self.ids.copy_(last_ids)
        self.pos.fill_(pos)

    def replay(self, n: int = 1) -> None:
        for _ in range(n):
            self.graph.replay()

    def generate(self, prompt: torch.Tensor, new_tokens: int, heads=None, neurons=None) -> torch.Tensor:
        """Greedy: prefill eagerly, then replay -> (B, P + new_tokens). Same result as engine.generate."""
        logits = self.engine.prefill(prompt, heads=heads, neurons=neurons)
        first = logits[:, -1:].argmax(-1)
        self.start(first, prompt.shape[1])
        out = [prompt, first]
        for _ in range(new_tokens - 1):
            self.graph.replay()
            out.append(self.ids.clone())
        return torch.cat(out, dim=1)


class GraphedStep:
    """One single-token decode step captured in a CUDA graph, logits left for the caller to sample from (gated
    generation with temperature / top-p runs its choice outside the graph). Capture before the prefill: the warm-up
    steps write the cache's last positions, out of the way of the prompt."""

    def __init__(self, engine: DecodeEngine, warmup: int = 2):
        if engine.device.type != "cuda":
            raise RuntimeError("CUDA graphs need the engine on a CUDA device")
        self.engine = engine
        self.ids = torch.zeros(engine.batch, 1, dtype=torch.long, device=engine.device)
        self.pos = torch.full((1,), max(0, engine.max_len - warmup), dtype=torch.long, device=engine.device)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                engine.step(self.ids, self.pos)
                self.pos.add_(1)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = engine.step(self.ids, self.pos)  # (B, 1, V)
        engine.reset_counts()

    def __call__(self, ids: torch.Tensor, pos: int) -> torch.Tensor:
        """ids (B, 1) at position pos -> logits (B, 1, V) (a view of the graph's output: use before the next call)."""
        self.ids.copy_(ids)
        self.pos.fill_(pos)
        self.graph.replay()
        return self.logits
