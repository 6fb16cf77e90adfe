"""Input-threshold selectors in the decode engine against their mask path: teal (every projection input, the hooks of
shadowsparse/teal.py) and threshold (|a| at the down projection, training_free.ThresholdScores through the gating
hooks), on tiny Llama, Mistral, Qwen2, Qwen3, Phi-3, Gemma, Gemma-2 and OPT. CPU, fp32; the kernel as its torch path
and, where Triton is installed, interpreted (conftest sets TRITON_INTERPRET=1 without CUDA)."""
import pytest
import torch

from shadowsparse import GatingConfig, attach_gating
from shadowsparse.errors import ConfigError
from shadowsparse.kernels import common as kernels_common
from shadowsparse.runtime import DecodeEngine, EngineConfig, extract_weights
from shadowsparse.runtime.input_sparsity import INPUTS, InputSparsity
from shadowsparse.teal import TealThresholds, attach_teal
from shadowsparse.training_free import ThresholdScores
from tests.conftest import tiny_model
from tests.test_runtime import CHUNKS, TRITON_DEVICE, TRITON_TOL, engine_model, engine_steps, token_ids

BACKENDS = ["torch"] + (["triton"] if kernels_common.triton is not None else [])
TOL = dict(rtol=1e-4, atol=1e-4)
FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "opt"]


def calib(seed=3):
    return token_ids(4, 32, seed=seed)


def _engine(model, sp, batch, backend, max_len=32, **cfg):
    return DecodeEngine(extract_weights(model), batch=batch, max_len=max_len,
                        config=EngineConfig(first_layer=1, backend=backend, **cfg), input_sparsity=sp)


@pytest.mark.parametrize("family,batch,sparse_tokens", [(f, 2, 16) for f in FAMILIES] + [("llama", 1, 16),
                                                                                          ("llama", 2, 1),
                                                                                          ("opt", 2, 0)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_teal_engine_matches_its_hooks(family, batch, sparse_tokens, backend):
    """Prefill, single tokens and a 3-token step: the engine reading only the weight rows of kept input channels
    (the kernel's one-token FMA path at batch 1, its tl.dot path for 2 rows, cuBLAS above) equals the hooks
    zeroing the same channels; the device counts equal the hooks' counts. Steps of more than sparse_tokens rows
    zero the inputs where they are made (norm kernels, one mask kernel) and run the dense GEMMs."""
    device, tol = (TRITON_DEVICE, TRITON_TOL) if backend == "triton" else ("cpu", TOL)
    model = engine_model(family)  # Qwen3's q/k norms and Gemma's 1 + w with weights of their own
    teal = TealThresholds.calibrate(model, calib())
    model = model.to(device)
    n_layers = model.config.num_hidden_layers
    sp = InputSparsity.from_teal(teal, 0.4, n_layers, first_layer=1)
    ids = token_ids(batch, sum(CHUNKS), seed=7).to(device)
    engine = _engine(model, sp, batch, backend, sparse_input_tokens=sparse_tokens)
    out = engine_steps(engine, ids, CHUNKS)
    with attach_teal(model, teal, 0.4, first_layer=1) as handle, torch.no_grad():
        ref = model(ids).logits
    torch.testing.assert_close(out, ref, **tol)
    with torch.no_grad():
        assert (model(ids).logits - ref).abs().max() > 1e-2  # the thresholds changed the output: not vacuous
    got = sp.realized(sp.kept_per_input(1), ids.numel(), n_layers - 1, engine.input_widths())
    for name, value in handle.stats().items():
        assert got[name] == pytest.approx(value, abs=1e-6), name
        assert 0.2 < value < 0.6


@pytest.mark.parametrize("family,sparse_tokens", [("llama", 16), ("opt", 16), ("llama", 0), ("phi3", 16),
                                                   ("gemma", 16), ("gemma", 0)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_threshold_engine_matches_its_hooks(family, sparse_tokens, backend):
    """threshold: gate/up (fc1) in full, only the down rows of the neurons whose |a| passes the layer's threshold.
    Gemma: a = gelu_tanh(gate) * up in the compaction kernel (16) and in the mask kernel before the dense GEMM (0)."""
    device, tol = (TRITON_DEVICE, TRITON_TOL) if backend == "triton" else ("cpu", TOL)
    model = tiny_model(family)
    source = ThresholdScores.calibrate(model, calib())
    model = model.to(device)
    gating = GatingConfig(ffn_sparsity=0.5, first_layer=1)
    thr = ThresholdScores._quantiles(source.neuron_samples, 0.5)
    sp = InputSparsity.from_neuron_thresholds(thr, first_layer=1)
    ids = token_ids(2, sum(CHUNKS), seed=9).to(device)
    out = engine_steps(_engine(model, sp, 2, backend, sparse_input_tokens=sparse_tokens), ids, CHUNKS)
    with attach_gating(model, source, gating), torch.no_grad():
        ref = model(ids).logits
    torch.testing.assert_close(out, ref, **tol)


def test_teal_on_attention_with_a_sketch_ffn_is_refused_only_where_blocks_overlap():
    model = tiny_model("llama")
    teal = TealThresholds.calibrate(model, calib())
    sp = InputSparsity.from_teal(teal, 0.4, 4, first_layer=1)
    with pytest.raises(ConfigError, match="one selector"):
        _engine(model, sp, 1, "torch", ffn_sparsity=0.5)
    attn_only = InputSparsity.from_teal(teal, 0.4, 4, first_layer=1, inputs=("attn_in", "attn_out"))
    with pytest.raises(ConfigError, match="one selector"):
        _engine(model, attn_only, 1, "torch", head_sparsity=0.5)
    with pytest.raises(ConfigError, match="inputs from"):
        InputSparsity(torch.zeros(4, len(INPUTS)), ("mlp",), 1, "teal")


def test_teal_engine_long_prefill_then_generate_equals_hooks():
    """A 40-token prefill (the torch path on cuBLAS for more than 16 rows), then greedy decoding token for token."""
    model = tiny_model("llama")
    teal = TealThresholds.calibrate(model, calib())
    sp = InputSparsity.from_teal(teal, 0.5, 4, first_layer=1)
    ids = token_ids(1, 40, seed=8)
    out = _engine(model, sp, 1, "torch", max_len=64).generate(ids, 8)
    with attach_teal(model, teal, 0.5, first_layer=1), torch.no_grad():
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, min_new_tokens=8,
                             do_sample=False)
    assert torch.equal(out, ref)
