"""Where the dp4a sketch (kernels/sketch_x8.py) and its torch fallback part on a GPU, at real sizes (issue 14,
session 16: the kernel benchmark stopped at 4.7e-4 relative on Llama-2-7B's shapes, while the compiled unit tests
at d = 576 agreed to 1e-7).

    PYTHONPATH=. python3 research/sketch_x8_check.py          (a CUDA machine)

Per bits (2, 3), shape (SmolLM2's 576 x 1536, Llama-2-7B's 4096 x 11008, a 4096 x 64 slice) and rows of x (1, 2),
random round-to-nearest codes under a random input permutation (as benchmarks/sketch_kernel.py builds them), it
prints: whether the Triton prep equals the torch prep (int8 words, scales, sums); the relative error of the GPU
fallback, the dp4a kernel, the emulated dot product and dp4a on the torch prep, each against the CPU fallback
(float64 ground truth is the CPU's exact integers); and, once, a GEMM-based sum over the groups (an einsum, what the
fallback did before) against float64, which a GPU running fp32 GEMMs in TF32 rounds at ~2**-11. Also the TF32 flags.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from shadowsparse.kernels import sketch_x8 as X  # noqa: E402
from shadowsparse.quant import MidriseCodes, quantize_rows_codes, quantize_x8  # noqa: E402

SHAPES = ((576, 1536), (4096, 11008), (4096, 64))


def random_sketch(d: int, F_: int, bits: int, seed: int) -> X.PackedSketchX8:
    g = torch.Generator(device="cuda").manual_seed(seed)
    perm = torch.randperm(d, generator=g, device="cuda")
    codes = []
    for _ in range(2):
        c = quantize_rows_codes(torch.randn(F_, d, generator=g, device="cuda") / math.sqrt(d), bits, 64)
        codes.append(MidriseCodes(c.codes, c.steps, bits, 64, perm))
    return X.pack_sketch_x8(*codes)


def rel(a: torch.Tensor, b: torch.Tensor) -> str:
    return f"{((a - b).norm() / b.norm()).item():.2e}"


def gemm_group_sum(x: torch.Tensor, p: X.PackedSketchX8) -> str:
    """The group sum as an einsum (a batched GEMM) against float64: TF32 shows here."""
    q, scale = quantize_x8(x, p.perm, 64)
    dots = torch.einsum("bgc,mfgc->mbfg", q, p.codes())
    t2 = 2 * dots - (2 ** p.bits - 1) * q.sum(-1)[None, :, None, :]
    steps = p.steps.float().permute(1, 0, 2)
    gemm = torch.einsum("mbfg,mfg,bg->mbf", t2, steps, 0.5 * scale)
    exact = (t2.double() * steps[:, None].double() * (0.5 * scale.double())[None, :, None, :]).sum(-1)
    return rel(gemm.double(), exact)


def main() -> None:
    m = torch.backends.cuda.matmul
    print(torch.cuda.get_device_name(), "allow_tf32", m.allow_tf32, "fp32_precision",
          getattr(m, "fp32_precision", None), flush=True)
    for bits in (2, 3):
        for d, F_ in SHAPES:
            p = random_sketch(d, F_, bits, seed=bits)
            x = torch.randn(2, d, device="cuda").half()
            for rows in (1, 2):
                xr = x[:rows]
                cpu = X.sketch_scores_x8(xr.cpu(), p.to("cpu"), backend="torch").cuda()
                gpu = X.sketch_scores_x8(xr, p, backend="torch")
                pt, pk = X.prepare_x8(xr, p, backend="torch"), X.prepare_x8(xr, p, backend="triton")
                print(f"{bits}-bit {d}x{F_} rows={rows}: prep equal {[torch.equal(a, b) for a, b in zip(pt, pk)]}; "
                      f"vs CPU fallback: GPU fallback {rel(gpu, cpu)}, dp4a {rel(X.score_prepared_x8(*pk, p), cpu)}, "
                      f"emulated {rel(X.score_prepared_x8(*pk, p, asm=False), cpu)}, "
                      f"dp4a on the torch prep {rel(X.score_prepared_x8(*pt, p), cpu)}", flush=True)
            if (d, F_) == SHAPES[1]:
                print(f"  GEMM group sum vs float64: {gemm_group_sum(x[:1], p)}", flush=True)


if __name__ == "__main__":
    main()
