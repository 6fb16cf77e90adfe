"""Input-sparse linears for decode (TEAL's kernel idea, written here): skip the weight rows of small input channels.

    input_sparse_linear(x, w_t, threshold, b)   y = (x · [|x| > τ]) · w_t + b     x (T, K), w_t (K, N) -> (T, N)

TEAL zeroes the input channels of a projection whose magnitude is at most a per-layer threshold τ (calibrated as
a quantile of |x|). A channel that is zero for every token of the step contributes nothing, so the kernel never
reads its weight row: the weight is stored transposed (w_t = W.T, contiguous: row k is input channel k, N
contiguous outputs), and a row is loaded under a mask that is false for the skipped channels — a masked load
issues no memory transactions, so the bytes read fall with the realized sparsity. Tokens that keep a channel
others skip multiply it by their own value; the others multiply by zero (each token's product is exactly its own
masked input times W).

The threshold is a one-element fp32 tensor on the device (no host value is baked into a captured CUDA graph).
Optional ``count``: a one-element fp32 tensor the kernel adds the number of kept (token, channel) pairs to, so
the realized sparsity of a step is counted on the device, graphs included.

Kernel: grid (N blocks, K splits) with fp32 atomics like row_gemv_t_kernel (linear.py): a projection's inputs
split across programs so that a GEMV of a few thousand rows keeps every SM streaming. One token is FMA work on a
(BLOCK_K, BLOCK_N) accumulator; 2..16 tokens use tl.dot (tokens padded to 16). Above ``kernel_tokens`` tokens
(default 16) the call takes the torch path on cuBLAS: x masked, one GEMM (prefill). A batch reads the union of its
tokens' channels: at 40-50% per token the union of 4 tokens is already ~95% of the channels, and the kernel then
runs at ~0.92x cuBLAS (every row read, H200 fp16, benchmarks/sparse_input_kernel.py). Measured on Llama-2-7B
shapes at batch 8 the kernel path still beats the masked torch path in the whole step (0.72x against 0.60x own
dense): several small masking kernels per projection cost more than the kernel's loss (docs/research.md).
"""
from __future__ import annotations

import torch

from .common import fp32_accumulator, reduction_splits, split_length, tl, triton, use_triton
from .pdl import pdl_kwargs, pdl_launch_next, pdl_wait

MAX_TOKENS = 16  # the tl.dot path pads tokens to 16
KERNEL_TOKENS = 16  # default: the kernel serves steps of up to this many token rows, cuBLAS the larger ones
# (block_k, block_n, warps, stages): the best of benchmarks/sparse_input_kernel.py on Llama-2-7B's projections
# at 40-50% (H200, fp16): (16, 512, 4, 3) at one token on q/k/v, o and gate/up (1.14-1.30x cuBLAS)
ONE_TOKEN_DEFAULTS = (16, 512, 4, 3)
MANY_TOKEN_DEFAULTS = (16, 256, 4, 4)
PROGRAMS_PER_SM = 4

if triton is not None:
    @triton.jit
    def _input_sparse_kernel(x_ptr, w_t_ptr, b_ptr, thr_ptr, count_ptr, y_ptr, T, K, N, K_PER_SPLIT,
                             HAS_BIAS: tl.constexpr, COUNT: tl.constexpr, T_PAD: tl.constexpr,
                             BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
                             USE_PDL: tl.constexpr):
        """y (T, N) fp32 += (x (T, K) masked by |x| > thr) · w_t (K, N) over this program's K_PER_SPLIT channels,
        loading only the rows of channels some token keeps (+ b, by the first split)."""
        pdl_wait(USE_PDL)
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        thr = tl.load(thr_ptr)
        k_start = tl.program_id(1) * K_PER_SPLIT
        if T_PAD == 1:
            acc1 = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)  # reduced over K once, after the loop
        else:
            acc = tl.zeros((T_PAD, BLOCK_N), dtype=tl.float32)
        offs_t = tl.arange(0, T_PAD)
        mask_t = offs_t < T
        kept = 0
        for k0 in range(k_start, k_start + K_PER_SPLIT, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = (offs_k < K) & (offs_k < k_start + K_PER_SPLIT)
            xk = tl.load(x_ptr + offs_t[:, None] * K + offs_k[None, :], mask=mask_t[:, None] & mask_k[None, :],
                         other=0.0).to(tl.float32)  # (T_PAD, BLOCK_K)
            keep = tl.abs(xk) > thr
            xk = tl.where(keep, xk, 0.0)
            row = tl.max(keep.to(tl.int32), axis=0) > 0  # (BLOCK_K,) some token keeps channel k: read its row
            if COUNT:
                kept += tl.sum(tl.sum(keep.to(tl.int32), axis=1), axis=0)
            w = tl.load(w_t_ptr + offs_k.to(tl.int64)[:, None] * N + offs_n[None, :],
                        mask=row[:, None] & mask_n[None, :], other=0.0)  # (BLOCK_K, BLOCK_N)
            if T_PAD == 1:
                acc1 += tl.trans(xk) * w.to(tl.float32)  # (BLOCK_K, 1) * (BLOCK_K, BLOCK_N)
            else:
                acc += tl.dot(xk.to(w.dtype), w, input_precision=PRECISION)
        pdl_launch_next(USE_PDL)
        if T_PAD == 1:
            acc = tl.sum(acc1, axis=0)[None, :]  # (1, BLOCK_N)
        if HAS_BIAS:  # added once, by the first split
            first = (tl.program_id(1) == 0).to(tl.float32)
            acc += first * tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        tl.atomic_add(y_ptr + offs_t[:, None] * N + offs_n[None, :], acc, mask=mask_t[:, None] & mask_n[None, :])
        if COUNT:  # one program per split counts its channels (the others read the same x)
            if tl.program_id(0) == 0:
                tl.atomic_add(count_ptr, kept.to(tl.float32))


def input_mask(x: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """The mask path's choice, shared by the torch path and the hooks' reference: x with |x| <= τ zeroed. The
    comparison is made in fp32 on x's own values (τ is stored rounded to the model dtype, so an fp16 model compares
    as its hooks do)."""
    return torch.where(x.float().abs() > threshold.to(x.device), x, torch.zeros((), dtype=x.dtype, device=x.device))


def input_sparse_linear(x: torch.Tensor, w_t: torch.Tensor, threshold: torch.Tensor, b: torch.Tensor | None = None,
                        backend: str = "auto", residual: torch.Tensor | None = None, out: torch.Tensor | None = None,
                        count: torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
                        config: tuple | None = None, programs_per_sm: int | None = None,
                        kernel_tokens: int = KERNEL_TOKENS) -> torch.Tensor:
    """x (T, K), w_t (K, N) a weight stored transposed, threshold (1,) fp32 on x's device, b (N,) or None ->
    (x · [|x| > τ]) · w_t + b, (T, N). residual (T, N): added (fused: the accumulator starts from it); out: an fp32
    (T, N) contiguous tensor to add the result into in place (the engine's fp32 residual stream; returned); count
    (1,) fp32: the kept (token, channel) pairs are added to it. Returns out_dtype (default: the residual's dtype,
    else x's; torch.float32 returns the kernel's accumulator without a cast). config (block_k, block_n, warps,
    stages) and programs_per_sm override the defaults for one call (benchmarks/sparse_input_kernel.py sweeps them);
    kernel_tokens (<= 16): the most token rows the kernel takes (module docstring)."""
    if x.dim() != 2 or w_t.dim() != 2 or x.shape[1] != w_t.shape[0]:
        raise ValueError(f"x (T, K) and w_t (K, N) must share K, got {tuple(x.shape)} and {tuple(w_t.shape)}")
    if threshold.numel() != 1:
        raise ValueError(f"threshold must be a one-element tensor, got shape {tuple(threshold.shape)}")
    out_dtype = out_dtype or (residual.dtype if residual is not None else x.dtype)
    T, K = x.shape
    N = w_t.shape[1]
    if not use_triton(x, backend) or T > min(kernel_tokens, MAX_TOKENS):
        keep = x.float().abs() > threshold.to(x.device)  # (T, K): input_mask's rule
        xm = torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))
        if count is not None:
            count.add_(keep.sum().float())
        y = xm.to(w_t.dtype) @ w_t
        y = y if b is None else y + b
        if out is not None:
            return out.add_(y)
        return (y if residual is None else residual + y).to(out_dtype)
    bk, bn, warps, stages = config or (ONE_TOKEN_DEFAULTS if T == 1 else MANY_TOKEN_DEFAULTS)
    n_blocks = triton.cdiv(N, bn)
    splits = reduction_splits(x, n_blocks, triton.cdiv(K, bk), programs_per_sm or PROGRAMS_PER_SM)
    k_per_split = split_length(K, splits, bk)
    y = fp32_accumulator(out, residual, T, N, x.device)
    _input_sparse_kernel[(n_blocks, triton.cdiv(K, k_per_split))](
        x.contiguous(), w_t, b if b is not None else x, threshold, count if count is not None else y, y, T, K, N,
        k_per_split, HAS_BIAS=b is not None, COUNT=count is not None, T_PAD=1 if T == 1 else 16, BLOCK_K=bk,
        BLOCK_N=bn, PRECISION="ieee" if w_t.dtype == torch.float32 else "tf32",  # fp32 models: exact products
        num_warps=warps, num_stages=stages, **pdl_kwargs(x))
    return y if out is not None or out_dtype == torch.float32 else y.to(out_dtype)
