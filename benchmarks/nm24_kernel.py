"""2:4 at decode, one FFN block and its single GEMVs: cuBLAS dense vs the compressed 2:4 kernels (kernels/nm24.py),
with and without 50% neuron skipping, against the Triton shared-set FFN (no 2:4) — block-size sweep included.

    python benchmarks/nm24_kernel.py [--out nm24.jsonl]

Random fp16 weights in the FFN shapes of OPT-13B (5120 -> 20480, ReLU, biases) and Llama-2-7B (4096 -> 11008,
SwiGLU), magnitude-pruned to 2:4; 1 and 8 tokens; CUDA-graph replays (triton.testing.do_bench_cudagraph, median).
The bytes limit of 2:4 at decode is 1 / 0.5625 = 1.78x (values + 4 bits of metadata per kept pair).
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from shadowsparse.kernels.ffn import gated_ffn_triton
from shadowsparse.kernels.nm24 import compress_24, nm24_linear, nm24_linear_t, prune_24

SHAPES = {"opt-13b": (5120, 20480, "relu", False, True), "llama-2-7b": (4096, 11008, "silu", True, False)}
# per token count: the configs swept (nm24.py: GEMV_DEFAULTS' fields for 1 token, DOT_DEFAULTS' for more)
IN_CONFIGS = {
    1: [(8, 128, 4, 3, False), (8, 128, 4, 3, True), (16, 64, 4, 3, False), (4, 256, 4, 3, False),
        (8, 256, 8, 3, False), (16, 128, 8, 3, False), (8, 128, 2, 3, False), (8, 64, 2, 3, False),
        (8, 128, 4, 4, False), (4, 128, 2, 3, False), (16, 64, 2, 3, False), (32, 64, 8, 3, False)],
    8: [(32, 256, 4, 3), (16, 256, 4, 3), (32, 512, 4, 3), (64, 256, 8, 3), (32, 128, 4, 4), (16, 512, 4, 3)],
}
T_CONFIGS = {  # (block_r, groups, warps, stages, META_DUP, SUM3)
    1: [(8, 128, 4, 3, False, False), (8, 128, 4, 3, False, True), (8, 128, 4, 3, True, True),
        (4, 256, 4, 3, False, True), (8, 128, 8, 3, False, True), (16, 64, 4, 3, False, True),
        (16, 32, 4, 3, False, True), (16, 32, 4, 3, False, False), (8, 128, 4, 4, False, True),
        (8, 64, 4, 3, False, True), (4, 128, 4, 3, False, True), (16, 128, 8, 3, False, True)],
    8: [(32, 128, 4, 3), (64, 128, 8, 3), (32, 256, 4, 3), (16, 128, 4, 3), (64, 64, 4, 3)],
}


def in_kw(cfg) -> dict:
    """kwargs of nm24_linear / nm24_linear_t for one sweep config."""
    return dict(config=cfg)


t_kw = in_kw


def bench(fn) -> float:
    from triton.testing import do_bench_cudagraph
    return do_bench_cudagraph(fn, rep=100, return_mode="median")


def best(make, configs, ref):
    """(ms, config) of the fastest config; make(config) -> a zero-argument callable whose result must match ref."""
    out, sweep = None, []
    for cfg in configs:
        fn = make(cfg)
        err = ((fn().float() - ref.float()).norm() / ref.float().norm()).item()
        if err > 1e-2:
            raise AssertionError(f"config {cfg} is wrong: relative error {err:.2e}")
        t = bench(fn)
        sweep.append((str(cfg), round(t * 1e3, 1)))
        if out is None or t < out[0]:
            out = (t, cfg)
    print("    sweep (config, us):", sweep, flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    card = torch.cuda.get_device_name()
    rows = []
    for name, (d, F_, act, glu, bias) in SHAPES.items():
        g = torch.Generator(device="cuda").manual_seed(0)
        r = lambda *s: (torch.randn(*s, generator=g, device="cuda") / s[-1] ** 0.5).half()  # noqa: E731
        w_in = prune_24(r(F_, d))
        w_up = prune_24(r(F_, d)) if glu else None
        down_t = prune_24(r(F_, d))  # (F, d): 2:4 along d, rows = neurons
        down = down_t.t().contiguous()  # (d, F) the dense layout cuBLAS reads
        b_in, b_out = (r(F_), r(d)) if bias else (None, None)
        c_in, c_up, c_down = compress_24(w_in), (compress_24(w_up) if glu else None), compress_24(down_t)
        actf = F.relu if act == "relu" else F.silu
        all_rows = torch.arange(F_, device="cuda", dtype=torch.int32)
        half = torch.randperm(F_, device="cuda")[: F_ // 2].to(torch.int32)
        for T in (1, 8):
            x = r(T, d)
            h_all = r(T, F_)
            h_half = r(T, F_ // 2)

            def dense():
                h = actf(F.linear(x, w_in, b_in))
                if glu:
                    h = h * F.linear(x, w_up)
                return F.linear(h, down, b_out)

            def ffn24(rows_, cin, ct):
                def run():  # gate/up (fc1), bias and act in one call (one kernel at one token), then down + bias
                    h = nm24_linear(x, *c_in, rows_, b_in, act=act, up=c_up, **in_kw(cin))
                    return nm24_linear_t(h, *c_down, rows_, bias=b_out, **t_kw(ct))
                return run

            t_dense = bench(dense)
            t_gemv = bench(lambda: F.linear(x, w_in))
            t_gemv_t = bench(lambda: F.linear(h_all, down))
            in_cfgs, t_cfgs = IN_CONFIGS[T], T_CONFIGS[T]
            g_in = best(lambda c: lambda: nm24_linear(x, *c_in, all_rows, **in_kw(c)), in_cfgs, F.linear(x, w_in))
            g_t = best(lambda c: lambda: nm24_linear_t(h_all, *c_down, all_rows, **t_kw(c)), t_cfgs,
                       F.linear(h_all, down))
            g_t_half = best(lambda c: lambda: nm24_linear_t(h_half, *c_down, half, **t_kw(c)), t_cfgs,
                            h_half @ down_t[half.long()])
            t_24 = bench(ffn24(all_rows, g_in[1], g_t[1]))
            t_24_half = bench(ffn24(half, g_in[1], g_t_half[1]))
            t_shared = bench(lambda: gated_ffn_triton(x, w_in, down_t, half, act, w_up=w_up, b_in=b_in, b_out=b_out))
            # correctness of the timed paths against the masked dense weights
            ref = dense().float()
            err = ((ffn24(all_rows, g_in[1], g_t[1])().float() - ref).norm() / ref.norm()).item()
            assert err < 2e-2, f"2:4 FFN wrong on {name}: rel err {err:.2e}"
            n_mats = 3 if glu else 2
            dense_bytes = n_mats * F_ * d * 2
            for method, ms, nbytes, note in [
                ("dense (cuBLAS, 2:4-masked weights)", t_dense, dense_bytes, "FFN block"),
                ("2:4 FFN", t_24, dense_bytes * 9 // 16, f"in {g_in[1]}, down {g_t[1]}"),
                ("2:4 + FFN 50%", t_24_half, dense_bytes * 9 // 32, f"in {g_in[1]}, down {g_t_half[1]}"),
                ("Triton shared-set FFN 50% (no 2:4)", t_shared, dense_bytes // 2, "ffn.py"),
                ("GEMV dense fc1/gate (cuBLAS)", t_gemv, F_ * d * 2, "one matrix"),
                ("GEMV 2:4 fc1/gate", g_in[0], F_ * d * 2 * 9 // 16, str(g_in[1])),
                ("GEMV dense down (cuBLAS)", t_gemv_t, F_ * d * 2, "one matrix"),
                ("GEMV 2:4 down (transposed)", g_t[0], F_ * d * 2 * 9 // 16, str(g_t[1])),
            ]:
                base = t_dense if "GEMV" not in method else (t_gemv if "fc1" in method else t_gemv_t)
                row = dict(card=card, dtype="float16", batch=T, model=name, block="ffn", method=method, ms=ms,
                           gb_per_s=nbytes / ms / 1e6, speedup=base / ms, baseline=(
                               "dense FFN block" if "GEMV" not in method else "dense GEMV"), note=note,
                           torch=torch.__version__, time=time.strftime("%Y-%m-%d %H:%M"))
                rows.append(row)
                print(f"{name:<11}T={T} {method:<38}{ms * 1e3:8.1f} us {row['gb_per_s']:6.0f} GB/s "
                      f"x{row['speedup']:5.2f}  {note}", flush=True)
    if args.out:
        with open(args.out, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
