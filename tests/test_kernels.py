"""Fast paths against the mask path on random inputs. The Triton kernels run on CUDA, or on the CPU under
TRITON_INTERPRET=1 where triton is installed; the torch fallback is checked everywhere."""
import os

import pytest
import torch
import torch.nn.functional as F

from shadowsparse.kernels import gated_ffn, gated_ffn_reference, gated_ffn_torch
from shadowsparse.kernels import common
from shadowsparse.kernels import ffn as module

CASES = [  # (T, d, F, k, act, gated, bias)
    (1, 64, 160, 80, "silu", True, False),
    (3, 96, 200, 37, "relu", False, True),
    (8, 72, 128, 128, "gelu", True, False),
    (2, 64, 96, 40, "gelu_tanh", True, False),  # Gemma's GeGLU
]


def _inputs(T, d, F, k, act, gated, bias, device="cpu", dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: (torch.randn(*s, generator=g) / s[-1] ** 0.5).to(device, dtype)  # noqa: E731
    x, w_in, w_down_t = r(T, d), r(F, d), r(F, d)
    idx = torch.stack([torch.randperm(F, generator=g)[:k] for _ in range(T)]).to(device)
    kw = dict(act=act, w_up=r(F, d) if gated else None, b_in=r(F) if bias else None, b_out=r(d) if bias else None)
    return (x, w_in, w_down_t, idx), kw


@pytest.mark.parametrize("case", CASES)
def test_torch_gather_matches_mask_path(case):
    args, kw = _inputs(*case)
    torch.testing.assert_close(gated_ffn_torch(*args, **kw), gated_ffn_reference(*args, **kw), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gated_ffn(*args, **kw), gated_ffn_reference(*args, **kw), rtol=1e-5, atol=1e-5)


def _triton_device():
    if common.triton is None:
        return None
    if torch.cuda.is_available():
        return "cuda"
    return "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else None


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("splits", [1, 3])
def test_triton_matches_mask_path(case, splits):
    device = _triton_device()
    if device is None:
        pytest.skip("needs triton on CUDA, or TRITON_INTERPRET=1 with triton installed")
    args, kw = _inputs(*case, device=device)
    out = module.gated_ffn_triton(*args, **kw, block_k=16, block_d=32, block_k2=16, block_d2=32, splits=splits)
    ref = gated_ffn_reference(*args, **kw)
    # a single token takes the tl.dot kernels, which may run fp32 inputs as tf32 on a GPU
    torch.testing.assert_close(out, ref, rtol=5e-3, atol=5e-3)


@pytest.mark.parametrize("case", CASES)
def test_shared_set_triton_matches_mask_path(case):
    """One neuron set for the whole batch (the union path of batched decode): rows read once, tl.dot over tokens."""
    device = _triton_device()
    if device is None:
        pytest.skip("needs triton on CUDA, or TRITON_INTERPRET=1 with triton installed")
    args, kw = _inputs(*case, device=device)
    x, w_in, w_down_t, idx = args
    shared = idx[0]
    ref = gated_ffn_reference(x, w_in, w_down_t, shared, **kw)
    torch.testing.assert_close(ref, gated_ffn_reference(x, w_in, w_down_t, shared.expand_as(idx), **kw))
    torch.testing.assert_close(gated_ffn_torch(x, w_in, w_down_t, shared, **kw), ref, rtol=1e-5, atol=1e-5)
    out = module.gated_ffn_triton(x, w_in, w_down_t, shared, **kw, block_k=16, block_d=32, block_k2=16,
                                  block_d2=32, splits=2)
    # tl.dot may use tf32 on GPUs: tolerance of a tf32 product
    torch.testing.assert_close(out, ref, rtol=5e-3, atol=5e-3)



@pytest.mark.parametrize("case", CASES)
def test_scored_ffn_in_matches_the_masked_activation(case):
    """scored_ffn_in (sketch_threshold's gate/up): each token's act(gate)·up where its score passes the threshold,
    zero elsewhere, the kept pairs counted; the torch path against a hand-made mask, the kernel against it."""
    T, d, F_, _, act, gated, bias = case
    (x, w_in, _, _), kw = _inputs(*case)
    est = torch.rand(T, F_, generator=torch.Generator().manual_seed(3))
    thr = torch.tensor([0.6])
    a = module.apply_act(F.linear(x, w_in, kw["b_in"]), act)
    a = a * F.linear(x, kw["w_up"]) if gated else a
    ref = a * (est > 0.6)
    count = torch.zeros(1)
    out = module.scored_ffn_in(x, w_in, est, thr, act, w_up=kw["w_up"], b_in=kw["b_in"], count=count,
                               backend="torch")
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    assert count.item() == (est > 0.6).sum().item()
    device = _triton_device()
    if device is None:
        return
    count = torch.zeros(1, device=device)
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    out = module.scored_ffn_in(x.to(device), w_in.to(device), est.to(device), thr.to(device), act,
                               w_up=to(kw["w_up"]), b_in=to(kw["b_in"]), count=count, backend="triton", block_k=16,
                               block_d=32)
    torch.testing.assert_close(out.cpu(), ref, rtol=5e-3, atol=5e-3)  # tl.dot: tf32 on a GPU
    assert count.item() == (est > 0.6).sum().item() and (out.cpu()[est <= 0.6] == 0).all()
    with pytest.raises(ValueError, match="est must be"):
        module.scored_ffn_in(x, w_in, est[:, 1:], thr, act, backend="torch")

def test_bad_activation():
    args, kw = _inputs(*CASES[0])
    with pytest.raises(ValueError, match="act must be"):
        gated_ffn(*args, **{**kw, "act": "tanh"})


# -- gathered linears (head gating) and decode attention ----------------------------------------------------------
from shadowsparse.kernels import linear as linear_module  # noqa: E402
from shadowsparse.kernels.attention import decode_attention, decode_attention_torch  # noqa: E402


def _backends():
    return ["torch"] + (["triton"] if _triton_device() is not None else [])


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("T", [1, 5])
def test_row_linears_match_dense_on_selected_rows(backend, T):
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(1)
    x, w, w_t = torch.randn(T, 40, generator=g), torch.randn(96, 40, generator=g), torch.randn(96, 40, generator=g)
    b_in, b_out = torch.randn(96, generator=g), torch.randn(40, generator=g)
    rows = torch.randperm(96, generator=g)[:48]
    x, w, w_t, b_in, b_out, rows = (t.to(device) for t in (x, w, w_t, b_in, b_out, rows))
    ref = x @ w.t() + b_in
    out = linear_module.row_linear(x, w, rows, b_in, backend=backend)
    torch.testing.assert_close(out, ref[:, rows], rtol=5e-3, atol=5e-3)
    h = torch.randn(T, 48, generator=g).to(device)
    out_t = linear_module.row_linear_t(h, w_t, rows, b_out, backend=backend)
    torch.testing.assert_close(out_t, h @ w_t[rows] + b_out, rtol=5e-3, atol=5e-3)


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("T,pos,softcap,window", [(1, 0, None, None), (1, 70, None, None), (3, 20, None, None),
                                                  (1, 70, 1.5, None), (3, 20, 1.5, None), (1, 70, None, 24),
                                                  (3, 20, 1.5, 8), (1, 3, None, 8)])
def test_decode_attention_matches_masked_softmax(backend, T, pos, softcap, window):
    """Selected query heads of a GQA layer (8 heads, 2 kv heads) against the plain masked softmax over every head;
    softcap: Gemma-2's capped scores, softcap · tanh(s / softcap) (a cap of 1.5 on scores of spread ~1: many are
    bent, so a missing or misplaced cap fails); window: a sliding window, keys s > position - window only (24 at
    position 70: whole key chunks before it are skipped; 8 at position 3: not reached yet)."""
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(2)
    B, H, KV, S, D = 2, 8, 2, 80, 16
    q_all = torch.randn(B, H, T, D, generator=g).to(device)
    k, v = torch.randn(B, KV, S, D, generator=g).to(device), torch.randn(B, KV, S, D, generator=g).to(device)
    heads = torch.tensor([6, 1, 3], dtype=torch.int32, device=device)
    p = torch.tensor([pos], device=device)
    scores = q_all @ k.repeat_interleave(H // KV, 1).transpose(-1, -2) * 0.25  # (B, H, T, S)
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    q_pos = (pos + torch.arange(T, device=device))[:, None]
    visible = torch.arange(S, device=device)[None, :] <= q_pos
    if window:
        visible &= torch.arange(S, device=device)[None, :] > q_pos - window
    ref = (scores.masked_fill(~visible, float("-inf")).softmax(-1) @ v.repeat_interleave(H // KV, 1))
    ref = ref[:, heads.long()].transpose(1, 2)  # (B, T, J, D)
    q = q_all[:, heads.long()].transpose(1, 2)  # (B, T, J, D), strided: the kernel reads it without a copy
    out = decode_attention(q, k, v, heads, p, 0.25, H, backend=backend, block_s=32, softcap=softcap, window=window)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(decode_attention_torch(q, k, v, heads, p, 0.25, H, softcap=softcap, window=window), ref,
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", _backends())
def test_rms_norm_and_rope_match_torch_math(backend):
    from shadowsparse.kernels.rope_norm import rms_norm, rms_norm_torch, rope_, rope_torch_
    from shadowsparse.runtime.ops import apply_rope, rope_cos_sin, rope_inv_freq
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(4)
    x, w = torch.randn(6, 96, generator=g).to(device), torch.randn(96, generator=g).to(device)
    torch.testing.assert_close(rms_norm(x, w, 1e-5, backend=backend), rms_norm_torch(x, w, 1e-5))
    from shadowsparse.kernels.rope_norm import layer_norm
    b = torch.randn(96, generator=g).to(device)
    torch.testing.assert_close(layer_norm(x, w, b, 1e-5, backend=backend),
                               torch.nn.functional.layer_norm(x, (96,), w, b, 1e-5))
    B, T, H, KV, D = 2, 3, 4, 2, 16
    qkv = torch.randn(B * T, (H + 2 * KV) * D, generator=g).to(device)
    cos, sin = rope_cos_sin(torch.tensor([5, 6, 7], device=device), rope_inv_freq(D, 10000.0, device), qkv.dtype)
    ref = qkv.clone()
    q_ref = apply_rope(ref[:, :H * D].view(B, T, H, D).transpose(1, 2), cos, sin).transpose(1, 2).reshape(B * T, -1)
    k_ref = apply_rope(ref[:, H * D:(H + KV) * D].view(B, T, KV, D).transpose(1, 2), cos, sin)
    out = rope_(qkv.clone(), cos, sin, H + KV, D, T, backend=backend)
    torch.testing.assert_close(out[:, :H * D], q_ref)
    torch.testing.assert_close(out[:, H * D:(H + KV) * D], k_ref.transpose(1, 2).reshape(B * T, -1))
    torch.testing.assert_close(out[:, (H + KV) * D:], qkv[:, (H + KV) * D:])  # v untouched
    torch.testing.assert_close(rope_torch_(qkv.clone(), cos, sin, H + KV, D, T), out)


@pytest.mark.parametrize("backend", _backends())
def test_shared_set_with_per_token_keep_matches_mask_path(backend):
    """A union read once, each token keeping only its own units (keep (T, k) 0/1)."""
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    args, kw = _inputs(4, 64, 160, 80, "silu", True, False, device=device)
    x, w_in, w_down_t, idx = args
    keep = (torch.rand(4, 80, generator=torch.Generator().manual_seed(3)) > 0.4).float().to(device)
    shared = idx[0]
    ref = gated_ffn_reference(x, w_in, w_down_t, shared, **kw, keep=keep)
    mask = torch.zeros(4, 160, device=device).scatter_(-1, shared.long().expand(4, -1), keep)
    per_token = torch.stack([gated_ffn_reference(x[t:t + 1], w_in, w_down_t, mask[t].nonzero()[:, 0], **kw)[0]
                             for t in range(4)])
    torch.testing.assert_close(ref, per_token, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gated_ffn(x, w_in, w_down_t, shared, **kw, keep=keep, backend=backend), ref,
                               rtol=5e-3, atol=5e-3)


@pytest.mark.parametrize("backend", _backends())
def test_in_rows_read_gate_and_up_in_place_from_an_experts_gate_up(backend):
    """An MoE layer's gate/up read in place from transformers' (E, 2F, d) gate_up_proj (w_in its (2EF, d) view,
    w_up the view F rows further, neuron e*F + f at row e*2F + f of each) with fractional keep (routing weights):
    equal to the same FFN on separate stacked (EF, d) gate and up matrices."""
    from shadowsparse.runtime.weights import moe_in_rows
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(4)
    E, Fe, d, T = 3, 32, 64, 3
    gate_up = torch.randn(E, 2 * Fe, d, generator=g).to(device) / 8
    w_down_t = torch.randn(E * Fe, d, generator=g).to(device) / 8
    x = torch.randn(T, d, generator=g).to(device)
    idx = torch.tensor([1, 5, 31, 32, 40, 70, 95], dtype=torch.int32, device=device)  # neurons of all 3 experts
    keep = torch.rand(T, idx.shape[0], generator=g).to(device)
    w_gate = gate_up[:, :Fe].reshape(E * Fe, d)
    w_up = gate_up[:, Fe:].reshape(E * Fe, d)
    ref = gated_ffn_reference(x, w_gate, w_down_t, idx, "silu", w_up=w_up, keep=keep)
    flat = gate_up.view(E * 2 * Fe, d)
    rows = moe_in_rows(idx, Fe)
    assert torch.equal(flat[rows.long()], w_gate[idx.long()]) and torch.equal(flat[Fe:][rows.long()],
                                                                             w_up[idx.long()])
    torch.testing.assert_close(gated_ffn_reference(x, flat, w_down_t, idx, "silu", w_up=flat[Fe:], keep=keep,
                                                   in_rows=rows), ref, rtol=1e-5, atol=1e-5)
    out = gated_ffn(x, flat, w_down_t, idx, "silu", w_up=flat[Fe:], keep=keep, backend=backend, in_rows=rows)
    torch.testing.assert_close(out, ref, rtol=5e-3, atol=5e-3)
    with pytest.raises(ValueError, match="in_rows must match a shared idx"):
        gated_ffn(x, flat, w_down_t, idx.expand(T, -1), "silu", w_up=flat[Fe:], backend=backend, in_rows=rows)


@pytest.mark.parametrize("backend", _backends())
def test_residual_is_fused_exactly(backend):
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    args, kw = _inputs(2, 64, 160, 80, "relu", False, True, device=device)
    x, w_in, w_down_t, idx = args
    r = torch.randn(2, 64, generator=torch.Generator().manual_seed(5)).to(device)
    ref = r + gated_ffn_reference(x, w_in, w_down_t, idx[0], **kw)
    torch.testing.assert_close(gated_ffn(x, w_in, w_down_t, idx[0], **kw, backend=backend, residual=r), ref,
                               rtol=5e-3, atol=5e-3)
    rows = idx[0]
    h = torch.randn(2, 80, generator=torch.Generator().manual_seed(6)).to(device)
    out = linear_module.row_linear_t(h, w_down_t, rows, kw["b_out"], backend=backend, residual=r)
    torch.testing.assert_close(out, r + h @ w_down_t[rows] + kw["b_out"], rtol=5e-3, atol=5e-3)


@pytest.mark.parametrize("backend", _backends())
def test_accumulate_into_fp32_residual_stream(backend):
    """out=: the FFN (bias in the down kernel's first split) and the o-projection add into an fp32 tensor in place
    (the engine's fp32 residual stream of gated layers), with more k-splits than one."""
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    args, kw = _inputs(2, 64, 160, 80, "relu", False, True, device=device)
    x, w_in, w_down_t, idx = args
    r = torch.randn(2, 64, generator=torch.Generator().manual_seed(7)).to(device)
    ref = r + gated_ffn_reference(x, w_in, w_down_t, idx[0], **kw)
    acc = r.clone()
    got = gated_ffn(x, w_in, w_down_t, idx[0], **kw, backend=backend, out=acc)
    assert got.data_ptr() == acc.data_ptr()
    torch.testing.assert_close(acc, ref, rtol=5e-3, atol=5e-3)
    h = torch.randn(2, 80, generator=torch.Generator().manual_seed(8)).to(device)
    acc = r.clone()
    linear_module.row_linear_t(h, w_down_t, idx[0], kw["b_out"], backend=backend, out=acc)
    torch.testing.assert_close(acc, r + h @ w_down_t[idx[0]] + kw["b_out"], rtol=5e-3, atol=5e-3)


@pytest.mark.parametrize("backend", _backends())
def test_norms_read_fp32_and_write_the_model_dtype(backend):
    """An fp32 residual row normed into fp16 equals the fp16 norm of the same row up to fp16 rounding."""
    from shadowsparse.kernels.rope_norm import layer_norm, rms_norm
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(9)
    x, w, b = (torch.randn(*s, generator=g).to(device) for s in ((3, 96), (96,), (96,)))
    w16, b16 = w.half(), b.half()
    out = rms_norm(x, w16, 1e-5, backend=backend, out_dtype=torch.float16)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), (w16.float() * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))),
                               rtol=2e-3, atol=2e-3)
    out = layer_norm(x, w16, b16, 1e-5, backend=backend, out_dtype=torch.float16)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), torch.nn.functional.layer_norm(x, (96,), w16.float(), b16.float(), 1e-5),
                               rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("backend", _backends())
def test_norms_with_a_threshold_zero_the_small_outputs_and_count_the_kept(backend):
    """threshold=: the normed row as without it, with |y| <= τ zeroed (the next projections' input threshold of a
    many-token step) and the kept entries added to count."""
    from shadowsparse.kernels.rope_norm import layer_norm, rms_norm
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(11)
    x, w, b = (torch.randn(*s, generator=g).to(device) for s in ((2, 3, 200), (200,), (200,)))
    thr = torch.tensor([0.6], device=device)
    for norm, args in ((rms_norm, (w.half(), 1e-5)), (layer_norm, (w.half(), b.half(), 1e-5))):
        count = torch.zeros(1, device=device)
        plain = norm(x, *args, backend=backend, out_dtype=torch.float16)
        out = norm(x, *args, backend=backend, out_dtype=torch.float16, threshold=thr, count=count)
        keep = plain.float().abs() > thr
        assert torch.equal(out, torch.where(keep, plain, torch.zeros_like(plain)))
        assert count.item() == keep.sum().item() and 0 < keep.float().mean() < 1
    with pytest.raises(ValueError, match="one-element"):
        rms_norm(x, w, 1e-5, backend=backend, threshold=torch.zeros(2, device=device))


@pytest.mark.parametrize("backend", _backends())
def test_decode_attention_query_from_a_window_slot(backend):
    """q_slot: the token's query is row q_slot of a (B, W, J, D) window (lazy K/V's fused GEMV output)."""
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(10)
    B, W, H, S, D = 2, 4, 4, 40, 16
    window = torch.randn(B, W, H, D, generator=g).to(device)
    k, v = torch.randn(B, H, S, D, generator=g).to(device), torch.randn(B, H, S, D, generator=g).to(device)
    heads = torch.tensor([3, 0], dtype=torch.int32, device=device)
    pos, slot = torch.tensor([30], device=device), torch.tensor([2], device=device)
    q = window[:, :, heads.long()]  # (B, W, J, D)
    ref = decode_attention_torch(q[:, 2:3], k, v, heads, pos, 0.25, H)
    out = decode_attention(q, k, v, heads, pos, 0.25, H, backend=backend, q_slot=slot)
    assert out.shape == (B, 1, 2, D)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", _backends())
def test_gelu_tanh_matches_torch(backend):
    """The kernels' gelu_tanh (g·sigmoid(2z), ffn.apply_act_tl) against torch's gelu(approximate="tanh"), through
    the threshold mask kernel that applies act(gate)·up (sparse_input.act_mask_input), wide range of gates."""
    from shadowsparse.kernels.ffn import apply_act
    from shadowsparse.kernels.sparse_input import act_mask_input
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    g = (torch.linspace(-12, 12, 3 * 200).view(3, 200)).to(device)
    up = torch.ones_like(g)
    torch.testing.assert_close(apply_act(g, "gelu_tanh"), F.gelu(g, approximate="tanh"), rtol=0, atol=0)
    out = act_mask_input(g, up, "gelu_tanh", torch.zeros(1, device=device), backend=backend)
    torch.testing.assert_close(out, F.gelu(g, approximate="tanh") * (F.gelu(g, approximate="tanh").abs() > 0),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", _backends())
def test_rms_norm_with_an_fp32_factor_takes_gemmas_order(backend):
    """An fp32 weight (Gemma's 1 + w) with an fp16 output: x̂·(1 + w) in fp32, rounded once, exactly as GemmaRMSNorm;
    an fp16 weight keeps Llama's order (x̂ rounded, then scaled)."""
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm

    from shadowsparse.kernels.rope_norm import rms_norm, rms_norm_torch
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(12)
    x, w = torch.randn(5, 96, generator=g).half(), torch.randn(96, generator=g).half()
    ref = GemmaRMSNorm(96, eps=1e-6)
    with torch.no_grad():
        ref.weight.copy_(w.float())
        want = ref(x.float()).half()  # GemmaRMSNorm in fp32 weights on an fp16 row: (x̂ · (1 + w)).to(fp16)
    factor = 1 + w.float()
    for out in (rms_norm(x.to(device), factor.to(device), 1e-6, backend=backend), rms_norm_torch(x, factor, 1e-6)):
        assert out.dtype == torch.float16
        torch.testing.assert_close(out.cpu(), want, rtol=0, atol=0)
    llama = rms_norm_torch(x, factor.half(), 1e-6)  # the other order: differs in the last bit somewhere
    assert not torch.equal(llama, want)


@pytest.mark.parametrize("backend", _backends())
def test_rope_on_half_heads_of_any_size(backend):
    """RoPE in place where the half head is not a power of two (Gemma's tiny 24-dim heads, Phi-3-mini's 96)."""
    from shadowsparse.kernels.rope_norm import rope_
    from shadowsparse.runtime.ops import apply_rope, rope_cos_sin, rope_inv_freq
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(13)
    B, T, H, D = 2, 3, 3, 24
    x = torch.randn(B * T, 2 * H * D, generator=g).to(device)
    cos, sin = rope_cos_sin(torch.tensor([4, 5, 6], device=device), rope_inv_freq(D, 10000.0, device), x.dtype)
    out = rope_(x.clone(), cos, sin, H, D, T, backend=backend)
    want = apply_rope(x[:, :H * D].view(B, T, H, D).transpose(1, 2), cos, sin).transpose(1, 2).reshape(B * T, -1)
    torch.testing.assert_close(out[:, :H * D], want)
    torch.testing.assert_close(out[:, H * D:], x[:, H * D:])  # the rest of the row untouched


# -- 2:4 compressed weights ---------------------------------------------------------------------------------------
from shadowsparse.kernels import nm24  # noqa: E402


def test_24_compress_roundtrip_and_exact_pattern():
    w = torch.randn(12, 64, generator=torch.Generator().manual_seed(7))
    p = nm24.prune_24(w)
    groups = (p.reshape(12, 16, 4) != 0).sum(-1)
    assert (groups == 2).all()  # exactly 2 of every 4 kept (random weights have no zeros)
    mag = w.reshape(12, 16, 4).abs()
    kept_min = torch.where(groups[..., None] > 0, mag, 0).masked_fill(p.reshape(12, 16, 4) == 0, 1e9).amin(-1)
    dropped_max = mag.masked_fill(p.reshape(12, 16, 4) != 0, -1).amax(-1)
    assert (kept_min > dropped_max).all()  # the 2 largest magnitudes of each group are the ones kept
    values, meta = nm24.compress_24(p)
    assert values.shape == (12, 32) and meta.shape == (12, 2) and meta.dtype == torch.int32
    assert (values.numel() * 2 + meta.numel() * 4) / (w.numel() * 2) == 0.5625  # in fp16 bytes
    torch.testing.assert_close(nm24.decompress_24(values, meta), p, rtol=0, atol=0)
    sparse = p.clone()
    sparse[0, :4] = torch.tensor([0.0, 0.0, 0.0, 1.5])  # fewer than 2 nonzeros in a group still round-trips
    torch.testing.assert_close(nm24.decompress_24(*nm24.compress_24(sparse)), sparse, rtol=0, atol=0)
    with pytest.raises(ValueError, match="not 2:4 sparse"):
        nm24.compress_24(w)
    assert all(bin(int(m) & 0xFFFFFFFF)[2:].count("1") == 16 for m in meta.flatten())  # 2 bits per group of 4
    with pytest.raises(ValueError, match="not a 2:4 position mask"):
        nm24.decompress_24(values, meta ^ 1)


# one token: the FMA kernels' variants (meta loaded per group or per word; position 2 by selects or by SUM3)
_CONFIGS_24 = [(1, (16, 64, 4, 2, True), (16, 64, 4, 2, True, False)),  # 64 > the rows' 40 groups: one masked chunk
               (1, (8, 32, 4, 2, False), (8, 32, 4, 2, False, True)),
               (1, (16, 16, 4, 2, True), (16, 16, 4, 2, True, False)),
               (5, (32, 64, 4, 2), (32, 64, 4, 2)),
               (5, (32, 256, 4, 2), (32, 256, 4, 2))]


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("T,config,config_t", _CONFIGS_24)
def test_24_kernels_match_masked_dense(backend, T, config, config_t):
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(8)
    w = nm24.prune_24(torch.randn(80, 160, generator=g)).to(device)  # (F, d): fc1 rows / down.T rows
    w[3, :8] = 0  # groups with fewer than two nonzeros still decode
    b = torch.randn(80, generator=g).to(device)
    values, meta = nm24.compress_24(w)
    x = torch.randn(T, 160, generator=g).to(device)
    rows = torch.randperm(80, generator=g)[:40].to(device)
    tol = dict(rtol=5e-3, atol=5e-3)
    torch.testing.assert_close(nm24.nm24_linear(x, values, meta, backend=backend, config=config), x @ w.t(), **tol)
    torch.testing.assert_close(nm24.nm24_linear(x, values, meta, rows, b, backend=backend, config=config),
                               x @ w[rows].t() + b[rows], **tol)
    h = torch.randn(T, 40, generator=g).to(device)
    r = torch.randn(T, 160, generator=g).to(device)
    torch.testing.assert_close(nm24.nm24_linear_t(h, values, meta, rows, backend=backend, config=config_t, splits=2),
                               h @ w[rows], **tol)
    torch.testing.assert_close(nm24.nm24_linear_t(h, values, meta, rows, residual=r, backend=backend,
                                                  config=config_t), r + h @ w[rows], **tol)
    # an FFN's two sides: act(x·W[rows]ᵀ + b) · (x·U[rows]ᵀ) in one call, and the down side with its bias added
    # into an fp32 residual stream in place
    u = nm24.prune_24(torch.randn(80, 160, generator=g)).to(device)
    fused = nm24.nm24_linear(x, values, meta, rows, b, backend=backend, config=config, act="silu",
                             up=nm24.compress_24(u))
    # (on a GPU, tl.dot rounds fp32 inputs to TF32, and the product of two such outputs doubles the error)
    fused_tol = tol if device == "cpu" or T == 1 else dict(rtol=5e-2, atol=5e-1)
    torch.testing.assert_close(fused, F.silu(x @ w[rows].t() + b[rows]) * (x @ u[rows].t()), **fused_tol)
    relu = nm24.nm24_linear(x, values, meta, rows, b, backend=backend, config=config, act="relu")
    torch.testing.assert_close(relu, F.relu(x @ w[rows].t() + b[rows]), **tol)
    stream, bias_d = r.clone(), torch.randn(160, generator=g).to(device)
    returned = nm24.nm24_linear_t(h, values, meta, rows, bias=bias_d, out=stream, backend=backend, config=config_t)
    assert returned is stream
    torch.testing.assert_close(stream, r + h @ w[rows] + bias_d, **tol)
    with pytest.raises(ValueError, match="act must be one of"):
        nm24.nm24_linear(x, values, meta, act="tanh")


def test_pdl_is_off_where_it_cannot_run(monkeypatch):
    """Programmatic dependent launch only on CUDA devices of sm_90+ with Triton's gdc instructions, and never with
    SHADOWSPARSE_PDL=0: off, the kernels get USE_PDL=False and no launch_pdl keyword."""
    from shadowsparse.kernels import pdl
    assert pdl.pdl_kwargs(torch.zeros(1)) == {"USE_PDL": False}
    if torch.cuda.is_available():
        monkeypatch.setenv("SHADOWSPARSE_PDL", "0")
        assert pdl.pdl_kwargs(torch.zeros(1, device="cuda")) == {"USE_PDL": False}
        monkeypatch.setenv("SHADOWSPARSE_PDL", "1")
        on = torch.cuda.get_device_capability()[0] >= 9 and pdl.HAS_GDC
        assert pdl.pdl_kwargs(torch.zeros(1, device="cuda")) == ({"USE_PDL": True, "launch_pdl": True} if on else
                                                                 {"USE_PDL": False})


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_prefill_attention_matches_the_plain_path(kv_heads):
    """The many-token path (torch SDPA over the whole cache with a device-side causal mask) equals the plain
    attention of every head, MHA and GQA, for a step that starts mid-cache (position 7, 20 tokens)."""
    from shadowsparse.kernels.attention import prefill_attention
    g = torch.Generator().manual_seed(21)
    B, H, T, S, D = 2, 4, 20, 40, 16
    device = "cuda" if torch.cuda.is_available() else "cpu"
    q = torch.randn(B, T, H, D, generator=g).to(device)
    k, v = (torch.randn(B, kv_heads, S, D, generator=g).to(device) for _ in range(2))
    pos = torch.tensor([7], device=device)
    heads = torch.arange(H, device=device, dtype=torch.int32)
    ref = decode_attention_torch(q, k, v, heads, pos, 0.25, H)
    torch.testing.assert_close(prefill_attention(q, k, v, pos, 0.25), ref, rtol=1e-4, atol=1e-4)
