"""The dp4a sketch (kernels/sketch_x8.py): its layout round-trips the codes, its x quantization is the same in the
kernel and the fallback, the kernel's scores equal the fallback's exact-integer ones up to fp32 summation order,
and the int8-x estimate stays close to the fp32 one (kernels/sketch.py). Kernels run under TRITON_INTERPRET=1 on
the CPU (tests/conftest.py sets it) or on CUDA."""
import pytest
import torch

from shadowsparse.kernels import sketch as S
from shadowsparse.kernels import sketch_x8 as X
from tests.test_sketch_kernel import gptq_layer, triton_device


@pytest.mark.parametrize("bits", [2, 3])
def test_layout_round_trip(bits):
    cg, cu, _ = gptq_layer(bits, F_=9, d=256)
    p = X.pack_sketch_x8(cg, cu)
    assert p.words.shape == (9, 2, bits * 2, 4) and p.nbytes == S.pack_sketch(cg, cu).nbytes
    codes = X.unpack_codes_x8(p)  # (2, F, G, 64)
    assert torch.equal(codes[0].reshape(9, 256), cg.codes) and torch.equal(codes[1].reshape(9, 256), cu.codes)


def test_quantize_x8_bounds_and_zero_groups():
    x = torch.randn(2, 128)
    x[1, :64] = 0  # an all-zero group: q = 0, scale = 0 (no division by zero)
    q, scale = X.quantize_x8(x, None)
    assert q.abs().max() == 127 and torch.equal(q, q.round())
    assert q[1, 0].abs().sum() == 0 and scale[1, 0] == 0
    assert ((q * scale[..., None]).reshape(2, 128) - x).abs().max() <= scale.max() / 2 + 1e-7


@pytest.mark.parametrize("bits", [2, 3])
def test_fallback_is_exact_integer_form_of_the_fp32_estimate(bits):
    """With x already on the int8 grid of each group (x = q·scale exactly), the int8 estimate IS the fp32 sketch's
    estimate of the same codes: the integer form changes nothing but the rounding of x."""
    cg, cu, g = gptq_layer(bits)
    p8, p = X.pack_sketch_x8(cg, cu), S.pack_sketch(cg, cu)
    x = torch.randn(3, 576, generator=g) * (torch.rand(576, generator=g) * 2 + 0.1)
    q, scale = X.quantize_x8(x, p8.perm)
    xp_grid = (q * scale[..., None]).reshape(3, 576)
    x_grid = torch.empty_like(xp_grid)
    x_grid[:, p8.perm.long()] = xp_grid  # back to x's own channel order
    got = X.sketch_scores_x8(x_grid, p8, backend="torch")
    want = S.sketch_scores(x_grid, p, backend="torch")
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-6)
    # off the grid: the int8 rounding moves the estimate by ~1% here (uneven channel scales) and keeps the ranking
    k = 35
    top8 = set(S.topk_indices(X.sketch_scores_x8(x, p8, backend="torch"), k, backend="torch")[0].tolist())
    top = set(S.topk_indices(S.sketch_scores(x, p, backend="torch"), k, backend="torch")[0].tolist())
    assert len(top8 & top) >= 0.85 * k


@pytest.mark.parametrize("bits", [2, 3])
@pytest.mark.parametrize("rows", [1, 2, 3])
def test_kernel_matches_fallback(bits, rows):
    dev = triton_device()
    if dev is None:
        pytest.skip("no Triton device (CUDA, or TRITON_INTERPRET=1 on the CPU)")
    cg, cu, g = gptq_layer(bits)
    p = X.pack_sketch_x8(cg, cu).to(dev)
    x = (torch.randn(rows, 576, generator=g) * (torch.rand(576, generator=g) * 2 + 0.1)).to(dev)
    for a, b in zip(X.prepare_x8(x, p, backend="torch"), X.prepare_x8(x, p, backend="triton")):
        assert torch.equal(a, b)  # the same int8 values, scales and sums
    want = X.sketch_scores_x8(x, p, backend="torch")
    for act in ("silu", "gelu_tanh"):
        got = X.sketch_scores_x8(x, p, backend="triton", act=act)
        ref = X.sketch_scores_x8(x, p, backend="torch", act=act)
        assert torch.allclose(got, ref, rtol=1e-5, atol=1e-6), (act, (got - ref).abs().max())
    # the emulated dot product (the interpreter's) and dp4a give the same integers
    if dev == "cuda":
        emu = X.score_prepared_x8(*X.prepare_x8(x, p), p, asm=False)
        assert torch.allclose(emu, want, rtol=1e-5, atol=1e-6)


def test_bad_inputs():
    cg, cu, _ = gptq_layer(3, F_=4, d=128)
    p = X.pack_sketch_x8(cg, cu)
    with pytest.raises(ValueError, match="x must be"):
        X.prepare_x8(torch.randn(2, 64), p)
    cg2, _, _ = gptq_layer(2, F_=4, d=128)
    with pytest.raises(ValueError, match="share shape, bits"):
        X.pack_sketch_x8(cg, cg2)
