"""2:4 weights at decode: GEMV / skinny GEMM over compressed 2:4 weights, composable with neuron skipping.

Format (compress_24): a row-major weight W (N, K) whose every group of 4 consecutive entries along a row holds at
most 2 nonzeros becomes
    values (N, K/2)   the 2 kept entries of each group, in position order
    meta   (N, K/32)  int32: per group a 4-bit mask of the two kept positions (bit p: position p holds a kept
                      value; groups with fewer nonzeros keep zeros at the lowest free positions), 8 groups per
                      word, group g of a word at bits 4g..4g+3
so a row costs K·2·(1/2) + K/8 = 0.5625 of its fp16 bytes: a memory-bound GEMV can be at most 1.78x faster.

    nm24_linear(x, values, meta, rows=None, bias=None)   y = x · W[rows]ᵀ (+ b[rows])    x (T, K)  -> (T, R)
    nm24_linear_t(h, values, meta, rows, residual=None)  y = h · W_t[rows] (+ residual)  h (T, R)  -> (T, K)

rows (R,) selects whole rows (neurons): skipped neurons cost no bytes, as in ffn.py. For an FFN, the input
projections (gate/up, fc1; (F, d), 2:4 along d, the reduction dim) use nm24_linear, and the down projection stored
transposed (F, d) uses nm24_linear_t: its 2:4 groups run along d, the output dim of W_down — the pattern that lets a
skipped neuron skip a whole compressed row (a 2:4 along F would put skipped and kept neurons in one group).

At batch 1 the kernels are ALU-bound, not memory-bound (decoding costs more instructions per byte than a dense
GEMV), so the format is chosen for the fewest instructions per kept value. With a position mask, every decision
is one bit test against a per-column constant mask (no shifts, no extraction): the first value's input is
x0, x1 or x2 (bits 0, 1), the second's x3, x2 or x1 (bits 3, 2); in the transposed kernel a position's
accumulator takes the first or second product by the same tests. One token runs FMA kernels (no tensor cores:
one token would be padded to 16 and the tiles would need layout shuffles); 2..16 tokens build one masked tile per
position and use tl.dot. Torch fallbacks decompress the rows and multiply.
"""
from __future__ import annotations

import torch

from .common import fp32_accumulator, reduction_splits, split_length, tl, triton, use_triton
from .ffn import ACTIVATIONS, apply_act
from .pdl import pdl_kwargs, pdl_launch_next, pdl_wait

MAX_TOKENS = 16
# (block_r, block_k, warps, stages) of the tl.dot kernels (2..16 tokens)
DOT_DEFAULTS = (32, 256, 4, 3)
DOT_T_DEFAULTS = (32, 128, 4, 3)
# (block_r, groups per chunk, warps, stages, META_DUP) of the one-token FMA kernels; the transposed one adds SUM3
# (_nm24_gemv_t_kernel)
GEMV_DEFAULTS = (4, 256, 4, 3, False)  # best of benchmarks/nm24_kernel.py on an H100 (OPT-13B and Llama-2-7B)
GEMV_T_DEFAULTS = (8, 128, 4, 3, False, True)

if triton is not None:
    from .ffn import apply_act_tl  # the FFN activations inside a kernel, as gated_ffn's

    @triton.jit
    def _load_groups(v_ptr, m_ptr, rows, mask_r, g0, HALF_K, WORDS_K, G: tl.constexpr, BLOCK_R: tl.constexpr,
                     META_DUP: tl.constexpr):
        """Rows (BLOCK_R,) at groups g0 .. g0 + G - 1 (g0 a multiple of 8) -> values (BLOCK_R, 2G) (pairs
        adjacent, one contiguous load per row) and the code words (BLOCK_R, G), each group's word at its column.
        META_DUP: each group loads its own word (8 lanes read one address, an L1 hit), so no register tile is
        reshaped; otherwise one load per word, broadcast to its 8 groups in registers."""
        gi = g0 + tl.arange(0, G)
        offs_v = 2 * g0 + tl.arange(0, 2 * G)
        v = tl.load(v_ptr + rows[:, None] * HALF_K + offs_v[None, :],
                    mask=mask_r[:, None] & (offs_v < HALF_K)[None, :], other=0.0)
        if META_DUP:
            words = tl.load(m_ptr + rows[:, None] * WORDS_K + (gi // 8)[None, :],
                            mask=mask_r[:, None] & (gi < HALF_K // 2)[None, :], other=0)
        else:
            offs_w = g0 // 8 + tl.arange(0, G // 8)
            words = tl.load(m_ptr + rows[:, None] * WORDS_K + offs_w[None, :],
                            mask=mask_r[:, None] & (offs_w < WORDS_K)[None, :], other=0)
            words = tl.reshape(tl.broadcast_to(words[:, :, None], (BLOCK_R, G // 8, 8)), (BLOCK_R, G))
        return v, words

    @triton.jit
    def _position_bits(G: tl.constexpr):
        """Per column of a (., G) tile of groups: the word bits of positions 0..3 (group g of a word at 4g)."""
        sh = (tl.arange(0, G) % 8) * 4
        return (1 << sh)[None, :], (2 << sh)[None, :], (4 << sh)[None, :], (8 << sh)[None, :]

    @triton.jit
    def _split_pairs(v, BLOCK_R: tl.constexpr, G: tl.constexpr):
        return tl.split(tl.reshape(v, (BLOCK_R, G, 2)))

    @triton.jit
    def _position_tiles(v0, v1, words, b0, b1, b2, b3):
        """The dense entries of positions 0..3 of each group: (BLOCK_R, G) each (tl.dot kernels)."""
        k0 = (words & b0) != 0
        k3 = (words & b3) != 0
        w0 = tl.where(k0, v0, 0.0)
        w1 = tl.where((words & b1) != 0, tl.where(k0, v1, v0), 0.0)
        w2 = tl.where((words & b2) != 0, tl.where(k3, v0, v1), 0.0)
        w3 = tl.where(k3, v1, 0.0)
        return w0, w1, w2, w3

    @triton.jit
    def _nm24_kernel(x_ptr, v_ptr, m_ptr, rows_ptr, b_ptr, y_ptr, T, R, K, HALF_K, WORDS_K,
                     HAS_BIAS: tl.constexpr, T_PAD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                     G: tl.constexpr, USE_PDL: tl.constexpr):
        """2..16 tokens: per position p, the masked tile w_p (BLOCK_R, G) times x[:, 4g + p] with tl.dot."""
        pdl_wait(USE_PDL)
        offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        mask_r = offs_r < R
        rows = tl.load(rows_ptr + offs_r, mask=mask_r, other=0).to(tl.int64)
        offs_t = tl.arange(0, T_PAD)
        mask_t = offs_t < T
        offs_g = tl.arange(0, G)
        b0, b1, b2, b3 = _position_bits(G)
        acc = tl.zeros((T_PAD, BLOCK_R), dtype=tl.float32)
        for c0 in range(0, K, BLOCK_K):
            v, words = _load_groups(v_ptr, m_ptr, rows, mask_r, c0 // 4, HALF_K, WORDS_K, G, BLOCK_R, False)
            v0, v1 = _split_pairs(v, BLOCK_R, G)
            w0, w1, w2, w3 = _position_tiles(v0, v1, words, b0, b1, b2, b3)
            cols = c0 + 4 * offs_g
            xp = x_ptr + offs_t[:, None] * K + cols[None, :]
            mx = mask_t[:, None] & (cols < K)[None, :]
            acc += tl.dot(tl.load(xp, mask=mx, other=0.0).to(v.dtype), tl.trans(w0))
            acc += tl.dot(tl.load(xp + 1, mask=mx, other=0.0).to(v.dtype), tl.trans(w1))
            acc += tl.dot(tl.load(xp + 2, mask=mx, other=0.0).to(v.dtype), tl.trans(w2))
            acc += tl.dot(tl.load(xp + 3, mask=mx, other=0.0).to(v.dtype), tl.trans(w3))
        pdl_launch_next(USE_PDL)
        if HAS_BIAS:
            acc += tl.load(b_ptr + rows, mask=mask_r, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + offs_t[:, None] * R + offs_r[None, :], acc, mask=mask_t[:, None] & mask_r[None, :])

    @triton.jit
    def _nm24_t_kernel(h_ptr, v_ptr, m_ptr, rows_ptr, b_ptr, y_ptr, T, R, K, HALF_K, WORDS_K, R_PER_SPLIT,
                       HAS_BIAS: tl.constexpr, T_PAD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                       G: tl.constexpr, USE_PDL: tl.constexpr):
        """2..16 tokens, transposed weight: acc_p (T, G) += h (T, BLOCK_R) · w_p (BLOCK_R, G) with tl.dot."""
        pdl_wait(USE_PDL)
        c0 = tl.program_id(0) * BLOCK_K
        r_start = tl.program_id(1) * R_PER_SPLIT
        offs_t = tl.arange(0, T_PAD)
        mask_t = offs_t < T
        b0, b1, b2, b3 = _position_bits(G)
        acc0 = tl.zeros((T_PAD, G), dtype=tl.float32)
        acc1 = tl.zeros((T_PAD, G), dtype=tl.float32)
        acc2 = tl.zeros((T_PAD, G), dtype=tl.float32)
        acc3 = tl.zeros((T_PAD, G), dtype=tl.float32)
        for r0 in range(r_start, r_start + R_PER_SPLIT, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            mask_r = (offs_r < R) & (offs_r < r_start + R_PER_SPLIT)
            rows = tl.load(rows_ptr + offs_r, mask=mask_r, other=0).to(tl.int64)
            v, words = _load_groups(v_ptr, m_ptr, rows, mask_r, c0 // 4, HALF_K, WORDS_K, G, BLOCK_R, False)
            v0, v1 = _split_pairs(v, BLOCK_R, G)
            w0, w1, w2, w3 = _position_tiles(v0, v1, words, b0, b1, b2, b3)
            hk = tl.load(h_ptr + offs_t[:, None] * R + offs_r[None, :], mask=mask_t[:, None] & mask_r[None, :],
                         other=0.0).to(v.dtype)  # (T_PAD, BLOCK_R)
            acc0 += tl.dot(hk, w0)
            acc1 += tl.dot(hk, w1)
            acc2 += tl.dot(hk, w2)
            acc3 += tl.dot(hk, w3)
        pdl_launch_next(USE_PDL)
        cols = c0 + 4 * tl.arange(0, G)
        _add_positions(y_ptr + offs_t[:, None] * K + cols[None, :], mask_t[:, None] & (cols < K)[None, :],
                       b_ptr + cols[None, :], HAS_BIAS, acc0, acc1, acc2, acc3)

    @triton.jit
    def _add_positions(out, mask, bias, HAS_BIAS: tl.constexpr, acc0, acc1, acc2, acc3):
        """Atomic adds of the four positions' accumulators into out (the columns of position 0) + p, with the
        bias (at the same columns of bias) added by the first row split only."""
        if HAS_BIAS:
            first = (tl.program_id(1) == 0).to(tl.float32)
            acc0 += first * tl.load(bias, mask=mask, other=0.0).to(tl.float32)
            acc1 += first * tl.load(bias + 1, mask=mask, other=0.0).to(tl.float32)
            acc2 += first * tl.load(bias + 2, mask=mask, other=0.0).to(tl.float32)
            acc3 += first * tl.load(bias + 3, mask=mask, other=0.0).to(tl.float32)
        tl.atomic_add(out, acc0, mask=mask)
        tl.atomic_add(out + 1, acc1, mask=mask)
        tl.atomic_add(out + 2, acc2, mask=mask)
        tl.atomic_add(out + 3, acc3, mask=mask)

    @triton.jit
    def _gemv_groups(v, words, x0, x1, x2, x3, b0, b1, b2, b3, BLOCK_R: tl.constexpr, G: tl.constexpr):
        """(BLOCK_R, G) fp32 partial products v0·x[4g + i0] + v1·x[4g + i1]: each kept value picks its input with
        two bit tests and two selects (module docstring)."""
        v0, v1 = _split_pairs(v, BLOCK_R, G)
        xs0 = tl.where((words & b0) != 0, x0, tl.where((words & b1) != 0, x1, x2))
        xs1 = tl.where((words & b3) != 0, x3, tl.where((words & b2) != 0, x2, x1))
        return v0.to(tl.float32) * xs0 + v1.to(tl.float32) * xs1

    @triton.jit
    def _nm24_gemv_kernel(x_ptr, v_ptr, m_ptr, u_ptr, um_ptr, rows_ptr, b_ptr, y_ptr, R, K, HALF_K, WORDS_K,
                          HAS_BIAS: tl.constexpr, HAS_UP: tl.constexpr, ACT: tl.constexpr, BLOCK_R: tl.constexpr,
                          G: tl.constexpr, META_DUP: tl.constexpr, USE_PDL: tl.constexpr):
        """One token: y[r] = sum_g v0·x[4g + i0] + v1·x[4g + i1] with fp32 FMAs into a (BLOCK_R, G) accumulator
        reduced once at the end; x's four positions are loaded once per chunk and shared by the rows. An FFN's
        input side in one pass: + b, act (ACT >= 0, ffn.ACTIVATIONS), times the same rows of a second compressed
        matrix (HAS_UP: SwiGLU's up projection)."""
        pdl_wait(USE_PDL)
        offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        mask_r = offs_r < R
        rows = tl.load(rows_ptr + offs_r, mask=mask_r, other=0).to(tl.int64)
        offs_g = tl.arange(0, G)
        b0, b1, b2, b3 = _position_bits(G)
        acc = tl.zeros((BLOCK_R, G), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_R, G), dtype=tl.float32)
        for c0 in range(0, K, 4 * G):
            cols = c0 + 4 * offs_g
            mask_c = cols < K
            x0 = tl.load(x_ptr + cols, mask=mask_c, other=0.0).to(tl.float32)[None, :]
            x1 = tl.load(x_ptr + cols + 1, mask=mask_c, other=0.0).to(tl.float32)[None, :]
            x2 = tl.load(x_ptr + cols + 2, mask=mask_c, other=0.0).to(tl.float32)[None, :]
            x3 = tl.load(x_ptr + cols + 3, mask=mask_c, other=0.0).to(tl.float32)[None, :]
            v, words = _load_groups(v_ptr, m_ptr, rows, mask_r, c0 // 4, HALF_K, WORDS_K, G, BLOCK_R, META_DUP)
            acc += _gemv_groups(v, words, x0, x1, x2, x3, b0, b1, b2, b3, BLOCK_R, G)
            if HAS_UP:
                v, words = _load_groups(u_ptr, um_ptr, rows, mask_r, c0 // 4, HALF_K, WORDS_K, G, BLOCK_R,
                                        META_DUP)
                acc_u += _gemv_groups(v, words, x0, x1, x2, x3, b0, b1, b2, b3, BLOCK_R, G)
        pdl_launch_next(USE_PDL)
        y = tl.sum(acc, axis=1)
        if HAS_BIAS:
            y += tl.load(b_ptr + rows, mask=mask_r, other=0.0).to(tl.float32)
        if ACT >= 0:
            y = apply_act_tl(y, ACT)
        if HAS_UP:
            y = y * tl.sum(acc_u, axis=1)
        tl.store(y_ptr + offs_r, y, mask=mask_r)

    @triton.jit
    def _nm24_gemv_t_kernel(h_ptr, v_ptr, m_ptr, rows_ptr, b_ptr, y_ptr, R, K, HALF_K, WORDS_K, R_PER_SPLIT,
                            HAS_BIAS: tl.constexpr, BLOCK_R: tl.constexpr, G: tl.constexpr, META_DUP: tl.constexpr,
                            SUM3: tl.constexpr, USE_PDL: tl.constexpr):
        """One token, transposed weight: y[4g + p] += sum_r h[r]·W_t[r, 4g + p] over this program's rows. Both
        products h·v of a group come from one packed fp16 multiply (one rounding, as the fp16 weight itself) and
        go to the fp32 accumulator of their position by bit tests ((BLOCK_R, G) accumulators, reduced over rows
        once), then four strided atomic adds per program. SUM3: position 2 is not accumulated but recovered as the
        group's total minus the other three (one accumulator of a0 + a1 instead of two tests and two selects)."""
        pdl_wait(USE_PDL)
        g0 = tl.program_id(0) * G
        gi = g0 + tl.arange(0, G)
        r_start = tl.program_id(1) * R_PER_SPLIT
        b0, b1, b2, b3 = _position_bits(G)
        acc0 = tl.zeros((BLOCK_R, G), dtype=tl.float32)
        acc1 = tl.zeros((BLOCK_R, G), dtype=tl.float32)
        acc2 = tl.zeros((BLOCK_R, G), dtype=tl.float32)  # SUM3: the total of both products
        acc3 = tl.zeros((BLOCK_R, G), dtype=tl.float32)
        for r0 in range(r_start, r_start + R_PER_SPLIT, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            mask_r = (offs_r < R) & (offs_r < r_start + R_PER_SPLIT)
            rows = tl.load(rows_ptr + offs_r, mask=mask_r, other=0).to(tl.int64)
            v, words = _load_groups(v_ptr, m_ptr, rows, mask_r, g0, HALF_K, WORDS_K, G, BLOCK_R, META_DUP)
            hk = tl.load(h_ptr + offs_r, mask=mask_r, other=0.0)[:, None]  # (BLOCK_R, 1)
            a0, a1 = _split_pairs(v * hk.to(v.dtype), BLOCK_R, G)
            a0 = a0.to(tl.float32)
            a1 = a1.to(tl.float32)
            if SUM3:
                k0 = (words & b0) != 0
                k3 = (words & b3) != 0
                acc0 += tl.where(k0, a0, 0.0)
                acc1 += tl.where((words & b1) != 0, tl.where(k0, a1, a0), 0.0)
                acc2 += a0 + a1
                acc3 += tl.where(k3, a1, 0.0)
            else:
                w0, w1, w2, w3 = _position_tiles(a0, a1, words, b0, b1, b2, b3)
                acc0 += w0
                acc1 += w1
                acc2 += w2
                acc3 += w3
        pdl_launch_next(USE_PDL)
        y0, y1, y2, y3 = tl.sum(acc0, axis=0), tl.sum(acc1, axis=0), tl.sum(acc2, axis=0), tl.sum(acc3, axis=0)
        if SUM3:
            y2 = y2 - y0 - y1 - y3
        _add_positions(y_ptr + 4 * gi, gi < K // 4, b_ptr + 4 * gi, HAS_BIAS, y0, y1, y2, y3)


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
                         "(prune_24 or shadowsparse.prune.sparsify_)")
    # the positions of the nonzeros first (then zero positions to fill), in increasing order within the group
    order = nz.float() * 8 - torch.arange(4, device=w.device)  # nonzeros rank first, then lower positions first
    pos = order.topk(2, dim=-1).indices.sort(-1).values  # (N, G, 2)
    values = g.gather(-1, pos).reshape(N, K // 2).contiguous()
    nib = ((1 << pos[..., 0]) | (1 << pos[..., 1])).reshape(N, K // 32, 8).to(torch.int64)  # (N, W, 8) masks
    words = (nib << (4 * torch.arange(8, device=w.device))).sum(-1)
    words = torch.where(words >= 2 ** 31, words - 2 ** 32, words)  # as signed int32 bit patterns
    return values, words.to(torch.int32).contiguous()


def decompress_24(values: torch.Tensor, meta: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """values (N, K/2), meta (N, K/32) -> the dense (N, K) weight (or only ``rows``)."""
    if rows is not None:
        values, meta = values[rows.long()], meta[rows.long()]
    N, half = values.shape
    words = meta.to(torch.int64) & 0xFFFFFFFF
    nib = ((words[..., None] >> (4 * torch.arange(8, device=meta.device))) & 15).reshape(N, half // 2)  # (N, G)
    bits = (nib[..., None] >> torch.arange(4, device=meta.device)) & 1  # (N, G, 4)
    if (bits.sum(-1) != 2).any():
        raise ValueError("meta is not a 2:4 position mask (a group's 4 bits must have exactly 2 set): compress the "
                         "weight with compress_24")
    pos = bits.nonzero()[:, 2].reshape(N, half // 2, 2)  # the two set positions of each group, ascending
    dense = torch.zeros(N, half // 2, 4, dtype=values.dtype, device=values.device)
    dense.scatter_(-1, pos, values.reshape(N, half // 2, 2))
    return dense.reshape(N, 2 * half)


def _groups(groups: int, K: int) -> int:
    """Groups of 4 per program chunk: the configured number, or fewer for short rows, a power of two (tl.arange)
    and a multiple of 8 (one code word); a row's last chunk is masked."""
    return max(8, min(groups, triton.next_power_of_2(K // 4)))


def nm24_linear(x, values, meta, rows=None, bias=None, backend: str = "auto", config: tuple | None = None,
                act: str | None = None, up: tuple | None = None):
    """x (T, K) · W[rows]ᵀ + b[rows] over the compressed W (N, K) -> (T, R) in x's dtype (rows None: all N).
    act (one of ffn.ACTIVATIONS) and up (values, meta of a second compressed (N, K) matrix) make it an FFN's input
    side: act(x·W[rows]ᵀ + b) · (x·U[rows]ᵀ). One token takes the FMA kernel, everything in one pass (config:
    GEMV_DEFAULTS' fields); 2..16 tokens the tl.dot one per matrix (DOT_DEFAULTS'), act and product in torch."""
    N = values.shape[0]
    K = values.shape[1] * 2
    if act is not None and act not in ACTIVATIONS:
        raise ValueError(f"act must be one of {ACTIVATIONS} or None, got {act!r}")
    if rows is None:
        rows = torch.arange(N, device=x.device, dtype=torch.int32)
    T, R = x.shape[0], rows.shape[0]
    if use_triton(x, backend) and T == 1:
        y = torch.empty(T, R, device=x.device, dtype=x.dtype)
        block_r, groups, warps, stages, meta_dup = config or GEMV_DEFAULTS
        u, um = up if up is not None else (values, meta)
        _nm24_gemv_kernel[(triton.cdiv(R, block_r),)](
            x.contiguous(), values, meta, u, um, rows.contiguous(), bias if bias is not None else x, y, R, K, K // 2,
            K // 32, HAS_BIAS=bias is not None, HAS_UP=up is not None,
            ACT=-1 if act is None else ACTIVATIONS.index(act), BLOCK_R=block_r, G=_groups(groups, K),
            META_DUP=meta_dup, num_warps=warps, num_stages=stages, **pdl_kwargs(x))
        return y
    y = _nm24_linear_tokens(x, values, meta, rows, bias, backend, config)
    if act is not None:
        y = apply_act(y, act)
    return y if up is None else y * _nm24_linear_tokens(x, *up, rows, None, backend, config)


def _nm24_linear_tokens(x, values, meta, rows, bias, backend, config):
    """nm24_linear without act/up for any token count: the tl.dot kernel (2..16 tokens) or the torch fallback."""
    K = values.shape[1] * 2
    if not (use_triton(x, backend) and x.shape[0] <= MAX_TOKENS):  # the kernels pad tokens to 16
        w = decompress_24(values, meta, rows)
        y = x.to(w.dtype) @ w.t()
        return (y if bias is None else y + bias[rows.long()]).to(x.dtype)
    T, R = x.shape[0], rows.shape[0]
    y = torch.empty(T, R, device=x.device, dtype=x.dtype)
    if config is not None and len(config) != 4:
        raise ValueError(f"a 2:4 config for 2..16 tokens is (block_r, block_k, warps, stages), got {config}")
    block_r, block_k, warps, stages = config or DOT_DEFAULTS
    block_k = 4 * _groups(block_k // 4, K)
    _nm24_kernel[(triton.cdiv(R, block_r),)](
        x.contiguous(), values, meta, rows.contiguous(), bias if bias is not None else x, y, T, R, K, K // 2,
        K // 32, HAS_BIAS=bias is not None, T_PAD=16, BLOCK_R=block_r, BLOCK_K=block_k, G=block_k // 4,
        num_warps=warps, num_stages=stages, **pdl_kwargs(x))
    return y


def nm24_linear_t(h, values, meta, rows, residual=None, bias=None, out=None, backend: str = "auto",
                  config: tuple | None = None, splits: int | None = None):
    """h (T, R) · W_t[rows] (+ bias (K,)) over the compressed W_t (F, K) -> (T, K), in residual's dtype with
    residual (T, K) added, else h's. out (T, K) fp32 contiguous: the result is added into it in place (an fp32
    residual stream) and it is returned. One token takes the FMA kernel (config: GEMV_T_DEFAULTS' fields), 2..16
    the tl.dot one (DOT_T_DEFAULTS'); the rows are split over programs (fp32 atomics) until about 4 programs run per
    SM, or into ``splits``."""
    out_dtype = residual.dtype if residual is not None else h.dtype
    K = values.shape[1] * 2
    if not (use_triton(h, backend) and h.shape[0] <= MAX_TOKENS):
        y = h.to(values.dtype) @ decompress_24(values, meta, rows)
        y = y if bias is None else y + bias
        if out is not None:
            return out.add_(y)
        return (y if residual is None else residual + y).to(out_dtype)
    T, R = h.shape
    one = T == 1
    if one:
        block_r, groups, warps, stages, meta_dup, sum3 = config or GEMV_T_DEFAULTS
        block_k = 4 * _groups(groups, K)
    else:
        block_r, block_k, warps, stages = config or DOT_T_DEFAULTS
        block_k = 4 * _groups(block_k // 4, K)
    k_blocks = triton.cdiv(K, block_k)
    if splits is None:
        splits = reduction_splits(h, k_blocks, triton.cdiv(R, block_r))
    r_per_split = split_length(R, splits, block_r)
    y = fp32_accumulator(out, residual, T, K, h.device)  # (T, K) fp32: out, a copy of residual, or zeros
    args = (h.contiguous(), values, meta, rows.contiguous(), bias if bias is not None else y, y)
    grid = (k_blocks, triton.cdiv(R, r_per_split))
    if one:
        _nm24_gemv_t_kernel[grid](*args, R, K, K // 2, K // 32, r_per_split, HAS_BIAS=bias is not None,
                                  BLOCK_R=block_r, G=block_k // 4, META_DUP=meta_dup, SUM3=sum3,
                                  num_warps=warps, num_stages=stages, **pdl_kwargs(h))
    else:
        _nm24_t_kernel[grid](*args, T, R, K, K // 2, K // 32, r_per_split, HAS_BIAS=bias is not None, T_PAD=16,
                             BLOCK_R=block_r, BLOCK_K=block_k, G=block_k // 4, num_warps=warps, num_stages=stages,
                             **pdl_kwargs(h))
    return y if out is not None else y.to(out_dtype)
