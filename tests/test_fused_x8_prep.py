"""The FFN-input norm fused with the dp4a sketch's int8 x (kernels/sketch_x8.rms_norm_x8): its y is rms_norm's and
its (xq, scale, qsum) are bit for bit prepare_x8's of that y, for both weight conventions, with and without an
act-order permutation, G not a power of two; and the engine gives the same logits with the fusion on and off
(SHADOWSPARSE_FUSED_X8_PREP) on an int8-x sketch_threshold selector. Kernels run under TRITON_INTERPRET=1 on the CPU
(tests/conftest.py sets it) or on CUDA."""
import functools

import pytest
import torch

from shadowsparse.kernels import sketch_x8 as X
from shadowsparse.kernels.rope_norm import rms_norm
from shadowsparse.runtime import DecodeEngine, EngineConfig, extract_weights
from shadowsparse.runtime import engine as engine_mod
from shadowsparse.runtime.ffn_select import SketchFFNSelector, SketchThresholdFFNSelector
from tests.conftest import tiny_model
from tests.test_runtime import engine_model, engine_steps, token_ids
from tests.test_sketch_kernel import gptq_layer, triton_device

EPS = 1e-6


@functools.lru_cache(maxsize=None)
def packed_x8(d, perm: bool):
    """A 3-bit dp4a sketch of a (12, d) gate/up pair: GPTQ in act order (a permutation) or round-to-nearest (made
    once per shape: GPTQ takes seconds on the CPU)."""
    if perm:
        return X.pack_sketch_x8(*gptq_layer(3, F_=12, d=d)[:2])
    g = torch.Generator().manual_seed(1)
    return X.sketch_from_weights_x8(torch.randn(12, d, generator=g), torch.randn(12, d, generator=g))


@pytest.mark.parametrize("w_dtype", [torch.float16, torch.float32])  # Llama's convention, Gemma's (fp32 1 + w)
@pytest.mark.parametrize("perm", [True, False])
@pytest.mark.parametrize("d", [128, 576])  # G = 2, 9
@pytest.mark.parametrize("rows", [1, 2, 3])
def test_fused_kernel_is_rms_norm_then_prepare_x8(rows, d, perm, w_dtype):
    dev = triton_device()
    if dev is None:
        pytest.skip("no Triton device (CUDA, or TRITON_INTERPRET=1 on the CPU)")
    g = torch.Generator().manual_seed(rows * d)
    p = packed_x8(d, perm).to(dev)
    assert (p.perm is not None) == perm
    # the engine's input: the fp32 residual stream (B, T, d), uneven channel scales, fp16 out
    x = (torch.randn(rows, 1, d, generator=g) * (torch.rand(d, generator=g) * 4 + 0.1)).to(dev)
    w = (1 + 0.3 * torch.randn(d, generator=g)).to(dev, w_dtype)
    y, (xq, scale, qsum) = X.rms_norm_x8(x, w, EPS, p, backend="triton", out_dtype=torch.float16)
    want = rms_norm(x, w, EPS, backend="triton", out_dtype=torch.float16)
    assert y.shape == x.shape and y.dtype == torch.float16
    # the fused kernel's norm runs without FMA contraction: on a GPU y may differ from rms_norm's by an fp16 ulp
    ulp = dict(rtol=2 ** -10, atol=1e-5) if dev == "cuda" else dict(rtol=0, atol=0)
    torch.testing.assert_close(y, want, **ulp)
    G = d // 64
    assert xq.shape == (rows, 16, G) and scale.shape == (rows, G) and qsum.shape == (rows, G)
    for prep_backend in ("triton", "torch"):  # exactly the int8 x of its own y, by either prep
        for got, ref in zip((xq, scale, qsum), X.prepare_x8(y.view(rows, d), p, backend=prep_backend)):
            assert torch.equal(got, ref), prep_backend
    # the torch fallback is the two calls
    yt, prep_t = X.rms_norm_x8(x, w, EPS, p, backend="torch", out_dtype=torch.float16)
    assert torch.equal(yt, rms_norm(x, w, EPS, backend="torch", out_dtype=torch.float16))
    for got, ref in zip(prep_t, X.prepare_x8(yt.view(rows, d), p, backend="torch")):
        assert torch.equal(got, ref)


def test_fused_refuses_a_sketch_of_another_width():
    p = packed_x8(128, perm=False)
    with pytest.raises(ValueError, match="x must be"):
        X.rms_norm_x8(torch.randn(2, 192), torch.ones(192), EPS, p, backend="torch")


def threshold_selector(model, packed, backend, device):
    """An int8-x sketch_threshold selector: each gated layer's threshold the median of its sketch's estimates on a
    few random rows (about half the neurons kept; the engine's arithmetic, not calibration, is under test)."""
    weights = extract_weights(model)
    sketch = SketchFFNSelector({k: p.to(device) for k, p in packed.items()}, backend, act=weights.act)
    g = torch.Generator().manual_seed(3)
    thr = torch.zeros(weights.n_layers)
    for layer in packed:
        h = torch.randn(8, weights.hidden, generator=g).to(device)
        thr[layer] = X.sketch_scores_x8(h, sketch.sketches[layer], backend="torch").median()
    return SketchThresholdFFNSelector(sketch, thr)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_engine_same_logits_with_the_fused_prep_on_and_off(monkeypatch, backend):
    """Batch 2, a 3-token prefill, a single token, a 2-token step: identical logits and kept counts with the norm
    making the int8 x and without (two gated layers: the interpreted dp4a emulation is slow). The fused kernel runs
    in every gated layer and step with the kernels, never with the torch fallback (its scoring takes no prepared
    input)."""
    from tests.test_engine_selectors import sketches_of
    dev = triton_device() if backend == "triton" else "cpu"
    if dev is None:
        pytest.skip("no Triton device (CUDA, or TRITON_INTERPRET=1 on the CPU)")
    batch, chunks = 2, [3, 1, 2]
    model = engine_model("llama")  # norm weights off 1
    packed, _ = sketches_of(model, first_layer=2, x_bits=8)
    model = model.to(dev)
    ids = token_ids(batch, sum(chunks), seed=7).to(dev)
    calls = []
    fused = engine_mod.rms_norm_x8
    monkeypatch.setattr(engine_mod, "rms_norm_x8", lambda *a, **k: calls.append(1) or fused(*a, **k))
    expected = len(chunks) * len(packed) if backend == "triton" else 0
    outs, kept = [], []
    for on in (True, False):
        monkeypatch.setattr(engine_mod, "FUSED_X8_PREP", on)
        selector = threshold_selector(model, packed, backend, dev)
        weights = extract_weights(model)
        engine = DecodeEngine(weights, batch=batch, max_len=sum(chunks) + 4,
                              config=EngineConfig(ffn_sparsity=0.5, first_layer=2, backend=backend),
                              ffn_selector=selector)
        outs.append(engine_steps(engine, ids, chunks))
        kept.append(selector.kept.sum().item())
        assert len(calls) == expected  # and none more with the switch off
    assert torch.equal(outs[0], outs[1])
    assert kept[0] == kept[1] and 0 < kept[0] < ids.numel() * len(packed) * weights.ffn  # a real threshold


def test_engine_fuses_only_where_the_norm_output_is_the_sketch_input(monkeypatch):
    """The engine's choice (DecodeEngine._fused_x8_sketch): the layer's PackedSketchX8 for a gated step of <= 16
    rows with the kernels; None for more rows (the masked path), an input threshold on h, the switch off, an
    ungated step, the torch fallback, or an fp32-x sketch."""
    from shadowsparse.kernels.sketch import sketch_from_weights
    from shadowsparse.runtime.engine import Selection
    if X.triton is None:
        pytest.skip("backend='triton' needs the triton package")
    model = tiny_model("llama")
    weights = extract_weights(model)
    g = torch.Generator().manual_seed(0)
    wg, wu = (torch.randn(weights.ffn, weights.hidden, generator=g) for _ in range(2))
    p8 = X.sketch_from_weights_x8(wg, wu)
    monkeypatch.setattr(engine_mod, "FUSED_X8_PREP", True)

    def choice(sketch, backend, rows=16, sel=Selection(), thr=None):
        selector = SketchThresholdFFNSelector(SketchFFNSelector({3: sketch}, backend), torch.ones(weights.n_layers))
        cfg = EngineConfig(ffn_sparsity=0.5, first_layer=3, backend=backend)
        engine = DecodeEngine(weights, batch=1, max_len=32, config=cfg, ffn_selector=selector)
        return engine._fused_x8_sketch(3, torch.randn(1, rows, weights.hidden), sel, thr)

    assert choice(p8, "triton") is p8
    assert choice(p8, "triton", rows=17) is None
    assert choice(p8, "triton", thr=(3, "ffn_in")) is None
    assert choice(p8, "triton", sel=None) is None
    assert choice(p8, "torch") is None
    assert choice(sketch_from_weights(wg, wu), "triton") is None
    monkeypatch.setattr(engine_mod, "FUSED_X8_PREP", False)
    assert choice(p8, "triton") is None
