"""shadowsparse.quant: the *_codes quantizers give the codes, steps and permutation a packed kernel stores, and the
dequantized copies (what the mask path multiplies by) are computed from them, bit-identical to the copies the
quantizers gave before codes existed (the pre-codes functions are kept below, verbatim, as the reference)."""
import pytest
import torch

from shadowsparse.errors import ConfigError
from shadowsparse.quant import (MidriseCodes, gptq_act_order, gptq_act_order_codes, gptq_rows, gptq_rows_codes,
                                midrise_step, quantize_rows, quantize_rows_codes)


def _old_midrise(g, step, bits):
    half = 2 ** (bits - 1)
    return ((g / step).floor().clamp(-half, half - 1) + 0.5) * step


def _old_quantize_rows_midrise(w, bits, group):
    F, d = w.shape
    g = w.detach().float().reshape(F, d // group, group)
    return _old_midrise(g, midrise_step(g, bits), bits).reshape(F, d).to(w.dtype)


def _old_gptq_rows(w, hessian, bits, group, damp=0.01):
    F, d = w.shape
    W = w.detach().float().clone()
    H = hessian.to(W.device, torch.float64).clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    H += damp * torch.diag(H).mean() * torch.eye(d, dtype=H.dtype, device=H.device)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True).float()
    Q = torch.zeros_like(W)
    for j0 in range(0, d, group):
        j1 = j0 + group
        blk, err = W[:, j0:j1].clone(), W.new_zeros(F, group)
        step = midrise_step(blk, bits) if bits > 1 else None
        scale = blk.abs().mean(-1, keepdim=True)
        for i in range(group):
            col = blk[:, i:i + 1]
            q = col.sign() * scale if bits == 1 else _old_midrise(col, step, bits)
            Q[:, j0 + i:j0 + i + 1] = q
            err[:, i:i + 1] = (col - q) / U[j0 + i, j0 + i]
            blk[:, i + 1:] -= err[:, i:i + 1] @ U[j0 + i:j0 + i + 1, j0 + i + 1:j1]
        W[:, j1:] -= err @ U[j0:j1, j1:]
    return Q.to(w.dtype)


def _old_gptq_act_order(w, hessian, bits, group, damp=0.01):
    perm = torch.argsort(torch.diag(hessian), descending=True)
    q = torch.empty_like(w)
    q[:, perm] = _old_gptq_rows(w[:, perm], hessian[perm][:, perm], bits, group, damp)
    return q


def _problem(seed=0, F=80, d=192):
    """A random weight and the X^T X of inputs with uneven channel scales (so act order is a real permutation)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(F, d, generator=g) * 0.05
    x = torch.randn(400, d, generator=g) * (torch.rand(d, generator=g) * 3 + 0.1)
    return w, (x.T @ x).double()


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_copies_bit_identical_to_before(bits, dtype):
    w, h = _problem(bits)
    w = w.to(dtype)
    assert torch.equal(gptq_rows(w, h, bits, 64), _old_gptq_rows(w, h, bits, 64))
    assert torch.equal(gptq_act_order(w, h, bits, 64), _old_gptq_act_order(w, h, bits, 64))
    if bits > 1:
        assert torch.equal(quantize_rows(w, bits, 32), _old_quantize_rows_midrise(w, bits, 32))


@pytest.mark.parametrize("bits", [2, 3])
def test_codes_give_the_copies(bits):
    w, h = _problem(10 + bits)
    rtn = quantize_rows_codes(w, bits, 64)
    rows = gptq_rows_codes(w, h, bits, 64)
    ordered = gptq_act_order_codes(w, h, bits, 64)
    for c in (rtn, rows, ordered):
        assert isinstance(c, MidriseCodes) and c.codes.dtype == torch.uint8 and c.codes.shape == w.shape
        assert int(c.codes.max()) < 2 ** bits and c.steps.shape == (80, 3) and c.steps.dtype == torch.float32
    assert torch.equal(rtn.dequantize(), quantize_rows(w, bits, 64))
    assert torch.equal(rows.dequantize(), gptq_rows(w, h, bits, 64))
    assert torch.equal(ordered.dequantize(), gptq_act_order(w, h, bits, 64))
    half_w = w.half()  # a half weight: the copy comes back in half, from the same codes
    assert torch.equal(gptq_act_order_codes(half_w, h, bits, 64).dequantize(torch.float16),
                       gptq_act_order(half_w, h, bits, 64))
    # act order: the permutation sorts diag(H) down, and the codes are gptq_rows' on the permuted problem
    perm = ordered.perm
    assert torch.equal(perm, torch.argsort(torch.diag(h), descending=True)) and not torch.equal(perm, torch.arange(192))
    assert torch.equal(ordered.codes, gptq_rows_codes(w[:, perm], h[perm][:, perm], bits, 64).codes)
    # the copy in act order is the level of each code: (code - 2**(bits-1) + 1/2) * step of its group
    half = 2 ** (bits - 1)
    by_hand = (ordered.codes.float() - half + 0.5) * ordered.steps.repeat_interleave(64, dim=1)
    assert torch.equal(by_hand, gptq_act_order(w, h, bits, 64)[:, perm])


def test_codes_refuse_one_bit_and_bad_groups():
    w, h = _problem()
    with pytest.raises(ConfigError, match="bits >= 2"):
        gptq_rows_codes(w, h, 1, 64)
    with pytest.raises(ConfigError, match="bits >= 2"):
        quantize_rows_codes(w, 1, 64)
    with pytest.raises(ConfigError, match="must divide"):
        quantize_rows_codes(w, 3, 100)
