"""Fast paths against the mask path on random inputs. The Triton kernels run on CUDA, or on the CPU under
TRITON_INTERPRET=1 where triton is installed; the torch fallback is checked everywhere."""
import os

import pytest
import torch

from shadowsparse.kernels import gated_ffn, gated_ffn_reference, gated_ffn_torch
from shadowsparse.kernels import ffn as module

CASES = [  # (T, d, F, k, act, gated, bias)
    (1, 64, 160, 80, "silu", True, False),
    (3, 96, 200, 37, "relu", False, True),
    (8, 72, 128, 128, "gelu", True, False),
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
    if module.triton is None:
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


def test_bad_activation():
    args, kw = _inputs(*CASES[0])
    with pytest.raises(ValueError, match="act must be"):
        gated_ffn(*args, **{**kw, "act": "tanh"})
