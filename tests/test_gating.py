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
def test_hooks_keeping_every_unit_are_exact(tiny, ids):
    """The mask path with its hooks attached and running, but told to keep every unit, leaves the logits bit for
    bit: a hook that scales, drops or reorders anything (or masks the wrong units) fails here."""
    model, _, _ = tiny
    view = ModelView(model)
    d = view.dims
    dense = model(input_ids=ids).logits
    before = _hook_count(model)
    src = TensorScores(torch.randn(*ids.shape, d.n_layers, d.n_heads), torch.randn(*ids.shape, d.n_layers, d.ffn))
    with attach_gating(model, src, GatingConfig(ffn_sparsity=0.5, head_sparsity=0.5, first_layer=0)) as h:
        assert _hook_count(model) == before + 2 * d.n_layers  # one head and one neuron hook per gated layer
        h.k_heads, h.k_neurons = d.n_heads, d.ffn  # the hooks read k at call time: keep all units
        kept = model(input_ids=ids).logits
        s = h.stats()
    assert h.counter.rows["heads"] == h.counter.rows["neurons"] == ids.numel() * d.n_layers  # every hook ran
    assert s["realized_ffn_sparsity"] == 0.0 and s["realized_head_sparsity"] == 0.0
    assert torch.equal(dense, kept)


def _kept(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k highest scores of each row, (R, U) -> (R, k), by a full sort (not topk)."""
    return scores.argsort(-1, descending=True)[:, :k]


def _sliced_linear(x: torch.Tensor, weight: torch.Tensor, bias, cols: torch.Tensor) -> torch.Tensor:
    """A linear layer that reads only the given input channels of each row: x (..., I), cols (R, k) with R the rows
    of x -> (..., O). What a sliced kernel computes: the kept columns of W times the kept inputs, nothing else."""
    rows = x.reshape(-1, x.shape[-1])  # (R, I)
    xs = rows.gather(-1, cols)  # (R, k)
    ws = weight[:, cols]  # (O, R, k)
    out = torch.einsum("rk,ork->ro", xs, ws)
    if bias is not None:
        out = out + bias
    return out.reshape(*x.shape[:-1], weight.shape[0])


@pytest.mark.parametrize("ffn,heads", [(0.5, 0.5), (0.5, 0.0), (0.0, 0.5)])
@torch.no_grad()
def test_mask_path_equals_a_hand_sliced_forward(tiny, ids, ffn, heads):
    """Gating by the mask path equals a forward that never reads the skipped units: per token, the out-projection
    reads only the kept heads' channels (head h owns [h*D, (h+1)*D), also under GQA) and the down projection only
    the kept neurons' rows of W_down^T (the rest of each is never touched)."""
    model, _, family = tiny
    view = ModelView(model)
    d = view.dims
    B, T = ids.shape
    g = torch.Generator().manual_seed(1)
    heads_s, neurons_s = torch.randn(B, T, d.n_layers, d.n_heads, generator=g), torch.randn(B, T, d.n_layers, d.ffn,
                                                                                            generator=g)
    cfg = GatingConfig(ffn_sparsity=ffn, head_sparsity=heads, first_layer=1)
    dense = model(input_ids=ids).logits
    with attach_gating(model, TensorScores(heads_s, neurons_s), cfg) as h:
        gated_logits = model(input_ids=ids).logits
        s = h.stats()
    assert s["realized_ffn_sparsity"] == pytest.approx(1 - n_keep(d.ffn, ffn) / d.ffn)
    assert s["realized_head_sparsity"] == pytest.approx(1 - n_keep(d.n_heads, heads) / d.n_heads)
    assert not torch.equal(dense, gated_logits)  # something was skipped

    hooks = []  # the reference: forward hooks replace each gated projection's output by the sliced computation
    for layer in range(1, d.n_layers):
        if heads > 0:
            kh = _kept(heads_s[:, :, layer].reshape(B * T, -1), n_keep(d.n_heads, heads))  # (R, kh)
            channels = (kh[:, :, None] * d.head_dim + torch.arange(d.head_dim)).flatten(1)  # (R, kh * D)
            hooks.append(view.attn_out(layer).register_forward_hook(
                lambda m, args, out, c=channels: _sliced_linear(args[0], m.weight, m.bias, c)))
        if ffn > 0:
            kn = _kept(neurons_s[:, :, layer].reshape(B * T, -1), n_keep(d.ffn, ffn))  # (R, kf)
            hooks.append(view.ffn_down(layer).register_forward_hook(
                lambda m, args, out, c=kn: _sliced_linear(args[0], m.weight, m.bias, c)))
    try:
        sliced = model(input_ids=ids).logits
    finally:
        for hk in hooks:
            hk.remove()
    torch.testing.assert_close(gated_logits, sliced, rtol=1e-5, atol=1e-5)
    assert (gated_logits - dense).abs().max() > 100 * (gated_logits - sliced).abs().max()  # not dense by accident


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
