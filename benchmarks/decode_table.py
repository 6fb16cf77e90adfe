"""benchmark.py rows (jsonl) -> the markdown table of docs/benchmarks.md, models in the order they appear.

    python benchmarks/decode_table.py docs/benchmark-h100-decode.jsonl [--methods dense ffn50 ...] [--batches 1 8]
        [--methods-batched dense ffn50 ...]   (methods shown for batches > 1; default: --methods)
"""
from __future__ import annotations

import argparse
import json

NAMES = {"opt-13b": "OPT-13B", "llama-2-7b": "Llama-2-7B", "smollm2-135m": "SmolLM2-135M shapes"}
BOLD = "ffn50+heads50"  # the headline configuration


def fmt(v, spec: str) -> str:
    return "" if v is None else format(v, spec)


def table(rows: list[dict], methods: list[str] | None, batches: list[int] | None,
          methods_batched: list[str] | None = None) -> str:
    lines = ["| model | B | method | ms/token | floor ms | GB/s | % copy | × own dense | × best dense | × HF eager | "
             "predictor |", "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    last = None
    for r in rows:
        shown = methods_batched if r["batch"] > 1 and methods_batched else methods
        if (shown and r["method"] not in shown) or (batches and r["batch"] not in batches):
            continue
        model = NAMES.get(r["model"], r["model"]) if r["model"] != last else ""
        last = r["model"]
        ms, x = fmt(r["ms_per_token"], ".3f"), fmt(r.get("speedup"), ".2f")
        if r["method"] == BOLD and r["batch"] == 1:
            ms, x = f"**{ms}**", f"**{x}**"
        share = r.get("predictor_share")
        lines.append(" | ".join([
            f"| {model}", str(r["batch"]), r["method"], ms, fmt(r.get("floor_ms"), ".2f"), fmt(r.get("gb_per_s"), ".0f"),
            fmt(None if r.get("frac_copy_bw") is None else 100 * r["frac_copy_bw"], ".0f"), x,
            fmt(r.get("speedup_vs_best_dense"), ".2f"), fmt(r.get("speedup_vs_hf_eager"), ".2f"),
            "" if share is None else f"{100 * share:.1f}% |"]) + ("" if share is not None else " |"))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("jsonl")
    ap.add_argument("--methods", nargs="*", default=None)
    ap.add_argument("--batches", nargs="*", type=int, default=None)
    ap.add_argument("--methods-batched", nargs="*", default=None)
    args = ap.parse_args()
    with open(args.jsonl) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    print(table(rows, args.methods, args.batches, args.methods_batched))


if __name__ == "__main__":
    main()
