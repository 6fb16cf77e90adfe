"""Selectors in the decode engine against their mask path: the sketch's per-layer FFN choice (runtime/ffn_select.py,
kernels/sketch.py) and load_gated's engine path. CPU, fp32; kernels as torch fallbacks and, where Triton is
installed, interpreted (conftest sets TRITON_INTERPRET=1 without CUDA)."""
import pytest
import torch

import shadowsparse as ss
from shadowsparse import GatingConfig, attach_gating
from shadowsparse.arch import ModelView
from shadowsparse.errors import ConfigError
from shadowsparse.kernels import common as kernels_common
from shadowsparse.kernels.sketch import sketch_from_weights
from shadowsparse.llm import LLMConfig, load_llm
from shadowsparse.runtime import DecodeEngine, EngineConfig, extract_weights
from shadowsparse.runtime.ffn_select import SketchFFNSelector
from shadowsparse.verify import VerifyConfig, VerifyScores
from tests.conftest import tiny_model
from tests.test_runtime import CHUNKS, TRITON_DEVICE, TRITON_TOL, engine_steps, token_ids

BACKENDS = ["torch"] + (["triton"] if kernels_common.triton is not None else [])
TOL = dict(rtol=1e-4, atol=1e-4)


def sketches_of(model, first_layer, bits=3, seed=0):
    """Packed sketches of every gated layer (GPTQ act order on a random positive-definite X^T X, so the input
    permutation is exercised), and the mask path's VerifyScores reading exactly those copies."""
    view = ModelView(model)
    g = torch.Generator().manual_seed(seed)
    packed, qcache = {}, {}
    cfg = VerifyConfig(q=0.0, bits=bits, group=64, quantizer="gptq")
    for layer in range(first_layer, view.dims.n_layers):
        x = torch.randn(256, view.dims.hidden, generator=g) * torch.linspace(0.2, 3, view.dims.hidden)
        w_gate, w_up = view.module(layer, "mlp.gate_proj").weight, view.module(layer, "mlp.up_proj").weight
        p = sketch_from_weights(w_gate, w_up, bits, 64, x.T @ x)
        packed[layer] = p
        wp = p.dequantized()  # (2, F, d) in the permuted column order
        w = torch.empty_like(wp)
        w[:, :, p.perm.long()] = wp  # back to the model's column order, as the mask path multiplies
        for i, path in enumerate(("mlp.gate_proj", "mlp.up_proj")):
            qcache[(layer, path, bits, 64, "gptq")] = w[i]
    source = VerifyScores(0.0, proposer="sketch", sketch=cfg, qcache=qcache, hessians={})
    return packed, source


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch", [1, 2])
def test_sketch_engine_matches_its_mask_path(backend, batch):
    """Prefill, single tokens and a 3-token step: the engine's gathered FFN on the sketch's top k of each token equals
    the mask path zeroing the same neurons (VerifyScores on the same low-bit copies)."""
    device, tol = (TRITON_DEVICE, TRITON_TOL) if backend == "triton" else ("cpu", TOL)
    model = tiny_model("llama")
    packed, source = sketches_of(model, first_layer=1)
    model = model.to(device)
    for key, copy in list(source._qweights.items()):  # the mask path's low-bit copies follow the model
        source._qweights[key] = copy.to(device)
    ids = token_ids(batch, sum(CHUNKS), seed=7).to(device)
    cfg = EngineConfig(ffn_sparsity=0.5, first_layer=1, backend=backend)
    engine = DecodeEngine(extract_weights(model), batch=batch, max_len=32, config=cfg,
                          ffn_selector=SketchFFNSelector({k: p.to(device) for k, p in packed.items()}, backend))
    out = engine_steps(engine, ids, CHUNKS)
    with attach_gating(model, source, GatingConfig(ffn_sparsity=0.5, first_layer=1)) as h, torch.no_grad():
        ref = model(ids).logits
        assert h.stats()["realized_ffn_sparsity"] == pytest.approx(0.5, abs=1e-6)
    torch.testing.assert_close(out, ref, **tol)
    with torch.no_grad():
        assert (model(ids).logits - ref).abs().max() > 1e-2  # gating changed the output: the check is not vacuous


def test_sketch_engine_many_token_step_and_generate():
    """A 40-token prefill (more than 16 rows: the masked cuBLAS path with the sketch's per-token masks), then greedy
    decoding, token for token equal to the mask path."""
    model = tiny_model("llama")
    packed, source = sketches_of(model, first_layer=1, bits=2, seed=1)
    ids = token_ids(1, 40, seed=8)
    engine = DecodeEngine(extract_weights(model), batch=1, max_len=64,
                          config=EngineConfig(ffn_sparsity=0.6, first_layer=1, backend="torch"),
                          ffn_selector=SketchFFNSelector(packed, backend="torch"))
    out = engine.generate(ids, 8)
    with attach_gating(model, source, GatingConfig(ffn_sparsity=0.6, first_layer=1)), torch.no_grad():
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, min_new_tokens=8,
                             do_sample=False, pad_token_id=0)
    assert torch.equal(out, ref)


def test_an_ffn_selector_refuses_2_4_weights():
    model = tiny_model("llama")
    packed, _ = sketches_of(model, first_layer=1)
    with pytest.raises(ConfigError, match="2:4"):
        DecodeEngine(extract_weights(model), batch=1, max_len=16, config=EngineConfig(ffn_sparsity=0.5, nm24=True),
                     ffn_selector=SketchFFNSelector(packed))


CALIB = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(0))
FAST = ["evaluate.verify.calib_windows=4"]


@pytest.fixture(scope="module")
def llama():
    return load_llm(LLMConfig(name="random:llama", seed=0))


def test_load_gated_runs_the_engine_and_agrees_with_the_hooks(llama):
    model, tok = llama
    kw = dict(tokenizer=tok, calib=CALIB, overrides=FAST, ffn_sparsity=0.5)
    fast = ss.load_gated(model, method="sketch", engine="kernels", **kw)
    ref = ss.load_gated(model, method="sketch", engine="hooks", **kw)
    assert fast.engine == "kernels" and ref.engine == "hooks"
    windows = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(4))
    p_ref = ref.perplexity(windows)
    # the engine's copy stores its steps in fp16 (2**-11 relative): a neuron at the top-k boundary may flip
    assert fast.perplexity(windows) == pytest.approx(p_ref, rel=1e-3)
    assert fast.perplexity(windows, token_by_token=True) == pytest.approx(p_ref, rel=1e-3)
    dense_fast = ss.load_gated(model, method="dense", engine="kernels", tokenizer=tok)
    dense_ref = ss.load_gated(model, method="dense", engine="hooks", tokenizer=tok)
    prompts = ["a longer prompt here", "short", "other"]  # two lengths: the engine runs them in two groups
    assert dense_fast.generate(prompts, max_new_tokens=6) == dense_ref.generate(prompts, max_new_tokens=6)
    st = fast.stats()
    assert st["engine"] == "kernels" and st["realized_ffn_sparsity"] == pytest.approx(0.5, abs=0.01)


def test_engine_kernels_refused_where_there_is_no_engine_path(llama):
    model, tok = llama
    with pytest.raises(ConfigError, match="engine='kernels' cannot run gate"):
        ss.load_gated(model, method="gate", engine="kernels", tokenizer=tok)
    with pytest.raises(ConfigError, match="cannot run threshold here: threshold's head"):
        ss.load_gated(model, method="threshold", engine="kernels", tokenizer=tok, calib=CALIB, head_sparsity=0.3,
                      overrides=["evaluate.threshold_windows=2"])
    g = ss.load_gated(model, method="gate", engine="auto", tokenizer=tok)
    assert g.engine == "hooks"  # auto falls back to the mask path, with the reason logged


@pytest.mark.parametrize("method,sparsity", [("teal", 0.4), ("threshold", 0.5)])
def test_load_gated_input_thresholds_in_the_engine_agree_with_the_hooks(llama, method, sparsity):
    """teal and threshold through load_gated: the engine (kernels/sparse_input.py) and the hooks give the same
    perplexity (prefill and token by token), the same greedy text, and the same realized sparsity."""
    model, tok = llama
    kw = dict(tokenizer=tok, calib=CALIB, overrides=["evaluate.threshold_windows=4"], ffn_sparsity=sparsity)
    fast = ss.load_gated(model, method=method, engine="kernels", **kw)
    ref = ss.load_gated(model, method=method, engine="hooks", **kw)
    windows = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(5))
    p_ref = ref.perplexity(windows)
    # fp32 on both paths, the same channels kept: only the summation order differs. The tiny random model is near
    # uniform (perplexity ~ its vocabulary), so the thresholds move it by ~1e-4: the tolerance sits far below that
    assert fast.perplexity(windows) == pytest.approx(p_ref, rel=2e-6)
    assert fast.perplexity(windows, token_by_token=True) == pytest.approx(p_ref, rel=2e-6)
    dense = ss.load_gated(model, method="dense", engine="hooks", tokenizer=tok).perplexity(windows)
    assert abs(p_ref / dense - 1) > 2e-5  # the thresholds changed the model: the comparison is not vacuous
    st_fast, st_ref = fast.stats(), ref.stats()
    for key in ("realized_ffn_sparsity", "realized_attn_in_sparsity", "realized_attn_out_sparsity"):
        if key in st_ref:
            assert st_fast[key] == pytest.approx(st_ref[key], abs=1e-6), key
    assert st_fast["realized_ffn_sparsity"] == pytest.approx(sparsity, abs=0.15)
    prompts = ["one prompt", "two words"]
    assert fast.generate(prompts, max_new_tokens=5) == ref.generate(prompts, max_new_tokens=5)
