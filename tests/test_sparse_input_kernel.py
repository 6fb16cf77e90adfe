"""The input-sparse linear (kernels/sparse_input.py, TEAL's kernel idea): the Triton kernel (interpreted on the CPU
with TRITON_INTERPRET=1) and the torch path against the mask path's definition, masked input times the dense
weight; the kept-pair count against the mask; and that a skipped channel's weight row is never read."""
import os

import pytest
import torch

from shadowsparse.kernels import common
from shadowsparse.kernels.sparse_input import input_mask, input_sparse_linear


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


@pytest.mark.parametrize("T", [1, 3, 16, 20])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_input_sparse_linear_matches_masked_dense(T, bias, backend):
    device = "cpu" if backend == "torch" else _device()
    if device is None:
        pytest.skip("needs triton on CUDA, or TRITON_INTERPRET=1 with triton installed")
    x, w_t, b, thr = _case(T, 96, 200, bias, device)  # K and N not multiples of the blocks: masked tails
    count = torch.zeros(1, device=device)
    y = input_sparse_linear(x, w_t, thr, b, backend=backend, count=count, kernel_tokens=16)
    ref, kept = _reference(x, w_t, b, thr)
    torch.testing.assert_close(y, ref, rtol=2e-3, atol=2e-3)  # tl.dot may run fp32 as tf32 on a GPU
    assert count.item() == kept
    assert 0.3 < 1 - kept / x.numel() < 0.7  # the case really skips about half


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_residual_and_out_accumulate(backend):
    device = "cpu" if backend == "torch" else _device()
    if device is None:
        pytest.skip("needs triton on CUDA, or TRITON_INTERPRET=1 with triton installed")
    x, w_t, b, thr = _case(2, 64, 64, True, device, seed=1)
    ref, _ = _reference(x, w_t, b, thr)
    r = torch.randn(2, 64, device=device)
    torch.testing.assert_close(input_sparse_linear(x, w_t, thr, b, backend=backend, residual=r, kernel_tokens=16),
                               r + ref, rtol=2e-3, atol=2e-3)
    out = r.clone()
    assert input_sparse_linear(x, w_t, thr, b, backend=backend, out=out, kernel_tokens=16) is out
    torch.testing.assert_close(out, r + ref, rtol=2e-3, atol=2e-3)


def test_skipped_rows_are_not_read():
    """A channel no token keeps may hold NaN in its weight row and the result stays finite: the row is never
    loaded (the masked load is what saves its bytes on a GPU)."""
    device = _device()
    if device is None:
        pytest.skip("needs triton on CUDA, or TRITON_INTERPRET=1 with triton installed")
    x, w_t, b, thr = _case(1, 64, 128, False, device, seed=2)
    skipped = (x.abs() <= thr).all(0)  # (K,)
    assert skipped.any()
    poisoned = w_t.clone()
    poisoned[skipped] = float("nan")
    y = input_sparse_linear(x, poisoned, thr, backend="triton")
    torch.testing.assert_close(y, _reference(x, w_t, None, thr)[0], rtol=2e-3, atol=2e-3)


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
