import pytest
import torch

from shadowsparse.arch import ModelView
from shadowsparse.errors import ConfigError
from shadowsparse.teal import TealThresholds, attach_teal
from tests.conftest import tiny_model


@pytest.mark.parametrize("family", ["llama", "opt"])
@torch.no_grad()
def test_teal_hits_sparsity_and_masks_inputs_by_hand(family):
    model = tiny_model(family)
    view = ModelView(model)
    windows = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(5))
    thr = TealThresholds.calibrate(model, windows)
    dense = model(input_ids=windows).logits
    with attach_teal(model, thr, 0.0):
        assert torch.equal(model(input_ids=windows).logits, dense)
    layer = 0  # layer 0's inputs are the calibration inputs themselves: the quantile is exact there
    raw, got = {}, {}
    down = view.ffn_down(layer)
    h0 = down.register_forward_pre_hook(lambda m, a: raw.__setitem__("x", a[0].clone()))
    with attach_teal(model, thr, 0.5) as h:
        h1 = down.register_forward_pre_hook(lambda m, a: got.__setitem__("x", a[0].clone()))
        model(input_ids=windows)
        h1.remove()
        stats = h.stats()
        bytes_skipped = h.weight_bytes_skipped()
    h0.remove()
    t = thr.thresholds(0.5)["ffn_out", layer]
    torch.testing.assert_close(got["x"], raw["x"] * (raw["x"].abs() > t), rtol=0, atol=0)
    for v in stats.values():
        assert 0.3 < v < 0.7  # later layers see sparsified inputs: near 0.5, not exact
    assert 0.3 < bytes_skipped < 0.7
    assert sum(len(m._forward_pre_hooks) for m in model.modules()) == 0


def test_teal_bad_sparsity():
    model = tiny_model("llama")
    thr = TealThresholds.calibrate(model, torch.randint(0, 256, (1, 8)))
    with pytest.raises(ConfigError):
        attach_teal(model, thr, 1.0)


@torch.no_grad()
def test_teal_on_some_inputs_only():
    """inputs=: only the named projection inputs are thresholded (sketch_teal's attention half); the others keep
    their values and read 0 realized sparsity; an unknown or empty set is refused."""
    model = tiny_model("llama")
    windows = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(6))
    thr = TealThresholds.calibrate(model, windows)
    with attach_teal(model, thr, 0.5, inputs=("attn_in", "attn_out")) as h:
        model(input_ids=windows)
        stats = h.stats()
        hooked = {name for name, m in model.named_modules() if m._forward_pre_hooks}
    assert 0.3 < stats["realized_attn_in_sparsity"] < 0.7 and 0.3 < stats["realized_attn_out_sparsity"] < 0.7
    assert stats["realized_ffn_in_sparsity"] == stats["realized_ffn_out_sparsity"] == 0.0
    assert hooked and all("self_attn" in name for name in hooked)
    for bad in (("attn_in", "mlp"), ()):
        with pytest.raises(ConfigError, match="teal inputs must be a non-empty subset"):
            attach_teal(model, thr, 0.5, inputs=bad)
