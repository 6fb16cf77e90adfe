"""Write a window of recomputed keys and values into the static cache (lazy K/V for skipped heads).

    kv_window_write(kv, k_cache, v_cache, heads, positions, inv_freq)

kv: (B*W, 2*J*D) (rows may be strided: the K/V columns of a wider q/k/v output), the K/V projections of J kv
heads recomputed for the W positions of each sequence's input window (row b*W + w is sequence b at position
positions[w]; columns: the J heads' keys, then their values, in the order of ``heads``); k_cache / v_cache:
(B, KV, S, D) one layer of the cache; heads: (J,) int kv head ids; positions: (W,) int64; inv_freq: (D/2,) fp32
RoPE inverse frequencies, or None (OPT: no rotation).

One pass does what would otherwise take four kernels: RoPE on the keys (rotate-half form, angles in fp32), the
cast to the cache dtype, and the scatter of keys and values to [b, heads[j], positions[w]]. The torch fallback
is the reference.
"""
from __future__ import annotations

import torch

from .common import check_backend, tl, triton, use_triton
from .pdl import pdl_kwargs, pdl_launch_next, pdl_wait

if triton is not None:
    @triton.jit
    def _kv_window_kernel(kv_ptr, k_ptr, v_ptr, heads_ptr, pos_ptr, inv_freq_ptr, W, J, KV, S, row_stride,
                          HAS_ROPE: tl.constexpr, HALF: tl.constexpr, D: tl.constexpr, USE_PDL: tl.constexpr):
        pdl_wait(USE_PDL)
        row = tl.program_id(0)  # b * W + w
        j = tl.program_id(1)
        b = row // W
        p = tl.load(pos_ptr + row % W)
        h = tl.load(heads_ptr + j)
        offs = tl.arange(0, HALF)
        src = kv_ptr + row.to(tl.int64) * row_stride + j * D
        k1 = tl.load(src + offs).to(tl.float32)
        k2 = tl.load(src + HALF + offs).to(tl.float32)
        if HAS_ROPE:
            ang = p.to(tl.float32) * tl.load(inv_freq_ptr + offs)
            c, s = tl.cos(ang), tl.sin(ang)
            k1, k2 = k1 * c - k2 * s, k2 * c + k1 * s
        dst = ((b * KV + h).to(tl.int64) * S + p) * D
        pdl_launch_next(USE_PDL)
        tl.store(k_ptr + dst + offs, k1.to(k_ptr.dtype.element_ty))
        tl.store(k_ptr + dst + HALF + offs, k2.to(k_ptr.dtype.element_ty))
        vsrc = src + J * D
        tl.store(v_ptr + dst + offs, tl.load(vsrc + offs).to(v_ptr.dtype.element_ty))
        tl.store(v_ptr + dst + HALF + offs, tl.load(vsrc + HALF + offs).to(v_ptr.dtype.element_ty))


def kv_window_write_torch(kv, k_cache, v_cache, heads, positions, inv_freq=None):
    B, KV, S, D = k_cache.shape
    W, J = positions.shape[0], heads.shape[0]
    x = kv.reshape(B, W, 2, J, D)
    k, v = x[:, :, 0], x[:, :, 1]  # (B, W, J, D)
    if inv_freq is not None:
        ang = positions.float()[:, None] * inv_freq[None, :]  # (W, D/2)
        c, s = ang.cos()[None, :, None], ang.sin()[None, :, None]
        k1, k2 = k[..., :D // 2], k[..., D // 2:]
        k = torch.cat((k1 * c - k2 * s, k2 * c + k1 * s), dim=-1)
    hi, pi = heads.long()[:, None], positions.long()[None, :]  # (J, 1), (1, W): adjacent advanced indices
    k_cache[:, hi, pi] = k.transpose(1, 2).to(k_cache.dtype)  # (B, J, W, D)
    v_cache[:, hi, pi] = v.transpose(1, 2).to(v_cache.dtype)


def kv_window_write(kv, k_cache, v_cache, heads, positions, inv_freq=None, backend: str = "auto") -> None:
    """Scatter (and rotate) a window of recomputed K/V rows into one layer's cache, in place. Shapes above.
    A head listed twice is written twice with the same values (the engine's refresh set may overlap the
    selected heads)."""
    check_backend(backend)  # a bad backend is named before a bad shape
    B, KV, S, D = k_cache.shape
    W, J = positions.shape[0], heads.shape[0]
    if kv.shape != (B * W, 2 * J * D) or D % 2:
        raise ValueError(f"kv must be (B*W, 2*J*D) = ({B * W}, {2 * J * D}) with an even D, got {tuple(kv.shape)}")
    # the kernel needs a power-of-two half head; other head sizes take the fallback, even with backend="triton"
    # (tested before use_triton, so such heads never need the triton package)
    if (D // 2) & (D // 2 - 1) or not use_triton(kv, backend):
        return kv_window_write_torch(kv, k_cache, v_cache, heads, positions, inv_freq)
    if not (k_cache.is_contiguous() and v_cache.is_contiguous() and kv.stride(1) == 1):
        raise ValueError("kv_window_write needs contiguous caches and kv rows (a column slice of a wider output "
                         "is fine)")
    _kv_window_kernel[(B * W, J)](kv, k_cache, v_cache, heads, positions, inv_freq if inv_freq is not None else kv,
                                  W, J, KV, S, kv.stride(0), HAS_ROPE=inv_freq is not None, HALF=D // 2, D=D,
                                  num_warps=1, **pdl_kwargs(kv))
