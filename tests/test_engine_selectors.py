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
from shadowsparse.kernels.sketch_x8 import from_packed
from shadowsparse.llm import LLMConfig, load_llm
from shadowsparse.runtime import DecodeEngine, EngineConfig, extract_weights
from shadowsparse.runtime.ffn_select import SketchFFNSelector, SketchThresholdFFNSelector
from shadowsparse.verify import SketchThresholdScores, VerifyConfig, VerifyScores
from tests.conftest import tiny_model
from tests.test_runtime import CHUNKS, TRITON_DEVICE, TRITON_TOL, engine_steps, token_ids

BACKENDS = ["torch"] + (["triton"] if kernels_common.triton is not None else [])
TOL = dict(rtol=1e-4, atol=1e-4)


def sketches_of(model, first_layer, bits=3, seed=0, x_bits=None):
    """Packed sketches of every gated layer (GPTQ act order on a random positive-definite X^T X, so the input
    permutation is exercised), and the mask path's VerifyScores reading exactly those copies (cached under the
    gate and up paths, or a fused gate_up's path and [gate] / [up]: verify.VerifyScores._qweight). x_bits 8: the
    dp4a layout (int8 x) and a mask path rounding x the same way, in the copy's input order."""
    view = ModelView(model)
    spec = view.spec
    paths = spec.ffn_in if spec.gate_up == "separate" else [f"{spec.ffn_in[0]}[{b}]" for b in ("gate", "up")]
    g = torch.Generator().manual_seed(seed)
    packed, qcache, hessians = {}, {}, {}
    cfg = VerifyConfig(q=0.0, bits=bits, group=64, quantizer="gptq", x_bits=x_bits)
    for layer in range(first_layer, view.dims.n_layers):
        x = torch.randn(256, view.dims.hidden, generator=g) * torch.linspace(0.2, 3, view.dims.hidden)
        (w_gate, _), (w_up, _) = view.ffn_in_rows(layer)  # (F, d) each, row views of a fused gate_up
        hessians[layer] = x.T @ x  # the mask path's act order (and int8 groups of x) come from it
        p = sketch_from_weights(w_gate, w_up, bits, 64, hessians[layer])
        packed[layer] = from_packed(p) if x_bits == 8 else p
        wp = p.dequantized()  # (2, F, d) in the permuted column order
        w = torch.empty_like(wp)
        w[:, :, p.perm.long()] = wp  # back to the model's column order, as the mask path multiplies
        for i, path in enumerate(paths):
            qcache[(layer, path, bits, 64, "gptq")] = w[i]
    source = VerifyScores(0.0, proposer="sketch", sketch=cfg, qcache=qcache, hessians=hessians)
    return packed, source


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family,batch,x_bits", [("llama", 1, None), ("llama", 2, None), ("phi3", 2, None),
                                                 ("gemma", 1, None), ("gemma2", 2, None), ("llama", 2, 8),
                                                 ("phi3", 1, 8)])
def test_sketch_engine_matches_its_mask_path(backend, family, batch, x_bits):
    """Prefill, single tokens and a 3-token step: the engine's gathered FFN on the sketch's top k of each token equals
    the mask path zeroing the same neurons (VerifyScores on the same low-bit copies). Phi-3: the sketch of the fused
    gate_up's halves; Gemma: GeGLU with the tanh gelu; Gemma-2: its sandwich norms around the sketched FFN. x_bits
    8: the int8-x dp4a layout against a mask path that rounds x the same way."""
    from tests.test_runtime import engine_model
    device, tol = (TRITON_DEVICE, TRITON_TOL) if backend == "triton" else ("cpu", TOL)
    model = engine_model(family) if family == "gemma2" else tiny_model(family)
    packed, source = sketches_of(model, first_layer=1, x_bits=x_bits)
    model = model.to(device)
    for key, copy in list(source._qweights.items()):  # the mask path's low-bit copies follow the model
        source._qweights[key] = copy.to(device)
    ids = token_ids(batch, sum(CHUNKS), seed=7).to(device)
    cfg = EngineConfig(ffn_sparsity=0.5, first_layer=1, backend=backend)
    weights = extract_weights(model)
    sketch = {k: p.to(device) for k, p in packed.items()}
    if family.startswith("gemma"):  # the sketch must score with the model's own activation
        with pytest.raises(ConfigError, match="scores with act 'silu', but the model's FFN uses 'gelu_tanh'"):
            DecodeEngine(weights, batch=batch, max_len=32, config=cfg, ffn_selector=SketchFFNSelector(sketch))
    engine = DecodeEngine(weights, batch=batch, max_len=32, config=cfg,
                          ffn_selector=SketchFFNSelector(sketch, backend, act=weights.act))
    out = engine_steps(engine, ids, CHUNKS)
    with attach_gating(model, source, GatingConfig(ffn_sparsity=0.5, first_layer=1)) as h, torch.no_grad():
        ref = model(ids).logits
        assert h.stats()["realized_ffn_sparsity"] == pytest.approx(0.5, abs=1e-6)
    torch.testing.assert_close(out, ref, **tol)
    with torch.no_grad():  # gating changed the output: the check is not vacuous (Gemma's residual stream starts at
        # 8x the embedding rows, so the tiny random FFN moves its logits less)
        assert (model(ids).logits - ref).abs().max() > (1e-3 if family.startswith("gemma") else 1e-2)


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



@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family,batch,x_bits", [("llama", 1, None), ("llama", 2, None), ("phi3", 1, None),
                                                 ("gemma2", 2, None), ("llama", 2, 8)])
def test_sketch_threshold_engine_matches_its_mask_path(backend, family, batch, x_bits):
    """sketch_threshold: no top-k; the engine's scored gate/up kernel and input-sparse down GEMV (prefill, single
    tokens, a 3-token step and a 40-token masked step) equal the mask path's hooks keeping the neurons whose
    estimate (the same low-bit copies) passes the same calibrated thresholds; the kept counts agree."""
    from tests.test_runtime import engine_model
    device, tol = (TRITON_DEVICE, TRITON_TOL) if backend == "triton" else ("cpu", TOL)
    model = engine_model(family) if family == "gemma2" else tiny_model(family)
    packed, proposer = sketches_of(model, first_layer=1, x_bits=x_bits)
    model = model.to(device)
    qcache = {key: copy.to(device) for key, copy in proposer._qweights.items()}
    calib = token_ids(3, 24, seed=11).to(device)
    source = SketchThresholdScores.calibrate(model, calib, proposer.sketch, first_layer=1, qcache=qcache,
                                             hessians=proposer.hessians)
    thr = source.thresholds(0.5, ModelView(model).dims.n_layers)
    assert thr[0] == 0 and (thr[1:] > 0).all()  # layer 0 is not gated
    weights = extract_weights(model)
    sketch = SketchFFNSelector({k: p.to(device) for k, p in packed.items()}, backend, act=weights.act)
    selector = SketchThresholdFFNSelector(sketch, thr)
    chunks = (*CHUNKS, 40) if backend == "torch" else CHUNKS  # 40 rows: the masked cuBLAS path
    ids = token_ids(batch, sum(chunks), seed=7).to(device)
    engine = DecodeEngine(weights, batch=batch, max_len=sum(chunks) + 8,
                          config=EngineConfig(ffn_sparsity=0.5, first_layer=1, backend=backend), ffn_selector=selector)
    out = engine_steps(engine, ids, chunks)
    with attach_gating(model, source, GatingConfig(ffn_sparsity=0.5, first_layer=1)) as h, torch.no_grad():
        ref = model(ids).logits
        realized = h.stats()["realized_ffn_sparsity"]
    torch.testing.assert_close(out, ref, **tol)
    assert 0.3 < realized < 0.7  # around the requested 0.5: a threshold, not a top-k
    n_kept = selector.kept[1:].sum().item()
    assert n_kept == pytest.approx((1 - realized) * ids.numel() * (weights.n_layers - 1) * weights.ffn, rel=2e-3)
    with torch.no_grad():
        assert (model(ids).logits - ref).abs().max() > 1e-3  # gating changed the output


def test_load_gated_sketch_threshold_runs_the_engine_and_agrees_with_the_hooks(llama):
    """load_gated(method="sketch_threshold"): perplexity (prefill and token by token) and greedy text through the
    engine equal the hooks'; stats report the realized sparsity per gated layer, counted on the device."""
    model, tok = llama
    kw = dict(tokenizer=tok, calib=CALIB, overrides=FAST + ["evaluate.threshold_windows=4"], ffn_sparsity=0.5)
    fast = ss.load_gated(model, method="sketch_threshold", engine="kernels", **kw)
    ref = ss.load_gated(model, method="sketch_threshold", engine="hooks", **kw)
    assert isinstance(fast.decoder.parts["ffn_selector"], SketchThresholdFFNSelector)
    windows = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(4))
    p_ref = ref.perplexity(windows)
    assert fast.perplexity(windows) == pytest.approx(p_ref, rel=1e-3)
    assert fast.perplexity(windows, token_by_token=True) == pytest.approx(p_ref, rel=1e-3)
    dense = ss.load_gated(model, method="dense", engine="hooks", tokenizer=tok).perplexity(windows)
    assert abs(p_ref / dense - 1) > 1e-4  # the selection changed the model
    prompts = ["one prompt", "two words"]
    assert fast.generate(prompts, max_new_tokens=5) == ref.generate(prompts, max_new_tokens=5)
    st = fast.stats()
    per_layer = st["realized_ffn_sparsity_per_layer"]
    assert len(per_layer) == st["gated_layers"] and all(0.2 < s < 0.8 for s in per_layer)
    assert st["realized_ffn_sparsity"] == pytest.approx(sum(per_layer) / len(per_layer))
    assert len(set(per_layer)) > 1  # thresholds: each layer realizes its own sparsity
    assert 0 < st["selector_byte_share"] < 0.5  # the sketch's copies against the bytes of a whole step
    hooks_layers = ref.stats()["realized_ffn_sparsity_per_layer"]  # the mask path counts per layer too
    assert len(hooks_layers) == len(per_layer) and max(abs(a - b) for a, b in zip(hooks_layers, per_layer)) < 0.05


def test_load_gated_sketch_teal_runs_both_selectors_in_the_engine(llama):
    """sketch_teal: sketch_threshold on the FFN with teal on the attention inputs, one engine (the scored FFN
    kernels and the input-sparse q/k/v and o GEMVs): perplexity and greedy text as the hooks'; stats report the
    FFN's and the attention inputs' realized sparsity on both paths."""
    model, tok = llama
    kw = dict(tokenizer=tok, calib=CALIB, ffn_sparsity=0.5,
              overrides=FAST + ["evaluate.threshold_windows=4", "evaluate.teal.sketch_attn=0.4"])
    fast = ss.load_gated(model, method="sketch_teal", engine="kernels", **kw)
    ref = ss.load_gated(model, method="sketch_teal", engine="hooks", **kw)
    parts = fast.decoder.parts
    assert isinstance(parts["ffn_selector"], SketchThresholdFFNSelector)
    assert parts["input_sparsity"].inputs == ("attn_in", "attn_out")
    windows = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(4))
    p_ref = ref.perplexity(windows)
    assert fast.perplexity(windows) == pytest.approx(p_ref, rel=1e-3)
    assert fast.perplexity(windows, token_by_token=True) == pytest.approx(p_ref, rel=1e-3)
    only_ffn = ss.load_gated(model, method="sketch_threshold", engine="hooks", **kw).perplexity(windows)
    assert abs(p_ref / only_ffn - 1) > 1e-5  # the attention inputs were thresholded too
    prompts = ["one prompt", "two words"]
    assert fast.generate(prompts, max_new_tokens=5) == ref.generate(prompts, max_new_tokens=5)
    st_fast, st_ref = fast.stats(), ref.stats()
    for key in ("realized_ffn_sparsity", "realized_attn_in_sparsity", "realized_attn_out_sparsity"):
        assert st_fast[key] == pytest.approx(st_ref[key], abs=0.03), key
    assert st_fast["realized_attn_in_sparsity"] == pytest.approx(0.4, abs=0.1)
    assert st_fast["realized_ffn_sparsity"] == pytest.approx(0.5, abs=0.1)
    assert len(st_fast["realized_ffn_sparsity_per_layer"]) == st_fast["gated_layers"]

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family,batch", [("llama", 1), ("llama", 2), ("opt", 2), ("qwen3", 1), ("gemma", 2),
                                          ("gemma2", 1), ("mixtral", 1), ("mixtral", 2), ("qwen3_moe", 2)])
def test_static_engine_matches_its_mask_path(backend, family, batch):
    """static: fixed per-layer scores in the predictor's place (runtime/fixed_scores.py), heads and neurons, equal
    the mask path's StaticScores with the same means (prefill, single tokens, a 3-token step). Mixtral / Qwen3-MoE:
    each token keeps the top half of its routed experts' neurons (the mask path's only_routed top-k)."""
    from shadowsparse.gating import StaticScores
    from shadowsparse.runtime.fixed_scores import FixedScores
    from tests.test_runtime import engine_model
    device, tol = (TRITON_DEVICE, TRITON_TOL) if backend == "triton" else ("cpu", TOL)
    model = (engine_model(family) if family == "gemma2" else tiny_model(family)).to(device)
    dims = ModelView(model).dims
    g = torch.Generator().manual_seed(3)
    heads, neurons = torch.rand(dims.n_layers, dims.n_heads, generator=g), torch.rand(dims.n_layers, dims.ffn,
                                                                                       generator=g)
    ids = token_ids(batch, sum(CHUNKS), seed=7).to(device)
    cfg = EngineConfig(ffn_sparsity=0.5, head_sparsity=0.5, first_layer=1, backend=backend)
    engine = DecodeEngine(extract_weights(model), batch=batch, max_len=32, config=cfg,
                          predictor=FixedScores(heads, neurons, first_layer=1))
    out = engine_steps(engine, ids, CHUNKS)
    gating = GatingConfig(ffn_sparsity=0.5, head_sparsity=0.5, first_layer=1, granularity="token")
    with attach_gating(model, StaticScores(heads, neurons), gating) as h, torch.no_grad():
        ref = model(ids).logits
        assert h.stats()["realized_ffn_sparsity"] == pytest.approx(0.5, abs=1e-6)
    torch.testing.assert_close(out, ref, **tol)
    with torch.no_grad():
        assert (model(ids).logits - ref).abs().max() > 1e-2  # gating changed the output: the check is not vacuous


@pytest.mark.parametrize("method", ["gate", "gate_verify"])
def test_load_gated_gate_methods_run_the_engine_and_agree_with_the_hooks(llama, method):
    """gate (CATS) and gate_verify through load_gated: the full gate projection scores (proposes) each layer's
    neurons in the engine (runtime/ffn_select.py); perplexity (prefill and token by token) and greedy text equal
    the hooks'."""
    model, tok = llama
    kw = dict(tokenizer=tok, ffn_sparsity=0.5, overrides=["evaluate.verify.q=[0.7]"])
    fast = ss.load_gated(model, method=method, engine="kernels", **kw)
    ref = ss.load_gated(model, method=method, engine="hooks", **kw)
    windows = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(6))
    p_ref = ref.perplexity(windows)
    assert fast.perplexity(windows) == pytest.approx(p_ref, rel=2e-6)
    assert fast.perplexity(windows, token_by_token=True) == pytest.approx(p_ref, rel=2e-6)
    dense = ss.load_gated(model, method="dense", engine="hooks", tokenizer=tok).perplexity(windows)
    assert abs(p_ref / dense - 1) > 2e-5  # gating changed the model: the comparison is not vacuous
    prompts = ["one prompt", "two words"]
    assert fast.generate(prompts, max_new_tokens=5) == ref.generate(prompts, max_new_tokens=5)
    assert fast.stats()["realized_ffn_sparsity"] == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family,proposer,final,batch", [("llama", "sketch", "activation", 1),
                                                         ("llama", "sketch", "contribution", 2),
                                                         ("llama", "gate", "activation", 2),
                                                         ("gemma", "gate", "activation", 1),
                                                         ("phi3", "gate", "contribution", 2)])
def test_verify_engine_matches_its_mask_path(backend, family, proposer, final, batch):
    """sketch_verify / gate_verify (runtime/ffn_select.VerifyFFNSelector): candidates by the proposer, each token's
    top k of its own candidates by |a| (or |a|·||W_down col||), the down rows of the kept ones: equal to
    verify.VerifyScores through the hooks (prefill, single tokens, a 3-token step). Gemma: the gate scored and a
    computed with the tanh gelu; Phi-3: the gate and up rows of the fused gate_up."""
    from shadowsparse.runtime.ffn_select import GateFFNSelector, VerifyFFNSelector
    from shadowsparse.runtime.weights import act_name
    from shadowsparse.verify import down_column_norms
    device, tol = (TRITON_DEVICE, TRITON_TOL) if backend == "triton" else ("cpu", TOL)
    model = tiny_model(family)
    packed, sketch_source = sketches_of(model, first_layer=1)
    model = model.to(device)
    view = ModelView(model)
    layers = range(1, view.dims.n_layers)
    if proposer == "sketch":
        engine_proposer = SketchFFNSelector({k: p.to(device) for k, p in packed.items()}, backend,
                                            act_name(model.config))
        source = VerifyScores(0.7, proposer="sketch", final=final, sketch=sketch_source.sketch,
                              qcache={k: v.to(device) for k, v in sketch_source._qweights.items()}, hessians={})
    else:
        engine_proposer = GateFFNSelector({i: view.ffn_in_rows(i)[0][0] for i in layers}, act_name(model.config))
        source = VerifyScores(0.7, proposer="gate", final=final)
    columns = {i: down_column_norms(view, i) for i in layers} if final == "contribution" else None
    ids = token_ids(batch, sum(CHUNKS), seed=7).to(device)
    cfg = EngineConfig(ffn_sparsity=0.5, first_layer=1, backend=backend)
    engine = DecodeEngine(extract_weights(model), batch=batch, max_len=32, config=cfg,
                          ffn_selector=VerifyFFNSelector(engine_proposer, 0.7, final, columns))
    out = engine_steps(engine, ids, CHUNKS)
    with attach_gating(model, source, GatingConfig(ffn_sparsity=0.5, first_layer=1)) as h, torch.no_grad():
        ref = model(ids).logits
        assert h.stats()["realized_ffn_sparsity"] == pytest.approx(0.5, abs=1e-6)
    torch.testing.assert_close(out, ref, **tol)
    with attach_gating(model, source.__class__(0.5, proposer="gate"), GatingConfig(ffn_sparsity=0.5, first_layer=1)), \
            torch.no_grad():
        assert (model(ids).logits - ref).abs().max() > 1e-3  # verification changed the choice: not vacuous


def test_verify_engine_many_token_step_and_generate():
    """A 40-token prefill (the masked cuBLAS path: per-token candidates and keep masks), then greedy decoding, token
    for token equal to the mask path (gate_verify)."""
    from shadowsparse.runtime.ffn_select import GateFFNSelector, VerifyFFNSelector
    model = tiny_model("llama")
    view = ModelView(model)
    gates = {i: view.module(i, "mlp.gate_proj").weight for i in range(1, view.dims.n_layers)}
    engine = DecodeEngine(extract_weights(model), batch=1, max_len=64,
                          config=EngineConfig(ffn_sparsity=0.6, first_layer=1, backend="torch"),
                          ffn_selector=VerifyFFNSelector(GateFFNSelector(gates, "silu"), 0.8))
    ids = token_ids(1, 40, seed=8)
    out = engine.generate(ids, 8)
    with attach_gating(model, VerifyScores(0.8, proposer="gate"), GatingConfig(ffn_sparsity=0.6, first_layer=1)), \
            torch.no_grad():
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
    with pytest.raises(ConfigError, match="engine='kernels' cannot run random"):
        ss.load_gated(model, method="random", engine="kernels", tokenizer=tok)
    with pytest.raises(ConfigError, match="cannot run threshold here: threshold's head"):
        ss.load_gated(model, method="threshold", engine="kernels", tokenizer=tok, calib=CALIB, head_sparsity=0.3,
                      overrides=["evaluate.threshold_windows=2"])
    g = ss.load_gated(model, method="random", engine="auto", tokenizer=tok)
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


@pytest.mark.parametrize("batch", [1, 2])
def test_lte_engine_matches_its_mask_path(batch):
    """lte: the routers pick each token's best experts (whole groups of neurons) in the engine
    (runtime/ffn_select.LTEFFNSelector) on the LTE-fine-tuned weights; equal to LTEScores through the hooks."""
    from shadowsparse.gating import n_keep
    from shadowsparse.lte import LTEConfig
    from shadowsparse.lte.train import train_lte
    from shadowsparse.runtime.ffn_select import LTEFFNSelector
    base = tiny_model("llama")
    cfg = LTEConfig(expert_size=8, stage1_steps=2, stage2_steps=2, batch_size=2, seq_len=24, val_windows=2,
                    val_every=2, warmup_steps=1).validate()
    artifact, trained = train_lte(base, token_ids(8, 24, seed=1), cfg, first_layer=1)
    routers = artifact.routers
    k_e = n_keep(routers.n_experts, 0.5)
    assert k_e * 8 == n_keep(ModelView(trained).dims.ffn, 0.5)
    ids = token_ids(batch, sum(CHUNKS), seed=7)
    engine = DecodeEngine(extract_weights(trained), batch=batch, max_len=32, config=EngineConfig(
        ffn_sparsity=0.5, first_layer=1, backend="torch"), ffn_selector=LTEFFNSelector(routers, k_e))
    out = engine_steps(engine, ids, CHUNKS)
    with attach_gating(trained, artifact.source(), GatingConfig(ffn_sparsity=0.5, first_layer=1)) as h, \
            torch.no_grad():
        ref = trained(ids).logits
        assert h.stats()["realized_ffn_sparsity"] == pytest.approx(0.5, abs=1e-6)
    torch.testing.assert_close(out, ref, **TOL)
    with torch.no_grad():
        assert (trained(ids).logits - ref).abs().max() > 1e-3  # routing changed the output: not vacuous


@pytest.mark.parametrize("family,method,rel", [("gemma", "sketch", 1e-3), ("phi3", "gate_verify", 2e-6),
                                               ("qwen3", "teal", 2e-6)])
def test_load_gated_runs_the_engine_on_the_newer_families(family, method, rel):
    """load_gated(engine="auto") now takes the engine for Gemma (the sketch built with its gelu_tanh), Phi-3 (fused
    gate/up rows) and Qwen3 (teal through the q/k norms); perplexity and greedy text as the hooks'. The sketch's
    engine copy stores its steps in fp16: a neuron at the top-k boundary may flip (rel 1e-3, as for Llama)."""
    from tests.test_runtime import random_norms
    model, tok = load_llm(LLMConfig(name=f"random:{family}", seed=0))
    random_norms(model)
    kw = dict(tokenizer=tok, calib=CALIB, ffn_sparsity=0.4 if method == "teal" else 0.5,
              overrides=[*FAST, "evaluate.verify.q=[0.7]", "evaluate.threshold_windows=4"])
    fast = ss.load_gated(model, method=method, engine="auto", **kw)
    ref = ss.load_gated(model, method=method, engine="hooks", **kw)
    assert fast.engine == "kernels"
    windows = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(6))
    p_ref = ref.perplexity(windows)
    assert fast.perplexity(windows) == pytest.approx(p_ref, rel=rel)
    assert fast.perplexity(windows, token_by_token=True) == pytest.approx(p_ref, rel=rel)
    prompts = ["one prompt", "two words"]
    assert fast.generate(prompts, max_new_tokens=5) == ref.generate(prompts, max_new_tokens=5)
