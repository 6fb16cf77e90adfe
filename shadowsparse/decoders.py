"""The two paths gated generation runs on, behind one interface (start / step / nll / stats):

  HooksDecoder   the mask path: the Hugging Face model with gating hooks and its own KV cache (the reference)
  EngineDecoder  the decode engine (shadowsparse/runtime): unselected heads and neurons are not read
"""
from __future__ import annotations

import contextlib
import dataclasses

import torch
import torch.nn.functional as F

from .errors import ConfigError
from .gating import GatingConfig, SparsityCounter, attach_gating
from .perplexity import window_nll


class HooksDecoder:
    """The mask path as a decoder. Batches of prompts of different lengths are padded on the left (attention mask
    and positions follow)."""

    pads = True  # takes left-padded batches

    def __init__(self, model, source, gating: GatingConfig | None, attach=None):
        """source: a ScoreSource through the gating hooks; or attach(model) -> handle: a selector's own hooks
        (teal's input channels), whose handle counts the realized sparsity."""
        self.model, self.source, self.gating, self.attach = model, source, gating, attach
        self.counter = SparsityCounter()
        self.handle = None  # the last handle of attach (its counts cover every call)
        self.device = next(model.parameters()).device

    def attached(self):
        """The gating hooks for the duration of one call (the model is dense again afterwards)."""
        if self.attach is not None:
            self.handle = self.attach(self.model)
            return self.handle
        if self.source is None:
            return contextlib.nullcontext()
        return attach_gating(self.model, self.source, self.gating, counter=self.counter)

    @torch.no_grad()
    def start(self, ids: torch.Tensor, attn: torch.Tensor, new_tokens: int) -> torch.Tensor:
        """ids, attn (B, P), left-padded -> logits (B, V) of the last position."""
        self.attn = attn.to(self.device)
        positions = (self.attn.cumsum(-1) - 1).clamp(min=0)  # (B, P): pads sit at 0, real tokens count from 0
        out = self.model(input_ids=ids.to(self.device), attention_mask=self.attn, position_ids=positions,
                         use_cache=True)
        self.cache, self.next_pos = _cache_of(out), positions[:, -1:] + 1  # (B, 1)
        return out.logits[:, -1]

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B,) -> logits (B, V) of the next position."""
        self.attn = torch.cat([self.attn, self.attn.new_ones(self.attn.shape[0], 1)], dim=1)
        out = self.model(input_ids=tokens.view(-1, 1), attention_mask=self.attn, position_ids=self.next_pos,
                         use_cache=True, **{_cache_kwarg(self.model): self.cache})
        self.cache, self.next_pos = _cache_of(out), self.next_pos + 1
        return out.logits[:, -1]

    @torch.no_grad()
    def nll(self, ids: torch.Tensor, token_by_token: bool = False) -> float:
        """Summed next-token NLL of windows (B, T) in one forward (the hooks gate every token as decoding would)."""
        with self.attached():
            return window_nll(self.model, ids.to(self.device))

    def stats(self, dims) -> dict:
        """Realized sparsity, counted from the masks the hooks applied."""
        if self.attach is not None:  # the selector's own counts; the neurons skipped are the down inputs zeroed
            st = self.handle.stats() if self.handle is not None else {}
            if "realized_ffn_out_sparsity" in st or "realized_ffn_sparsity" not in st:  # teal's handle
                st = {**st, "realized_ffn_sparsity": st.get("realized_ffn_out_sparsity", 0.0)}
            return st
        return self.counter.stats(dims.n_heads, dims.active_ffn, dims.n_kv_heads)


def _cache_kwarg(model) -> str:
    """The KV-cache keyword of the model's forward: ``cache`` in recent transformers, ``past_key_values`` before."""
    import inspect
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _cache_of(out):
    return out.cache if hasattr(out, "cache") else out.past_key_values


class EngineDecoder:
    """The decode engine as a decoder. One engine (and KV cache) per call, sized to the prompt plus the new tokens;
    on a GPU the single-token steps replay a CUDA graph. The engine's batch shares positions, so a call takes
    prompts of one length (GatedLM groups them)."""

    pads = False

    def __init__(self, model, parts: dict, gating: GatingConfig | None, backend: str = "auto",
                 fallback: str | int = "measured"):
        from .runtime import EngineConfig, extract_weights
        self.weights = extract_weights(model)  # refuses a family the engine does not serve, with the fix
        self.parts = parts
        g = gating or GatingConfig(ffn_sparsity=0.0, head_sparsity=0.0)
        self.inputs = parts.get("input_sparsity")  # thresholds on projection inputs: they set the blocks' sparsity
        ffn, heads = g.ffn_sparsity, g.head_sparsity
        if self.inputs is not None:
            ffn = 0.0 if self.inputs.on("ffn_in") or self.inputs.on("ffn_out") else ffn
            heads = 0.0 if self.inputs.on("attn_in") or self.inputs.on("attn_out") else heads
        self.config = EngineConfig(ffn_sparsity=ffn, head_sparsity=heads,
                                   first_layer=g.first_layer if gating else None, backend=backend,
                                   fallback=fallback).validate()
        # generation falls back to dense where its path was measured to lose (runtime/dispatch.py); perplexity
        # (nll) measures the selector itself, so its engines gate every step
        self.eval_config = dataclasses.replace(self.config, fallback="never")
        self.device = self.weights.device
        self.rows = {"tokens": 0, "neurons": 0, "heads": 0, "dense_tokens": 0}  # units kept, summed over tokens
        self.kept = [0.0] * 4  # input sparsity: kept (token, channel) pairs per input, engines before this one
        self.layer_neurons: list[float] | None = None  # FFN neurons kept per layer, summed over tokens
        self.engine = None

    def attached(self):
        return contextlib.nullcontext()

    def _engine(self, batch: int, max_len: int, evaluation: bool = False):
        from .runtime import DecodeEngine
        return DecodeEngine(self.weights, batch=batch, max_len=max_len,
                            config=self.eval_config if evaluation else self.config, **self.parts)

    @torch.no_grad()
    def start(self, ids: torch.Tensor, attn: torch.Tensor, new_tokens: int) -> torch.Tensor:
        if not bool(attn.all()):
            raise ConfigError("the decode engine takes prompts of one length per call (no padding)")
        B, P = ids.shape
        self._fold_counts()
        self.engine = self._engine(B, P + new_tokens)
        self.graph = None
        if self.device.type == "cuda":
            from .runtime.graph import GraphedStep
            self.graph = GraphedStep(self.engine)  # captured before the prefill (graph.py)
        logits = self.engine.prefill(ids.to(self.device))
        self.pos = P
        from .runtime.engine import MAX_STEP_TOKENS
        for t0 in range(0, P, MAX_STEP_TOKENS):  # prefill()'s steps, each counted as it ran (gated or dense)
            self._count(B, min(MAX_STEP_TOKENS, P - t0))
        return logits[:, -1]

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        ids = tokens.view(-1, 1)
        logits = self.graph(ids, self.pos) if self.graph is not None else self.engine.step(ids, self.pos)
        self.pos += 1
        self._count(ids.shape[0], 1)
        return logits[:, -1]

    @torch.no_grad()
    def nll(self, ids: torch.Tensor, token_by_token: bool = False) -> float:
        """Summed next-token NLL of windows (B, T): the engine's prefill (steps of up to 64 tokens: the many-token
        path) or, token_by_token, one decode step per position (the path generation takes)."""
        B, T = ids.shape
        self._fold_counts()
        engine = self._engine(B, T, evaluation=True)
        ids = ids.to(self.device)
        if token_by_token:
            logits = torch.cat([engine.step(ids[:, t:t + 1], t) for t in range(T)], dim=1)
        else:
            logits = engine.prefill(ids)
        self._count(B, T, engine)
        self._fold_counts(engine)
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="sum").item()

    def _fold_counts(self, engine=None) -> None:
        """Add an engine's device counts (kept input channels; a threshold FFN selector's kept neurons per layer) to
        the totals (the next engine restarts them)."""
        e = engine or self.engine
        if self.inputs is not None and e is not None and e.teal is not None:
            self.kept = [a + b for a, b in zip(self.kept, e.teal.kept_per_input(e.first_layer))]
            e.reset_counts()
        if e is not None and e.counts_kept_neurons:
            self._add_layer_neurons(e, e.ffn_selector.kept_per_layer())
            e.ffn_selector.reset_counts()

    def _add_layer_neurons(self, e, kept: list[float]) -> None:
        """kept: neurons kept per layer (summed over tokens), for every layer; the gated ones are added."""
        if self.layer_neurons is None:
            self.layer_neurons = [0.0] * e.w.n_layers
        for layer in range(e.first_layer, e.w.n_layers):
            self.layer_neurons[layer] += kept[layer]

    def _count(self, batch: int, tokens_per_seq: int, engine=None) -> None:
        """Count one step of batch x tokens_per_seq tokens: each token keeps exactly its own top k (select.py), or
        every unit where the step fell back to dense (dispatch.py); input thresholds count on the device, and a
        dense step's inputs are counted here as kept whole."""
        e = engine or self.engine
        tokens = batch * tokens_per_seq
        dense = e.runs_dense(tokens, tokens_per_seq > 1)
        self.rows["tokens"] += tokens
        self.rows["dense_tokens"] += tokens if dense else 0
        per_layer = e.w.active_ffn if dense else (0 if e.counts_kept_neurons else e.k_ffn)  # else counted on the device
        self.rows["neurons"] += tokens * per_layer
        if e.gate_ffn or e.ffn_selector is not None:
            self._add_layer_neurons(e, [tokens * per_layer] * e.w.n_layers)
        self.rows["heads"] += tokens * (e.w.n_heads if dense else e.k_heads)
        if dense and e.teal is not None:
            from .runtime.input_sparsity import INPUTS
            widths = e.input_widths()
            gated = e.w.n_layers - e.first_layer
            self.kept = [k + (tokens * gated * widths[n] if e.teal.on(n) else 0) for k, n in zip(self.kept, INPUTS)]

    def stats(self, dims) -> dict:
        """Sparsity per token over the gated layers: each token keeps exactly k units (its own top k; a step's
        tokens read the union of their sets)."""
        n, e = self.rows["tokens"], self.engine
        out = self._input_stats(dims, n, e) if self.inputs is not None else self._unit_stats(dims, n, e)
        if self.inputs is not None and self.config.ffn_sparsity:  # FFN units chosen next to thresholds on the
            # attention inputs (sketch_teal): the FFN's counts are the units'
            unit = self._unit_stats(dims, n, e)
            out.update({k: unit[k] for k in ("realized_ffn_sparsity", "realized_ffn_sparsity_per_layer",
                                             "selector_byte_share") if k in unit})
            out["selector_bytes"] = out.get("selector_bytes", 0) + unit.get("selector_bytes", 0)
        if e is not None:  # how many tokens ran dense under the fallback rule, and the rule (runtime/dispatch.py)
            from .runtime import dispatch
            out.update(dense_fallback_tokens=self.rows["dense_tokens"],
                       fallback=dispatch.explain(e.path, self.config.fallback, cuda=e.device.type == "cuda"))
        return out

    def _unit_stats(self, dims, n: int, e) -> dict:
        gated = dims.n_layers - (self.config.first_layer or 0) if self.config.ffn_sparsity or \
            self.config.head_sparsity else 0
        if not n:
            return {"realized_ffn_sparsity": 0.0, "realized_head_sparsity": 0.0, "gated_layers": gated}
        per_layer = self._layer_sparsity(dims, n, e)
        ffn = sum(per_layer) / len(per_layer) if per_layer else 1 - self.rows["neurons"] / (n * dims.active_ffn)
        out = {"realized_ffn_sparsity": ffn, "realized_ffn_sparsity_per_layer": per_layer,
               "realized_head_sparsity": 1 - self.rows["heads"] / (n * dims.n_heads), "gated_layers": gated,
               "selector_bytes": e.ffn_selector.nbytes() if e is not None and e.ffn_selector is not None else 0}
        if out["selector_bytes"]:  # of the bytes one decode step reads at the last context length: a byte share,
            # not a time share (benchmark.py times the selector alone: selector_share)
            from .runtime.bench import step_bytes
            out["selector_byte_share"] = out["selector_bytes"] / step_bytes(e, 1, getattr(self, "pos", 0))
        return out

    def _layer_sparsity(self, dims, n: int, e) -> list[float]:
        """Realized FFN sparsity of each gated layer over the n tokens run (the current engine's device counts
        included), [] where no layer's FFN is gated."""
        if self.layer_neurons is None:
            return []
        kept = list(self.layer_neurons)
        if e is not None and e.counts_kept_neurons:  # not folded yet: the engine still runs
            kept = [a + b for a, b in zip(kept, e.ffn_selector.kept_per_layer())]
        first = e.first_layer if e is not None else (self.config.first_layer or 0)
        return [1 - kept[layer] / (n * dims.active_ffn) for layer in range(first, dims.n_layers)]

    def _input_stats(self, dims, n: int, e) -> dict:
        """Input thresholds (teal, threshold): realized sparsity per thresholded input from the kernels' device
        counts; realized_ffn_sparsity is that of the down projection's input (the neurons skipped), as in the
        evaluation's rows."""
        first = e.first_layer if e is not None else (self.config.first_layer or 0)
        kept = self.kept
        if e is not None:
            kept = [a + b for a, b in zip(kept, e.teal.kept_per_input(first))]
        widths = {"attn_in": dims.hidden, "attn_out": dims.n_heads * dims.head_dim, "ffn_in": dims.hidden,
                  "ffn_out": dims.ffn}
        out = self.inputs.realized(kept, n, dims.n_layers - first, widths)
        return {**out, "realized_ffn_sparsity": out.get("realized_ffn_out_sparsity", 0.0),
                "realized_head_sparsity": 0.0, "gated_layers": dims.n_layers - first,
                "selector_bytes": e.input_sparsity_bytes() if e is not None else 0}

