"""When a gated step runs dense instead: never slower than dense, decided by measurement.

A gated path saves weight bytes at decode, but its kernels, its selector and its bookkeeping cost time of their
own; with several token rows per step the rows read become a union and the savings shrink. Where a path was
measured slower than its own dense step, generation runs that step dense (every head and neuron: the dense
model's output) — faster and more accurate than the gated step it replaces. Evaluation (perplexity) never falls
back: it measures the selector's quality (EngineConfig.fallback = "never").

The rule, for a step of n token rows (batch · tokens per sequence) on a path (the engine's gating features):
  1. the path's measured speed-ups are {rows: × own dense}, one table for decode steps (one new token per sequence:
     MEASURED) and one for prefill steps (several: MEASURED_PREFILL, where the rows are one sequence's tokens, the
     union of whose sets is read, and the lazy K/V window is refreshed first); take the measurement at the smallest
     rows >= n (speed-ups fall with rows, so a larger measured step bounds a smaller unmeasured one from below);
  2. below 1.0 -> dense; at or above 1.0 -> gated; n beyond every measurement -> dense (a larger step than any
     measured one: the unions only grow);
  3. a path with no measurement at all stays gated (nothing to decide by), and ``explain`` says so.
The measurements are of the GPU kernels: on a CPU (the torch reference path, not built for speed) "measured" keeps
every step gated. EngineConfig.fallback may also be an integer N: dense above N rows, whatever the path and device
(a user's own measurement).
"""
from __future__ import annotations

from ..errors import ConfigError

FALLBACKS = ("never", "measured")

# path -> {token rows per step: ms of own dense / ms of the gated step}, fp16, torch 2.11 + Triton 3.6, Llama-2-7B
# shapes unless noted, CUDA-graph decode, dense measured in the same run (docs/benchmarks.md; docs/research.md
# sessions 8-10). Rows are the batch: one new token per sequence (prefill steps: MEASURED_PREFILL below).
# Where a path was measured on both cards (NVIDIA H200, H100) the entry is the lower figure: the rule must hold on
# either (the sketch at batch 1: 0.98x on the H200, 1.04x on the H100 -> dense on both).
MEASURED: dict[str, dict[int, float]] = {
    # given or predicted index sets (predictor, static, lte: the same kernels), H200 2026-12-03; batch 2 H200 session 9
    "ffn+heads": {1: 1.73, 2: 1.65, 8: 1.40},
    "ffn+heads+predictor": {1: 1.66, 2: 1.57, 8: 1.35},
    "ffn": {1: 1.41, 8: 1.32},
    # 2:4-compressed FFN weights (kernels/nm24.py) with index sets: batch 8 slower than dense
    "ffn+heads+nm24": {1: 1.64, 8: 0.84},
    # input thresholds, H200 session 8 (batch 2: session 9): the kernel route at <= sparse_input_tokens rows, the
    # dense route (masks + cuBLAS) above
    "teal": {1: 1.34, 2: 0.97, 8: 0.93},
    "threshold": {1: 1.13, 2: 1.07, 8: 1.01},
    # selectors that score every neuron in the step (kernels/sketch.py; the real gate projection for CATS): the
    # scoring and top-k cost about what the skipped rows save at one token; at 2+ tokens the union of the tokens'
    # sets reads ~75% of the rows while every token pays the scoring. Batch 1: H200 for the sketch (H100: 1.04),
    # H100 session 10 with the bisection top-k for gate and the verifiers
    # (docs/benchmark-h100-selectors-session10.jsonl); batch 2: H100; batch 8: H200 for the sketch, H100 on
    # Mistral-7B / Llama-3-8B shapes (GQA) for the others
    "ffn+sketch": {1: 0.98, 2: 0.62, 8: 0.46},
    "ffn+heads+sketch": {1: 1.11},
    "sketch+teal": {1: 1.00, 2: 0.62, 8: 0.50},  # sketch FFN + teal on the attention inputs (H200 b1; H100 b1 1.14)
    # sketch_threshold: the sketch's estimate against calibrated per-layer thresholds, no top-k (the scored gate/up
    # kernel and the input-sparse down GEMV); alone and with teal 40% on the attention inputs. H100 session 11
    # (docs/benchmark-h100-selectors-session11.jsonl; the top-k sketch in the same run: 1.09 / 0.62 / 0.54)
    "ffn+sketch+threshold": {1: 1.21, 2: 1.01, 8: 0.76},
    "sketch+teal+threshold": {1: 1.31, 2: 1.02, 8: 0.74},
    # the same with the dp4a scoring kernel (int8 x, kernels/sketch_x8.py), H100 session 16
    # (docs/benchmark-h100-sketch-x8-session16.jsonl; the fp32 kernel in the same run: 1.22 / 1.01 / 0.76 and
    # 1.32 / 1.03 / 0.74). A path "+x8" without its own entry takes the fp32 kernel's (slower: a lower bound)
    "ffn+sketch+threshold+x8": {1: 1.24, 2: 1.09, 8: 0.90},
    "sketch+teal+threshold+x8": {1: 1.34, 2: 1.10, 8: 0.87},
    "ffn+gate": {1: 0.91, 2: 0.58, 8: 0.53},
    "ffn+gate+verify": {1: 0.74, 2: 0.41},
    "ffn+sketch+verify": {1: 0.80, 2: 0.42, 8: 0.34},
    # mixture-of-experts layers (_ffn_moe), Mixtral-8x7B shapes in bf16, its first 16 of 32 layers (an 80 GB card),
    # given index sets over each token's routed neurons: H100 session 15
    # (docs/benchmark-h100-moe-session15.jsonl). At batch 8 the tokens' routed experts cover most of the 8 and the
    # union of their kept rows about all of it
    "ffn+moe": {1: 1.42, 8: 1.00},
    "ffn+heads+moe": {1: 1.44, 8: 1.01},
    "heads+moe": {1: 1.04, 8: 1.01},
    # the sketch on MoE layers, scoring the routed experts' packed rows only (fewer routed slots than experts; H100
    # session 15, docs/benchmark-h100-moe-sketch-session15.jsonl): batch 3 and up are unmeasured, so dense
    "ffn+sketch+moe": {1: 1.21, 2: 1.21},
}


# path -> {token rows of a prefill step: × own dense}: a 128-token prompt prefilled in steps of 8 and of 64 tokens at
# batch 1 (benchmark.py's prefill_ms, step8 / step64), H100 session 10 (docs/benchmark-h100-selectors-session10.jsonl)
# and, for index sets at 64 and 512 rows (batch 8), the H200 of 2026-12-03. Every gated path loses here: the
# union of a prompt's tokens' sets covers most rows, and multi-token steps pay the selection per token.
MEASURED_PREFILL: dict[str, dict[int, float]] = {
    "ffn+heads": {8: 0.67, 64: 0.46, 512: 0.78},
    # not measured itself: the kernels of ffn+heads plus the predictor's own work, so no faster than ffn+heads (a
    # derived bound, the only entry that is one)
    "ffn+heads+predictor": {64: 0.46},
    "ffn+heads+nm24": {64: 0.21},  # issue 17's table: 2:4 + FFN50 + heads50 prefill 156 ms vs dense 32 (H200)
    "teal": {8: 0.52, 64: 0.64},
    "ffn+gate": {8: 0.67, 64: 1.00},
    "ffn+sketch": {8: 0.69, 64: 0.89},
    "ffn+sketch+verify": {8: 0.48, 64: 0.65},
    "sketch+teal": {8: 0.62, 64: 0.89},
    "ffn+sketch+threshold": {8: 0.70, 64: 0.56},  # H100 session 11
    "sketch+teal+threshold": {8: 0.68, 64: 0.53},
    "ffn+sketch+threshold+x8": {8: 0.74, 64: 0.67},  # the dp4a sketch, H100 session 16
    "sketch+teal+threshold+x8": {8: 0.69, 64: 0.61},
    # MoE (H100 session 15, as MEASURED): batch 1 steps of 8 and 64, batch 8 steps of 8 (64 rows) and 64 (512 rows)
    "ffn+moe": {8: 0.74, 64: 0.99, 512: 0.98},
    "ffn+heads+moe": {8: 0.82, 64: 0.88, 512: 0.97},
    "heads+moe": {8: 0.87, 64: 0.97, 512: 0.99},
    "ffn+sketch+moe": {8: 0.68, 16: 0.52, 64: 0.24, 128: 0.16},
}


def path_of(features: set[str]) -> str:
    """The key of MEASURED for a set of gating features (ffn, heads, predictor, sketch, gate, verify, teal,
    threshold, lte, nm24, moe, x8)."""
    return "+".join(sorted(features, key=_ORDER.index))


_ORDER = ["ffn", "heads", "predictor", "sketch", "gate", "verify", "teal", "threshold", "lte", "nm24", "moe", "x8"]


def measured_row(table: dict[str, dict[int, float]], path: str) -> dict[int, float] | None:
    """The path's row of a table; an unmeasured "+x8" path (the dp4a sketch) falls back to its fp32-kernel path,
    measured slower at every batch size where both were timed."""
    if path not in table and path.endswith("+x8"):
        path = path[:-len("+x8")]
    return table.get(path)


def validate(fallback) -> None:
    if isinstance(fallback, bool) or not (fallback in FALLBACKS or (isinstance(fallback, int) and fallback >= 0)):
        raise ConfigError(f"fallback must be one of {FALLBACKS} or a row count >= 0 (dense above it), got "
                          f"{fallback!r}")


def runs_dense(path: str, rows: int, fallback, cuda: bool = True,
               table: dict[str, dict[int, float]] | None = None, prefill: bool = False) -> bool:
    """Whether a step of ``rows`` token rows on ``path`` runs dense under ``fallback`` (module docstring); prefill:
    the step has several tokens per sequence (MEASURED_PREFILL, unless a table is given)."""
    if fallback == "never" or (fallback == "measured" and not cuda):
        return False
    if not isinstance(fallback, str):
        return rows > fallback
    measured = measured_row(table if table is not None else MEASURED_PREFILL if prefill else MEASURED, path)
    if not measured:
        return False
    above = [r for r in measured if r >= rows]
    return not above or measured[min(above)] < 1.0


def explain(path: str, fallback, cuda: bool = True, table: dict[str, dict[int, float]] | None = None) -> str:
    """One line for stats and logs: what the rule does for this path."""
    if fallback == "never":
        return "never (every step gated)"
    if fallback == "measured" and not cuda:
        return "measured on the GPU only: every step gated on this device"
    if not isinstance(fallback, str):
        return f"dense above {fallback} token rows per step (given)"
    if table is not None:
        tables = {"steps": table}
    else:
        tables = {"decode": MEASURED, "prefill": MEASURED_PREFILL}
    parts = []
    for kind, t in tables.items():
        pts = ", ".join(f"{r} rows {s:.2f}x" for r, s in sorted((measured_row(t, path) or {}).items()))
        parts.append(f"{kind} {pts or 'not measured (gated)'}")
    if not any(measured_row(t, path) for t in tables.values()):
        return f"'{path}' was not measured: every step gated"
    return f"'{path}' measured (fp16, x own dense, lower of H200/H100): {'; '.join(parts)}; dense where the next " \
        "measurement up is < 1.0x"
