"""The input-sparse linear (kernels/sparse_input.py) alone against cuBLAS on the projections of a model's shapes, at
decode batch sizes and input sparsities, sweeping the kernel's tile configs (CUDA GPU; rows as JSON lines).

    python benchmarks/sparse_input_kernel.py [--shape llama-2-7b] [--tokens 1 8] [--layouts compact masked]
                                             [--out sparse_input.jsonl]

Layouts: ``compact`` (a small kernel lists each segment's kept channels, the GEMV loads whole tiles of kept rows;
the time includes both kernels) and ``masked`` (one kernel, rows of skipped channels masked off in each tile).

x is Gaussian, the threshold the s-quantile of |x| (each token skips its own random channels; a batch reads the
union). Each timed call is a CUDA graph of REPLAYS back-to-back calls over COPIES weight copies (more bytes than the
L2 holds), as the engine's decode step replays them: the time is the GPU's, without the Python launch cost that a
plain do_bench of one call adds (it made a 19 us kernel read as 29 us). Medians of triton.testing.do_bench over
graph replays, divided by REPLAYS; fp16 weights.
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
import triton

from shadowsparse.kernels import sparse_input
from shadowsparse.kernels.sparse_input import input_sparse_linear
from shadowsparse.shapes import build_config

CONFIGS = [(8, 1024, 4, 4), (8, 2048, 4, 4), (8, 2048, 8, 4), (4, 1024, 4, 4), (8, 1024, 4, 5), (8, 1024, 8, 4),
           (4, 2048, 8, 4), (16, 512, 4, 3), (32, 256, 4, 4), (16, 256, 4, 4), (32, 512, 8, 3), (64, 256, 8, 3), (32, 128, 4, 4),
           (64, 128, 4, 3), (128, 128, 8, 3), (16, 1024, 8, 3), (32, 256, 8, 4), (32, 512, 4, 4), (16, 512, 8, 5),
           (64, 512, 8, 3), (32, 1024, 8, 3), (8, 1024, 4, 4), (16, 2048, 8, 3)]


def projections(shape: str) -> dict[str, tuple[int, int]]:
    c = build_config(shape)
    d, hd = c.hidden_size, c.hidden_size // c.num_attention_heads
    kv = getattr(c, "num_key_value_heads", c.num_attention_heads)
    f = getattr(c, "intermediate_size", None) or c.ffn_dim
    glu = hasattr(c, "intermediate_size")
    return {"qkv": (d, c.num_attention_heads * hd + 2 * kv * hd), "o": (c.num_attention_heads * hd, d),
            "gate_up": (d, (2 if glu else 1) * f), "down": (f, d)}


REPLAYS = 8
COPIES = 4


def graph_us(fn, copies) -> float:
    """GPU microseconds of one fn(copy) call: a graph of REPLAYS calls cycling through the weight copies."""
    for c in copies:  # compile / warm up outside the capture
        fn(c)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(REPLAYS):
            fn(copies[i % len(copies)])
    return triton.testing.do_bench(graph.replay, warmup=10, rep=40) * 1e3 / REPLAYS


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama-2-7b")
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--sparsity", type=float, nargs="+", default=[0.0, 0.4, 0.5])
    ap.add_argument("--per-sm", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--evict", type=int, nargs="+", default=[0, 1], help="weight loads evict-first: 0, 1 or both")
    ap.add_argument("--many-token-configs", type=int, default=6, help="tile configs swept above one token")
    ap.add_argument("--layouts", nargs="+", default=["compact", "masked"], choices=["compact", "masked"])
    ap.add_argument("--configs", type=int, default=len(CONFIGS), help="sweep the first N tile configs")
    ap.add_argument("--out", default="sparse_input.jsonl")
    args = ap.parse_args()
    card = torch.cuda.get_device_name()
    with open(args.out, "w") as f:
        for name, (K, N) in projections(args.shape).items():
            ws = [torch.randn(N, K, device="cuda", dtype=torch.float16) / K ** 0.5 for _ in range(COPIES)]  # (N, K)
            wts = [w.t().contiguous() for w in ws]  # (K, N) each
            for T in args.tokens:
                x = torch.randn(T, K, device="cuda", dtype=torch.float16)
                dense = graph_us(lambda w: F.linear(x, w), ws)
                # as the engine calls it: o and down add into the fp32 residual stream (out=), q/k/v and gate/up
                # into a fresh fp32 accumulator (zeroed in the call)
                resid = torch.zeros(T, N, device="cuda", dtype=torch.float32) if name in ("o", "down") else None
                for s in args.sparsity:
                    thr = (x.float().abs().flatten().quantile(s) if s > 0 else torch.tensor(-1.0)).view(1).cuda()
                    union = float((x.float().abs() > thr).any(0).float().mean())
                    for layout, evict in [(lay, e) for lay in args.layouts for e in args.evict]:
                        sparse_input.EVICT = bool(evict)
                        call = lambda cfg, per_sm: graph_us(lambda w_t: input_sparse_linear(  # noqa: E731
                            x, w_t, thr, config=cfg, programs_per_sm=per_sm, out_dtype=torch.float32, out=resid,
                            kernel_tokens=16, compact=layout == "compact"), wts)
                        default_us = call(None, None)
                        best = None
                        n_cfg = args.configs if T == 1 else min(args.configs, args.many_token_configs)
                        for cfg in CONFIGS[:n_cfg]:
                            for per_sm in args.per_sm:
                                us = call(cfg, per_sm)
                                if best is None or us < best[0]:
                                    best = (us, cfg, per_sm)
                        us, cfg, per_sm = best
                        row = dict(shape=args.shape, proj=name, K=K, N=N, tokens=T, sparsity=s, layout=layout,
                                   evict_first=bool(evict), union_kept=union, cublas_us=dense, kernel_us=us,
                                   speedup=dense / us, default_us=default_us, default_speedup=dense / default_us,
                                   config=cfg, programs_per_sm=per_sm, kernel_gb_s=union * K * N * 2 / us / 1e3,
                                   cublas_gb_s=K * N * 2 / dense / 1e3, card=card, dtype="float16", timing="graph")
                        print(json.dumps(row), flush=True)
                        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
