"""What every kernel module shares: the optional Triton import, the kernel-or-fallback choice, launch helpers.

One place decides whether a call runs a Triton kernel or its torch fallback (use_triton), so the six kernel
modules cannot drift apart on what "auto" means or on the errors a bad ``backend`` gets.
"""
from __future__ import annotations

import torch

try:  # Triton is optional: CPU wheels of torch ship without it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on machines without triton
    triton = None
    tl = None

BACKENDS = ("auto", "triton", "torch")


def check_backend(backend: str) -> None:
    """Refuse a ``backend`` that is not one of BACKENDS (before any other check of the call)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")


def use_triton(x: torch.Tensor, backend: str) -> bool:
    """Whether a kernel call on ``x`` runs the Triton kernel: "triton" always (on the CPU only under
    TRITON_INTERPRET=1), "auto" on a CUDA tensor where Triton is installed, "torch" never. "triton" without the
    package is an error rather than a silent fallback: the caller asked to measure or test the kernels."""
    check_backend(backend)
    if backend == "triton" and triton is None:
        raise ValueError("backend='triton' needs the triton package: pip install triton")
    return backend == "triton" or (backend == "auto" and triton is not None and x.is_cuda)


def reduction_splits(x: torch.Tensor, blocks: int, max_splits: int, per_sm: int = 4) -> int:
    """How many programs share a reduction (fp32 atomics) so that ``blocks`` output blocks x splits fill the SMs
    about ``per_sm`` times over at decode: never more than ``max_splits`` (one block of the reduction each)."""
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 8
    return max(1, min(triton.cdiv(per_sm * sms, blocks), max_splits))


def split_length(n: int, splits: int, block: int) -> int:
    """The part of a reduction of length ``n`` that one of ``splits`` programs takes, rounded up to whole blocks
    (every program but the last runs full blocks; the grid is then cdiv(n, split_length))."""
    return triton.cdiv(triton.cdiv(n, splits), block) * block


def check_fp32_out(out: torch.Tensor) -> torch.Tensor:
    """An ``out=`` accumulator the kernels add into with fp32 atomics (an fp32 residual stream)."""
    if out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError("out must be a contiguous fp32 tensor (the kernel adds into it with fp32 atomics)")
    return out


def fp32_accumulator(out: torch.Tensor | None, residual: torch.Tensor | None, rows: int, cols: int,
                     device) -> torch.Tensor:
    """The (rows, cols) fp32 buffer a split reduction adds into with atomics: ``out`` itself (checked), a copy of
    ``residual`` (the sum starts from it: no separate add pass), or zeros."""
    if out is not None:
        return check_fp32_out(out)
    if residual is None:
        return torch.zeros(rows, cols, device=device, dtype=torch.float32)
    return residual.to(torch.float32, copy=True)
