"""TEAL's block-wise greedy allocation (shadowsparse/teal_allocation.py): the path it records, the thresholds it
yields, that it spends sparsity where the block's output does not move, and its config through the pipeline, the
hooks and the decode engine. CPU, tiny random Llama."""
import pytest
import torch

import shadowsparse as ss
from shadowsparse.arch import ModelView
from shadowsparse.errors import ConfigError
from shadowsparse.llm import LLMConfig, load_llm
from shadowsparse.teal import TealThresholds, attach_teal, projection_inputs
from shadowsparse.teal_allocation import greedy_allocation, validate_teal_config

CALIB = torch.randint(0, 256, (4, 48), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def llama():
    return load_llm(LLMConfig(name="random:llama", seed=0))


@pytest.fixture(scope="module")
def allocated(llama):
    model, _ = llama
    thresholds = TealThresholds.calibrate(model, CALIB)
    thresholds.allocation = greedy_allocation(model, CALIB[:2], thresholds, step=0.1, max_sparsity=0.6)
    return thresholds


def _params(view, layer):
    return {n: sum(view.weight(layer, p).numel() for p in paths) for n, paths in projection_inputs(view).items()}


def test_path_rises_to_the_target_and_interpolates_to_the_requested_layer_sparsity(llama, allocated):
    """Each layer's path starts dense, raises one input by the step at a time (sparsities never fall) and reaches
    max_sparsity; at(b) gives inputs whose weight-weighted sparsity is b exactly, for b between the steps too."""
    model, _ = llama
    view = ModelView(model)
    alloc = allocated.allocation
    assert alloc.max_sparsity >= 0.6 - 1e-9
    for layer, steps in alloc.path.items():
        assert steps[0] == (0.0, {n: 0.0 for n in projection_inputs(view)})
        for (b0, s0), (b1, s1) in zip(steps, steps[1:]):
            assert b1 > b0 and all(s1[n] >= s0[n] for n in s0)
            assert sum(s1[n] != s0[n] for n in s0) == 1  # one input raised per step
    for b in (0.1, 0.25, 0.4, 0.6):
        per = alloc.at(b)
        for layer in alloc.path:
            P = _params(view, layer)
            got = sum(per[n, layer] * P[n] for n in P) / sum(P.values())
            assert got == pytest.approx(b, abs=1e-6)
    with pytest.raises(ConfigError, match="reaches block sparsity"):
        alloc.at(0.95)


def test_allocated_thresholds_skip_the_requested_fraction_of_weights(llama, allocated):
    """attach_teal with the allocation: the inputs' realized sparsities follow their allocated ones (not one s for
    all), and the weight bytes skipped are the requested fraction, as with uniform thresholds."""
    model, _ = llama
    windows = torch.randint(0, 256, (4, 48), generator=torch.Generator().manual_seed(1))
    with attach_teal(model, allocated, 0.4) as h, torch.no_grad():
        model(windows)
        greedy = h.stats()
        greedy_bytes = h.weight_bytes_skipped()
    uniform = TealThresholds(allocated.samples)
    with attach_teal(model, uniform, 0.4) as h, torch.no_grad():
        model(windows)
        uniform_bytes = h.weight_bytes_skipped()
    assert max(greedy.values()) - min(greedy.values()) > 0.1  # allocated unevenly
    assert greedy_bytes == pytest.approx(uniform_bytes, abs=0.05)  # held-out text: quantiles, not exact


def test_greedy_spends_sparsity_where_the_output_does_not_move():
    """A layer whose out-projection is all zeros: its attention adds nothing, so thresholding either attention input
    costs no error; the greedy raises those two to the cap (0.75 each: 0.3 of the layer's weights) before it touches
    the FFN's inputs, whose every raise moves the output. The other layers spend on the FFN too."""
    model, _ = load_llm(LLMConfig(name="random:llama", seed=0))
    view = ModelView(model)
    with torch.no_grad():
        view.attn_out(1).weight.zero_()
    P = _params(view, 1)
    assert (P["attn_in"] + P["attn_out"]) / sum(P.values()) == pytest.approx(0.4)
    thresholds = TealThresholds.calibrate(model, CALIB)
    alloc = greedy_allocation(model, CALIB[:2], thresholds, step=0.25, max_sparsity=0.3, max_input=0.75)
    final = alloc.path[1][-1][1]
    assert final == {"attn_in": 0.75, "attn_out": 0.75, "ffn_in": 0.0, "ffn_out": 0.0}
    assert any(alloc.path[i][-1][1]["ffn_in"] + alloc.path[i][-1][1]["ffn_out"] > 0 for i in (0, 2, 3))


def test_config_is_checked_before_any_model_loads():
    validate_teal_config({"allocation": "uniform"}, [0.9])
    with pytest.raises(ConfigError, match="allocation must be one of"):
        validate_teal_config({"allocation": "layerwise"}, [])
    node = {"allocation": "greedy", "step": 0.05, "max_sparsity": 0.5, "windows": 2}
    validate_teal_config(node, [0.3, 0.5])
    with pytest.raises(ConfigError, match=r"teal levels \[0.6\] exceed evaluate.teal.max_sparsity=0.5"):
        validate_teal_config(node, [0.3, 0.6])
    with pytest.raises(ConfigError, match="needs 0 < step < 1"):
        validate_teal_config({**node, "step": 0.0}, [])


def test_load_gated_greedy_teal_engine_equals_hooks(llama):
    """evaluate.teal.allocation=greedy through load_gated: the decode engine reads the allocated thresholds
    (InputSparsity.from_teal) and its perplexity equals the hooks'; it differs from uniform teal's."""
    model, tok = llama
    kw = dict(method="teal", ffn_sparsity=0.4, tokenizer=tok, calib=CALIB)
    over = ["evaluate.threshold_windows=4", "evaluate.teal.allocation=greedy", "evaluate.teal.step=0.1",
            "evaluate.teal.max_sparsity=0.5"]
    fast = ss.load_gated(model, engine="kernels", overrides=over, **kw)
    ref = ss.load_gated(model, engine="hooks", overrides=over, **kw)
    uniform = ss.load_gated(model, engine="hooks", overrides=over[:1], **kw)
    windows = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(2))
    p_ref = ref.perplexity(windows)
    assert fast.perplexity(windows) == pytest.approx(p_ref, rel=1e-5)
    assert abs(uniform.perplexity(windows) - p_ref) > 1e-4 * p_ref
