"""The input-sparse linear (kernels/sparse_input.py) alone against cuBLAS on the projections of a model's shapes, at
decode batch sizes and input sparsities, sweeping the kernel's tile configs (CUDA GPU; rows as JSON lines).

    python benchmarks/sparse_input_kernel.py [--shape llama-2-7b] [--tokens 1 8] [--out sparse_input.jsonl]

x is Gaussian, the threshold the s-quantile of |x| (each token skips its own random channels; a batch reads the
union). Times are medians of triton.testing.do_bench (L2 flushed between calls), fp16 weights.
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
import triton

from shadowsparse.kernels.sparse_input import input_sparse_linear
from shadowsparse.shapes import build_config

CONFIGS = [(32, 128, 4, 4), (16, 256, 4, 4), (32, 256, 4, 4), (64, 128, 4, 3), (16, 512, 4, 3), (32, 256, 8, 3),
           (64, 256, 8, 3), (128, 128, 8, 3)]


def projections(shape: str) -> dict[str, tuple[int, int]]:
    c = build_config(shape)
    d, hd = c.hidden_size, c.hidden_size // c.num_attention_heads
    kv = getattr(c, "num_key_value_heads", c.num_attention_heads)
    f = getattr(c, "intermediate_size", None) or c.ffn_dim
    glu = hasattr(c, "intermediate_size")
    return {"qkv": (d, c.num_attention_heads * hd + 2 * kv * hd), "o": (c.num_attention_heads * hd, d),
            "gate_up": (d, (2 if glu else 1) * f), "down": (f, d)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama-2-7b")
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--sparsity", type=float, nargs="+", default=[0.0, 0.4, 0.5])
    ap.add_argument("--per-sm", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--out", default="sparse_input.jsonl")
    args = ap.parse_args()
    card = torch.cuda.get_device_name()
    with open(args.out, "w") as f:
        for name, (K, N) in projections(args.shape).items():
            w = torch.randn(N, K, device="cuda", dtype=torch.float16) / K ** 0.5  # (N, K) as nn.Linear stores it
            w_t = w.t().contiguous()  # (K, N)
            for T in args.tokens:
                x = torch.randn(T, K, device="cuda", dtype=torch.float16)
                dense = triton.testing.do_bench(lambda: F.linear(x, w), warmup=25, rep=200)
                for s in args.sparsity:
                    thr = (x.float().abs().flatten().quantile(s) if s > 0 else torch.tensor(-1.0)).view(1).cuda()
                    union = float((x.float().abs() > thr).any(0).float().mean())
                    best = None
                    for cfg in CONFIGS:
                        for per_sm in args.per_sm:
                            ms = triton.testing.do_bench(lambda: input_sparse_linear(
                                x, w_t, thr, config=cfg, programs_per_sm=per_sm, out_dtype=torch.float32,
                                kernel_tokens=16),
                                warmup=25, rep=200)
                            if best is None or ms < best[0]:
                                best = (ms, cfg, per_sm)
                    ms, cfg, per_sm = best
                    row = dict(shape=args.shape, proj=name, K=K, N=N, tokens=T, sparsity=s, union_kept=union,
                               cublas_us=dense * 1e3, kernel_us=ms * 1e3, speedup=dense / ms, config=cfg,
                               programs_per_sm=per_sm, kernel_gb_s=union * K * N * 2 / ms / 1e6,
                               cublas_gb_s=K * N * 2 / dense / 1e6, card=card, dtype="float16")
                    print(json.dumps(row), flush=True)
                    f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
