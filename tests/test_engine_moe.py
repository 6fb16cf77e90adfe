"""Mixture-of-experts models in the decode engine (runtime/engine.DecodeEngine._ffn_moe) against the model and the
mask path: the router's experts with their weights, dense and with a top-k of the routed neurons, on tiny Mixtral
and Qwen3-MoE (4 experts x 32 neurons, 2 per token); static scores: test_engine_selectors.py. CPU, fp32; kernels as
torch fallbacks and, where Triton is installed, interpreted."""
import pytest
import torch

import shadowsparse as ss
from shadowsparse.errors import ConfigError
from shadowsparse.llm import LLMConfig, load_llm
from shadowsparse.runtime import DecodeEngine, EngineConfig, extract_weights
from shadowsparse.runtime.fixed_scores import FixedScores
from shadowsparse.runtime.input_sparsity import InputSparsity
from tests.test_engine_selectors import BACKENDS, CALIB, FAST
from tests.test_runtime import CHUNKS, TOL, TRITON_DEVICE, TRITON_TOL, engine_model, engine_steps, token_ids

MOE_ENGINE = ["mixtral", "qwen3_moe"]


def _tol(backend):
    return (TRITON_DEVICE, TRITON_TOL) if backend == "triton" else ("cpu", TOL)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", MOE_ENGINE)
def test_dense_moe_engine_matches_the_model(family, backend):
    """Every routed expert in full: a 5-token prefill, single tokens and a 3-token step at batch 2 (the gathered
    kernels over the union of the routed neurons, routing weights in keep), then a 40-token prefill (80 rows: every
    expert on cuBLAS with the unrouted neurons zeroed), equal the model's logits."""
    device, tol = _tol(backend)
    model = engine_model(family).to(device)
    weights = extract_weights(model)
    assert (weights.experts, weights.experts_per_token, weights.ffn, weights.active_ffn) == (4, 2, 128, 64)
    assert DecodeEngine(weights, 1, 16, EngineConfig(ffn_sparsity=0.5)).k_ffn == 32  # half the routed, not of all
    for chunks in (CHUNKS, [40, 1]):
        ids = token_ids(2, sum(chunks), seed=5).to(device)
        engine = DecodeEngine(weights, batch=2, max_len=48, config=EngineConfig(backend=backend))
        with torch.no_grad():
            ref = model(ids).logits
        torch.testing.assert_close(engine_steps(engine, ids, chunks), ref, **tol)


@pytest.mark.parametrize("family,method", [("mixtral", "sketch"), ("qwen3_moe", "gate")])
def test_load_gated_runs_moe_models_in_the_engine_and_agrees_with_the_hooks(family, method):
    """load_gated(engine="auto") takes the engine for Mixtral and Qwen3-MoE: the sketch (or the full gate) scores all
    E*F neurons, each token keeps the top half of its routed ones; perplexity (prefill and token by token), greedy
    text and the realized sparsity (of the routed neurons) as the hooks'."""
    model, tok = load_llm(LLMConfig(name=f"random:{family}", seed=0))
    kw = dict(tokenizer=tok, calib=CALIB, ffn_sparsity=0.5, overrides=[*FAST, "evaluate.verify.q=[0.7]"])
    fast = ss.load_gated(model, method=method, engine="auto", **kw)
    ref = ss.load_gated(model, method=method, engine="hooks", **kw)
    assert fast.engine == "kernels"
    windows = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(6))
    p_ref = ref.perplexity(windows)
    # the sketch's engine copy stores its steps in fp16: a neuron at the top-k boundary may flip
    rel = 1e-3 if method == "sketch" else 2e-6
    assert fast.perplexity(windows) == pytest.approx(p_ref, rel=rel)
    assert fast.perplexity(windows, token_by_token=True) == pytest.approx(p_ref, rel=rel)
    dense = ss.load_gated(model, method="dense", engine="hooks", tokenizer=tok).perplexity(windows)
    assert abs(p_ref / dense - 1) > 2e-5  # gating changed the model: the comparison is not vacuous
    prompts = ["one prompt", "two words"]
    assert fast.generate(prompts, max_new_tokens=5) == ref.generate(prompts, max_new_tokens=5)
    assert fast.stats()["realized_ffn_sparsity"] == pytest.approx(0.5, abs=0.01)


def test_moe_engine_refuses_the_ffn_paths_it_does_not_serve():
    """2:4 FFN weights and FFN input thresholds assume one dense neuron set: refused with the fix (the mask path);
    OLMoE (q/k norms over whole projections) is refused by extract_weights, and load_gated runs it on the hooks."""
    model = engine_model("mixtral")
    weights = extract_weights(model)
    with pytest.raises(ConfigError, match=r"2:4-compressed FFN weights \(nm24=True\) is not implemented for "
                                          r"mixture-of-experts models .*engine='hooks'"):
        DecodeEngine(weights, batch=1, max_len=16, config=EngineConfig(ffn_sparsity=0.5, nm24=True),
                     predictor=FixedScores(torch.rand(4, 4), torch.rand(4, 128), first_layer=0))
    teal = InputSparsity(torch.zeros(4, 4), ("attn_in", "ffn_in"), first_layer=0, label="teal")
    with pytest.raises(ConfigError, match="input thresholds on the FFN .* mixture-of-experts"):
        DecodeEngine(weights, batch=1, max_len=16, input_sparsity=teal)
    with pytest.raises(ConfigError, match="the decode engine supports .* not 'olmoe'"):
        extract_weights(engine_model("olmoe"))
