"""Where a decode step's time goes: per-kernel GPU time of the engine's step (eager, torch.profiler).

    python benchmarks/profile_step.py [--model opt-13b] [--layers 4] [--methods dense ffn50+heads50] [--prefill 64]

Random weights in the model's per-layer shapes with fewer layers (a layer's kernels do not depend on depth);
prints the kernels by total GPU time per step, and the graph-replayed step time for comparison. --prefill T profiles
a T-token step at position 128 instead (the masked path of engine.py when T > 16), eager.
"""
from __future__ import annotations

import argparse
import statistics

import torch

from shadowsparse.runtime import DecodeEngine, EngineConfig, GraphedDecoder, extract_weights
from shadowsparse.runtime.bench import SHAPES, build_config, time_replays

METHODS = {"dense": {}, "ffn50": dict(ffn_sparsity=0.5), "heads50": dict(head_sparsity=0.5),
           "ffn50+heads50": dict(ffn_sparsity=0.5, head_sparsity=0.5),
           "ffn50+heads50/kv-dense": dict(ffn_sparsity=0.5, head_sparsity=0.5, kv="dense"),
           # input thresholds (kernels/sparse_input.py), calibrated as benchmark.py does
           "teal40": dict(teal=0.4), "teal50": dict(teal=0.5), "threshold+ffn50": dict(threshold=0.5)}


def main() -> None:
    from torch.profiler import ProfilerActivity, profile
    from transformers import AutoModelForCausalLM
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="opt-13b", choices=sorted(SHAPES))
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--methods", nargs="+", default=["dense", "ffn50+heads50"])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--prefill", type=int, default=0, help="profile a step of this many tokens instead")
    args = ap.parse_args()
    cfg = build_config(args.model)
    cfg.num_hidden_layers = args.layers
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float16).eval()
    w = extract_weights(model)
    teal = None
    for method in args.methods:
        spec = dict(METHODS[method])
        if {"teal", "threshold"} & set(spec) and teal is None:
            import benchmark
            teal = benchmark.teal_calibration(model, w, {"prompt": 128})
        sp = benchmark.input_thresholds(spec, teal, w) if teal is not None else None
        engine = DecodeEngine(w, 1, 256, EngineConfig(**spec), input_sparsity=sp)
        heads = torch.randn(1, 1, w.n_layers, w.n_heads, device="cuda")
        neurons = torch.randn(1, 1, w.n_layers, w.ffn, device="cuda")
        kw = dict(heads=heads, neurons=neurons) if engine._needs_scores() else {}
        g = GraphedDecoder(engine, **kw)
        engine.prefill(torch.zeros(1, 128, dtype=torch.long, device="cuda"),
                       **({k: v.expand(-1, 128, -1, -1) for k, v in kw.items()}))
        ms = statistics.median(time_replays(g.graph.replay, 50, 5, 2, lambda: g.start(
            torch.zeros(1, 1, dtype=torch.long, device="cuda"), 128)))
        ids = torch.zeros(1, 1, dtype=torch.long, device="cuda")
        if args.prefill:
            ids = torch.zeros(1, args.prefill, dtype=torch.long, device="cuda")
            kw = {k: v.expand(-1, args.prefill, -1, -1) for k, v in kw.items()}
        for _ in range(3):
            engine.step(ids, 128, **kw)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(args.steps):
                engine.step(ids, 128, **kw)
            torch.cuda.synchronize()
        print(f"\n== {args.model} x{args.layers} layers, {method}: graph step {ms * 1e3:.0f} us "
              f"({ms * 1e3 / args.layers:.1f} us/layer)")
        rows = {}
        for e in prof.key_averages():
            if e.device_time_total > 0:
                rows[e.key] = (e.device_time_total / args.steps, e.count / args.steps)
        total = sum(v[0] for v in rows.values())
        print(f"kernel time per step {total:.0f} us; by kernel (us/step, calls/step):")
        for k, (t, c) in sorted(rows.items(), key=lambda kv: -kv[1][0])[:18]:
            print(f"  {t:8.1f} {c:5.0f}  {k[:110]}")
        del g, engine


if __name__ == "__main__":
    main()
