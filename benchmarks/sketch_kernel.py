"""The packed sketch selector (kernels/sketch.py) against the dense GEMV it is meant to undercut, at decode.

    PYTHONPATH=. python benchmarks/sketch_kernel.py [--out sketch.jsonl] [--sweep] [--jobs 16]

Per shape (Llama-2-7B d=4096 F=11008, SmolLM2-135M d=576 F=1536), bits (2, 3) and rows of x (1, 2, 8): the sketch
(x prep + scoring kernel: |silu(x_p·Qgᵀ)·(x_p·Quᵀ)| for all F neurons from the packed 2-3 bit gate AND up), the
scoring kernel alone, the selector (sketch + the radix-select top-k, k = F/2; and the same with torch.topk), a
dense fp16 GEMV of W_gate (cuBLAS, x @ W.T) and one dense SwiGLU FFN block (gate, up, silu·, down; cuBLAS). Times
are medians over replays of a CUDA graph of many calls (after warm-up), read with CUDA events; every measured input
set rotates among enough copies to exceed 3x the L2 cache (an H200's 60 MB would otherwise hold a whole 3-bit
Llama sketch: 36.6 MB), since at decode the other layers' weights evict a layer's sketch between two of its calls.
Every timed variant's scores are checked against the torch fallback first.

Bytes: the sketch reads its packed words and fp16 steps once ((bits + 16/64) / 16 of an fp16 matrix, twice: gate and
up); the floor is bytes / 4.2 TB/s (the device-to-device copy rate measured on this workplace's H200s). --sweep
times every block config in SWEEP and reports the best (kernels/sketch.py's DEFAULTS come from it); the kernels
compile in parallel processes first (--jobs), since each unrolls the 64 slots of two matrices.
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import statistics
import time

import torch
import torch.nn.functional as F

from shadowsparse.kernels import sketch as S
from shadowsparse.kernels import sketch_x8 as X
from shadowsparse.quant import MidriseCodes, quantize_rows_codes

SHAPES = {"llama-2-7b": (4096, 11008), "smollm2-135m": (576, 1536)}
BITS = (2, 3)
ROWS = (1, 2, 8)
GROUP = 64
BANDWIDTH = 4.2e12  # bytes/s: the copy rate measured on this workplace's H200 (KINDS.md), the floor's denominator
L2_BYTES = 60 * 2 ** 20
# (block_f, block_g, warps, stages); per-thread (row, group) elements = bf·bg / (32·warps); G / bg blocks of groups
# per program. Earlier sweeps on an H200 (Llama-2-7B, one row, 3-bit; us): (16,32,4) 18.2, (32,32,8) 18.3,
# (8,32,4) 20.8, (16,16,4) 22.4, (8,16,2) 22.4, (32,16,4) 25.7, (16,16,2) 25.7, (64,16,8) 27.5; blocks of 8
# groups 28-31 (the first kernel version; the pair grid and the loads are the same since)
# the dp4a kernel (kernels/sketch_x8.py, int8 x): every config here is timed, the best reported
X8_CONFIGS = [(16, 32, 4, 1), (32, 32, 4, 1), (8, 32, 4, 1), (32, 16, 4, 1), (16, 64, 8, 1), (64, 32, 8, 1)]
SWEEP = {1: [(16, 32, 4, 1), (8, 32, 4, 1), (32, 32, 8, 1), (16, 64, 4, 1)],
         8: [(16, 32, 4, 1)]}


def configs(rows: int, G: int, sweep: bool, bits: int) -> list[tuple]:
    """The configs timed for one case, as the kernel runs them (block_g capped at G's power of two, duplicates
    dropped): the default for the bits first, then SWEEP[rows] with --sweep."""
    out = []
    for bf, bg, warps, stages in [S.DEFAULTS[bits]] + (SWEEP.get(rows, []) if sweep else []):
        cfg = (bf, min(bg, 1 << (G - 1).bit_length()), warps, stages)
        if cfg not in out:
            out.append(cfg)
    return out


def random_sketch(d: int, F_: int, bits: int, device, seed: int = 0, pack=S.pack_sketch):
    """A packed sketch of random fp16 weights (round-to-nearest midrise codes) under a random input permutation:
    the kernel's speed depends on the shapes, not on the values. pack: S.pack_sketch or X.pack_sketch_x8."""
    g = torch.Generator(device=device).manual_seed(seed)
    perm = torch.randperm(d, generator=g, device=device)
    codes = []
    for _ in range(2):
        w = torch.randn(F_, d, generator=g, device=device) / math.sqrt(d)
        c = quantize_rows_codes(w, bits, GROUP)
        codes.append(MidriseCodes(c.codes, c.steps, bits, GROUP, perm))
    return pack(*codes)


def copies_for(nbytes: int) -> int:
    """Input sets to rotate among so that one pass over them is >= 3x the L2 (capped at 256)."""
    return max(1, min(256, math.ceil(3 * L2_BYTES / nbytes)))


def graph_median_us(calls: list, repeats: int = 25) -> float:
    """Median per-call time (us) of the zero-argument callables in ``calls``, run in order: captured once into a
    CUDA graph (so launch overhead is the GPU's, as in a graph-captured decode step), replayed ``repeats`` times
    between CUDA events."""
    for fn in calls[:3]:  # warm-up outside the graph (compiles, cuBLAS handles)
        fn()
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for fn in calls:  # one eager pass on the capture stream (allocator warm-up)
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in calls:
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(calls))
    return statistics.median(times)


def rotated(make_fn, sets: list, min_calls: int = 20) -> list:
    return [make_fn(sets[i % len(sets)]) for i in range(max(min_calls, len(sets)))]


def _compile_one(job) -> str:
    """Worker: compile (by one small run) the prep, scoring and top-k kernels of one variant into Triton's cache."""
    d, F_, bits, rows, cfg = job
    t = time.time()
    p = random_sketch(d, 64, bits, "cuda")  # F = 64: divisible by 16 like the real F (the same specialization)
    x = torch.randn(rows, d, device="cuda", dtype=torch.float16)
    S.score_prepared(*S.prepare_x(x, p), p, cfg)
    p8 = random_sketch(d, 64, bits, "cuda", pack=X.pack_sketch_x8)
    for c in X8_CONFIGS:
        for asm in (True, False):
            X.score_prepared_x8(*X.prepare_x8(x, p8), p8, c, asm=asm)
    for w in (4, 8, 16, 32):  # the real F: its block size
        for m in S.TOPK_METHODS:
            S.topk_indices(torch.rand(rows, F_, device="cuda"), F_ // 2, warps=w, method=m)
    torch.cuda.synchronize()
    return f"{d} {bits} {rows} {cfg}: {time.time() - t:.1f} s"


def precompile(jobs: list, workers: int) -> None:
    t = time.time()
    with mp.get_context("spawn").Pool(workers) as pool:
        for line in pool.imap_unordered(_compile_one, jobs):
            print("  compiled", line, flush=True)
    print(f"precompiled {len(jobs)} variants in {time.time() - t:.0f} s with {workers} processes", flush=True)


def time_x8(card: str, versions: str, name: str, d: int, F_: int, bits: int, x: torch.Tensor,
            ref_fp: torch.Tensor, t_gemv: float, t_ffn: float, k: int) -> dict:
    """The dp4a kernel (int8 x) on the same shapes: every X8_CONFIGS entry (the emulated dot product too, to
    separate what dp4a buys), checked against its torch fallback; top-k overlap with the fp32 estimate ref_fp."""
    sets = [random_sketch(d, F_, bits, "cuda", seed=bits, pack=X.pack_sketch_x8)]
    sets += [random_sketch(d, F_, bits, "cuda", seed=100 + i, pack=X.pack_sketch_x8)
             for i in range(copies_for(sets[0].nbytes) - 1)]
    ref = X.sketch_scores_x8(x, sets[0], backend="torch")
    prepared = [X.prepare_x8(x, p) for p in sets]
    times, errs = {}, {}
    for cfg in X8_CONFIGS:
        for asm in (True, False):
            out = X.score_prepared_x8(*prepared[0], sets[0], cfg, asm=asm)
            errs[(cfg, asm)] = err = ((out - ref).norm() / ref.norm()).item()
            if not err < 1e-5:
                raise AssertionError(f"x8 {name} {bits}-bit {cfg} asm={asm}: rel err {err:.2e}")
            times[(cfg, asm)] = graph_median_us(rotated(
                lambda i: lambda: X.score_prepared_x8(*prepared[i], sets[i], cfg, asm=asm), list(range(len(sets)))))
            print(f"  x8 {name} {bits}-bit rows={x.shape[0]} {cfg} asm={asm}: {times[(cfg, asm)]:.2f} us", flush=True)
    (cfg, _), t_kernel = min(((c, a), t) for (c, a), t in times.items() if a)
    t = graph_median_us(rotated(lambda p: lambda: X.sketch_scores_x8(x, p, config=cfg), sets))
    want = S.topk_indices(ref_fp, k, backend="torch")
    sel = torch.zeros_like(ref).scatter_(1, S.topk_indices(ref, k, backend="torch").long(), 1.0)
    nbytes = sets[0].nbytes
    return dict(card=card, versions=versions, shape=name, d=d, F=F_, rows=x.shape[0], what=f"sketch x8 {bits}-bit",
                bits=bits, dtype=f"x int8 / {GROUP}, {bits}-bit codes + fp16 steps / {GROUP}", config=cfg,
                us=round(t, 2), kernel_us=round(t_kernel, 2), emulated_kernel_us=round(times[(cfg, False)], 2),
                kernel_us_by_config={str(c): round(v, 2) for (c, a), v in times.items() if a}, bytes=nbytes,
                rel_err=float(f"{errs[(cfg, True)]:.2e}"),
                GBps=round(nbytes / t / 1e3, 1), kernel_GBps=round(nbytes / t_kernel / 1e3, 1),
                floor_us=round(nbytes / BANDWIDTH * 1e6, 2), topk_agree_with_fp32_estimate=round(
                    sel.gather(1, want.long()).mean().item(), 4), copies=len(sets), vs_gate_gemv=round(t / t_gemv, 3),
                share_of_ffn=round(t / t_ffn, 3))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None, help="jsonl file for the rows")
    ap.add_argument("--sweep", action="store_true", help="time every config in SWEEP (default: kernels' defaults)")
    ap.add_argument("--jobs", type=int, default=16, help="processes compiling the kernels first (0: none)")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--rows", default=",".join(map(str, ROWS)), help="rows of x to time, e.g. 1,8")
    args = ap.parse_args()
    shapes = {k: SHAPES[k] for k in args.shapes.split(",")}
    rows_list = tuple(int(r) for r in args.rows.split(","))
    card = torch.cuda.get_device_name()
    versions = f"torch {torch.__version__}, triton {S.triton.__version__}"
    print(f"{card}; {versions}", flush=True)
    if args.jobs:
        jobs = sorted({(d, F_, bits, rows, c) for d, F_ in shapes.values() for bits in BITS for rows in rows_list
                       for c in configs(rows, d // GROUP, args.sweep, bits)})
        precompile(jobs, args.jobs)
    rows_out = []
    sink = open(args.out, "w") if args.out else None  # rows are written as they come (a cut-off run keeps them)

    def emit(row: dict) -> None:
        rows_out.append(row)
        if sink:
            sink.write(json.dumps(row) + "\n")
            sink.flush()

    for name, (d, F_) in shapes.items():
        gen = torch.Generator(device="cuda").manual_seed(1)
        w_bytes = F_ * d * 2
        n_w = copies_for(3 * w_bytes)
        ffn_sets = [tuple((torch.randn(F_, d, generator=gen, device="cuda") / math.sqrt(d)).half() for _ in range(3))
                    for _ in range(n_w)]  # (gate, up, down (d, F) as its transpose) per set
        mats = [m for s in ffn_sets for m in s]  # the GEMV rotates over all of them: >= 3x L2 as well
        sketches = {}  # bits -> the rotation of packed sketches
        for rows in rows_list:
            x = torch.randn(rows, d, generator=gen, device="cuda").half()
            t_gemv = graph_median_us(rotated(lambda w: lambda: x @ w.T, mats))
            t_ffn = graph_median_us(rotated(lambda s: lambda: (F.silu(x @ s[0].T) * (x @ s[1].T)) @ s[2], ffn_sets))
            for label, t, nbytes in (("dense gate GEMV (cuBLAS)", t_gemv, w_bytes),
                                     ("dense SwiGLU FFN (cuBLAS)", t_ffn, 3 * w_bytes)):
                emit(dict(card=card, versions=versions, shape=name, d=d, F=F_, rows=rows, what=label, dtype="fp16",
                          us=round(t, 2), bytes=nbytes, GBps=round(nbytes / t / 1e3, 1),
                          floor_us=round(nbytes / BANDWIDTH * 1e6, 2)))
            for bits in BITS:
                if bits not in sketches:
                    base = random_sketch(d, F_, bits, "cuda", seed=bits)
                    sketches[bits] = [base] + [random_sketch(d, F_, bits, "cuda", seed=100 + i)
                                               for i in range(copies_for(base.nbytes) - 1)]
                sets = sketches[bits]
                base = sets[0]
                ref = S.sketch_scores(x, base, backend="torch")
                best = None
                for cfg in configs(rows, d // GROUP, args.sweep, bits):
                    out = S.sketch_scores(x, base, config=cfg)
                    err = ((out - ref).norm() / ref.norm()).item()
                    if not err < 1e-5:
                        raise AssertionError(f"{name} {bits}-bit rows={rows} {cfg}: rel err {err:.2e}")
                    t = graph_median_us(rotated(lambda p: lambda: S.sketch_scores(x, p, config=cfg), sets))
                    print(f"  {name} {bits}-bit rows={rows} {cfg}: {t:.2f} us (rel err {err:.1e})", flush=True)
                    if best is None or t < best[0]:
                        best = (t, cfg, err)
                t, cfg, err = best
                k = F_ // 2
                idx = S.sketch_topk(x, base, k, config=cfg)
                want = S.topk_indices(ref, k, backend="torch")
                sel = torch.zeros_like(ref).scatter_(1, idx.long(), 1.0)
                agree = (sel.gather(1, want.long()).mean()).item()  # overlap of the two sets (rounding ties aside)
                prepared = [S.prepare_x(x, p) for p in sets]
                t_kernel = graph_median_us(rotated(
                    lambda i: lambda: S.score_prepared(*prepared[i], sets[i], cfg), list(range(len(sets)))))
                t_topk = graph_median_us(rotated(lambda p: lambda: S.sketch_topk(x, p, k, config=cfg), sets))
                scores = [S.sketch_scores(x, p, config=cfg) for p in sets[:4]]
                t_select = {f"{m}/{w}": graph_median_us(rotated(
                    lambda sc: lambda: S.topk_indices(sc, k, warps=w, method=m), scores))
                    for m in S.TOPK_METHODS for w in (4, 8, 16, 32)}  # the selection alone, per kernel and warps
                print(f"  top-k alone (us) by warps: {t_select}", flush=True)
                t_torch_topk = graph_median_us(rotated(
                    lambda p: lambda: torch.topk(S.sketch_scores(x, p, config=cfg), k, dim=-1, sorted=False), sets))
                nbytes = base.nbytes
                row = dict(card=card, versions=versions, shape=name, d=d, F=F_, rows=rows, what=f"sketch {bits}-bit",
                           bits=bits, dtype=f"x fp16, {bits}-bit codes + fp16 steps / {GROUP}", config=cfg,
                           us=round(t, 2), kernel_us=round(t_kernel, 2), topk_us=round(t_topk, 2),
                           torch_topk_us=round(t_torch_topk, 2), topk_agree=round(agree, 4), bytes=nbytes,
                           GBps=round(nbytes / t / 1e3, 1), kernel_GBps=round(nbytes / t_kernel / 1e3, 1),
                           floor_us=round(nbytes / BANDWIDTH * 1e6, 2), rel_err=float(f"{err:.2e}"),
                           copies=len(sets), vs_gate_gemv=round(t / t_gemv, 3), share_of_ffn=round(t / t_ffn, 3),
                           topk_share_of_ffn=round(t_topk / t_ffn, 3),
                           select_us_by_warps={w: round(t, 2) for w, t in t_select.items()})
                emit(row)
                print(f"  -> {row}", flush=True)
                del prepared
                emit(time_x8(card, versions, name, d, F_, bits, x, ref, t_gemv, t_ffn, k))
        del ffn_sets, mats, sketches
        torch.cuda.empty_cache()
    print(f"\n{card}: medians of CUDA-graph replays (us); floor = bytes / {BANDWIDTH / 1e12:.1f} TB/s")
    print(f"{'shape':14} {'rows':>4} {'what':26} {'us':>7} {'kernel':>7} {'+topk':>7} {'torch':>7} {'floor':>6} "
          f"{'GB/s':>5} {'x gate':>6} {'x FFN':>6}  config")
    for r in rows_out:
        print(f"{r['shape']:14} {r['rows']:>4} {r['what']:26} {r['us']:7.2f} {r.get('kernel_us', ''):>7} "
              f"{r.get('topk_us', ''):>7} {r.get('torch_topk_us', ''):>7} {r['floor_us']:6.2f} {r['GBps']:5.0f} "
              f"{r.get('vs_gate_gemv', ''):>6} {r.get('share_of_ffn', ''):>6}  {r.get('config', '')}")
    if sink:
        sink.close()


if __name__ == "__main__":
    main()
