"""Head gating's gathered projections at decode: block-size sweep of kernels/linear.py against cuBLAS.

    python benchmarks/row_kernels.py [--out rows.jsonl]

Random fp16 weights in the q / o projection shapes of OPT-13B (5120 x 5120) and Llama-2-7B (4096 x 4096), 50% of
the heads (whole 128-row blocks) kept, 1 and 8 tokens; CUDA-graph replays (triton.testing.do_bench_cudagraph,
median). Prints ms per config and the best; appends JSON rows.
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from shadowsparse.kernels import linear

SHAPES = {"opt-13b": (5120, 40), "llama-2-7b": (4096, 32)}  # (d_model, heads); head_dim 128
ROW_CONFIGS = [(16, 256, 4, 3), (32, 256, 4, 3), (32, 512, 4, 3), (64, 256, 8, 3), (16, 512, 4, 4), (32, 128, 4, 4)]
ROW_T_CONFIGS = [(64, 128, 8, 3), (32, 128, 4, 3), (64, 256, 8, 3), (128, 64, 4, 3), (32, 256, 4, 4)]


def main() -> None:
    from triton.testing import do_bench_cudagraph
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--lazy-only", action="store_true", help="only the lazy K/V GEMV and o-projection sweep")
    args = ap.parse_args()
    card = torch.cuda.get_device_name()
    rows_out = []
    for name, (d, H) in ({} if args.lazy_only else SHAPES).items():
        D = d // H
        w = torch.randn(d, d, device="cuda", dtype=torch.float16) / d ** 0.5  # (H*D, d): q rows / o.T rows
        heads = torch.randperm(H, device="cuda")[: H // 2]
        rows = (heads[:, None] * D + torch.arange(D, device="cuda")).flatten().to(torch.int32)
        w_sl = w[rows.long()].contiguous()
        for T in (1, 8):
            x = torch.randn(T, d, device="cuda", dtype=torch.float16)
            h = torch.randn(T, rows.numel(), device="cuda", dtype=torch.float16)
            t_dense = do_bench_cudagraph(lambda: F.linear(x, w), rep=100)
            t_pre = do_bench_cudagraph(lambda: F.linear(x, w_sl), rep=100)
            t_dense_t = do_bench_cudagraph(lambda: x @ w, rep=100)
            t_pre_t = do_bench_cudagraph(lambda: h @ w_sl, rep=100)
            print(f"{name} T={T}: dense q {t_dense * 1e3:.1f} us, pre-sliced 50% {t_pre * 1e3:.1f} us; "
                  f"dense x@W.T-layout {t_dense_t * 1e3:.1f} us, pre-sliced {t_pre_t * 1e3:.1f} us")
            for kind, configs, fn in (("row_linear", ROW_CONFIGS, lambda: linear.row_linear(x, w, rows)),
                                      ("row_linear_t", ROW_T_CONFIGS, lambda: linear.row_linear_t(h, w, rows))):
                for cfg in configs:
                    if kind == "row_linear":
                        linear.ROW_DEFAULTS = cfg
                    else:
                        linear.ROW_T_DEFAULTS = cfg
                    fn()
                    t = do_bench_cudagraph(fn, rep=100)
                    print(f"  {kind:<13}{str(cfg):<20}{t * 1e3:8.1f} us  x dense {t_dense / t:5.2f}")
                    rows_out.append(dict(card=card, model=name, tokens=T, kernel=kind, config=cfg, us=t * 1e3,
                                         dense_us=t_dense * 1e3, presliced_us=(t_pre if kind == "row_linear"
                                                                               else t_pre_t) * 1e3))
    rows_out += lazy_sweep(card)
    if args.out:
        with open(args.out, "a") as f:
            for r in rows_out:
                f.write(json.dumps(r) + "\n")


def lazy_sweep(card) -> list[dict]:
    """Lazy K/V's one GEMV at batch 1 (engine.py): 16 window rows against the q rows of 50% of the heads and the
    K/V rows of those + the refresh heads, out of the fused (3d, d) q/k/v weight; and the o-projection of one token.
    Sweeps block sizes and the programs-per-SM target of the reduction split (1 split: plain stores)."""
    from triton.testing import do_bench_cudagraph
    out = []
    for name, (d, H) in SHAPES.items():
        D, W = d // H, 16
        r = -(-H // W)
        w = torch.randn(3 * d, d, device="cuda", dtype=torch.float16) / d ** 0.5
        heads = torch.randperm(H, device="cuda")[: H // 2]
        kvh = torch.cat([heads, torch.arange(r, device="cuda")])
        per = lambda hs: (hs[:, None] * D + torch.arange(D, device="cuda")).flatten()  # noqa: E731
        rows = torch.cat([per(heads), d + per(kvh), 2 * d + per(kvh)]).to(torch.int32)
        x = torch.randn(W, d, device="cuda", dtype=torch.float16)
        t_dense = do_bench_cudagraph(lambda: F.linear(x, w), rep=100)
        print(f"{name} lazy q/k/v GEMV, {rows.numel()} of {3 * d} rows, 16 tokens: dense {t_dense * 1e3:.1f} us")
        for per_sm in (4, 2, 1):
            linear.PROGRAMS_PER_SM = per_sm
            for cfg in ROW_CONFIGS:
                linear.ROW_DEFAULTS = cfg
                fn = lambda: linear.row_linear(x, w, rows, out_dtype=torch.float32)  # noqa: E731
                fn()
                t = do_bench_cudagraph(fn, rep=100)
                gbs = rows.numel() * d * 2 / t / 1e6
                print(f"  per_sm {per_sm} {str(cfg):<20}{t * 1e3:8.1f} us  {gbs:6.0f} GB/s")
                out.append(dict(card=card, model=name, tokens=W, kernel="lazy_qkv", config=cfg, per_sm=per_sm,
                                us=t * 1e3, dense_us=t_dense * 1e3, gb_per_s=gbs))
        wo = torch.randn(d, d, device="cuda", dtype=torch.float16)
        orows = per(heads).to(torch.int32)
        h = torch.randn(1, orows.numel(), device="cuda", dtype=torch.float32)
        acc = torch.zeros(1, d, device="cuda", dtype=torch.float32)
        for per_sm in (4, 2, 8):
            linear.PROGRAMS_PER_SM = per_sm
            for cfg in ROW_T_CONFIGS + [(256, 64, 4, 3), (128, 128, 4, 3), (64, 64, 4, 4)]:
                linear.ROW_T_DEFAULTS = cfg
                fn = lambda: linear.row_linear_t(h, wo, orows, out=acc)  # noqa: E731
                fn()
                t = do_bench_cudagraph(fn, rep=100)
                gbs = orows.numel() * d * 2 / t / 1e6
                print(f"  o-proj per_sm {per_sm} {str(cfg):<20}{t * 1e3:8.1f} us  {gbs:6.0f} GB/s")
                out.append(dict(card=card, model=name, tokens=1, kernel="o_into_fp32", config=cfg, per_sm=per_sm,
                                us=t * 1e3, gb_per_s=gbs))
    linear.PROGRAMS_PER_SM = 4
    return out


if __name__ == "__main__":
    main()
