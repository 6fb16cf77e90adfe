"""Two small fused kernels of the decode step, so a captured step is a few large kernels and not dozens of tiny
elementwise ones (each costs a few microseconds even inside a CUDA graph):

  rms_norm(x, w, eps)            transformers' LlamaRMSNorm in one pass: fp32 mean of squares, x·rsqrt cast back to
                                 x's dtype, times the weight in that dtype. An fp32 weight with a narrower output is
                                 GemmaRMSNorm's order instead: x·rsqrt·w all in fp32, rounded once (the engine
                                 stores Gemma's 1 + w in fp32 for it; in fp32 both orders are one computation).
  layer_norm(x, w, b, eps)       nn.LayerNorm (OPT) in one pass, fp32 statistics.
  rope_(x, cos, sin, heads, D)   default RoPE applied in place to the first ``heads`` heads of each row of
                                 x (B·T, C), row r at table row r % T: out = x·cos + rotate_half(x)·sin.

Torch fallbacks (runtime/ops.py math) run on the CPU; the tests compare both.
"""
from __future__ import annotations

import torch

from .common import tl, triton, use_triton
from .pdl import pdl_kwargs, pdl_launch_next, pdl_wait
from .sparse_input import counted_input_mask

if triton is not None:
    @triton.jit
    def _dst_row(row, slot_ptr, W, HAS_SLOT: tl.constexpr):
        """The output row: row itself, or row's slot in a (rows, W, N) window (slot: a device value)."""
        dst = row.to(tl.int64)
        if HAS_SLOT:
            dst = dst * W + tl.load(slot_ptr)
        return dst

    @triton.jit
    def _load_row(x_ptr, N, BLOCK: tl.constexpr):
        """This program's row of x (rows of N) -> (row index, offsets (BLOCK,), mask (BLOCK,), the row in fp32):
        both norms read their row the same way (statistics in fp32 whatever x's dtype)."""
        row = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        m = offs < N
        xf = tl.load(x_ptr + row * N + offs, mask=m, other=0.0).to(tl.float32)
        return row, offs, m, xf

    @triton.jit
    def _threshold(y, m, thr_ptr, count_ptr, THR: tl.constexpr):
        """THR: y (the row in the output dtype) with |y| <= thr zeroed, the kept channels added to count_ptr (the
        input threshold of the projections that read this norm's output: engine.py, many-token steps)."""
        if THR:
            keep = (tl.abs(y.to(tl.float32)) > tl.load(thr_ptr)) & m
            tl.atomic_add(count_ptr, tl.sum(keep.to(tl.int32), axis=0).to(tl.float32))
            y = tl.where(keep, y, tl.zeros_like(y))
        return y

    @triton.jit
    def _rms_norm_kernel(x_ptr, w_ptr, y_ptr, slot_ptr, thr_ptr, count_ptr, N, W, eps, HAS_SLOT: tl.constexpr,
                         THR: tl.constexpr, W_FP32: tl.constexpr, BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
        pdl_wait(USE_PDL)
        row, offs, m, xf = _load_row(x_ptr, N, BLOCK)
        var = tl.sum(xf * xf, axis=0) / N
        w = tl.load(w_ptr + offs, mask=m, other=0.0)
        if W_FP32:  # Gemma: x·rsqrt·(1 + w) in fp32, one rounding (GemmaRMSNorm)
            y = (xf * tl.rsqrt(var + eps) * w).to(y_ptr.dtype.element_ty)
        else:
            normed = (xf * tl.rsqrt(var + eps)).to(y_ptr.dtype.element_ty)  # cast before the weight, as Llama
            y = (w * normed).to(y_ptr.dtype.element_ty)
        pdl_launch_next(USE_PDL)
        y = _threshold(y, m, thr_ptr, count_ptr, THR)
        tl.store(y_ptr + _dst_row(row, slot_ptr, W, HAS_SLOT).to(tl.int64) * N + offs, y, mask=m)

    @triton.jit
    def _layer_norm_kernel(x_ptr, w_ptr, b_ptr, y_ptr, slot_ptr, thr_ptr, count_ptr, N, W, eps,
                           HAS_SLOT: tl.constexpr, THR: tl.constexpr, BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
        pdl_wait(USE_PDL)
        row, offs, m, xf = _load_row(x_ptr, N, BLOCK)
        mean = tl.sum(xf, axis=0) / N
        xc = tl.where(m, xf - mean, 0.0)
        var = tl.sum(xc * xc, axis=0) / N
        w = tl.load(w_ptr + offs, mask=m, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + offs, mask=m, other=0.0).to(tl.float32)
        dst = y_ptr + _dst_row(row, slot_ptr, W, HAS_SLOT).to(tl.int64) * N
        pdl_launch_next(USE_PDL)
        y = _threshold((xc * tl.rsqrt(var + eps) * w + b).to(y_ptr.dtype.element_ty), m, thr_ptr, count_ptr, THR)
        tl.store(dst + offs, y, mask=m)

    @triton.jit
    def _rope_kernel(x_ptr, cos_ptr, sin_ptr, T, C, HALF: tl.constexpr, HALF_PAD: tl.constexpr, D: tl.constexpr,
                     USE_PDL: tl.constexpr):
        pdl_wait(USE_PDL)
        row = tl.program_id(0)
        head = tl.program_id(1)
        t = row % T
        offs = tl.arange(0, HALF_PAD)  # a half head padded to a power of two (Phi-3-mini: D = 96, half 48)
        m = offs < HALF
        base = x_ptr + row.to(tl.int64) * C + head * D
        x1 = tl.load(base + offs, mask=m, other=0.0).to(tl.float32)
        x2 = tl.load(base + HALF + offs, mask=m, other=0.0).to(tl.float32)
        c1 = tl.load(cos_ptr + t * D + offs, mask=m, other=0.0).to(tl.float32)
        c2 = tl.load(cos_ptr + t * D + HALF + offs, mask=m, other=0.0).to(tl.float32)
        s1 = tl.load(sin_ptr + t * D + offs, mask=m, other=0.0).to(tl.float32)
        s2 = tl.load(sin_ptr + t * D + HALF + offs, mask=m, other=0.0).to(tl.float32)
        pdl_launch_next(USE_PDL)
        tl.store(base + offs, (x1 * c1 - x2 * s1).to(x_ptr.dtype.element_ty), mask=m)
        tl.store(base + HALF + offs, (x2 * c2 + x1 * s2).to(x_ptr.dtype.element_ty), mask=m)


def rms_norm_torch(x, weight, eps, out_dtype=None):
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if weight.dtype == torch.float32:  # Gemma's order: the product in fp32, one rounding (module docstring)
        return (weight * xf).to(out_dtype or x.dtype)
    return weight * xf.to(out_dtype or x.dtype)


def _into_window(y: torch.Tensor, window, slot) -> torch.Tensor:
    """Torch path of ``window=``: y (B, 1, N) stored at window[:, slot] (window (B, W, N)); returns window."""
    window.index_copy_(1, slot.reshape(1), y.reshape(window.shape[0], 1, -1).to(window.dtype))
    return window


def _threshold_torch(y, threshold, count):
    """The torch twin of _threshold: y with |y| <= τ zeroed and the kept entries counted (sparse_input's rule)."""
    return y if threshold is None else counted_input_mask(y, threshold, count)


def _check_threshold(threshold, window):
    if threshold is not None and (threshold.numel() != 1 or window is not None):
        raise ValueError("threshold must be a one-element tensor, and it does not combine with window=")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, backend: str = "auto",
             out_dtype: torch.dtype | None = None, window: torch.Tensor | None = None,
             slot: torch.Tensor | None = None, threshold: torch.Tensor | None = None,
             count: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., N) -> (..., N) in out_dtype (default x's: an fp32 residual stream gives fp16 normed inputs).
    window (B, W, N), slot (1,) int64 on device: x is (B, 1, N) and row b is written to window[b, slot] instead
    (lazy K/V's input window, engine.py); returns window. threshold (1,) fp32: outputs with |y| <= τ are zeroed
    (the input threshold of the projections reading y) and the kept ones added to count (1,) fp32. weight (N,) in
    the output dtype (Llama: the normed row rounded, then scaled) or fp32 (Gemma's 1 + w: scaled, then rounded)."""
    _check_threshold(threshold, window)
    if not use_triton(x, backend):
        y = _threshold_torch(rms_norm_torch(x, weight, eps, out_dtype), threshold, count)
        return y if window is None else _into_window(y, window, slot)
    N = x.shape[-1]
    xc = x.contiguous()
    y = torch.empty(xc.shape, dtype=out_dtype or xc.dtype, device=xc.device) if window is None else window
    _rms_norm_kernel[(xc.numel() // N,)](xc, weight, y, slot if window is not None else xc,
                                         threshold if threshold is not None else xc,
                                         count if count is not None else y, N,
                                         1 if window is None else window.shape[1], eps, HAS_SLOT=window is not None,
                                         THR=threshold is not None, W_FP32=weight.dtype == torch.float32,
                                         BLOCK=triton.next_power_of_2(N),
                                         num_warps=8 if N >= 4096 else 4, **pdl_kwargs(xc))
    return y


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
               backend: str = "auto", out_dtype: torch.dtype | None = None, window: torch.Tensor | None = None,
               slot: torch.Tensor | None = None, threshold: torch.Tensor | None = None,
               count: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., N) -> (..., N): nn.LayerNorm's math (fp32 statistics, affine in fp32, one rounding). torch's own
    kernel takes ~10 us for one 5120-wide row on an H100 (one block per row); this one ~3 us. threshold, count:
    as rms_norm."""
    _check_threshold(threshold, window)
    if not use_triton(x, backend):
        if out_dtype is None or out_dtype == x.dtype:
            y = torch.nn.functional.layer_norm(x, (x.shape[-1],), weight, bias, eps)
        else:
            y = torch.nn.functional.layer_norm(x.float(), (x.shape[-1],), weight.float(), bias.float(),
                                               eps).to(out_dtype)
        y = _threshold_torch(y, threshold, count)
        return y if window is None else _into_window(y, window, slot)
    N = x.shape[-1]
    xc = x.contiguous()
    y = torch.empty(xc.shape, dtype=out_dtype or xc.dtype, device=xc.device) if window is None else window
    _layer_norm_kernel[(xc.numel() // N,)](xc, weight, bias, y, slot if window is not None else xc,
                                           threshold if threshold is not None else xc,
                                           count if count is not None else y, N,
                                           1 if window is None else window.shape[1], eps,
                                           HAS_SLOT=window is not None, THR=threshold is not None,
                                           BLOCK=triton.next_power_of_2(N), num_warps=8 if N >= 4096 else 4,
                                           **pdl_kwargs(xc))
    return y


def rope_torch_(x, cos, sin, heads, head_dim, T):
    n, C = x.shape
    v = x.view(n // T, T, C)[..., :heads * head_dim].unflatten(-1, (heads, head_dim))  # (B, T, heads, D)
    half = head_dim // 2
    rotated = torch.cat((-v[..., half:], v[..., :half]), dim=-1)
    v.copy_(v * cos[None, :, None] + rotated * sin[None, :, None])
    return x


def rope_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, head_dim: int, T: int,
          backend: str = "auto") -> torch.Tensor:
    """In place on x (B*T, C) contiguous rows; cos/sin (T, D) in x's dtype. Returns x."""
    if not use_triton(x, backend):
        return rope_torch_(x, cos, sin, heads, head_dim, T)
    n, C = x.shape
    _rope_kernel[(n, heads)](x, cos.contiguous(), sin.contiguous(), T, C, HALF=head_dim // 2,
                             HALF_PAD=triton.next_power_of_2(head_dim // 2), D=head_dim, num_warps=1, **pdl_kwargs(x))
    return x
