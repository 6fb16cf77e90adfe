import pytest
import torch

from shadowsparse import GatingConfig, SharedPredictor, StaticScores, TensorScores, attach_gating, gated
from shadowsparse.arch import ModelView
from shadowsparse.errors import ConfigError
from shadowsparse.gating import n_keep, topk_mask


def _predictor(view, feature_layer=0, seed=0):
    torch.manual_seed(seed)
    d = view.dims
    return SharedPredictor(d.hidden, d.n_layers, d.n_heads, d.ffn, feature_layer).eval()


def _hook_count(model):
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


@torch.no_grad()
def test_keep_all_equals_dense_bit_for_bit(tiny, ids):
    model, _, _ = tiny
    dense = model(input_ids=ids).logits
    with attach_gating(model, _predictor(ModelView(model)), GatingConfig(ffn_sparsity=0.0, head_sparsity=0.0)):
        kept = model(input_ids=ids).logits
    assert torch.equal(dense, kept)


@torch.no_grad()
def test_all_ones_mask_path_is_exact(tiny, ids):
    """Even with the hooks on, a mask of ones changes nothing: the multiply path is a faithful reference."""
    model, _, _ = tiny
    d = ModelView(model).dims
    dense = model(input_ids=ids).logits
    src = StaticScores(torch.ones(d.n_layers, d.n_heads), torch.ones(d.n_layers, d.ffn))
    with attach_gating(model, src, GatingConfig(ffn_sparsity=0.0, head_sparsity=0.0, first_layer=0)) as h:
        # force hooks with k = all units
        h.k_heads, h.k_neurons = d.n_heads, d.ffn
        assert torch.equal(dense, model(input_ids=ids).logits)


@torch.no_grad()
def test_remove_restores_model_and_leaves_no_hooks(tiny, ids):
    model, _, _ = tiny
    before = _hook_count(model)
    dense = model(input_ids=ids).logits
    handle = attach_gating(model, _predictor(ModelView(model)), GatingConfig(ffn_sparsity=0.5, head_sparsity=0.5))
    assert _hook_count(model) > before
    gated_logits = model(input_ids=ids).logits
    assert not torch.equal(dense, gated_logits)
    handle.remove()
    assert _hook_count(model) == before
    assert torch.equal(model(input_ids=ids).logits, dense)
    with gated(model, _predictor(ModelView(model)), GatingConfig(ffn_sparsity=0.5)):
        pass
    assert _hook_count(model) == before


@pytest.mark.parametrize("ffn,heads", [(0.5, 0.5), (0.25, 0.0), (0.75, 0.25)])
@torch.no_grad()
def test_realized_equals_requested(tiny, ids, ffn, heads):
    model, _, _ = tiny
    view = ModelView(model)
    d = view.dims
    with attach_gating(model, _predictor(view), GatingConfig(ffn_sparsity=ffn, head_sparsity=heads)) as h:
        model(input_ids=ids)
        s = h.stats()
    # tiny dims: ffn 96 or 128, 4 heads -> these fractions are exact
    assert s["realized_ffn_sparsity"] == pytest.approx(1 - n_keep(d.ffn, ffn) / d.ffn)
    assert s["realized_ffn_sparsity"] == pytest.approx(ffn)
    assert s["realized_head_sparsity"] == pytest.approx(heads)
    assert s["gated_layers"] == d.n_layers - 1


@torch.no_grad()
def test_head_gating_zeroes_exactly_the_lowest_scored_heads_gqa_layout(ids):
    """Under GQA the out-projection input is the query-head layout: head h owns channels [h*D, (h+1)*D)."""
    from tests.conftest import tiny_model
    model = tiny_model("llama")
    view = ModelView(model)
    d = view.dims
    assert d.n_kv_heads < d.n_heads  # the tiny Llama is GQA
    B, T = ids.shape
    scores_h = torch.randn(B, T, d.n_layers, d.n_heads)
    src = TensorScores(scores_h, torch.randn(B, T, d.n_layers, d.ffn))
    layer = 2
    seen, raw = {}, {}
    # pre-hooks run in registration order: `raw` sees the input before gating, `seen` after it
    h0 = view.attn_out(layer).register_forward_pre_hook(lambda m, a: raw.__setitem__("x", a[0].clone()))
    with attach_gating(model, src, GatingConfig(ffn_sparsity=0.0, head_sparsity=0.5, first_layer=0)) as h:
        h1 = view.attn_out(layer).register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0].clone()))
        model(input_ids=ids)
        h1.remove()
        assert h.stats()["realized_head_sparsity"] == pytest.approx(0.5)
    h0.remove()
    x = seen["x"].unflatten(-1, (d.n_heads, d.head_dim))
    xr = raw["x"].unflatten(-1, (d.n_heads, d.head_dim))
    keep = topk_mask(scores_h[:, :, layer], n_keep(d.n_heads, 0.5), torch.bool)  # (B, T, H)
    assert torch.equal(x[~keep], torch.zeros_like(x[~keep]))
    assert torch.equal(x[keep], xr[keep])


@torch.no_grad()
def test_neuron_mask_matches_manual_reference(ids):
    """The gated down-projection input equals the dense one times the top-k mask of the given scores."""
    from tests.conftest import tiny_model
    model = tiny_model("opt")
    view = ModelView(model)
    d = view.dims
    B, T = ids.shape
    scores_n = torch.randn(B, T, d.n_layers, d.ffn)
    src = TensorScores(torch.randn(B, T, d.n_layers, d.n_heads), scores_n)
    layer = 1
    got, raw = {}, {}
    h0 = view.ffn_down(layer).register_forward_pre_hook(lambda m, a: raw.__setitem__("x", a[0].clone()))
    with attach_gating(model, src, GatingConfig(ffn_sparsity=0.7, first_layer=layer)):
        h1 = view.ffn_down(layer).register_forward_pre_hook(lambda m, a: got.__setitem__("x", a[0].clone()))
        model(input_ids=ids)
        h1.remove()
    h0.remove()
    mask = topk_mask(scores_n[:, :, layer], n_keep(d.ffn, 0.7), raw["x"].dtype)
    assert raw["x"].dim() == 2  # OPT flattens tokens before fc1/fc2: rows are (b, t) in order
    torch.testing.assert_close(got["x"], raw["x"] * mask.reshape(raw["x"].shape), rtol=0, atol=0)


@torch.no_grad()
def test_sequence_granularity_one_mask_per_sequence_and_kept_while_decoding(ids):
    from tests.conftest import tiny_model
    model = tiny_model("llama")
    view = ModelView(model)
    pred = _predictor(view)
    masks = []
    cap = view.ffn_down(3).register_forward_pre_hook(lambda m, a: masks.append((a[0] != 0)))
    with attach_gating(model, pred, GatingConfig(ffn_sparsity=0.5, granularity="sequence")):
        model.generate(input_ids=ids[:1, :8], attention_mask=torch.ones(1, 8, dtype=torch.long), max_new_tokens=4,
                       do_sample=False, pad_token_id=0)
    cap.remove()
    prompt_mask = masks[0][0]  # (T, F)
    assert (prompt_mask == prompt_mask[0]).all()  # same neurons for every prompt token
    for m in masks[1:]:  # decode steps reuse the prompt's mask (where activations are non-zero)
        assert not (m[0, 0] & ~prompt_mask[0]).any()


@torch.no_grad()
def test_generate_works_with_token_gating(tiny):
    model, _, _ = tiny
    ids = torch.randint(0, 256, (1, 6))
    with attach_gating(model, _predictor(ModelView(model)), GatingConfig(ffn_sparsity=0.5, head_sparsity=0.25)) as h:
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                             pad_token_id=0)
        s = h.stats()
    assert out.shape == (1, 11)
    assert s["realized_ffn_sparsity"] == pytest.approx(0.5)


@pytest.mark.parametrize("bad", [{"ffn_sparsity": 1.0}, {"ffn_sparsity": -0.1}, {"head_sparsity": 1.5},
                                 {"granularity": "batch"}])
def test_bad_gating_config_is_refused(bad):
    from tests.conftest import tiny_model
    model = tiny_model("llama")
    with pytest.raises(ConfigError):
        attach_gating(model, _predictor(ModelView(model)), GatingConfig(**bad))


def test_topk_mask_exact_values():
    s = torch.tensor([[0.1, 0.9, 0.5, 0.3], [4.0, 1.0, 3.0, 2.0]])
    assert torch.equal(topk_mask(s, 2, torch.float32), torch.tensor([[0., 1, 1, 0], [1, 0, 1, 0]]))
    assert n_keep(1536, 0.5) == 768 and n_keep(9, 0.3) == 6 and n_keep(4, 0.99) == 1


def _static(view, heads, neurons):
    return StaticScores(heads, neurons)


@torch.no_grad()
def test_global_budget_exact_values(ids):
    """Global: one threshold over all gated layers. Layer 1 scores high everywhere, so it keeps all its units."""
    from tests.conftest import tiny_model
    model = tiny_model("llama")
    d = ModelView(model).dims  # 4 layers, ffn 96
    neurons = torch.arange(d.n_layers * d.ffn, dtype=torch.float32).view(d.n_layers, d.ffn).flip(0)  # layer 0 highest
    heads = torch.ones(d.n_layers, d.n_heads)
    cfg = GatingConfig(ffn_sparsity=0.5, first_layer=1, budget="global")
    with attach_gating(model, StaticScores(heads, neurons), cfg) as h:
        model(input_ids=ids)
        masks = h._budget_cache["neurons"][1][0, 0]  # (Lg=3, F)
        assert h.stats()["realized_ffn_sparsity"] == pytest.approx(0.5)
    # 3 gated layers x 96 = 288 units, keep 144: all of layer 1 (the highest gated), 48 of layer 2, none of layer 3
    assert masks.sum(-1).tolist() == [96, 48, 0]
    assert masks[1, -48:].all() and not masks[1, :48].any()
    cfg = GatingConfig(ffn_sparsity=0.5, first_layer=1, budget="hybrid", min_keep=0.25)
    with attach_gating(model, StaticScores(heads, neurons), cfg) as h:
        model(input_ids=ids)
        masks = h._budget_cache["neurons"][1][0, 0]
        assert h.stats()["realized_ffn_sparsity"] == pytest.approx(0.5)
    assert masks.sum(-1).tolist() == [96, 24, 24]  # 24 = 0.25 * 96 kept everywhere, the other 72 go to layer 1


@torch.no_grad()
def test_global_budget_with_predictor_per_token(ids):
    from tests.conftest import tiny_model
    model = tiny_model("opt")
    view = ModelView(model)
    with attach_gating(model, _predictor(view), GatingConfig(ffn_sparsity=0.6, head_sparsity=0.5,
                                                              budget="global")) as h:
        model(input_ids=ids)
        s = h.stats()
    assert s["realized_ffn_sparsity"] == pytest.approx(1 - n_keep(3 * 128, 0.6) / (3 * 128))  # global rounding
    assert s["realized_head_sparsity"] == pytest.approx(0.5, abs=1e-3)


def test_global_budget_refused_for_per_layer_selectors():
    from shadowsparse.training_free import GateScores
    from tests.conftest import tiny_model
    model = tiny_model("llama")
    with pytest.raises(ConfigError, match="all layers at once"):
        with attach_gating(model, GateScores(), GatingConfig(ffn_sparsity=0.5, budget="global")):
            model(input_ids=torch.zeros(1, 4, dtype=torch.long))
