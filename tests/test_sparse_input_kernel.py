"""The input-sparse linear (kernels/sparse_input.py, TEAL's kernel idea): the Triton kernels — compacted (channel
lists, then whole tiles of kept rows) and masked-row — interpreted on the CPU with TRITON_INTERPRET=1, and the
torch path against the mask path's definition, masked input times the dense weight; the kept-pair count against
the mask; that a skipped channel's weight row is never read; and the fused act(gate) * up input of the down
projection against the model's rounding."""
import os

import pytest
import torch

from shadowsparse.kernels import common
from shadowsparse.kernels.ffn import apply_act
from shadowsparse.kernels.sparse_input import act_input_sparse_linear, input_mask, input_sparse_linear

VARIANTS = [("torch", None), ("triton", True), ("triton", False)]  # (backend, compact)
VARIANT_IDS = ["torch", "triton-compact", "triton-masked"]


def _device():
    if common.triton is None:
        return None
    if torch.cuda.is_available():
        return "cuda"
    return "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else None


def _case(T, K, N, bias, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, K, generator=g).to(device)
    w_t = (torch.randn(K, N, generator=g) / K ** 0.5).to(device)
    b = torch.randn(N, generator=g).to(device) if bias else None
    thr = x.abs().flatten().quantile(0.5).view(1).to(device)  # about half the (token, channel) pairs skipped
    return x, w_t, b, thr


def _reference(x, w_t, b, thr):
    keep = x.abs() > thr
    y = (x * keep) @ w_t
    return y if b is None else y + b, keep.sum().item()


def _device_for(backend):
    device = "cpu" if backend == "torch" else _device()
    if device is None:
        pytest.skip("needs triton on CUDA, or TRITON_INTERPRET=1 with triton installed")
    return device


@pytest.mark.parametrize("T", [1, 3, 16, 20])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("backend,compact", VARIANTS, ids=VARIANT_IDS)
def test_input_sparse_linear_matches_masked_dense(T, bias, backend, compact):
    device = _device_for(backend)
    x, w_t, b, thr = _case(T, 96, 200, bias, device)  # K and N not multiples of the blocks: masked tails
    count = torch.zeros(1, device=device)
    y = input_sparse_linear(x, w_t, thr, b, backend=backend, count=count, kernel_tokens=16, compact=compact)
    ref, kept = _reference(x, w_t, b, thr)
    torch.testing.assert_close(y, ref, rtol=2e-3, atol=2e-3)  # tl.dot may run fp32 as tf32 on a GPU
    assert count.item() == kept
    assert 0.3 < 1 - kept / x.numel() < 0.7  # the case really skips about half


@pytest.mark.parametrize("backend,compact", VARIANTS, ids=VARIANT_IDS)
def test_residual_and_out_accumulate(backend, compact):
    device = _device_for(backend)
    x, w_t, b, thr = _case(2, 64, 64, True, device, seed=1)
    ref, _ = _reference(x, w_t, b, thr)
    r = torch.randn(2, 64, device=device)
    kw = dict(backend=backend, kernel_tokens=16, compact=compact)
    torch.testing.assert_close(input_sparse_linear(x, w_t, thr, b, residual=r, **kw), r + ref, rtol=2e-3, atol=2e-3)
    out = r.clone()
    assert input_sparse_linear(x, w_t, thr, b, out=out, **kw) is out
    torch.testing.assert_close(out, r + ref, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("compact", [True, False], ids=["compact", "masked"])
@pytest.mark.parametrize("T", [1, 3])
def test_skipped_rows_are_not_read(compact, T):
    """A channel no token keeps may hold NaN in its weight row and the result stays finite: the row is never
    loaded (what saves its bytes on a GPU)."""
    device = _device_for("triton")
    x, w_t, b, thr = _case(T, 300, 128, False, device, seed=2)  # several segments, the last one partial
    skipped = (x.abs() <= thr).all(0)  # (K,)
    assert skipped.any()
    poisoned = w_t.clone()
    poisoned[skipped] = float("nan")
    for _ in range(2):  # a fresh accumulator from torch.empty is zeroed by the compaction kernel every call
        y = input_sparse_linear(x, poisoned, thr, backend="triton", compact=compact, config=(16, 64, 4, 2))
        torch.testing.assert_close(y, _reference(x, w_t, None, thr)[0], rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("act,glu", [("silu", True), ("relu", False), ("gelu", True)])
@pytest.mark.parametrize("backend,compact", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("T", [1, 4])
def test_act_input_sparse_linear_matches_the_models_down_input(act, glu, backend, compact, T):
    """a = act(gate) * up rounded to the model dtype, then thresholded: gate and up are halves of one fused fp32
    accumulator (the engine's gate/up output), the down weight fp16 — so the rounding of a is observable."""
    device = _device_for(backend)
    g = torch.Generator().manual_seed(3)
    F_, d = 160, 48
    gu = torch.randn(T, 2 * F_, generator=g).to(device)  # (T, 2F) fp32
    gate, up = gu[:, :F_], (gu[:, F_:] if glu else None)
    w_t = (torch.randn(F_, d, generator=g) / F_ ** 0.5).to(torch.float16).to(device)
    b = torch.randn(d, generator=g).to(device)
    a = apply_act(gate.half(), act)
    a = (a if up is None else a * up.half()).half()  # the model's down input, (T, F)
    thr = a.float().abs().flatten().quantile(0.5).view(1)
    keep = a.float().abs() > thr
    ref = (torch.where(keep, a, 0).float() @ w_t.float()) + b
    r = torch.randn(T, d, device=device)
    count = torch.zeros(1, device=device)
    out = r.clone()
    if compact is not None:  # the fresh accumulator too: zeroed by the small kernel, not by a memset
        y = act_input_sparse_linear(gate, up, act, w_t, thr, b, backend=backend, dtype=torch.float16,
                                    compact=compact, out_dtype=torch.float32)
        torch.testing.assert_close(y, ref, rtol=2e-3, atol=2e-3)
    act_input_sparse_linear(gate, up, act, w_t, thr, b, backend=backend, out=out, count=count,
                            dtype=torch.float16, compact=compact)
    torch.testing.assert_close(out, r + ref, rtol=1e-2, atol=1e-2)  # the torch path's product is fp16
    assert count.item() == keep.sum().item()  # the kernel's a is the model's to the bit


def test_fp16_threshold_compares_like_the_hooks():
    """With τ rounded to fp16, comparing in fp32 keeps exactly the channels an fp16 hook keeps."""
    x = torch.randn(4, 256).half()
    thr = torch.tensor([0.6745]).half().float()
    hook_keep = x.abs() > thr.half()[0]  # the hook compares fp16 with fp16
    assert torch.equal(input_mask(x, thr) != 0, hook_keep & (x != 0))


def test_bad_shapes_are_refused():
    x, w_t, b, thr = _case(1, 32, 16, False)
    with pytest.raises(ValueError, match="share K"):
        input_sparse_linear(x, w_t.t(), thr)
    with pytest.raises(ValueError, match="one-element"):
        input_sparse_linear(x, w_t, thr.expand(2))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("act", [None, "silu", "relu", "gelu"])
def test_mask_kernels_of_many_token_steps_equal_the_mask_rule(dtype, act):
    """mask_input / act_mask_input (the producer side of a many-token step: the dense GEMM follows) against the
    mask path's rule on the model-rounded values, with the kept pairs counted. fp16 bit for bit; fp32 within a few
    ulps of torch's activation times up (the erf gelu's product measured 2 ulps off: 1.4e-6 at 7.0)."""
    from shadowsparse.kernels.sparse_input import act_mask_input, mask_input
    device = _device()
    if device is None:
        pytest.skip("needs Triton (CUDA, or TRITON_INTERPRET=1)")
    g = torch.Generator().manual_seed(4)
    gate, up = (torch.randn(5, 1000, generator=g).to(device) for _ in range(2))
    thr = torch.tensor([0.3], device=device)
    for u in ((up, None) if act else (None,)):
        counts = [torch.zeros(1, device=device) for _ in range(2)]
        if act is None:
            got = mask_input(gate, thr, counts[0], out_dtype=dtype, backend="triton")
            ref = mask_input(gate, thr, counts[1], out_dtype=dtype, backend="torch")
            a = gate.to(dtype)
        else:
            got = act_mask_input(gate, u, act, thr, counts[0], dtype=dtype, backend="triton")
            ref = act_mask_input(gate, u, act, thr, counts[1], dtype=dtype, backend="torch")
            a = apply_act(gate.to(dtype), act)
            a = (a if u is None else a * u.to(dtype)).to(dtype)
        assert got.dtype == dtype
        if dtype == torch.float16:
            assert torch.equal(got, ref)
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
        assert counts[0].item() == counts[1].item() == (a.float().abs() > thr).sum().item()
        assert torch.equal(ref, input_mask(a, thr))  # the torch path is the mask path's rule
        assert 0 < (got == 0).float().mean() < 1  # the threshold bites
