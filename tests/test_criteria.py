"""Each criterion against a hand computation on a tiny model."""
import pytest
import torch
import torch.nn.functional as F

from shadowsparse.arch import ModelView
from shadowsparse.criteria import CRITERIA, get_criterion
from shadowsparse.errors import ConfigError
from shadowsparse.targets import score_window


def _capture_inputs(model, ids, layer):
    """Dense forward recording the out-projection and down-projection inputs of one layer, (B, T, ·)."""
    view = ModelView(model)
    got = {}
    hs = [view.attn_out(layer).register_forward_pre_hook(lambda m, a: got.__setitem__("x", a[0].detach().clone())),
          view.ffn_down(layer).register_forward_pre_hook(lambda m, a: got.__setitem__("a", a[0].detach().clone()))]
    with torch.no_grad():
        model(input_ids=ids)
    for h in hs:
        h.remove()
    B, T = ids.shape
    return got["x"].reshape(B, T, -1), got["a"].reshape(B, T, -1)


def _grad_by_leaf(model, ids, module):
    """∂L/∂(input of module) by another route than the collector: the input is replaced by a leaf tensor."""
    leaf = {}

    def pre(m, a):
        leaf["t"] = a[0].detach().requires_grad_(True)
        return (leaf["t"],) + tuple(a[1:])
    h = module.register_forward_pre_hook(pre)
    with torch.enable_grad():
        logits = model(input_ids=ids).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")
        (g,) = torch.autograd.grad(loss, [leaf["t"]])
    h.remove()
    return g.reshape(*ids.shape, -1)


@pytest.mark.parametrize("layer", [0, 2])
def test_activation_criterion_by_hand(tiny, ids, layer):
    model, _, _ = tiny
    view = ModelView(model)
    d = view.dims
    heads, neurons, feat, layer_in = score_window(model, get_criterion("activation"), ids, feature_layer=0)
    x, a = _capture_inputs(model, ids, layer)
    torch.testing.assert_close(neurons[:, :, layer], a.abs())
    W = view.attn_out(layer).weight  # (d_model, H*D)
    by_hand = torch.stack([(x[..., h * d.head_dim:(h + 1) * d.head_dim] @ W[:, h * d.head_dim:(h + 1) * d.head_dim].T)
                           .norm(dim=-1) for h in range(d.n_heads)], -1)
    torch.testing.assert_close(heads[:, :, layer], by_hand, rtol=1e-4, atol=1e-5)
    assert feat.shape == (*ids.shape, d.hidden) and layer_in.shape == (*ids.shape, d.n_layers, d.hidden)


@pytest.mark.parametrize("layer", [1, 3])
def test_plainact_criterion_by_hand(tiny, ids, layer):
    model, _, _ = tiny
    d = ModelView(model).dims
    heads, neurons, _, _ = score_window(model, get_criterion("plainact"), ids)
    x, a = _capture_inputs(model, ids, layer)
    view = ModelView(model)
    gx, ga = _grad_by_leaf(model, ids, view.attn_out(layer)), _grad_by_leaf(model, ids, view.ffn_down(layer))
    torch.testing.assert_close(neurons[:, :, layer], (a * ga).abs(), rtol=1e-4, atol=1e-7)
    by_hand = (x * gx).abs().unflatten(-1, (d.n_heads, d.head_dim)).sum(-1)
    torch.testing.assert_close(heads[:, :, layer], by_hand, rtol=1e-4, atol=1e-7)
    assert all(not p.requires_grad and p.grad is None for p in model.parameters())  # frozen model untouched


def test_feature_is_output_of_feature_layer(ids):
    from tests.conftest import tiny_model
    model = tiny_model("llama")
    out = model(input_ids=ids, output_hidden_states=True).hidden_states  # [embeddings, layer0, layer1, ...]
    _, _, feat, layer_in = score_window(model, get_criterion("activation"), ids, feature_layer=1)
    torch.testing.assert_close(feat, out[2])
    torch.testing.assert_close(layer_in.float(), torch.stack(out[:-1], 2).bfloat16().float())  # input of every layer


def test_unknown_criterion_is_refused():
    with pytest.raises(ConfigError, match="not registered"):
        get_criterion("nope")
    assert {"activation", "plainact"} <= set(CRITERIA)
