"""rms_norm_x8 (kernels/sketch_x8.py: the RMSNorm and the dp4a sketch's int8 x in one kernel) on a GPU: equality with
rms_norm + prepare_x8 at a real width, and CUDA-graph timings of the two launches against the fused one, alone and
with the scoring kernel after it (the dependency the engine has).

    PYTHONPATH=. python3 benchmarks/fused_x8_prep.py [d]          (a CUDA machine; d = 4096 by default)
"""
import sys
import torch
from shadowsparse.kernels import sketch_x8 as X
from shadowsparse.kernels.rope_norm import rms_norm

torch.manual_seed(0)
d, F_ = int(sys.argv[1]) if len(sys.argv) > 1 else 4096, 256
p = X.sketch_from_weights_x8(torch.randn(F_, d) * 0.02, torch.randn(F_, d) * 0.02)
p.perm = torch.randperm(d).int()
p = p.to("cuda")
eps = 1e-5


def graph_time(fn, iters=200, reps=5):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(iters):
            fn()
    best = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); g.replay(); b.record(); torch.cuda.synchronize()
        best.append(a.elapsed_time(b) * 1000 / iters)
    return sorted(best)[len(best) // 2]


for wdt in (torch.float16, torch.float32):
    for B in (1, 2, 8, 16):
        x = torch.randn(B, 1, d, device="cuda") * (torch.rand(d, device="cuda") * 4 + 0.1)
        w = (1 + 0.3 * torch.randn(d, device="cuda")).to(wdt)
        yr = rms_norm(x, w, eps, out_dtype=torch.float16)
        y, prep = X.rms_norm_x8(x, w, eps, p, out_dtype=torch.float16)
        diff = (y.float() - yr.float()).abs()
        ulps = (diff / (yr.float().abs() * 2 ** -10 + 1e-7)).max().item()
        ok = all(torch.equal(a, b) for a, b in zip(prep, X.prepare_x8(y.view(B, d), p)))
        ok_t = all(torch.equal(a, b) for a, b in zip(prep, X.prepare_x8(y.view(B, d), p, backend="torch")))
        ne = (y != yr).sum().item()
        sc = X.score_prepared_x8(*prep, p)
        sc_ref = X.sketch_scores_x8(y.view(B, d), p)
        print(f"w {wdt} B {B}: y mismatches {ne} (max {ulps:.2f} ulp), prep==prepare_x8(y) {ok}, ==torch {ok_t}, "
              f"scores equal {torch.equal(sc, sc_ref)}", flush=True)
        if wdt == torch.float32:
            continue
        two = lambda: X.prepare_x8(rms_norm(x, w, eps, out_dtype=torch.float16).view(B, d), p)
        t_two = graph_time(two)
        t_norm = graph_time(lambda: rms_norm(x, w, eps, out_dtype=torch.float16))
        row = [f"B {B}: rms_norm {t_norm:.2f} us, rms_norm+prepare_x8 {t_two:.2f} us"]
        for bg in (8, 16, 32, 64):
            X.FUSED_BLOCK_G = bg
            row.append(f"fused[{bg}] {graph_time(lambda: X.rms_norm_x8(x, w, eps, p, out_dtype=torch.float16)):.2f}")
        X.FUSED_BLOCK_G = 64
        # with the scoring kernel after (the dependency the engine has)
        t2s = graph_time(lambda: X.score_prepared_x8(*two(), p), iters=100)
        t1s = graph_time(lambda: X.score_prepared_x8(*X.rms_norm_x8(x, w, eps, p, out_dtype=torch.float16)[1], p),
                         iters=100)
        row.append(f"| +score(F={F_}): two {t2s:.2f} fused {t1s:.2f}")
        print(", ".join(row), flush=True)
