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

import os

from .common import fp32_accumulator, reduction_splits, split_length, tl, triton, use_triton
from .ffn import ACTIVATIONS, apply_act
from .pdl import pdl_kwargs, pdl_launch_next, pdl_wait

MAX_TOKENS = 16  # the tl.dot path pads tokens to 16
KERNEL_TOKENS = 16  # default: the kernel serves steps of up to this many token rows, cuBLAS the larger ones
# (block_k, block_n, warps, stages): the best of benchmarks/sparse_input_kernel.py on Llama-2-7B's projections
# at 40-50%, timed as CUDA graphs (H200, fp16, session 8): (8, 1024, 4, 4) at one token on every projection,
# 1.25-1.56x cuBLAS (the earlier (16, 512, 4, 3), picked on host-bound timings, was 0.98x on gate/up)
ONE_TOKEN_DEFAULTS = (8, 1024, 4, 4)
MANY_TOKEN_DEFAULTS = (16, 256, 4, 4)
PROGRAMS_PER_SM = 4
# Compacted kernels (SHADOWSPARSE_INPUT_COMPACT=1; off by default): a small kernel lists each segment's kept
# channels, the GEMV then loads only whole tiles of kept rows. Measured slower than the masked-row kernel on an
# H200 (docs/research.md, session 7), kept for the A/B.
COMPACT = os.environ.get("SHADOWSPARSE_INPUT_COMPACT", "0") == "1"
# Weight loads marked evict-first (each weight byte is read once per step: keeping it in L2 only evicts the
# activations the next kernels read). A/B in benchmarks/sparse_input_kernel.py (--evict).
EVICT = os.environ.get("SHADOWSPARSE_INPUT_EVICT", "1") == "1"  # on: 1-4% faster at one token (H200)

if triton is not None:
    from .ffn import apply_act_tl
    @triton.jit
    def _input_sparse_kernel(x_ptr, w_t_ptr, b_ptr, thr_ptr, count_ptr, y_ptr, T, K, N, K_PER_SPLIT,
                             HAS_BIAS: tl.constexpr, COUNT: tl.constexpr, T_PAD: tl.constexpr,
                             BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
                             EVICT: tl.constexpr, USE_PDL: tl.constexpr):
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
            w_ptrs = w_t_ptr + offs_k.to(tl.int64)[:, None] * N + offs_n[None, :]
            if EVICT:
                w = tl.load(w_ptrs, mask=row[:, None] & mask_n[None, :], other=0.0, eviction_policy="evict_first")
            else:
                w = tl.load(w_ptrs, mask=row[:, None] & mask_n[None, :], other=0.0)  # (BLOCK_K, BLOCK_N)
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


    @triton.jit
    def _act_product(g_ptr, u_ptr, out_ptr, offs, mask, ACT: tl.constexpr, HAS_UP: tl.constexpr):
        """act(gate) * up at ``offs`` in out_ptr's dtype, rounded at each step as the model rounds its gate,
        activation and product (HAS_UP False: act(gate))."""
        dt = out_ptr.dtype.element_ty
        xt = apply_act_tl(tl.load(g_ptr + offs, mask=mask, other=0.0).to(dt).to(tl.float32), ACT).to(dt)
        if HAS_UP:
            u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(dt).to(tl.float32)
            xt = (xt.to(tl.float32) * u).to(dt)
        return xt

    @triton.jit
    def _compact_kernel(x_ptr, u_ptr, a_ptr, thr_ptr, idx_ptr, nk_ptr, count_ptr, zero_ptr, T, K, X_STRIDE,
                        ZERO_N, ACT: tl.constexpr, HAS_UP: tl.constexpr, LISTS: tl.constexpr, COUNT: tl.constexpr,
                        ZERO: tl.constexpr, SEG: tl.constexpr, USE_PDL: tl.constexpr):
        """Program s compacts the input channels [s*SEG, (s+1)*SEG) some token keeps (|x| > thr) into
        idx[s*SEG : s*SEG + nk[s]] (ascending) and nk[s]: the segment list the GEMV below reads whole rows from.
        ACT (>= 0): x is act(gate) * up, computed here from the fused gate/up accumulator (x_ptr: gate, u_ptr:
        up, row stride X_STRIDE), rounded to a_ptr's dtype and stored to a_ptr (T, K) — the down projection's
        input. ZERO: the program also zeroes its share of zero_ptr (ZERO_N fp32), the next GEMV's accumulator.
        LISTS False: only a (and the zeroing) for the masked-row kernel, which finds the kept rows itself."""
        pdl_wait(USE_PDL)
        s = tl.program_id(0)
        offs = s * SEG + tl.arange(0, SEG)
        mask = offs < K
        thr = tl.load(thr_ptr)
        any_keep = tl.zeros((SEG,), dtype=tl.int32)
        kept = 0
        for t in range(T):
            if ACT >= 0:
                xt = _act_product(x_ptr, u_ptr, a_ptr, t * X_STRIDE + offs, mask, ACT, HAS_UP)
                tl.store(a_ptr + t * K + offs, xt, mask=mask)
                xt = xt.to(tl.float32)
            else:
                xt = tl.load(x_ptr + t * X_STRIDE + offs, mask=mask, other=0.0).to(tl.float32)
            keep = ((tl.abs(xt) > thr) & mask).to(tl.int32)
            any_keep = tl.maximum(any_keep, keep)
            if COUNT:
                kept += tl.sum(keep, axis=0)
        if LISTS:
            pos = tl.cumsum(any_keep, axis=0) - 1  # (SEG,) the slot of each kept channel in the segment's list
            tl.store(idx_ptr + s * SEG + pos, offs, mask=any_keep > 0)
            tl.store(nk_ptr + s, tl.sum(any_keep, axis=0))
        if COUNT:
            tl.atomic_add(count_ptr, kept.to(tl.float32))
        if ZERO:  # this program's share of the accumulator the GEMV adds into
            per = tl.cdiv(ZERO_N, tl.num_programs(0))
            for z0 in range(s * per, tl.minimum(s * per + per, ZERO_N), 1024):
                offs_z = z0 + tl.arange(0, 1024)
                tl.store(zero_ptr + offs_z, tl.zeros((1024,), dtype=tl.float32),
                         mask=(offs_z < ZERO_N) & (offs_z < s * per + per))
        pdl_launch_next(USE_PDL)

    @triton.jit
    def _compact_gemv_kernel(x_ptr, w_t_ptr, b_ptr, thr_ptr, idx_ptr, nk_ptr, y_ptr, T, K, N,
                             HAS_BIAS: tl.constexpr, T_PAD: tl.constexpr, SEG: tl.constexpr,
                             BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
                             USE_PDL: tl.constexpr):
        """y (T, N) fp32 += x[:, kept] · w_t[kept, :] over segment program_id(1)'s list of kept channels: every
        loaded row is a kept one (whole tiles, no masked-off rows), the tile loop runs nk / BLOCK_K times."""
        pdl_wait(USE_PDL)
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        seg = tl.program_id(1)
        nk = tl.load(nk_ptr + seg)
        thr = tl.load(thr_ptr)
        offs_t = tl.arange(0, T_PAD)
        mask_t = offs_t < T
        if T_PAD == 1:
            acc1 = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
        else:
            acc = tl.zeros((T_PAD, BLOCK_N), dtype=tl.float32)
        for j0 in range(0, nk, BLOCK_K):
            offs_j = j0 + tl.arange(0, BLOCK_K)
            mask_j = offs_j < nk
            k = tl.load(idx_ptr + seg * SEG + offs_j, mask=mask_j, other=0)  # (BLOCK_K,) channel ids
            xk = tl.load(x_ptr + offs_t[:, None] * K + k[None, :], mask=mask_t[:, None] & mask_j[None, :],
                         other=0.0).to(tl.float32)  # (T_PAD, BLOCK_K)
            xk = tl.where(tl.abs(xk) > thr, xk, 0.0)  # each token's own choice
            w = tl.load(w_t_ptr + k.to(tl.int64)[:, None] * N + offs_n[None, :],
                        mask=mask_j[:, None] & mask_n[None, :], other=0.0)  # (BLOCK_K, BLOCK_N) kept rows
            if T_PAD == 1:
                acc1 += tl.trans(xk) * w.to(tl.float32)
            else:
                acc += tl.dot(xk.to(w.dtype), w, input_precision=PRECISION)
        pdl_launch_next(USE_PDL)
        if T_PAD == 1:
            acc = tl.sum(acc1, axis=0)[None, :]
        if HAS_BIAS:
            first = (seg == 0).to(tl.float32)
            acc += first * tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        tl.atomic_add(y_ptr + offs_t[:, None] * N + offs_n[None, :], acc, mask=mask_t[:, None] & mask_n[None, :])


    @triton.jit
    def _mask_kernel(x_ptr, u_ptr, y_ptr, thr_ptr, count_ptr, K, X_STRIDE, ACT: tl.constexpr, HAS_UP: tl.constexpr,
                     COUNT: tl.constexpr, BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
        """Program (t, j): y[t, j*BLOCK : (j+1)*BLOCK] = x · [|x| > thr] in y's dtype, x rounded to that dtype
        first (ACT >= 0: x = act(gate) * up from x_ptr/u_ptr, rounded at each step as the model rounds them);
        COUNT adds the kept channels to count_ptr. The producer side of a many-token step: the GEMM after it is a
        plain dense one on the zeroed input, which is the mask path itself."""
        pdl_wait(USE_PDL)
        t = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < K
        dt = y_ptr.dtype.element_ty
        if ACT >= 0:
            xt = _act_product(x_ptr, u_ptr, y_ptr, t * X_STRIDE + offs, mask, ACT, HAS_UP)
        else:
            xt = tl.load(x_ptr + t * X_STRIDE + offs, mask=mask, other=0.0).to(dt)
        keep = (tl.abs(xt.to(tl.float32)) > tl.load(thr_ptr)) & mask
        pdl_launch_next(USE_PDL)
        tl.store(y_ptr + t * K + offs, tl.where(keep, xt, tl.zeros_like(xt)), mask=mask)
        if COUNT:
            tl.atomic_add(count_ptr, tl.sum(keep.to(tl.int32), axis=0).to(tl.float32))


def input_mask(x: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """The mask path's choice, shared by the torch path and the hooks' reference: x with |x| <= τ zeroed. The
    comparison is made in fp32 on x's own values (τ is stored rounded to the model dtype, so an fp16 model compares
    as its hooks do)."""
    return torch.where(x.float().abs() > threshold.to(x.device), x, torch.zeros((), dtype=x.dtype, device=x.device))


def counted_input_mask(x: torch.Tensor, threshold: torch.Tensor, count: torch.Tensor | None) -> torch.Tensor:
    """input_mask(x, threshold), with the kept entries added to count (1,) fp32 if given: the torch twin of every
    kernel here that thresholds and counts (and of the norms' threshold=, kernels/rope_norm.py)."""
    keep = x.float().abs() > threshold.to(x.device)  # input_mask's rule
    if count is not None:
        count.add_(keep.sum().float())
    return torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))


def _torch_path(x, w_t, threshold, b, residual, out, count, out_dtype):
    xm = counted_input_mask(x, threshold, count)  # (T, K)
    y = xm.to(w_t.dtype) @ w_t
    y = y if b is None else y + b
    if out is not None:
        return out.add_(y)
    return (y if residual is None else residual + y).to(out_dtype)


def _plan(x: torch.Tensor, K: int, N: int, T: int, config, programs_per_sm):
    """(block_k, block_n, warps, stages, n_blocks, k_per_split): the tile config and the reduction split."""
    bk, bn, warps, stages = config or (ONE_TOKEN_DEFAULTS if T == 1 else MANY_TOKEN_DEFAULTS)
    n_blocks = triton.cdiv(N, bn)
    splits = reduction_splits(x, n_blocks, triton.cdiv(K, bk), programs_per_sm or PROGRAMS_PER_SM)
    return bk, bn, warps, stages, n_blocks, split_length(K, splits, bk)


def _launch(x, w_t, threshold, b, count, y, fresh: bool, plan, compact: bool, act: tuple | None = None):
    """Adds (x · [|x| > τ]) · w_t + b into y (T, N) fp32. Compacted: _compact_kernel lists each segment's kept
    channels, then _compact_gemv_kernel loads whole tiles of kept rows; masked: _input_sparse_kernel. With ``act``
    = (gate, up or None, ACT id) _compact_kernel first computes x = act(gate) * up into ``x`` (both layouts), and
    it zeroes y when y is a fresh accumulator."""
    T, K = x.shape
    N = w_t.shape[1]
    bk, bn, warps, stages, n_blocks, k_per_split = plan
    precision = "ieee" if w_t.dtype == torch.float32 else "tf32"  # fp32 models: exact products
    bias = b if b is not None else x
    if compact or act is not None or fresh:
        seg = max(bk, 1 << (k_per_split.bit_length() - 1))  # a power of two (tl.arange): the split rounded down
        n_seg = triton.cdiv(K, seg)
        idx = torch.empty(n_seg * seg if compact else 1, device=x.device, dtype=torch.int32)
        nk = torch.empty(n_seg if compact else 1, device=x.device, dtype=torch.int32)
        gate, up, act_id = act if act is not None else (x, None, -1)
        _compact_kernel[(n_seg,)](
            gate, up if up is not None else gate, x, threshold, idx, nk, count if count is not None else y, y, T, K,
            gate.stride(0), y.numel() if fresh else 0, ACT=act_id, HAS_UP=up is not None, LISTS=compact,
            COUNT=compact and count is not None, ZERO=fresh, SEG=seg, num_warps=4, **pdl_kwargs(x))
    if compact:
        _compact_gemv_kernel[(n_blocks, n_seg)](
            x, w_t, bias, threshold, idx, nk, y, T, K, N, HAS_BIAS=b is not None, T_PAD=1 if T == 1 else 16,
            SEG=seg, BLOCK_K=bk, BLOCK_N=bn, PRECISION=precision, num_warps=warps, num_stages=stages,
            **pdl_kwargs(x))
    else:
        _input_sparse_kernel[(n_blocks, triton.cdiv(K, k_per_split))](
            x, w_t, bias, threshold, count if count is not None else y, y, T, K, N, k_per_split,
            HAS_BIAS=b is not None, COUNT=count is not None, T_PAD=1 if T == 1 else 16, BLOCK_K=bk, BLOCK_N=bn,
            PRECISION=precision, EVICT=EVICT, num_warps=warps, num_stages=stages, **pdl_kwargs(x))
    return y


def _accumulator(out, residual, T, N, x, prepared: bool) -> tuple[torch.Tensor, bool]:
    """(the fp32 (T, N) buffer the kernel adds into, whether it is fresh): where _compact_kernel runs anyway
    (``prepared``) a fresh one is left uninitialized for it to zero (no memset launch)."""
    if out is None and residual is None and prepared:
        return torch.empty(T, N, device=x.device, dtype=torch.float32), True
    return fp32_accumulator(out, residual, T, N, x.device), False


def _finish(y, out, out_dtype):
    return y if out is not None or out_dtype == torch.float32 else y.to(out_dtype)


def _check(x, w_t, threshold):
    if x.dim() != 2 or w_t.dim() != 2 or x.shape[1] != w_t.shape[0]:
        raise ValueError(f"x (T, K) and w_t (K, N) must share K, got {tuple(x.shape)} and {tuple(w_t.shape)}")
    if threshold.numel() != 1:
        raise ValueError(f"threshold must be a one-element tensor, got shape {tuple(threshold.shape)}")


def input_sparse_linear(x: torch.Tensor, w_t: torch.Tensor, threshold: torch.Tensor, b: torch.Tensor | None = None,
                        backend: str = "auto", residual: torch.Tensor | None = None, out: torch.Tensor | None = None,
                        count: torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
                        config: tuple | None = None, programs_per_sm: int | None = None,
                        kernel_tokens: int = KERNEL_TOKENS, compact: bool | None = None) -> torch.Tensor:
    """x (T, K), w_t (K, N) a weight stored transposed, threshold (1,) fp32 on x's device, b (N,) or None ->
    (x · [|x| > τ]) · w_t + b, (T, N). residual (T, N): added (fused: the accumulator starts from it); out: an fp32
    (T, N) contiguous tensor to add the result into in place (the engine's fp32 residual stream; returned); count
    (1,) fp32: the kept (token, channel) pairs are added to it. Returns out_dtype (default: the residual's dtype,
    else x's; torch.float32 returns the kernel's accumulator without a cast). config (block_k, block_n, warps,
    stages) and programs_per_sm override the defaults for one call (benchmarks/sparse_input_kernel.py sweeps them);
    kernel_tokens (<= 16): the most token rows the kernel takes (module docstring); compact: the compacted kernels
    (default COMPACT) or the masked-row kernel."""
    _check(x, w_t, threshold)
    out_dtype = out_dtype or (residual.dtype if residual is not None else x.dtype)
    T, K = x.shape
    N = w_t.shape[1]
    if not use_triton(x, backend) or T > min(kernel_tokens, MAX_TOKENS):
        return _torch_path(x, w_t, threshold, b, residual, out, count, out_dtype)
    compact = COMPACT if compact is None else compact
    plan = _plan(x, K, N, T, config, programs_per_sm)
    y, fresh = _accumulator(out, residual, T, N, x, compact)
    return _finish(_launch(x.contiguous(), w_t, threshold, b, count, y, fresh, plan, compact), out, out_dtype)


def act_input_sparse_linear(gate: torch.Tensor, up: torch.Tensor | None, act: str, w_t: torch.Tensor,
                            threshold: torch.Tensor, b: torch.Tensor | None = None, backend: str = "auto",
                            residual: torch.Tensor | None = None, out: torch.Tensor | None = None,
                            count: torch.Tensor | None = None, dtype: torch.dtype | None = None,
                            out_dtype: torch.dtype | None = None, kernel_tokens: int = KERNEL_TOKENS,
                            compact: bool | None = None) -> torch.Tensor:
    """The FFN's down projection under a threshold on its input a = act(gate) * up (up None: a = act(gate)):
    gate, up (T, F) with the same row stride (halves of the fused gate/up accumulator, fp32, or separate model-
    dtype tensors) -> (a · [|a| > τ]) · w_t + b, w_t (F, d). a is rounded to ``dtype`` (the model's; default
    gate's) before the threshold, as the model computes it. On the kernel path one small kernel computes a (and,
    compacted, the channel lists) before the GEMV; other arguments as input_sparse_linear."""
    compact = COMPACT if compact is None else compact
    if act not in ACTIVATIONS:
        raise ValueError(f"act must be one of {ACTIVATIONS}, got {act!r}")
    if up is not None and (up.shape != gate.shape or up.stride() != gate.stride()):
        raise ValueError(f"gate and up must have one shape and row stride, got {tuple(gate.shape)}/"
                         f"{gate.stride()} and {tuple(up.shape)}/{up.stride()}")
    dtype = dtype or gate.dtype
    T, F_ = gate.shape
    if not use_triton(gate, backend) or T > min(kernel_tokens, MAX_TOKENS) or gate.stride(1) != 1:
        a = apply_act(gate.to(dtype), act)
        a = (a if up is None else a * up.to(dtype)).to(dtype)
        return input_sparse_linear(a, w_t, threshold, b, backend=backend, residual=residual, out=out, count=count,
                                   out_dtype=out_dtype, kernel_tokens=kernel_tokens)
    _check(gate, w_t, threshold)
    out_dtype = out_dtype or (residual.dtype if residual is not None else dtype)
    N = w_t.shape[1]
    a = torch.empty(T, F_, device=gate.device, dtype=dtype)  # (T, F) the down projection's input
    y, fresh = _accumulator(out, residual, T, N, gate, True)
    y = _launch(a, w_t, threshold, b, count, y, fresh, _plan(gate, F_, N, T, None, None), compact,
                act=(gate, up, ACTIVATIONS.index(act)))
    return _finish(y, out, out_dtype)


def _mask_launch(x, up, act_id: int, threshold, count, out_dtype, backend) -> torch.Tensor | None:
    """The Triton _mask_kernel over x (T, K) (and up, same shape and row stride), or None where it does not run."""
    if not use_triton(x, backend) or x.stride(-1) != 1 or (up is not None and up.stride() != x.stride()):
        return None
    T, K = x.shape
    y = torch.empty(T, K, device=x.device, dtype=out_dtype)
    block = min(1024, triton.next_power_of_2(K))
    _mask_kernel[(T, triton.cdiv(K, block))](
        x, up if up is not None else x, y, threshold, count if count is not None else y, K, x.stride(0),
        ACT=act_id, HAS_UP=up is not None, COUNT=count is not None, BLOCK=block, num_warps=4, **pdl_kwargs(x))
    return y


def mask_input(x: torch.Tensor, threshold: torch.Tensor, count: torch.Tensor | None = None,
               out_dtype: torch.dtype | None = None, backend: str = "auto") -> torch.Tensor:
    """x (T, K) -> x rounded to out_dtype (default x's) with |x| <= τ zeroed, in one kernel; count (1,) fp32: the
    kept pairs are added to it. A many-token step thresholds a projection input this way and then runs the dense
    GEMM on it: the mask path's own arithmetic, one pass over the weights for all tokens."""
    out_dtype = out_dtype or x.dtype
    y = _mask_launch(x, None, -1, threshold, count, out_dtype, backend)
    if y is not None:
        return y
    return counted_input_mask(x.to(out_dtype), threshold, count)


def act_mask_input(gate: torch.Tensor, up: torch.Tensor | None, act: str, threshold: torch.Tensor,
                   count: torch.Tensor | None = None, dtype: torch.dtype | None = None,
                   backend: str = "auto") -> torch.Tensor:
    """gate, up (T, F) (up None: a = act(gate)) -> a = act(gate) * up rounded to ``dtype`` at each step as the
    model computes it, with |a| <= τ zeroed: the down projection's thresholded input for a dense GEMM, in one
    kernel (no separate act, mul, cast and mask passes)."""
    if act not in ACTIVATIONS:
        raise ValueError(f"act must be one of {ACTIVATIONS}, got {act!r}")
    dtype = dtype or gate.dtype
    y = _mask_launch(gate, up, ACTIVATIONS.index(act), threshold, count, dtype, backend)
    if y is not None:
        return y
    a = apply_act(gate.to(dtype), act)
    a = (a if up is None else a * up.to(dtype)).to(dtype)
    return mask_input(a, threshold, count, dtype, backend="torch")
