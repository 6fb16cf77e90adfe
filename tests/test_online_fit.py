"""Online predictor fitting (the LLM scores each chunk as the fit reads it): the rows are the pipeline's targets,
every student kind learns, the fitted predictors plug into the gating hooks, and max_seconds shortens the plan."""
import pytest
import torch

from shadowsparse.arch import ModelView
from shadowsparse.criteria import get_criterion
from shadowsparse.fitting import normalize_scores
from shadowsparse.gating import scores_for
from shadowsparse.online_fit import (OnlineFitConfig, ffn_input_scores, ffn_input_student, fit_online, score_chunk,
                                     shared_student)
from shadowsparse.perplexity import Level, evaluate_levels
from shadowsparse.targets.score import score_window
from shadowsparse.verify import VerifyScores
from tests.conftest import tiny_model


def _dims(model):
    d = ModelView(model).dims
    return dict(d_model=d.hidden, n_layers=d.n_layers, n_heads=d.n_heads, ffn=d.ffn, feature_layer=0)


def _windows(n, t=32, seed=0):
    return torch.randint(0, 256, (n, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_chunk_rows_are_the_pipelines_targets(family):
    model = tiny_model(family)
    ids = _windows(2)
    cfg = OnlineFitConfig()
    rows = score_chunk(model, ids, cfg, {"features", "layer_inputs", "ffn_inputs"})
    heads, neurons, feat, layer_in = score_window(model, get_criterion("activation"), ids, 0)
    torch.testing.assert_close(rows["neurons"].float(), normalize_scores(neurons.flatten(0, 1), cfg.eps).bfloat16()
                               .float())
    torch.testing.assert_close(rows["heads"].float(), normalize_scores(heads.flatten(0, 1), cfg.eps).bfloat16().float())
    torch.testing.assert_close(rows["features"], feat.flatten(0, 1))
    torch.testing.assert_close(rows["layer_inputs"], layer_in.flatten(0, 1))
    d = _dims(model)
    assert rows["ffn_inputs"].shape == (ids.numel(), d["n_layers"], d["d_model"])


def test_students_learn_and_plug_into_the_gating():
    torch.manual_seed(0)
    model = tiny_model("llama")
    dims = _dims(model)
    layers = list(range(1, dims["n_layers"]))
    students = [shared_student("shared", dims, {"hidden": 64, "rank": 8}),
                shared_student("bce", dims, {"hidden": 64, "rank": 8}, loss="bce"),
                shared_student("per_layer", dims, {"rank": 16}, kind="per_layer"),
                ffn_input_student("ffn", dims, layers, rank=16, lr=3e-3)]
    records = []
    cfg = OnlineFitConfig(epochs=3, chunk_windows=4, batch_size=64, lr=3e-3)
    history = fit_online(model, _windows(16), students, cfg, val_windows=_windows(2, seed=1),
                         on_epoch=records.append)
    assert len(history) == 3 and records == history and history[0]["tokens"] == 16 * 32
    for s in students:
        assert history[-1][f"{s.name}/train_loss"] < history[0][f"{s.name}/train_loss"], s.name
        assert 0.0 <= history[-1][f"{s.name}/val_recall_ffn"] <= 1.0
        # the epoch's step losses are scalars of their own: F.mse_loss's mean is a view of its elementwise buffer,
        # which a kept loss would keep alive for the whole epoch (the device memory growth of session 13)
        assert s.losses and all(loss.untyped_storage().nbytes() == loss.element_size() for loss in s.losses), s.name
    # the batched FFN-input scores are the predictor's own, layer by layer (what predictor_verify's hooks call)
    ffn = students[-1].predictor
    x = torch.randn(5, len(layers), dims["d_model"])
    both = ffn_input_scores(ffn, x)
    for i, layer in enumerate(layers):
        torch.testing.assert_close(both[:, i], ffn.predict_layer(layer, x[:, i]))
    ev = _windows(2, seed=2)
    for source in (scores_for(students[0].predictor), scores_for(students[2].predictor), VerifyScores(0.5, ffn)):
        (lv,) = evaluate_levels(model, ev, source, [Level(0.5, 0.0)], first_layer=1)
        assert lv.ppl > 0
        assert lv.counter.stats(dims["n_heads"], dims["ffn"], 2)["realized_ffn_sparsity"] == pytest.approx(0.5,
                                                                                                            abs=0.02)


def test_max_seconds_shortens_the_plan():
    model = tiny_model("llama")
    dims = _dims(model)
    cfg = OnlineFitConfig(epochs=50, chunk_windows=2, batch_size=32, max_seconds=1e-6)
    history = fit_online(model, _windows(4), [shared_student("s", dims, {"hidden": 32, "rank": 4})], cfg)
    assert len(history) == 1 and history[0]["epochs_planned"] == 1
