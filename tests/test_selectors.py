"""Predictor families and training-free selectors: equivalences, hand computations, accounting."""
import pytest
import torch

from shadowsparse import GatingConfig, attach_gating
from shadowsparse.accounting import decoder_linear_bytes, weight_bytes_skipped
from shadowsparse.selectors import SELECTORS
from shadowsparse.arch import ModelView
from shadowsparse.errors import ConfigError
from shadowsparse.gating import n_keep, topk_mask
from shadowsparse.predictor import PerLayerPredictor, PredictorConfig
from shadowsparse.training_free import GateScores, ThresholdScores
from tests.conftest import tiny_model


def _per_layer(view, lookahead=0, feature_layer=0):
    torch.manual_seed(0)
    d = view.dims
    return PerLayerPredictor(d.hidden, d.n_layers, d.n_heads, d.ffn, feature_layer,
                             PredictorConfig(kind="per_layer", rank=16, lookahead=lookahead)).eval()


@pytest.mark.parametrize("lookahead", [0, 1])
def test_per_layer_predict_layer_matches_batched_forward(lookahead):
    view = ModelView(tiny_model("llama"))
    p = _per_layer(view, lookahead)
    x = torch.randn(5, view.dims.n_layers, view.dims.hidden)  # every layer's input
    heads, neurons = p(x)
    for layer in range(view.dims.n_layers):
        src = max(0, layer - lookahead)
        h, n = p.predict_layer(layer, x[:, src])
        torch.testing.assert_close(h, heads[:, layer])
        torch.testing.assert_close(n, neurons[:, layer])


@pytest.mark.parametrize("lookahead", [0, 1])
@torch.no_grad()
def test_per_layer_gating_uses_the_right_layer_inputs(ids, lookahead):
    """The gate at layer l must be the predictor's top-k on the hidden state entering layer l - lookahead."""
    model = tiny_model("llama")
    view = ModelView(model)
    p = _per_layer(view, lookahead)
    hs = model(input_ids=ids, output_hidden_states=True).hidden_states  # hs[l] = input of layer l
    layer = 3
    raw, got = {}, {}
    h0 = view.ffn_down(layer).register_forward_pre_hook(lambda m, a: raw.__setitem__("x", a[0].clone()))
    with attach_gating(model, p, GatingConfig(ffn_sparsity=0.5)) as handle:
        h1 = view.ffn_down(layer).register_forward_pre_hook(lambda m, a: got.__setitem__("x", a[0].clone()))
        gated_hs = model(input_ids=ids, output_hidden_states=True).hidden_states
        h1.remove()
        assert handle.stats()["realized_ffn_sparsity"] == pytest.approx(0.5)
    h0.remove()
    _, scores = p.predict_layer(layer, gated_hs[layer - lookahead])
    mask = topk_mask(scores, n_keep(view.dims.ffn, 0.5), raw["x"].dtype)
    torch.testing.assert_close(got["x"], raw["x"] * mask, rtol=0, atol=0)
    dense = model(input_ids=ids).logits
    with attach_gating(model, p, GatingConfig(ffn_sparsity=0.0)):
        assert torch.equal(model(input_ids=ids).logits, dense)
    assert not torch.equal(hs[-1], gated_hs[-1])  # the gated run really differed


@torch.no_grad()
def test_gate_selector_is_topk_of_act_gate_by_hand(ids):
    model = tiny_model("llama")
    view = ModelView(model)
    layer = 2
    mlp = view.layer(layer).mlp
    raw, got, gate_in = {}, {}, {}
    hg = mlp.gate_proj.register_forward_pre_hook(lambda m, a: gate_in.__setitem__("x", a[0].clone()))
    h0 = view.ffn_down(layer).register_forward_pre_hook(lambda m, a: raw.__setitem__("x", a[0].clone()))
    with attach_gating(model, GateScores(), GatingConfig(ffn_sparsity=0.5, first_layer=0)):
        h1 = view.ffn_down(layer).register_forward_pre_hook(lambda m, a: got.__setitem__("x", a[0].clone()))
        model(input_ids=ids)
        h1.remove()
    hg.remove(), h0.remove()
    by_hand = torch.nn.functional.silu(gate_in["x"] @ mlp.gate_proj.weight.T).abs()
    mask = topk_mask(by_hand, n_keep(view.dims.ffn, 0.5), raw["x"].dtype)
    torch.testing.assert_close(got["x"], raw["x"] * mask, rtol=0, atol=0)


def test_gate_selector_refuses_non_glu_and_heads():
    with pytest.raises(ConfigError, match="gated FFN"):
        attach_gating(tiny_model("opt"), GateScores(), GatingConfig(ffn_sparsity=0.5))
    with pytest.raises(ConfigError, match="FFN neurons only"):
        attach_gating(tiny_model("llama"), GateScores(), GatingConfig(ffn_sparsity=0.5, head_sparsity=0.5))


@pytest.mark.parametrize("family", ["llama", "opt"])
@torch.no_grad()
def test_threshold_hits_requested_sparsity_on_its_calibration_data(family):
    model = tiny_model(family)
    windows = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(3))
    src = ThresholdScores.calibrate(model, windows)
    # gate every layer from 0: layer 0's inputs are exactly the calibration inputs, so the quantile is exact there
    with attach_gating(model, src, GatingConfig(ffn_sparsity=0.6, head_sparsity=0.5, first_layer=0)) as h:
        model(input_ids=windows)
        s = h.stats()
    assert 0.45 < s["realized_ffn_sparsity"] < 0.75  # later layers see gated inputs: close, not exact
    assert 0.3 < s["realized_head_sparsity"] < 0.7
    dense = model(input_ids=windows).logits
    with attach_gating(model, src, GatingConfig(ffn_sparsity=0.0, head_sparsity=0.0, first_layer=0)):
        assert torch.equal(model(input_ids=windows).logits, dense)


def test_weight_bytes_skipped_by_hand():
    model = tiny_model("llama")  # 4 layers, d=64, 4 heads (2 kv) of 16, ffn 96, fp32
    view = ModelView(model)
    # q,o: 64x64; k,v: 32x64; gate, up, down: 96x64 -> per layer 4096*2 + 2048*2 + 6144*3 = 30720 params
    assert decoder_linear_bytes(view) == 4 * 30720 * 4
    stats = {"realized_ffn_sparsity": 0.5, "realized_head_sparsity": 0.5, "realized_kv_group_sparsity": 0.5,
             "gated_layers": 3}
    total = 4 * 30720 * 4
    early = 3 * (48 * 3 * 64 + 2 * 2 * 16 * 64 + 1 * 2 * 16 * 64) * 4  # neurons x3 mats, heads q+o, one kv group
    decision = {m: SELECTORS[m].decision for m in ("predictor", "oracle", "gate")}  # early, late, after_gate
    assert weight_bytes_skipped(view, decision["predictor"], stats, selector_bytes=1000) == pytest.approx(
        (early - 1000) / total)
    late = 3 * (48 * 64 + 2 * 16 * 64) * 4  # down column, o columns only
    assert weight_bytes_skipped(view, decision["oracle"], stats) == pytest.approx(late / total)
    assert weight_bytes_skipped(view, decision["gate"], {**stats, "realized_head_sparsity": 0.0,
                                                         "realized_kv_group_sparsity": 0.0}) == pytest.approx(
        3 * 48 * 2 * 64 * 4 / total)
