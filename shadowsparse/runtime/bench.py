"""Measurement helpers of the decode benchmark (benchmark.py): models in exact shapes, timing, byte accounting.

Models are built from their configs with random weights directly on the GPU (no download, no host copy): what
decode speed depends on is the shapes and the dtype, not the values. The bytes a step reads are counted from the
rows the kernels actually read (fixed per step), so the achieved GB/s are not assumed from the sparsity.
"""
from __future__ import annotations

import statistics
import time

import torch

# Exact shapes (and their transformers configs) live in shadowsparse/shapes.py, shared with random-shape:<name>
# models of the training pipeline; re-exported here for benchmark.py and benchmarks/.
from ..shapes import SHAPES, build_config  # noqa: F401
from .engine import DecodeEngine
from .ffn_select import GateFFNSelector, VerifyFFNSelector
from .select import padded_size
from .weights import EngineWeights


def build_random_model(name: str, dtype: torch.dtype, device: str = "cuda", seed: int = 0, layers: int | None = None):
    """A causal LM in the exact shapes of ``name`` with random weights, created on ``device`` directly; ``layers``:
    only its first N decoder layers (a model too large for the card, measured per layer; the rows say so)."""
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    config = build_config(name)
    if layers is not None:
        config.num_hidden_layers = min(layers, config.num_hidden_layers)
        if getattr(config, "layer_types", None):
            config.layer_types = config.layer_types[:config.num_hidden_layers]
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if next(model.parameters()).device.type != torch.device(device).type:  # should not happen; never silently CPU
        model = model.to(device)
    model.eval().requires_grad_(False)
    return model


def copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy GB/s (bytes read + written), median of 20 copies: the ceiling of memory-bound work."""
    a = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    times = []
    for _ in range(25):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        b.copy_(a)
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e))
    return 2 * nbytes / statistics.median(times[5:]) / 1e6


def time_replays(fn, n: int, repeats: int, warmup: int, reset=None) -> list[float]:
    """ms per call of fn() over n back-to-back calls, for each repeat after warm-up (CUDA events)."""
    out = []
    for r in range(warmup + repeats):
        if reset is not None:
            reset()
        torch.cuda.synchronize()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(n):
            fn()
        e.record()
        e.synchronize()
        if r >= warmup:
            out.append(s.elapsed_time(e) / n)
    return out


def time_host(fn, repeats: int, warmup: int = 1) -> list[float]:
    """Wall ms of fn() (synchronised), for HF generate."""
    out = []
    for r in range(warmup + repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        if r >= warmup:
            out.append((time.perf_counter() - t0) * 1e3)
    return out


def _selector_ffn_rows(engine: DecodeEngine, tokens_per_seq: int, kf: int) -> int:
    """Weight rows (of d values) one gated layer's FFN reads under a per-layer FFN selector: the gate and up rows
    of the kept neurons (the sketch) or of the candidates (propose-then-verify: the union of the step's), the gate
    in full where the real gate scores them (gate, gate_verify), and the down rows of the kept ones."""
    sel, F_ = engine.ffn_selector, engine.w.ffn
    gate_full = F_ if isinstance(getattr(sel, "proposer", sel), GateFFNSelector) else 0
    if isinstance(sel, VerifyFFNSelector):
        kc = padded_size(engine.batch * tokens_per_seq, sel.k_candidates(F_, engine.k_ffn), F_, "union")
        return gate_full + 2 * kc + kf
    return gate_full + 3 * kf


def step_bytes(engine: DecodeEngine, tokens_per_seq: int, context: float, input_kept: dict | None = None) -> int:
    """Bytes one decode step reads: the weight rows its kernels read (dense layers whole, gated layers only the
    selected heads' q/o rows, all K/V rows or lazy K/V's, the selected neurons' FFN rows, 2:4-compressed where so),
    the lm_head, the predictor's parameters or the sketch's packed copies if they run, and the KV cache up to
    ``context`` positions (the mean over the timed steps). input_kept: input name -> the fraction of its channels
    kept (input thresholds: the projections reading it read that fraction of their rows in gated layers)."""
    kept = {"attn_in": 1.0, "attn_out": 1.0, "ffn_in": 1.0, "ffn_out": 1.0, **(input_kept or {})}
    w: EngineWeights = engine.w
    el = w.lm_head.element_size()
    d, D, H, KV = w.hidden, w.head_dim, w.n_heads, w.n_kv_heads
    n_in = 2 if w.family == "llama" else 1
    rows = engine.rows_read(engine.batch * tokens_per_seq)
    total = w.lm_head.numel() * el
    for layer in range(w.n_layers):
        gated = layer >= engine.first_layer
        kh = rows["heads"] if gated else H
        kf = rows["neurons"] if gated else rows["dense_neurons"]
        kv_heads_read = min(KV, kh)  # kv heads whose cache a selected query head reads (an upper bound with GQA)
        kv_proj = rows["kv_heads"] if gated else KV  # K/V projection heads: all, or lazy's selected + refresh
        window = rows["window"] if gated else 0  # lazy K/V reads the window's W normed inputs per sequence
        f_in, f_out = (kept["ffn_in"], kept["ffn_out"]) if gated else (1.0, 1.0)
        ffn_bytes = int((n_in * f_in + f_out) * kf * d * el)
        if gated and engine.ffn_selector is not None:
            ffn_bytes = _selector_ffn_rows(engine, tokens_per_seq, kf) * d * el
        if engine.nm24 is not None:  # values (half the entries) + 4 bits of metadata per kept pair
            ffn_bytes = ffn_bytes * 9 // 16
        a_in, a_out = (kept["attn_in"], kept["attn_out"]) if gated else (1.0, 1.0)
        total += int(((kh * a_in + kh * a_out) * D * d + 2 * kv_proj * D * d * a_in + engine.batch * window * d)
                     * el) + ffn_bytes
        total += int(engine.batch * kv_heads_read * context * D * 2 * el)
        total += w.experts * d * el  # an MoE layer's router
    if engine.predictor is not None:
        total += sum(p.numel() * p.element_size() for p in engine.predictor.parameters())
    if engine.ffn_selector is not None:  # the sketch's packed copies, read in every step
        sel_bytes = engine.ffn_selector.nbytes()
        slots = engine.batch * tokens_per_seq * w.experts_per_token  # an MoE step's routed (token, expert) slots
        if engine.sketch_reads_routed(slots):  # the routed experts' rows only: at most `slots` experts
            sel_bytes = sel_bytes * slots // w.experts
        total += sel_bytes
    return total
