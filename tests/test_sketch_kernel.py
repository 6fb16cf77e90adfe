"""The packed sketch (kernels/sketch.py) against the mask path's estimate (shadowsparse.verify, proposer "sketch":
x @ dequantized-copyᵀ from shadowsparse.quant). The Triton kernels run on CUDA, or on the CPU under TRITON_INTERPRET=1
(tests/conftest.py sets it) where triton is installed; the torch fallback is checked everywhere."""
import os

import pytest
import torch
import torch.nn.functional as F

from shadowsparse.gating import topk_mask
from shadowsparse.kernels import sketch as S
from shadowsparse.quant import MidriseCodes, gptq_act_order, gptq_act_order_codes, quantize_rows_codes
from tests.conftest import tiny_model


def triton_device():
    """Where the Triton kernels run here, or None (skip)."""
    if S.triton is None:
        return None
    if torch.cuda.is_available():
        return "cuda"
    return "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else None


def gptq_layer(bits, F_=70, d=576, group=64, seed=0):
    """Gate/up codes fitted by GPTQ in act order on inputs with uneven channel scales (a real permutation), F_ not
    a multiple of any block, d = SmolLM2's 576 (9 groups of 64: not a power of two, not a multiple of 128)."""
    g = torch.Generator().manual_seed(seed)
    wg, wu = torch.randn(F_, d, generator=g) * 0.05, torch.randn(F_, d, generator=g) * 0.05
    xc = torch.randn(256, d, generator=g) * (torch.rand(d, generator=g) * 2 + 0.1)
    h = (xc.T @ xc).double()
    return gptq_act_order_codes(wg, h, bits, group), gptq_act_order_codes(wu, h, bits, group), g


@pytest.mark.parametrize("bits", [2, 3])
def test_pack_round_trip(bits):
    group = 64
    cg, cu, _ = gptq_layer(bits, F_=9, d=256, group=group)
    p = S.pack_sketch(cg, cu)
    nw = bits * group // 32
    assert p.words.shape == (9, 2, nw, 256 // group) and p.words.dtype == torch.int32
    assert p.steps.shape == (9, 2, 256 // group) and p.steps.dtype == torch.float16
    codes = S.unpack_codes(p)
    assert torch.equal(codes[0], cg.codes) and torch.equal(codes[1], cu.codes)
    assert p.nbytes == 2 * 9 * 256 * (bits + 16 / group) / 8  # bits + one fp16 step per group, per weight
    # slot c of a group is x_p column c: the fallback's copy is the quantizer's in act order, steps in fp16
    half = 2 ** (bits - 1)
    want = (cg.codes.float() - half + 0.5) * cg.steps.half().float().repeat_interleave(group, dim=1)
    assert torch.equal(p.dequantized()[0], want)


@pytest.mark.parametrize("bits", [2, 3])
def test_fallback_matches_mask_path(bits):
    """The packed copy differs from the mask path's at most by the fp16 rounding of the steps (<= 2**-11 relative
    per weight; none where quant.midrise_step gives fp16 steps), so each pre-activation is within 2**-11 · Σ|q||x|
    of the mask path's."""
    cg, cu, g = gptq_layer(bits)
    p = S.pack_sketch(cg, cu)
    x = torch.randn(4, 576, generator=g)
    qg, qu = cg.dequantize(), cu.dequantize()  # what VerifyScores multiplies by (gptq_act_order's copy)
    gp, up = S.sketch_preacts_torch(x, p)
    for got, q in ((gp, qg), (up, qu)):
        bound = 2.0 ** -11 * (x.abs() @ q.abs().T) + 1e-6
        assert ((got - x @ q.T).abs() <= bound).all()
    mask = (F.silu(x @ qg.T) * (x @ qu.T)).abs()
    torch.testing.assert_close(S.sketch_scores(x, p, backend="torch"), mask, rtol=1e-2, atol=1e-3 * mask.max())
    assert (((S.sketch_scores(x, p, backend="torch") - mask).norm() / mask.norm()) < 2e-3)


@pytest.mark.parametrize("bits", [2, 3])
@pytest.mark.parametrize("rows,block_g", [(1, 8), (2, 4), (5, 16)])
def test_triton_matches_fallback(bits, rows, block_g):
    """1 row, 2 rows (one pair), 5 rows (two pairs and a lone row); 9 groups in blocks of 8 (the last block
    partial), 4 (three blocks, the words of the next one in flight) or 16 (one masked block)."""
    device = triton_device()
    if device is None:
        pytest.skip("needs triton on CUDA, or TRITON_INTERPRET=1 with triton installed")
    cg, cu, g = gptq_layer(bits, seed=bits)
    p = S.pack_sketch(cg, cu).to(device)
    x = torch.randn(rows, 576, generator=g).to(device)
    ref = S.sketch_scores(x, p, backend="torch")
    out = S.sketch_scores(x, p, backend="triton", config=(16, block_g, 4, 1))  # 70 neurons: 5 blocks, 1 partial
    assert out.shape == (rows, 70) and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * ref.abs().max())  # fp32 throughout


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("rows,segments,seg_rows", [(1, [3, 1], 16), (2, [0, 2, 2], 32), (3, [1], 8)])
def test_scores_of_listed_segments_only(backend, rows, segments, seg_rows):
    """An MoE layer's routed experts: only the rows of the listed segments are scored (repeats allowed), 0 elsewhere;
    segments of whole blocks take the segmented grid (16, 32 rows at block_f 16), 8 rows scores all and cuts."""
    device = "cpu" if backend == "torch" else triton_device()
    if device is None:
        pytest.skip("needs triton on CUDA, or TRITON_INTERPRET=1 with triton installed")
    cg, cu, g = gptq_layer(3, F_=64 * 2, d=256, seed=1)
    p = S.pack_sketch(cg, cu).to(device)
    x = torch.randn(rows, 256, generator=g).to(device)
    full = S.sketch_scores(x, p, backend="torch")
    seg = torch.tensor(segments, device=device)
    out = S.sketch_scores(x, p, backend=backend, config=(16, 4, 4, 1), segments=seg, segment_rows=seg_rows)
    on = torch.zeros(128 // seg_rows, dtype=torch.bool)
    on[segments] = True
    on = on.repeat_interleave(seg_rows).to(device)
    assert (out[:, ~on] == 0).all() and (full[:, on] != 0).all()
    torch.testing.assert_close(out[:, on], full[:, on], rtol=1e-5, atol=1e-5 * full.abs().max())
    with pytest.raises(ValueError, match="segment_rows must divide"):
        S.sketch_scores(x, p, backend=backend, segments=seg, segment_rows=48)


@pytest.mark.parametrize("backend,method", [("torch", "radix"), ("triton", "radix"), ("triton", "bisect")])
def test_topk_indices(backend, method):
    """Each row's k largest as ascending int32 indices, ties to the lowest index; the radix select against a
    stable sort, on random scores (F = 1000: not a power of two) and on rows full of ties."""
    device = triton_device() if backend == "triton" else "cpu"
    if device is None:
        pytest.skip("needs triton on CUDA, or TRITON_INTERPRET=1 with triton installed")
    g = torch.Generator().manual_seed(3)
    s = torch.rand(3, 1000, generator=g)
    s[1] = (s[1] * 4).floor()  # 4 distinct values: k cuts through a tie
    s[2] = 0.0
    s = s.to(device)
    for k in (1, 17, 500, 1000):
        idx = S.topk_indices(s, k, backend=backend, method=method).cpu()
        assert idx.dtype == torch.int32 and idx.shape == (3, k)
        want = torch.sort(s.cpu(), dim=-1, descending=True, stable=True).indices[:, :k].sort(-1).values
        assert torch.equal(idx.long(), want)
    ties = torch.tensor([[1., 2., 2., 2., 0., 3., 2.]]).to(device)
    assert S.topk_indices(ties, 3, backend, method=method).tolist() == [[1, 2, 5]]
    # patterns that share their high bytes and differ only in the last one (the radix select's last pass)
    close = torch.tensor([[1.0, 1.0 + 2 ** -23, 1.0 + 2 ** -22, 1.0 + 3 * 2 ** -23, 0.5, 2.0]]).to(device)
    assert S.topk_indices(close, 3, backend, method=method).tolist() == [[2, 3, 5]]


def test_half_input_and_default_dispatch():
    """x in fp16 (the engine's dtype) through the default kernel choice, without a permutation (round-to-nearest)."""
    device = triton_device()
    if device is None:
        pytest.skip("needs triton on CUDA, or TRITON_INTERPRET=1 with triton installed")
    g = torch.Generator().manual_seed(5)
    wg, wu = torch.randn(40, 128, generator=g) * 0.05, torch.randn(40, 128, generator=g) * 0.05
    p = S.pack_sketch(quantize_rows_codes(wg, 3, 64), quantize_rows_codes(wu, 3, 64)).to(device)
    assert p.perm is None
    x = torch.randn(1, 128, generator=g).half().to(device)
    ref = S.sketch_scores(x, p, backend="torch")
    torch.testing.assert_close(S.sketch_scores(x, p, backend="triton"), ref, rtol=1e-5, atol=1e-5 * ref.max())


def test_topk_matches_mask_path_on_tiny_llama():
    """Layer 1 of a tiny random Llama, on its real FFN inputs: the sketch's top-k (Triton kernel where it runs,
    else the fallback) is the mask path's top-k, except where two neurons' estimates tie within rounding."""
    model = tiny_model("llama")
    mlp = model.model.layers[1].mlp
    inputs = []
    hook = mlp.register_forward_pre_hook(lambda m, a: inputs.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        model(input_ids=torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(0)))
    hook.remove()
    x = torch.cat(inputs)  # (80, 64)
    calib, x = x[:64], x[64:72]  # X^T X from other tokens than the ones scored
    h = (calib.T @ calib).double()
    bits, group, k = 3, 64, 48  # d = 64: one group of 64 in act order; keep half of F = 96
    wg, wu = mlp.gate_proj.weight.detach(), mlp.up_proj.weight.detach()
    qg, qu = gptq_act_order(wg, h, bits, group), gptq_act_order(wu, h, bits, group)
    with torch.no_grad():  # the mask path, as VerifyScores' sketch proposer computes it
        mask_est = (mlp.act_fn(x @ qg.T) * (x @ qu.T)).abs()
    mask_keep = topk_mask(mask_est, k, torch.bool)
    p = S.sketch_from_weights(wg, wu, bits, group, hessian=h)
    device = triton_device() or "cpu"
    p = p.to(device)
    for backend in ["torch"] + (["triton"] if triton_device() else []):
        for rows in (x[:1], x):
            n = rows.shape[0]
            idx = S.sketch_topk(rows.to(device), p, k, backend=backend).cpu()
            assert idx.dtype == torch.int32 and idx.shape == (n, k)
            keep = torch.zeros(n, 96, dtype=torch.bool).scatter_(1, idx.long(), True)
            differ = keep ^ mask_keep[:n]
            kth = mask_est[:n].topk(k, dim=-1).values[:, -1:]  # the mask path's threshold per row
            near = (mask_est[:n] - kth).abs() <= 1e-3 * kth + 1e-6
            assert not (differ & ~near).any(), "a neuron far from the threshold is chosen differently"
            assert differ.sum() <= 2 * n


def test_bad_inputs_refused():
    cg, cu, _ = gptq_layer(3, F_=8, d=128)
    with pytest.raises(ValueError, match="2 or 3 bits"):
        S.pack_sketch(*(quantize_rows_codes(torch.randn(8, 128), 4, 64) for _ in range(2)))
    with pytest.raises(ValueError, match="2 or 3 bits"):
        S.sketch_from_weights(torch.randn(8, 128), torch.randn(8, 128), bits=1)
    with pytest.raises(ValueError, match="must divide"):
        S.sketch_from_weights(torch.randn(8, 96), torch.randn(8, 96), bits=3, group=64)
    with pytest.raises(ValueError, match="groups of 64"):
        S.sketch_from_weights(torch.randn(8, 128), torch.randn(8, 128), bits=3, group=32)
    bad = MidriseCodes(cg.codes[:, :96], cg.steps[:, :1], 3, 64)  # a hand-made copy whose group does not divide d
    with pytest.raises(ValueError, match="must divide"):
        S.pack_sketch(bad, bad)
    with pytest.raises(ValueError, match="one input permutation"):
        S.pack_sketch(cg, MidriseCodes(cu.codes, cu.steps, 3, 64, torch.arange(128)))
    p = S.pack_sketch(cg, cu)
    with pytest.raises(ValueError, match=r"x must be \(B, d\) with d=128"):
        S.sketch_scores(torch.randn(2, 100), p)
    with pytest.raises(ValueError, match="k must be in"):
        S.sketch_topk(torch.randn(2, 128), p, 9)
    with pytest.raises(ValueError, match="backend must be"):
        S.sketch_scores(torch.randn(2, 128), p, backend="cuda")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_scores_with_the_ffns_own_activation(backend):
    """act="gelu_tanh" (Gemma's GeGLU): |gelu_tanh(g)·u| on the same pre-activations, kernel and fallback alike; an
    activation without a gate (relu) or unknown is refused."""
    device = triton_device() if backend == "triton" else "cpu"
    if device is None:
        pytest.skip("needs triton on CUDA, or TRITON_INTERPRET=1 with triton installed")
    cg, cu, g = gptq_layer(3, seed=5)
    p = S.pack_sketch(cg, cu)
    x = torch.randn(3, 576, generator=g)
    gp, up = S.sketch_preacts_torch(x, p)
    want = (F.gelu(gp, approximate="tanh") * up).abs()
    out = S.sketch_scores(x.to(device), p.to(device), backend=backend, act="gelu_tanh").cpu()
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5 * want.max())
    assert not torch.allclose(out, S.sketch_scores(x, p, backend="torch"))  # silu would score otherwise
    for bad in ("relu", "tanh"):
        with pytest.raises(ValueError, match="gated FFN's activation"):
            S.sketch_scores(x, p, act=bad)
