"""Gated FFN for decode: read only the selected neurons' weights.

    y_t = Σ_{f ∈ idx_t} act(W_in[f]·x_t + b_in[f]) [· (W_up[f]·x_t)] · W_down_t[f]  (+ b_out)

x: (T, d) a few decode tokens; W_in / W_up: (F, d) the gate (or OPT fc1) and up projections, row-major as
nn.Linear stores them, so a neuron is one contiguous row; W_down_t: (F, d) the down projection stored transposed
(down.weight.T, contiguous) so that a neuron is a row there too; idx: (T, k) the neurons kept per token, or (k,)
one set shared by all T tokens (batched decode with a union of the tokens' sets: each row is read once and
multiplied against all tokens with tl.dot, tokens padded to 16).

Two Triton kernels: (1) h = act(gathered GEMV) for the k selected rows, tiled over d; (2) y = h · W_down_t[idx],
split over d blocks and over k (fp32 atomics), since d alone gives too few programs to fill the GPU at batch 1.
The plain mask path (dense FFN with the unselected activations zeroed) is the reference: gated_ffn_reference.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .common import check_fp32_out, reduction_splits, split_length, tl, triton, use_triton
from .pdl import pdl_kwargs, pdl_launch_next, pdl_wait

ACTIVATIONS = ("silu", "relu", "gelu", "gelu_tanh")  # kernel ids are indices here (constexpr ACT)
# (block_k, block_d, block_k2, block_d2, warps (in, down), stages (in, down)): best measured on an H100, fp16
SHARED_DEFAULTS = (32, 256, 64, 128, (4, 8), (3, 3))
PER_TOKEN_DEFAULTS = (16, 512, 128, 64, (4, 8), (3, 4))


def apply_act(t: torch.Tensor, act: str) -> torch.Tensor:
    """The FFN activation ``act`` (one of ACTIVATIONS) of t, any shape: the torch twin of apply_act_tl, also used
    by the engine's dense and masked FFN paths and by nm24.py's multi-token path."""
    if act == "gelu_tanh":  # GeGLU's tanh approximation (Gemma's gelu_pytorch_tanh)
        return F.gelu(t, approximate="tanh")
    return {"silu": F.silu, "relu": F.relu, "gelu": F.gelu}[act](t)


def _check_keep(idx: torch.Tensor, keep, T: int) -> None:
    if keep is not None and (idx.dim() != 1 or keep.shape != (T, idx.shape[0])):
        raise ValueError(f"keep must be (T, k) = ({T}, {idx.shape[-1]}) with a shared idx (k,), got "
                         f"{tuple(keep.shape)} with idx {tuple(idx.shape)}")


def gated_ffn_reference(x, w_in, w_down_t, idx, act="silu", w_up=None, b_in=None, b_out=None, keep=None,
                        in_rows=None):
    """The mask path: the dense FFN with the activations outside idx zeroed. Same shapes as gated_ffn.
    keep (T, k), with a shared idx (k,): a per-token 0/1 factor on the selected units (a union read once, each
    token keeping only its own units)."""
    _check_keep(idx, keep, x.shape[0])
    if in_rows is not None:  # the reference reads the gathered gate/up rows, placed at their neurons' columns
        F_ = w_down_t.shape[0]
        w_in = torch.zeros(F_, x.shape[1], dtype=w_in.dtype, device=w_in.device).index_copy_(
            0, idx.long(), w_in[in_rows.long()])
        w_up = None if w_up is None else torch.zeros_like(w_in).index_copy_(0, idx.long(), w_up[in_rows.long()])
    h = apply_act(F.linear(x, w_in, b_in), act)  # (T, F)
    if w_up is not None:
        h = h * F.linear(x, w_up)
    idx = idx.expand(x.shape[0], -1) if idx.dim() == 1 else idx
    src = torch.ones(idx.shape, dtype=h.dtype, device=h.device) if keep is None else keep.to(h.dtype)
    mask = torch.zeros_like(h).scatter_(-1, idx.long(), src)
    return F.linear(h * mask, w_down_t.t(), b_out)


def gated_ffn_torch(x, w_in, w_down_t, idx, act="silu", w_up=None, b_in=None, b_out=None, keep=None,
                    in_rows=None):
    """Fallback that reads only the selected rows, by gathering them (T, k, d) — correct everywhere, and on a GPU
    slower than dense (docs/design.md: index_select at 50% is 1.6x dense), which is why the kernels exist."""
    _check_keep(idx, keep, x.shape[0])
    idx = (idx.expand(x.shape[0], -1) if idx.dim() == 1 else idx).long()
    rows = idx if in_rows is None else in_rows.long().expand(x.shape[0], -1)  # gate/up rows of the units
    g = torch.einsum("tkd,td->tk", w_in[rows], x)  # (T, k)
    if b_in is not None:
        g = g + b_in[rows]
    h = apply_act(g, act)
    if w_up is not None:
        h = h * torch.einsum("tkd,td->tk", w_up[rows], x)
    if keep is not None:
        h = h * keep.to(h.dtype)
    y = torch.einsum("tk,tkd->td", h, w_down_t[idx])
    return y + b_out if b_out is not None else y


if triton is not None:
    from .linear import row_gemv_t_kernel  # defined only where Triton is: the shared-set down projection

    @triton.jit
    def apply_act_tl(g, ACT: tl.constexpr):
        """Inside a kernel: ACTIVATIONS[ACT] of the fp32 tile g (nm24.py's fused input kernel uses it too)."""
        if ACT == 0:  # silu
            return g * tl.sigmoid(g)
        elif ACT == 1:  # relu
            return tl.maximum(g, 0.0)
        elif ACT == 2:  # gelu (erf form, as torch's default)
            return 0.5 * g * (1.0 + tl.erf(g * 0.7071067811865476))
        else:  # gelu_tanh, torch's approximate="tanh": 0.5·g·(1 + tanh(z)), z = √(2/π)·(g + 0.044715·g³), written
            # g·sigmoid(2z) (the same function; tl has no tanh, and this form does not cancel for negative g)
            return g * tl.sigmoid(1.5957691216057308 * (g + 0.044715 * g * g * g))

    @triton.jit
    def _gather_in_kernel(x_ptr, w_in_ptr, w_up_ptr, b_in_ptr, idx_ptr, h_ptr, K, D,
                          HAS_UP: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
                          BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, USE_PDL: tl.constexpr):
        pdl_wait(USE_PDL)
        t = tl.program_id(0)
        offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        rows = tl.load(idx_ptr + t * K + offs_k, mask=mask_k, other=0).to(tl.int64)  # (BLOCK_K,) neuron ids
        acc_g = tl.zeros((BLOCK_K,), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            mask_d = offs_d < D
            xs = tl.load(x_ptr + t * D + offs_d, mask=mask_d, other=0.0).to(tl.float32)
            w_off = rows[:, None] * D + offs_d[None, :]
            m2 = mask_k[:, None] & mask_d[None, :]
            wg = tl.load(w_in_ptr + w_off, mask=m2, other=0.0).to(tl.float32)
            acc_g += tl.sum(wg * xs[None, :], axis=1)
            if HAS_UP:
                wu = tl.load(w_up_ptr + w_off, mask=m2, other=0.0).to(tl.float32)
                acc_u += tl.sum(wu * xs[None, :], axis=1)
        pdl_launch_next(USE_PDL)
        if HAS_BIAS:
            acc_g += tl.load(b_in_ptr + rows, mask=mask_k, other=0.0).to(tl.float32)
        h = apply_act_tl(acc_g, ACT)
        if HAS_UP:
            h = h * acc_u
        tl.store(h_ptr + t * K + offs_k, h, mask=mask_k)

    @triton.jit
    def _gather_down_kernel(h_ptr, w_down_t_ptr, idx_ptr, y_ptr, K, D, K_PER_SPLIT,
                            BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, USE_PDL: tl.constexpr):
        pdl_wait(USE_PDL)
        t = tl.program_id(0)
        offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        k_start = tl.program_id(2) * K_PER_SPLIT
        acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for k0 in range(k_start, k_start + K_PER_SPLIT, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = (offs_k < K) & (offs_k < k_start + K_PER_SPLIT)
            rows = tl.load(idx_ptr + t * K + offs_k, mask=mask_k, other=0).to(tl.int64)
            hk = tl.load(h_ptr + t * K + offs_k, mask=mask_k, other=0.0)
            w = tl.load(w_down_t_ptr + rows[:, None] * D + offs_d[None, :],
                        mask=mask_k[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(w * hk[:, None], axis=0)
        pdl_launch_next(USE_PDL)
        tl.atomic_add(y_ptr + t * D + offs_d, acc, mask=mask_d)


if triton is not None:
    @triton.jit
    def _rows_dot(x_ptr, w_in_ptr, w_up_ptr, rows, row_mask, offs_t, mask_t, D, HAS_UP: tl.constexpr,
                  T_PAD: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
        """(T_PAD, BLOCK_K) fp32 x · W_in[rows]ᵀ and x · W_up[rows]ᵀ for x (T, D): each row is read once (none where
        row_mask is false: a masked load issues no memory transactions) and multiplied against every token with
        tl.dot (tokens padded to T_PAD = 16)."""
        acc_g = tl.zeros((T_PAD, BLOCK_K), dtype=tl.float32)
        acc_u = tl.zeros((T_PAD, BLOCK_K), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            mask_d = offs_d < D
            xs = tl.load(x_ptr + offs_t[:, None] * D + offs_d[None, :], mask=mask_t[:, None] & mask_d[None, :],
                         other=0.0)  # (T_PAD, BLOCK_D)
            w_off = rows[:, None] * D + offs_d[None, :]
            m2 = row_mask[:, None] & mask_d[None, :]
            wg = tl.load(w_in_ptr + w_off, mask=m2, other=0.0)  # (BLOCK_K, BLOCK_D)
            acc_g += tl.dot(xs, tl.trans(wg))
            if HAS_UP:
                wu = tl.load(w_up_ptr + w_off, mask=m2, other=0.0)
                acc_u += tl.dot(xs, tl.trans(wu))
        return acc_g, acc_u

    @triton.jit
    def _gate_up_act(acc_g, acc_u, b_in_ptr, rows, mask_k, HAS_UP: tl.constexpr, HAS_BIAS: tl.constexpr,
                     ACT: tl.constexpr):
        """act(gate + b_in) [· up] from _rows_dot's accumulators (T_PAD, BLOCK_K)."""
        if HAS_BIAS:
            acc_g += tl.load(b_in_ptr + rows, mask=mask_k, other=0.0).to(tl.float32)[None, :]
        h = apply_act_tl(acc_g, ACT)
        if HAS_UP:
            h = h * acc_u
        return h

    @triton.jit
    def _shared_in_kernel(x_ptr, w_in_ptr, w_up_ptr, b_in_ptr, idx_ptr, h_ptr, keep_ptr, T, K, D,
                          HAS_UP: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr, HAS_KEEP: tl.constexpr,
                          T_PAD: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, USE_PDL: tl.constexpr):
        pdl_wait(USE_PDL)
        offs_k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        rows = tl.load(idx_ptr + offs_k, mask=mask_k, other=0).to(tl.int64)
        offs_t = tl.arange(0, T_PAD)
        mask_t = offs_t < T
        acc_g, acc_u = _rows_dot(x_ptr, w_in_ptr, w_up_ptr, rows, mask_k, offs_t, mask_t, D, HAS_UP, T_PAD, BLOCK_K,
                                 BLOCK_D)
        pdl_launch_next(USE_PDL)
        h = _gate_up_act(acc_g, acc_u, b_in_ptr, rows, mask_k, HAS_UP, HAS_BIAS, ACT)
        if HAS_KEEP:  # per-token 0/1 inside a shared (union) set: a token keeps only its own units
            h = h * tl.load(keep_ptr + offs_t[:, None] * K + offs_k[None, :], mask=mask_t[:, None] & mask_k[None, :],
                            other=0.0).to(tl.float32)
        tl.store(h_ptr + offs_t[:, None] * K + offs_k[None, :], h, mask=mask_t[:, None] & mask_k[None, :])


if triton is not None:
    @triton.jit
    def _scored_in_kernel(x_ptr, w_in_ptr, w_up_ptr, b_in_ptr, est_ptr, thr_ptr, h_ptr, count_ptr, T, F, D,
                          HAS_UP: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr, COUNT: tl.constexpr,
                          T_PAD: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, USE_PDL: tl.constexpr):
        """h (T, F) = act(x·W_inᵀ + b)·(x·W_upᵀ) where est > thr, else 0, for the BLOCK_K neurons of this program:
        a neuron's rows of W_in and W_up are loaded only if some token keeps it (a masked load issues no memory
        transactions), each token's product zeroed where it does not. count += the kept (token, neuron) pairs."""
        pdl_wait(USE_PDL)
        offs_k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
        mask_k = offs_k < F
        offs_t = tl.arange(0, T_PAD)
        m_tk = (offs_t < T)[:, None] & mask_k[None, :]
        thr = tl.load(thr_ptr)
        est = tl.load(est_ptr + offs_t[:, None] * F + offs_k[None, :], mask=m_tk, other=0.0)
        keep = (est > thr) & m_tk  # (T_PAD, BLOCK_K)
        row = tl.max(keep.to(tl.int32), axis=0) > 0  # (BLOCK_K,) some token keeps the neuron: read its rows
        rows = offs_k.to(tl.int64)
        acc_g, acc_u = _rows_dot(x_ptr, w_in_ptr, w_up_ptr, rows, row, offs_t, offs_t < T, D, HAS_UP, T_PAD, BLOCK_K,
                                 BLOCK_D)  # kept rows only
        pdl_launch_next(USE_PDL)
        h = _gate_up_act(acc_g, acc_u, b_in_ptr, rows, mask_k, HAS_UP, HAS_BIAS, ACT)
        tl.store(h_ptr + offs_t[:, None] * F + offs_k[None, :], tl.where(keep, h, 0.0), mask=m_tk)
        if COUNT:
            tl.atomic_add(count_ptr, tl.sum(tl.sum(keep.to(tl.float32), axis=1), axis=0))


def scored_ffn_in(x: torch.Tensor, w_in: torch.Tensor, est: torch.Tensor, threshold: torch.Tensor, act: str = "silu",
                  w_up: torch.Tensor | None = None, b_in: torch.Tensor | None = None,
                  count: torch.Tensor | None = None, out_dtype: torch.dtype | None = None, backend: str = "auto",
                  block_k: int = 32, block_d: int = 256, warps: int = 4, stages: int = 3) -> torch.Tensor:
    """The FFN activation of the neurons whose score passes a threshold: x (T, d) with T <= 16, w_in / w_up (F, d),
    est (T, F) fp32 each token's score per neuron (the sketch's estimate), threshold (1,) fp32 on the device ->
    a (T, F) in out_dtype (default x's): act(x·W_inᵀ + b_in)·(x·W_upᵀ) where est > threshold, else 0. The kernel
    reads the gate/up rows of the neurons some token keeps and nothing else; count (1,) fp32 gets the kept
    (token, neuron) pairs added (the realized sparsity, counted on the device). The down projection then reads only
    the rows of the nonzero entries of a (sparse_input.input_sparse_linear with threshold 0)."""
    if act not in ACTIVATIONS:
        raise ValueError(f"act must be one of {ACTIVATIONS}, got {act!r}")
    T, D = x.shape
    F_ = w_in.shape[0]
    if est.shape != (T, F_) or threshold.numel() != 1:
        raise ValueError(f"est must be (T, F) = ({T}, {F_}) and threshold one element, got {tuple(est.shape)} and "
                         f"{tuple(threshold.shape)}")
    out_dtype = out_dtype or x.dtype
    if not use_triton(x, backend):
        keep = est > threshold.to(est.device)
        if count is not None:
            count.add_(keep.sum().float())
        a = apply_act(F.linear(x, w_in, b_in), act)
        a = a if w_up is None else a * F.linear(x, w_up)
        return torch.where(keep, a, torch.zeros((), dtype=a.dtype, device=a.device)).to(out_dtype)
    if T > 16:
        raise ValueError(f"the scored FFN kernel takes up to 16 tokens, got {T}")
    h = torch.empty(T, F_, device=x.device, dtype=out_dtype)
    dummy = x
    _scored_in_kernel[(triton.cdiv(F_, block_k),)](
        x.contiguous(), w_in, w_up if w_up is not None else dummy, b_in if b_in is not None else dummy,
        est.contiguous(), threshold, h, count if count is not None else est, T, F_, D, HAS_UP=w_up is not None,
        HAS_BIAS=b_in is not None, ACT=ACTIVATIONS.index(act), COUNT=count is not None, T_PAD=16,
        BLOCK_K=max(block_k, 16), BLOCK_D=block_d, num_warps=warps, num_stages=stages, **pdl_kwargs(x))
    return h


def _gated_ffn_triton_shared(x, w_in, w_down_t, idx, act, w_up, b_in, b_out, block_k, block_d, block_k2,
                             block_d2, splits, warps, stages, keep=None, residual=None, out=None, in_rows=None):
    """idx (k,): one neuron set for all T tokens (T <= 16); keep (T, k) an optional per-token 0/1 factor;
    residual (T, d): the fp32 accumulator starts from it (saves the add pass), output in its dtype;
    out (T, d) fp32: the result (+ b_out) is added into it in place and it is returned (an fp32 residual stream)."""
    T, D = x.shape
    K = idx.shape[0]
    if T > 16:
        raise ValueError(f"the shared-set decode kernel takes up to 16 tokens, got {T}")
    block_k, block_k2 = max(block_k, 16), max(block_k2, 16)  # tl.dot needs 16 on each side
    idx = idx.to(torch.int32).contiguous()
    rows = idx if in_rows is None else in_rows.to(torch.int32).contiguous()  # the gate/up rows of the units
    h = torch.empty(T, K, device=x.device, dtype=torch.float32)
    dummy = x
    _shared_in_kernel[(triton.cdiv(K, block_k),)](
        x.contiguous(), w_in, w_up if w_up is not None else dummy, b_in if b_in is not None else dummy, rows, h,
        keep.contiguous() if keep is not None else dummy, T, K, D, HAS_UP=w_up is not None,
        HAS_BIAS=b_in is not None, ACT=ACTIVATIONS.index(act), HAS_KEEP=keep is not None, T_PAD=16,
        BLOCK_K=block_k, BLOCK_D=block_d, num_warps=warps[0], num_stages=stages[0], **pdl_kwargs(x))
    d_blocks = triton.cdiv(D, block_d2)
    if splits is None:
        splits = reduction_splits(x, d_blocks, triton.cdiv(K, block_k2))
    k_per_split = split_length(K, splits, block_k2)
    bias_in_kernel = out is not None and b_out is not None
    if out is not None:
        y = check_fp32_out(out)
    elif residual is None:
        y = torch.zeros(T, D, device=x.device, dtype=torch.float32)
    else:  # the accumulator starts at residual (+ bias): one pass instead of a zero fill, a bias add and an add
        y = torch.empty(T, D, device=x.device, dtype=torch.float32)
        torch.add(residual, b_out, out=y) if b_out is not None else y.copy_(residual)
        b_out = None
    # the down projection of a shared set is row_linear_t's product: h (T, k) · W_down.T[idx] (linear.py);
    # arguments in its order: h, w_t, bias, rows, y
    row_gemv_t_kernel[(d_blocks, triton.cdiv(K, k_per_split))](
        h, w_down_t, b_out if bias_in_kernel else h, idx, y, T, K, D, k_per_split, HAS_BIAS=bias_in_kernel,
        T_PAD=16, BLOCK_K=block_k2, BLOCK_D=block_d2, num_warps=warps[1], num_stages=stages[1], **pdl_kwargs(x))
    if out is not None:
        return out
    if b_out is not None:
        y += b_out
    return y.to(x.dtype if residual is None else residual.dtype)


def gated_ffn_triton(x, w_in, w_down_t, idx, act="silu", w_up=None, b_in=None, b_out=None,
                     block_k: int | None = None, block_d: int | None = None, block_k2: int | None = None,
                     block_d2: int | None = None, splits: int | None = None, warps: tuple[int, int] | None = None,
                     stages: tuple[int, int] | None = None, keep: torch.Tensor | None = None,
                     residual: torch.Tensor | None = None, out: torch.Tensor | None = None,
                     in_rows: torch.Tensor | None = None):
    """The Triton path. One set for all tokens (idx (k,), or a single token) takes the tl.dot kernels, which were
    the fastest measured even at batch 1 (H100: 97% of pre-sliced weights on OPT-13B shapes); per-token sets for
    several tokens take the per-token kernels. Block sizes, warps, stages and the k-split are tunables
    (benchmarks/ffn_kernel.py measures them); the defaults are the best measured on an H100."""
    _check_keep(idx, keep, x.shape[0])
    shared = idx.dim() == 1 or idx.shape[0] == 1
    defaults = SHARED_DEFAULTS if shared else PER_TOKEN_DEFAULTS
    given = (block_k, block_d, block_k2, block_d2, warps, stages)
    block_k, block_d, block_k2, block_d2, warps, stages = (g if g is not None else d for g, d in zip(given, defaults))
    if shared:
        return _gated_ffn_triton_shared(x, w_in, w_down_t, idx.reshape(-1), act, w_up, b_in, b_out, block_k,
                                        block_d, block_k2, block_d2, splits, warps, stages, keep, residual, out,
                                        in_rows)
    if in_rows is not None:
        raise ValueError("in_rows (gate/up rows apart from the down rows) takes a shared idx (k,)")
    T, D = x.shape
    K = idx.shape[1]
    idx = idx.to(torch.int32).contiguous()
    x = x.contiguous()
    h = torch.empty(T, K, device=x.device, dtype=torch.float32)
    dummy = x  # never read when the constexpr flag is off
    _gather_in_kernel[(T, triton.cdiv(K, block_k))](
        x, w_in, w_up if w_up is not None else dummy, b_in if b_in is not None else dummy, idx, h, K, D,
        HAS_UP=w_up is not None, HAS_BIAS=b_in is not None, ACT=ACTIVATIONS.index(act),
        BLOCK_K=block_k, BLOCK_D=block_d, num_warps=warps[0], num_stages=stages[0], **pdl_kwargs(x))
    d_blocks = triton.cdiv(D, block_d2)
    if splits is None:  # enough programs to cover the SMs a few times over at batch 1
        splits = reduction_splits(x, T * d_blocks, triton.cdiv(K, block_k2))
    k_per_split = split_length(K, splits, block_k2)
    y = torch.zeros(T, D, device=x.device, dtype=torch.float32)
    _gather_down_kernel[(T, d_blocks, triton.cdiv(K, k_per_split))](
        h, w_down_t, idx, y, K, D, k_per_split, BLOCK_K=block_k2, BLOCK_D=block_d2, num_warps=warps[1],
        num_stages=stages[1], **pdl_kwargs(x))
    if b_out is not None:
        y += b_out
    if out is not None:
        return out.add_(y)
    return y.to(x.dtype) if residual is None else residual + y.to(residual.dtype)


def gated_ffn(x, w_in, w_down_t, idx, act="silu", w_up=None, b_in=None, b_out=None, keep=None,
              backend: str = "auto", residual=None, out=None, in_rows=None):
    """Dispatch: the Triton kernels on a CUDA device where Triton is installed, the torch gather otherwise.
    backend "triton" forces the kernels (on the CPU they need TRITON_INTERPRET=1), "torch" the fallback.
    residual (T, d), if given, is added to the output (fused into the accumulator on the shared-set path);
    out (T, d) fp32, if given, receives the output added in place and is returned (an fp32 residual stream).
    in_rows (k,), with a shared idx (k,): the rows of w_in / w_up holding the units' gate / up, where they are not
    the units' own indices (an MoE layer's experts read in place from transformers' (E, 2F, d) gate_up: neuron
    e·F + f at row e·2F + f of gate and of up, which starts F rows further); idx still names the down rows."""
    if act not in ACTIVATIONS:
        raise ValueError(f"act must be one of {ACTIVATIONS}, got {act!r}")
    if in_rows is not None and (idx.dim() != 1 or in_rows.shape != idx.shape):
        raise ValueError(f"in_rows must match a shared idx (k,), got {tuple(in_rows.shape)} and {tuple(idx.shape)}")
    if use_triton(x, backend):
        return gated_ffn_triton(x, w_in, w_down_t, idx, act, w_up, b_in, b_out, keep=keep, residual=residual,
                                out=out, in_rows=in_rows)
    y = gated_ffn_torch(x, w_in, w_down_t, idx, act, w_up, b_in, b_out, keep=keep, in_rows=in_rows)
    if out is not None:
        return out.add_(y)
    return y if residual is None else residual + y
