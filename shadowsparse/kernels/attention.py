"""Decode attention over a static KV cache for a chosen set of query heads (GQA-aware).

    out[b, t, j] = softmax_s( cap(q[b, t, j] · K[b, kv(heads[j]), s] * scale), s <= pos + t ) · V[b, kv(heads[j]), s]

cap(z) = softcap · tanh(z / softcap) where the model soft-caps its attention logits (Gemma-2), else z. A layer with a
sliding window W (Mistral v0.1, Gemma-2's local layers) sees only keys s > pos + t - W, as transformers' sliding mask:
the keys before that are never read.

q: (B, T, J, D) the selected query heads only, any strides over (B, T, J) with D contiguous (a slice of the
projection output, no copy); k_cache / v_cache: (B, KV, S, D) one layer of the static cache;
heads: (J,) int the query heads q holds (kv(h) = h // (H / KV)); pos: (1,) int the position of the first new token
(all sequences aligned). Returns (B, T, J, D), the out-projection's input layout. Keys past pos + t are never read,
and heads not in ``heads`` cost nothing (no copies of their K/V). The dense step passes heads = arange(H), so both
paths use the same kernel.

Triton: split over the keys (flash decoding), online softmax in fp32 per chunk, then a combine kernel. Torch
fallback (CPU): gather the heads' K/V and do the masked softmax explicitly (as transformers' eager attention).
"""
from __future__ import annotations

import torch

from .common import tl, triton, use_triton
from .pdl import pdl_kwargs, pdl_launch_next, pdl_wait

if triton is not None:
    @triton.jit
    def _decode_attn_split_kernel(q_ptr, k_ptr, v_ptr, heads_ptr, pos_ptr, slot_ptr, m_ptr, l_ptr, acc_ptr, scale, J,
                                  T, KV, S, D, GROUP, CHUNK, NSPLIT, WINDOW, sq_b, sq_t, sq_j, HAS_SLOT: tl.constexpr,
                                  BLOCK_S: tl.constexpr, D_PAD: tl.constexpr, SOFTCAP: tl.constexpr,
                                  USE_PDL: tl.constexpr):
        """One (token row, head, chunk of keys): partial softmax statistics (max, sum, weighted values) over keys
        last - WINDOW < s <= last (a sliding window; a chunk wholly before it is empty, as one past the last).
        SOFTCAP > 0: the scores are soft-capped first, SOFTCAP·tanh(s / SOFTCAP), tanh as 2·sigmoid(2z) - 1 (the
        interpreter has no libdevice; fp32, absolute error ~1e-7 · SOFTCAP)."""
        pdl_wait(USE_PDL)
        row = tl.program_id(0)  # b * T + t
        j = tl.program_id(1)
        split = tl.program_id(2)
        b = row // T
        t = row % T
        offs_d = tl.arange(0, D_PAD)
        mask_d = offs_d < D
        kvh = tl.load(heads_ptr + j) // GROUP
        q_row = t
        if HAS_SLOT:  # T == 1: the token's query is row slot of a window of rows
            q_row = tl.load(slot_ptr)
        q = tl.load(q_ptr + b * sq_b + q_row * sq_t + j * sq_j + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        q = q * scale
        last = tl.load(pos_ptr) + t  # keys 0..last are visible to this token
        base = (b * KV + kvh).to(tl.int64) * S * D
        m_i = tl.zeros((1,), dtype=tl.float32) - float("inf")  # running max (1-element: broadcasts)
        l_i = tl.zeros((1,), dtype=tl.float32)  # running softmax denominator
        acc = tl.zeros((D_PAD,), dtype=tl.float32)
        lo = split * CHUNK
        hi = tl.minimum(lo + CHUNK, last + 1)
        lo = tl.maximum(lo, last + 1 - WINDOW)  # WINDOW = S + 1 without a window: no bound
        for s0 in range(lo, hi, BLOCK_S):
            offs_s = s0 + tl.arange(0, BLOCK_S)
            mask_s = offs_s < hi
            off2 = base + offs_s[:, None] * D + offs_d[None, :]
            m2 = mask_s[:, None] & mask_d[None, :]
            k = tl.load(k_ptr + off2, mask=m2, other=0.0).to(tl.float32)  # (BLOCK_S, D_PAD)
            v = tl.load(v_ptr + off2, mask=m2, other=0.0).to(tl.float32)
            s = tl.sum(k * q[None, :], axis=1)
            if SOFTCAP > 0:
                s = SOFTCAP * (2.0 * tl.sigmoid(s * (2.0 / SOFTCAP)) - 1.0)
            s = tl.where(mask_s, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=0))
            p = tl.exp(s - m_new)
            alpha = tl.exp(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, axis=0)
            acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
            m_i = m_new
        pdl_launch_next(USE_PDL)
        part = (row * J + j) * NSPLIT + split
        one = tl.arange(0, 1)
        tl.store(m_ptr + part + one, m_i)  # -inf and 0 for a chunk past the last visible key
        tl.store(l_ptr + part + one, l_i)
        tl.store(acc_ptr + part.to(tl.int64) * D + offs_d, acc, mask=mask_d)

    @triton.jit
    def _decode_attn_combine_kernel(m_ptr, l_ptr, acc_ptr, out_ptr, J, D, NSPLIT, SPLIT_PAD: tl.constexpr,
                                    D_PAD: tl.constexpr, USE_PDL: tl.constexpr):
        pdl_wait(USE_PDL)
        row = tl.program_id(0)
        j = tl.program_id(1)
        offs_s = tl.arange(0, SPLIT_PAD)
        mask_s = offs_s < NSPLIT
        offs_d = tl.arange(0, D_PAD)
        mask_d = offs_d < D
        part = (row * J + j) * NSPLIT
        m = tl.load(m_ptr + part + offs_s, mask=mask_s, other=float("-inf"))
        l = tl.load(l_ptr + part + offs_s, mask=mask_s, other=0.0)
        acc = tl.load(acc_ptr + (part + offs_s)[:, None].to(tl.int64) * D + offs_d[None, :],
                      mask=mask_s[:, None] & mask_d[None, :], other=0.0)  # (SPLIT_PAD, D_PAD)
        m_max = tl.max(m, axis=0)
        w = tl.where(mask_s & (m > float("-inf")), tl.exp(m - m_max), 0.0)  # empty chunks weigh nothing
        out = tl.sum(w[:, None] * acc, axis=0) / tl.sum(w * l, axis=0)
        pdl_launch_next(USE_PDL)
        tl.store(out_ptr + (row * J + j) * D + offs_d, out.to(out_ptr.dtype.element_ty), mask=mask_d)


def soft_cap(scores: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """softcap · tanh(scores / softcap) (Gemma-2's attention and final logits), or scores unchanged for None."""
    return scores if not softcap else torch.tanh(scores / softcap) * softcap


def decode_attention_torch(q, k_cache, v_cache, heads, pos, scale, n_heads, q_slot=None, softcap=None, window=None):
    """The plain path: q (B, T, J, D) -> (B, T, J, D). pos: (1,) int tensor."""
    if q_slot is not None:
        q = q.index_select(1, q_slot.reshape(1))  # (B, 1, J, D)
    q = q.transpose(1, 2)  # (B, J, T, D)
    B, J, T, D = q.shape
    S = k_cache.shape[2]
    group = n_heads // k_cache.shape[1]
    kv = (heads // group).long()
    k = k_cache.index_select(1, kv)  # (B, J, S, D)
    v = v_cache.index_select(1, kv)
    scores = soft_cap(torch.matmul(q, k.transpose(-1, -2)) * scale, softcap)  # (B, J, T, S)
    q_pos = pos.reshape(1) + torch.arange(T, device=q.device)  # (T,)
    hidden = ~causal_visible(q_pos, S, window)  # (T, S) keys not (or no longer) visible
    scores = scores.masked_fill(hidden, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v).transpose(1, 2)  # (B, T, J, D)


def causal_visible(positions: torch.Tensor, S: int, window: int | None = None) -> torch.Tensor:
    """positions (T,) of the query tokens -> (T, S) bool: cache position s is visible to token t (s <= its position;
    with a sliding window W also s > its position - W)."""
    s = torch.arange(S, device=positions.device)[None, :]
    visible = s <= positions[:, None]
    return visible if window is None else visible & (s > positions[:, None] - window)


def prefill_attention(q, k_cache, v_cache, pos, scale, visible=None, softcap=None, window=None):
    """Many query tokens of every head: q (B, T, H, D) at positions pos .. pos+T-1 over the cache (B, KV, S, D) ->
    (B, T, H, D), through torch's scaled_dot_product_attention (a fused kernel with tensor cores; the decode kernel
    runs one program per token and head). The causal limit is a device-side mask over all S positions
    (causal_visible; pass it to share one between layers, made with the layer's window), so nothing is read back to
    the host. Soft-capped scores (softcap, Gemma-2) are not what SDPA computes: those take the explicit path
    (decode_attention_torch's)."""
    B, T, H, D = q.shape
    if visible is None:
        visible = causal_visible(pos.reshape(1) + torch.arange(T, device=q.device), k_cache.shape[2], window)
    if softcap:
        heads = torch.arange(H, device=q.device)
        return decode_attention_torch(q, k_cache, v_cache, heads, pos, scale, H, softcap=softcap, window=window)
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k_cache, v_cache, attn_mask=visible, scale=scale, enable_gqa=H != k_cache.shape[1])
    return out.transpose(1, 2)  # (B, T, H, D)


def decode_attention(q, k_cache, v_cache, heads, pos, scale, n_heads, backend: str = "auto", block_s: int = 64,
                     target_splits: int = 8, q_slot: torch.Tensor | None = None, softcap: float | None = None,
                     window: int | None = None):
    """Dispatch: the Triton kernels on CUDA (or backend='triton' under TRITON_INTERPRET=1), torch otherwise.

    q_slot: (1,) int64 on device, for one new token whose query is one row of a window: q is then (B, W, J, D)
    and the token's query is q[:, q_slot] (lazy K/V computes q for the whole input window in its one GEMV).

    Triton, flash-decoding style: the cache's S positions are cut into up to ``target_splits`` chunks, one program
    per (token, head, chunk) computes partial softmax statistics, a second kernel combines them. At decode a
    layer has only B·T·J (token, head) pairs, too few programs to keep the SMs busy if each walked all keys.
    Chunks past the last visible key exit at once, so the fixed grid (CUDA graphs) costs little. (One pass with no
    combine kernel at short contexts was measured slower: OPT-13B step 6.30 vs 6.03 ms at 200 positions, H100.)"""
    if not use_triton(q, backend):
        return decode_attention_torch(q, k_cache, v_cache, heads, pos, scale, n_heads, q_slot, softcap, window)
    B, T, J, D = q.shape
    if q.stride(3) != 1:
        q = q.contiguous()
    if q_slot is not None:
        T = 1
    KV, S = k_cache.shape[1], k_cache.shape[2]
    chunk = block_s * triton.cdiv(triton.cdiv(S, target_splits), block_s)
    nsplit = triton.cdiv(S, chunk)
    out = torch.empty(B, T, J, D, device=q.device, dtype=q.dtype)
    m = torch.empty(B * T, J, nsplit, device=q.device, dtype=torch.float32)
    l = torch.empty_like(m)
    acc = torch.empty(B * T, J, nsplit, D, device=q.device, dtype=torch.float32)
    d_pad = triton.next_power_of_2(D)
    _decode_attn_split_kernel[(B * T, J, nsplit)](
        q, k_cache, v_cache, heads.contiguous(), pos, q_slot if q_slot is not None else pos, m, l, acc, scale, J, T,
        KV, S, D, n_heads // KV, chunk, nsplit, window or S + 1, q.stride(0), q.stride(1), q.stride(2),
        HAS_SLOT=q_slot is not None, BLOCK_S=block_s, D_PAD=d_pad, SOFTCAP=float(softcap or 0.0), num_warps=4,
        **pdl_kwargs(q))
    _decode_attn_combine_kernel[(B * T, J)](m, l, acc, out, J, D, nsplit,
                                            SPLIT_PAD=max(2, triton.next_power_of_2(nsplit)), D_PAD=d_pad,
                                            num_warps=2, **pdl_kwargs(q))
    return out
