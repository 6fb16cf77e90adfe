"""Gathered linears for decode: read only the selected rows of a weight (head gating's q and o projections).

    row_linear(x, w, rows, b)               y = x · w[rows]ᵀ + b[rows]        x (T, d), w (N, d)    -> (T, K)
    row_linear_t(h, w_t, rows, b, residual) y = residual + h · w_t[rows] + b  h (T, K), w_t (N, d)  -> (T, d)

For a skipped query head h, rows h·D..h·D+D-1 of W_q and of W_o stored transposed (W_o.T, contiguous) are never
read. One row set for all T <= 16 tokens: each selected row is read once and multiplied against all tokens with
tl.dot (tokens padded to 16), as in ffn.py's shared-set kernels. Both kernels split the reduction (over d,
resp. over the rows) across programs with fp32 atomics, because a projection's few hundred to few thousand rows
make too few row blocks to keep every SM streaming. row_gemv_t_kernel is also ffn.py's shared-set down projection
(the same product with w_t = W_down.T). The torch fallbacks gather (correct everywhere, slower than dense on a
GPU).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .common import fp32_accumulator, reduction_splits, split_length, tl, triton, use_triton
from .pdl import pdl_kwargs, pdl_launch_next, pdl_wait

MAX_TOKENS = 16  # the kernels pad tokens to 16 for tl.dot
# (block_k, block_d, warps, stages) of both kernels. A q or o projection keeps few rows (2560 of OPT-13B's 5120 at
# 50% heads), too few row blocks to fill 132 SMs, so both kernels also split the reduction over programs (fp32
# atomics): about 4 programs per SM.
ROW_DEFAULTS = (32, 128, 4, 4)  # best of benchmarks/row_kernels.py on an H100 (OPT-13B and Llama-2-7B shapes)
ROW_T_DEFAULTS = (128, 128, 4, 3)  # o-projection into the fp32 residual: 2.8-3.3 TB/s (benchmarks/row_kernels.py)
PROGRAMS_PER_SM = 4  # the reduction is split until there are about this many programs per SM (1 split: no atomics)
# lazy K/V's one GEMV (16 window rows x q + K/V rows of ~60% of the heads) has rows enough to fill the GPU without a
# split: (32, 256, 4, 3) at 1 program per SM, 2.7-2.8 TB/s on OPT-13B and Llama-2-7B shapes (H100)
LAZY_QKV = dict(config=(32, 256, 4, 3), programs_per_sm=1)

if triton is not None:
    @triton.jit
    def _row_gemv_kernel(x_ptr, w_ptr, b_ptr, rows_ptr, y_ptr, T, K, D, D_PER_SPLIT, HAS_BIAS: tl.constexpr,
                         ATOMIC: tl.constexpr, T_PAD: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                         USE_PDL: tl.constexpr):
        pdl_wait(USE_PDL)
        offs_k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        rows = tl.load(rows_ptr + offs_k, mask=mask_k, other=0).to(tl.int64)
        offs_t = tl.arange(0, T_PAD)
        mask_t = offs_t < T
        d_start = tl.program_id(1) * D_PER_SPLIT
        acc = tl.zeros((T_PAD, BLOCK_K), dtype=tl.float32)
        for d0 in range(d_start, d_start + D_PER_SPLIT, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            mask_d = (offs_d < D) & (offs_d < d_start + D_PER_SPLIT)
            xs = tl.load(x_ptr + offs_t[:, None] * D + offs_d[None, :], mask=mask_t[:, None] & mask_d[None, :],
                         other=0.0)  # (T_PAD, BLOCK_D)
            w = tl.load(w_ptr + rows[:, None] * D + offs_d[None, :], mask=mask_k[:, None] & mask_d[None, :],
                        other=0.0)  # (BLOCK_K, BLOCK_D): each selected row read once
            acc += tl.dot(xs.to(w.dtype), tl.trans(w))
        pdl_launch_next(USE_PDL)
        if HAS_BIAS:  # added once, by the first split
            first = (tl.program_id(1) == 0).to(tl.float32)
            acc += first * tl.load(b_ptr + rows, mask=mask_k, other=0.0).to(tl.float32)[None, :]
        if ATOMIC:
            tl.atomic_add(y_ptr + offs_t[:, None] * K + offs_k[None, :], acc, mask=mask_t[:, None] & mask_k[None, :])
        else:  # one split: each output is written by one program
            tl.store(y_ptr + offs_t[:, None] * K + offs_k[None, :], acc, mask=mask_t[:, None] & mask_k[None, :])

    @triton.jit
    def row_gemv_t_kernel(h_ptr, w_t_ptr, b_ptr, rows_ptr, y_ptr, T, K, D, K_PER_SPLIT, HAS_BIAS: tl.constexpr,
                          T_PAD: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, USE_PDL: tl.constexpr):
        """y (T, D) fp32 += h (T, K) · w_t[rows] (+ b (D,), added by the first split): the selected rows (K,) of a
        weight stored transposed (N, D), read once for all T <= T_PAD tokens with tl.dot. Grid (D blocks, K splits
        of K_PER_SPLIT rows), fp32 atomics. Shared by row_linear_t (o-projection) and gated_ffn's shared-set down
        projection (ffn.py), whose math is the same with w_t = W_down.T and rows = the kept neurons."""
        pdl_wait(USE_PDL)
        offs_d = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        offs_t = tl.arange(0, T_PAD)
        mask_t = offs_t < T
        k_start = tl.program_id(1) * K_PER_SPLIT
        acc = tl.zeros((T_PAD, BLOCK_D), dtype=tl.float32)
        for k0 in range(k_start, k_start + K_PER_SPLIT, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = (offs_k < K) & (offs_k < k_start + K_PER_SPLIT)
            rows = tl.load(rows_ptr + offs_k, mask=mask_k, other=0).to(tl.int64)
            w = tl.load(w_t_ptr + rows[:, None] * D + offs_d[None, :], mask=mask_k[:, None] & mask_d[None, :],
                        other=0.0)  # (BLOCK_K, BLOCK_D)
            hk = tl.load(h_ptr + offs_t[:, None] * K + offs_k[None, :], mask=mask_t[:, None] & mask_k[None, :],
                         other=0.0)  # (T_PAD, BLOCK_K)
            acc += tl.dot(hk.to(w.dtype), w)
        pdl_launch_next(USE_PDL)
        if HAS_BIAS:
            first = (tl.program_id(1) == 0).to(tl.float32)
            acc += first * tl.load(b_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)[None, :]
        tl.atomic_add(y_ptr + offs_t[:, None] * D + offs_d[None, :], acc, mask=mask_t[:, None] & mask_d[None, :])


def _splits(x: torch.Tensor, blocks: int, max_splits: int, per_sm: int | None = None) -> int:
    # PROGRAMS_PER_SM is read at call time: benchmarks/row_kernels.py sweeps it by assigning the module global
    return reduction_splits(x, blocks, max_splits, per_sm or PROGRAMS_PER_SM)


def row_linear(x, w, rows, b=None, backend: str = "auto", out_dtype: torch.dtype | None = None,
               config: tuple | None = None, programs_per_sm: int | None = None):
    """x (T, d), w (N, d), rows (K,) int, b (N,) or None -> (T, K) in out_dtype (default x's dtype). The Triton
    path accumulates in fp32: out_dtype=torch.float32 returns that buffer without a cast. config (block_k, block_d,
    warps, stages) and programs_per_sm override ROW_DEFAULTS / PROGRAMS_PER_SM for one call."""
    out_dtype = out_dtype or x.dtype
    if not use_triton(x, backend) or x.shape[0] > MAX_TOKENS:
        return F.linear(x, w.index_select(0, rows), None if b is None else b.index_select(0, rows)).to(out_dtype)
    T, D = x.shape
    K = rows.shape[0]
    bk, bd, warps, stages = config or ROW_DEFAULTS
    k_blocks = triton.cdiv(K, bk)
    splits = _splits(x, k_blocks, triton.cdiv(D, bd), programs_per_sm)
    d_per_split = split_length(D, splits, bd)
    n_splits = triton.cdiv(D, d_per_split)
    y = (torch.zeros if n_splits > 1 else torch.empty)(T, K, device=x.device, dtype=torch.float32)
    _row_gemv_kernel[(k_blocks, n_splits)](
        x.contiguous(), w, b if b is not None else x, rows, y, T, K, D, d_per_split, HAS_BIAS=b is not None,
        ATOMIC=n_splits > 1, T_PAD=16, BLOCK_K=bk, BLOCK_D=bd, num_warps=warps, num_stages=stages,
        **pdl_kwargs(x))
    return y.to(out_dtype)


def row_linear_t(h, w_t, rows, b=None, backend: str = "auto", residual: torch.Tensor | None = None,
                 out: torch.Tensor | None = None):
    """h (T, K), w_t (N, d) (a weight stored transposed: row r is input channel r), rows (K,) int -> (T, d), plus
    ``residual`` (T, d) if given (fused: the accumulator starts from it). Returns residual's dtype, else h's.
    out: an fp32 (T, d) contiguous tensor to add the result (+ b) into in place (an fp32 residual stream: no copy
    in, no cast out); returned."""
    out_dtype = residual.dtype if residual is not None else h.dtype
    if not use_triton(h, backend) or h.shape[0] > MAX_TOKENS:
        y = h.to(w_t.dtype) @ w_t.index_select(0, rows)
        y = y if b is None else y + b
        if out is not None:
            return out.add_(y)
        return (y if residual is None else residual + y).to(out_dtype)
    T, K = h.shape
    D = w_t.shape[1]
    bk, bd, warps, stages = ROW_T_DEFAULTS
    d_blocks = triton.cdiv(D, bd)
    splits = _splits(h, d_blocks, triton.cdiv(K, bk))
    k_per_split = split_length(K, splits, bk)
    y = fp32_accumulator(out, residual, T, D, h.device)  # (T, D) fp32: out, a copy of residual, or zeros
    row_gemv_t_kernel[(d_blocks, triton.cdiv(K, k_per_split))](
        h.contiguous(), w_t, b if b is not None else h, rows, y, T, K, D, k_per_split, HAS_BIAS=b is not None,
        T_PAD=16, BLOCK_K=bk, BLOCK_D=bd, num_warps=warps, num_stages=stages, **pdl_kwargs(h))
    return y if out is not None else y.to(out_dtype)
