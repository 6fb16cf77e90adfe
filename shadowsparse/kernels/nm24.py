"""2:4 weights at decode: GEMV / skinny GEMM over compressed 2:4 weights, composable with neuron skipping.

Format (compress_24): a row-major weight W (N, K) whose every group of 4 consecutive entries along a row holds at
most 2 nonzeros becomes
    values (N, K/2)   the 2 kept entries of each group, in position order
    meta   (N, K/32)  int32: per group a 4-bit code (bits 0-1: position of the first kept entry in its group,
                      bits 2-3: of the second), 8 groups per word, group g of a word at bits 4g..4g+3
so a row costs K·2·(1/2) + K/8 = 0.5625 of its fp16 bytes: a memory-bound GEMV can be at most 1.78x faster.

    nm24_linear(x, values, meta, rows=None, bias=None)   y = x · W[rows]ᵀ (+ b[rows])    x (T, K)  -> (T, R)
    nm24_linear_t(h, values, meta, rows, residual=None)  y = h · W_t[rows] (+ residual)  h (T, R)  -> (T, K)

rows (R,) selects whole rows (neurons): skipped neurons cost no bytes, as in ffn.py. For an FFN, the input
projections (gate/up, fc1; (F, d), 2:4 along d, the reduction dim) use nm24_linear, and the down projection stored
transposed (F, d) uses nm24_linear_t: its 2:4 groups run along d, the output dim of W_down — the pattern that lets a
skipped neuron skip a whole compressed row (a 2:4 along F would put skipped and kept neurons in one group).

The kernels never gather inside a group: for each of the 4 positions p they build the tile w_p[n, g] =
v0·[i0 = p] + v1·[i1 = p] with selects and multiply it with x[4g + p] (a strided load of x, cached) via tl.dot;
tokens are padded to 16. Torch fallbacks decompress the rows and multiply.
"""
from __future__ import annotations

import torch

from .ffn import triton

MAX_TOKENS = 16

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _unpack(v_ptr, m_ptr, rows, mask_r, c0, HALF_K, WORDS_K, G: tl.constexpr, BLOCK_R: tl.constexpr):
        """values/meta of rows (BLOCK_R,) for groups c0/4 .. c0/4 + G -> v0, v1 (BLOCK_R, G) and i0, i1 codes.
        Contiguous loads split in registers (measured faster than strided loads of v0 and v1 on an H100)."""
        offs_v = c0 // 2 + tl.arange(0, 2 * G)
        v = tl.load(v_ptr + rows[:, None] * HALF_K + offs_v[None, :],
                    mask=mask_r[:, None] & (offs_v < HALF_K)[None, :], other=0.0)
        v0, v1 = tl.split(tl.reshape(v, (BLOCK_R, G, 2)))
        offs_w = c0 // 32 + tl.arange(0, G // 8)
        words = tl.load(m_ptr + rows[:, None] * WORDS_K + offs_w[None, :],
                        mask=mask_r[:, None] & (offs_w < WORDS_K)[None, :], other=0)
        words = tl.reshape(tl.broadcast_to(words[:, :, None], (BLOCK_R, G // 8, 8)), (BLOCK_R, G))
        nib = (words >> ((tl.arange(0, G) % 8) * 4)[None, :]) & 15
        return v0, v1, nib & 3, (nib >> 2) & 3

    @triton.jit
    def _nm24_kernel(x_ptr, v_ptr, m_ptr, rows_ptr, b_ptr, y_ptr, T, R, K, HALF_K, WORDS_K,
                     HAS_BIAS: tl.constexpr, T_PAD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                     G: tl.constexpr):
        offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        mask_r = offs_r < R
        rows = tl.load(rows_ptr + offs_r, mask=mask_r, other=0).to(tl.int64)
        offs_t = tl.arange(0, T_PAD)
        mask_t = offs_t < T
        offs_g = tl.arange(0, G)
        acc = tl.zeros((T_PAD, BLOCK_R), dtype=tl.float32)
        for c0 in range(0, K, BLOCK_K):
            v0, v1, i0, i1 = _unpack(v_ptr, m_ptr, rows, mask_r, c0, HALF_K, WORDS_K, G, BLOCK_R)
            for p in tl.static_range(4):
                w_p = tl.where(i0 == p, v0, 0.0) + tl.where(i1 == p, v1, 0.0)  # (BLOCK_R, G)
                cols = c0 + 4 * offs_g + p
                x_p = tl.load(x_ptr + offs_t[:, None] * K + cols[None, :], mask=mask_t[:, None] & (cols < K)[None, :],
                              other=0.0)  # (T_PAD, G): inputs at position p of each group
                acc += tl.dot(x_p.to(w_p.dtype), tl.trans(w_p))
        if HAS_BIAS:
            acc += tl.load(b_ptr + rows, mask=mask_r, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + offs_t[:, None] * R + offs_r[None, :], acc, mask=mask_t[:, None] & mask_r[None, :])

    @triton.jit
    def _nm24_t_kernel(h_ptr, v_ptr, m_ptr, rows_ptr, y_ptr, T, R, K, HALF_K, WORDS_K, R_PER_SPLIT,
                       T_PAD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, G: tl.constexpr):
        c0 = tl.program_id(0) * BLOCK_K
        r_start = tl.program_id(1) * R_PER_SPLIT
        offs_t = tl.arange(0, T_PAD)
        mask_t = offs_t < T
        acc0 = tl.zeros((T_PAD, G), dtype=tl.float32)
        acc1 = tl.zeros((T_PAD, G), dtype=tl.float32)
        acc2 = tl.zeros((T_PAD, G), dtype=tl.float32)
        acc3 = tl.zeros((T_PAD, G), dtype=tl.float32)
        for r0 in range(r_start, r_start + R_PER_SPLIT, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            mask_r = (offs_r < R) & (offs_r < r_start + R_PER_SPLIT)
            rows = tl.load(rows_ptr + offs_r, mask=mask_r, other=0).to(tl.int64)
            v0, v1, i0, i1 = _unpack(v_ptr, m_ptr, rows, mask_r, c0, HALF_K, WORDS_K, G, BLOCK_R)
            hk = tl.load(h_ptr + offs_t[:, None] * R + offs_r[None, :], mask=mask_t[:, None] & mask_r[None, :],
                         other=0.0).to(v0.dtype)  # (T_PAD, BLOCK_R)
            acc0 += tl.dot(hk, tl.where(i0 == 0, v0, 0.0) + tl.where(i1 == 0, v1, 0.0))
            acc1 += tl.dot(hk, tl.where(i0 == 1, v0, 0.0) + tl.where(i1 == 1, v1, 0.0))
            acc2 += tl.dot(hk, tl.where(i0 == 2, v0, 0.0) + tl.where(i1 == 2, v1, 0.0))
            acc3 += tl.dot(hk, tl.where(i0 == 3, v0, 0.0) + tl.where(i1 == 3, v1, 0.0))
        out = y_ptr + offs_t[:, None] * K + c0 + 4 * tl.arange(0, G)[None, :]
        m2 = mask_t[:, None] & (c0 + 4 * tl.arange(0, G) < K)[None, :]
        tl.atomic_add(out, acc0, mask=m2)
        tl.atomic_add(out + 1, acc1, mask=m2)
        tl.atomic_add(out + 2, acc2, mask=m2)
        tl.atomic_add(out + 3, acc3, mask=m2)


def prune_24(w: torch.Tensor) -> torch.Tensor:
    """Magnitude 2:4 along the last dim: keep the 2 largest |w| of every 4 (N, K) -> (N, K), zeros elsewhere."""
    g = w.reshape(*w.shape[:-1], -1, 4)
    keep = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, g.abs().topk(2, dim=-1).indices, True)
    return (g * keep).reshape(w.shape)


def compress_24(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A 2:4 weight (N, K), K a multiple of 32 -> values (N, K/2), meta (N, K/32) int32 (format above)."""
    N, K = w.shape
    if K % 32:
        raise ValueError(f"2:4 compression needs the row length to be a multiple of 32, got {K}")
    g = w.reshape(N, K // 4, 4)
    nz = g != 0
    if (nz.sum(-1) > 2).any():
        raise ValueError("weight is not 2:4 sparse (a group of 4 has more than 2 nonzeros): prune it first "
                         "(prune_24 or shadowsparse.nm)")
    # the positions of the nonzeros first (then zero positions to fill), in increasing order within the group
    order = nz.float() * 8 - torch.arange(4, device=w.device)  # nonzeros rank first, then lower positions first
    pos = order.topk(2, dim=-1).indices.sort(-1).values  # (N, G, 2)
    values = g.gather(-1, pos).reshape(N, K // 2).contiguous()
    nib = (pos[..., 0] | (pos[..., 1] << 2)).reshape(N, K // 32, 8).to(torch.int64)  # (N, W, 8) 4-bit codes
    words = (nib << (4 * torch.arange(8, device=w.device))).sum(-1)
    words = torch.where(words >= 2 ** 31, words - 2 ** 32, words)  # as signed int32 bit patterns
    return values, words.to(torch.int32).contiguous()


def decompress_24(values: torch.Tensor, meta: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """values (N, K/2), meta (N, K/32) -> the dense (N, K) weight (or only ``rows``)."""
    if rows is not None:
        values, meta = values[rows.long()], meta[rows.long()]
    N, half = values.shape
    words = meta.to(torch.int64) & 0xFFFFFFFF
    nib = (words[..., None] >> (4 * torch.arange(8, device=meta.device))) & 15  # (N, W, 8)
    pos = torch.stack([nib & 3, nib >> 2], -1).reshape(N, half // 2, 2)  # (N, G, 2)
    dense = torch.zeros(N, half // 2, 4, dtype=values.dtype, device=values.device)
    dense.scatter_(-1, pos, values.reshape(N, half // 2, 2))
    return dense.reshape(N, 2 * half)


def _use_triton(x: torch.Tensor, backend: str) -> bool:
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    if backend == "triton" and triton is None:
        raise ValueError("backend='triton' needs the triton package: pip install triton")
    return (backend == "triton" or (backend == "auto" and triton is not None and x.is_cuda)) and \
        x.shape[0] <= MAX_TOKENS


def nm24_linear(x, values, meta, rows=None, bias=None, backend: str = "auto", block_r: int = 32,
                block_k: int = 256, warps: int = 4, stages: int = 3):
    """x (T, K) · W[rows]ᵀ + b[rows] over the compressed W (N, K) -> (T, R) in x's dtype (rows None: all N)."""
    N = values.shape[0]
    K = values.shape[1] * 2
    if rows is None:
        rows = torch.arange(N, device=x.device, dtype=torch.int32)
    if not _use_triton(x, backend):
        w = decompress_24(values, meta, rows)
        y = x.to(w.dtype) @ w.t()
        return (y if bias is None else y + bias[rows.long()]).to(x.dtype)
    T, R = x.shape[0], rows.shape[0]
    y = torch.empty(T, R, device=x.device, dtype=x.dtype)
    block_k = min(block_k, K)
    _nm24_kernel[(triton.cdiv(R, block_r),)](
        x.contiguous(), values, meta, rows.contiguous(), bias if bias is not None else x, y, T, R, K, K // 2, K // 32,
        HAS_BIAS=bias is not None, T_PAD=16, BLOCK_R=block_r, BLOCK_K=block_k, G=block_k // 4, num_warps=warps,
        num_stages=stages)
    return y


def nm24_linear_t(h, values, meta, rows, residual=None, backend: str = "auto", block_r: int = 32,
                  block_k: int = 128, splits: int | None = None, warps: int = 4, stages: int = 3):
    """h (T, R) · W_t[rows] over the compressed W_t (F, K) (+ residual (T, K)) -> (T, K) in h's (residual's) dtype."""
    out_dtype = residual.dtype if residual is not None else h.dtype
    K = values.shape[1] * 2
    if not _use_triton(h, backend):
        y = h.to(values.dtype) @ decompress_24(values, meta, rows)
        return (y if residual is None else residual + y).to(out_dtype)
    T, R = h.shape
    block_k = min(block_k, K)
    k_blocks = triton.cdiv(K, block_k)
    if splits is None:  # enough programs to fill the SMs a few times over
        sms = torch.cuda.get_device_properties(h.device).multi_processor_count if h.is_cuda else 8
        splits = max(1, min(triton.cdiv(4 * sms, k_blocks), triton.cdiv(R, block_r)))
    r_per_split = triton.cdiv(triton.cdiv(R, splits), block_r) * block_r
    y = torch.zeros(T, K, device=h.device, dtype=torch.float32) if residual is None else \
        residual.to(torch.float32, copy=True)
    _nm24_t_kernel[(k_blocks, triton.cdiv(R, r_per_split))](
        h.contiguous(), values, meta, rows.contiguous(), y, T, R, K, K // 2, K // 32, r_per_split, T_PAD=16,
        BLOCK_R=block_r, BLOCK_K=block_k, G=block_k // 4, num_warps=warps, num_stages=stages)
    return y.to(out_dtype)
