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


def _grad_by_leaf(model, ids, module, loss_mask=None):
    """∂L/∂(input of module) by another route than the collector: the input is replaced by a leaf tensor."""
    leaf = {}

    def pre(m, a):
        leaf["t"] = a[0].detach().requires_grad_(True)
        return (leaf["t"],) + tuple(a[1:])
    h = module.register_forward_pre_hook(pre)
    with torch.enable_grad():
        logits = model(input_ids=ids).logits
        nll = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
        if loss_mask is not None:
            nll = nll[loss_mask[:, 1:].flatten()]
        (g,) = torch.autograd.grad(nll.sum(), [leaf["t"]])
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
    assert {"activation", "l2_norm", "plainact", "fisher", "grad_norm", "snip", "grasp"} <= set(CRITERIA)


@pytest.mark.parametrize("layer", [1, 3])
def test_gradient_family_by_hand(tiny, ids, layer):
    """grad_norm, snip, fisher, l2_norm against formulas on independently computed gradients."""
    model, _, _ = tiny
    view = ModelView(model)
    d = view.dims
    x, a = _capture_inputs(model, ids, layer)
    gx, ga = _grad_by_leaf(model, ids, view.attn_out(layer)), _grad_by_leaf(model, ids, view.ffn_down(layer))
    per_head = lambda t: t.unflatten(-1, (d.n_heads, d.head_dim))  # noqa: E731
    expected = {
        "grad_norm": (ga.abs(), per_head(gx).norm(dim=-1)),
        "snip": ((a * ga).abs(), per_head(x * gx).sum(-1).abs()),
        "fisher": ((a * ga) ** 2, per_head(x * gx).sum(-1) ** 2),
        "l2_norm": (a.abs(), per_head(x).norm(dim=-1)),
    }
    for name, (neuron_ref, head_ref) in expected.items():
        heads, neurons, _, _ = score_window(model, get_criterion(name), ids)
        torch.testing.assert_close(neurons[:, :, layer], neuron_ref, rtol=1e-4, atol=1e-8, msg=name)
        torch.testing.assert_close(heads[:, :, layer], head_ref, rtol=1e-4, atol=1e-8, msg=name)


def _mask_grads(model, ids, masks: dict):
    """∂L/∂m for unit masks applied by the test's own hooks; masks[(kind, layer)] are leaf tensors."""
    view = ModelView(model)
    H = view.dims.n_heads
    hooks = []
    for (kind, i), m in masks.items():
        mod = view.attn_out(i) if kind == "head" else view.ffn_down(i)
        if kind == "head":
            hooks.append(mod.register_forward_pre_hook(
                lambda mod_, a, m=m: ((a[0].unflatten(-1, (H, -1)) * m.unsqueeze(-1)).flatten(-2),)))
        else:
            hooks.append(mod.register_forward_pre_hook(lambda mod_, a, m=m: (a[0] * m.reshape(a[0].shape),)))
    with torch.enable_grad():
        logits = model(input_ids=ids).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")
        grads = torch.autograd.grad(loss, list(masks.values()))
    for h in hooks:
        h.remove()
    return grads


def test_grasp_against_finite_differences(ids):
    """−(H g) in mask space, checked by central differences of ∂L/∂m along g (float64)."""
    from tests.conftest import tiny_model
    model = tiny_model("llama").double()
    view = ModelView(model)
    d = view.dims
    B, T = ids.shape
    keys = [(k, i) for i in range(d.n_layers) for k in ("head", "neuron")]
    ones = {k: torch.ones(B, T, d.n_heads if k[0] == "head" else d.ffn, dtype=torch.float64, requires_grad=True)
            for k in keys}
    g = [t.detach() for t in _mask_grads(model, ids, ones)]
    eps = 1e-3  # smaller steps drown in round-off (some ops of the model stay in fp32); 1e-3 agrees to ~0.5%
    plus = _mask_grads(model, ids, {k: (1 + eps * gi).requires_grad_() for k, gi in zip(keys, g)})
    minus = _mask_grads(model, ids, {k: (1 - eps * gi).requires_grad_() for k, gi in zip(keys, g)})
    hg = {k: (p - m) / (2 * eps) for k, p, m in zip(keys, plus, minus)}
    heads, neurons, _, _ = score_window(model, get_criterion("grasp"), ids)
    for i in (0, 2):
        for got, ref in ((neurons[:, :, i], hg["neuron", i]), (heads[:, :, i], hg["head", i])):
            scale = ref.abs().max().item()
            assert scale > 0
            torch.testing.assert_close(got.double(), -ref, rtol=0, atol=2e-2 * scale)


def test_answer_only_loss_by_hand(ids):
    """Task data: the loss covers the answer tokens only; tokens after the answer get no gradient signal at all."""
    from tests.conftest import tiny_model
    model = tiny_model("llama")
    view = ModelView(model)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[:, 10:15] = True  # the "answer"
    layer = 2
    _, a = _capture_inputs(model, ids, layer)
    ga = _grad_by_leaf(model, ids, view.ffn_down(layer), loss_mask=mask)
    _, neurons, _, _ = score_window(model, get_criterion("plainact"), ids, loss_mask=mask)
    torch.testing.assert_close(neurons[:, :, layer], (a * ga).abs(), rtol=1e-4, atol=1e-8)
    assert neurons[:, 15:].abs().max() == 0  # causal: tokens after the last answer token cannot affect its loss
    _, full, _, _ = score_window(model, get_criterion("plainact"), ids)
    assert not torch.equal(full, neurons)
