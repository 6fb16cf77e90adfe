"""Predict-then-verify (shadowsparse/verify.py): the mask path equals a hand-sliced FFN that computes gate/up only
for the candidates and down only for the kept neurons; counting, byte accounting, training and the pipeline."""
import json
import math
import types

import pytest
import torch

from shadowsparse.accounting import decoder_linear_bytes, weight_bytes_skipped
from shadowsparse.selectors import SELECTORS
from shadowsparse.arch import ModelView
from shadowsparse.errors import ConfigError
from shadowsparse.ffn_io import load_layer, record_ffn_io
from shadowsparse.gating import GatingConfig, SparsityCounter, attach_gating, n_keep
from shadowsparse.training_free import LiveActivationScores
from shadowsparse.quant import quantize_rows, x8_grid
from shadowsparse.config import verify_config
from shadowsparse.verify import VerifyConfig, VerifyScores, sketch_bytes
from shadowsparse.verify_predictor import FFNInputPredictor, fit_from_recording, fit_layer, normalized_target
from tests.conftest import compose, tiny_model


def _predictor(model, layers, seed=0):
    view = ModelView(model)
    torch.manual_seed(seed)
    return FFNInputPredictor(view.dims.hidden, view.dims.ffn, layers, rank=8).eval().requires_grad_(False)


def _sliced_forward(mlp, propose, q, s, final_col=None):
    """The FFN as a kernel would run it: gate/up rows of the candidates only, down columns of the kept only."""
    F = mlp.down_proj.weight.shape[1]

    def forward(self, x):  # x: (B, T, d)
        cand = propose(x).topk(int(round(q * F)), -1).indices  # (B, T, C)
        g = torch.einsum("btd,btcd->btc", x, self.gate_proj.weight[cand])
        u = torch.einsum("btd,btcd->btc", x, self.up_proj.weight[cand])
        a = self.act_fn(g) * u  # (B, T, C): the candidates' activations, nothing else computed
        rank = a.abs() if final_col is None else a.abs() * final_col[cand]
        top = rank.topk(n_keep(F, s), -1).indices  # (B, T, K) positions among the candidates
        keep, a_keep = cand.gather(-1, top), a.gather(-1, top)
        return torch.einsum("btk,btko->bto", a_keep, self.down_proj.weight.T[keep])
    return types.MethodType(forward, mlp)


def _sliced_logits(model, ids, first, make_propose, q, s, final_col=None):
    """Logits with every FFN from ``first`` on replaced by _sliced_forward (make_propose(layer, mlp) -> scores of x;
    final_col(mlp) -> the contribution weights or None); the FFNs are restored afterwards."""
    view = ModelView(model)
    saved = {}
    try:
        for l in range(first, view.dims.n_layers):
            mlp = view.layer(l).mlp
            saved[l] = mlp.forward
            mlp.forward = _sliced_forward(mlp, make_propose(l, mlp), q, s, final_col(mlp) if final_col else None)
        return model(input_ids=ids).logits
    finally:
        for l, f in saved.items():
            view.layer(l).mlp.forward = f


@pytest.mark.parametrize("family", ["llama", "mistral"])
@pytest.mark.parametrize("proposer,final", [("predictor", "activation"), ("gate", "activation"),
                                            ("predictor", "contribution"), ("sketch", "activation"),
                                            ("sketch_act", "activation"), ("sketch_act_fp32", "activation")])
def test_verify_mask_path_equals_hand_sliced_ffn(ids, family, proposer, final):
    """The hooks against FFNs sliced by hand; the sketch reads x rounded to int8 per group of 16 channels (x_bits
    8, the default: quant.x8_grid by hand), or fp32 x ("sketch_act_fp32", x_bits None)."""
    model = tiny_model(family)
    view = ModelView(model)
    q, s, first = 0.75, 0.5, 1
    pred = _predictor(model, list(range(first, view.dims.n_layers)))
    fp32 = proposer.endswith("_fp32")
    proposer = proposer.replace("_fp32", "")
    sketch = VerifyConfig(bits=2, group=16, sketch="act" if proposer == "sketch_act" else "gate",
                          x_bits=None if fp32 else 8)
    src = VerifyScores(q, pred if proposer == "predictor" else None, proposer.replace("_act", ""), final, sketch)
    xs = (lambda x: x) if fp32 else (lambda x: x8_grid(x, None, 16))  # what the sketch multiplies
    with attach_gating(model, src, GatingConfig(ffn_sparsity=s, first_layer=first)):
        gated = model(input_ids=ids).logits
    dense = model(input_ids=ids).logits

    def make_propose(l, mlp):
        qg, qu = quantize_rows(mlp.gate_proj.weight, 2, 16), quantize_rows(mlp.up_proj.weight, 2, 16)
        return {"predictor": lambda x: pred.predict_layer(l, x),
                "gate": lambda x: mlp.act_fn(x @ mlp.gate_proj.weight.T).abs(),
                "sketch": lambda x: mlp.act_fn(xs(x) @ qg.T).abs(),
                "sketch_act": lambda x: (mlp.act_fn(xs(x) @ qg.T) * (xs(x) @ qu.T)).abs(),
                }[proposer]
    col = (lambda mlp: mlp.down_proj.weight.norm(dim=0)) if final == "contribution" else None
    ref = _sliced_logits(model, ids, first, make_propose, q, s, col)
    torch.testing.assert_close(gated, ref, atol=2e-5, rtol=1e-4)
    assert not torch.allclose(gated, dense, atol=1e-3)  # it did gate something
    torch.testing.assert_close(model(input_ids=ids).logits, dense, atol=0, rtol=0)  # hooks gone: dense again


def test_quantize_rows_by_hand():
    w = torch.tensor([[1.0, -0.5, 0.25, -1.0, 2.0, 0.0, -2.0, 1.0]])
    # symmetric: scale = max|w| per group; torch.round takes halves to even (1/2 -> 0)
    assert quantize_rows(w, 2, 4, "symmetric").tolist() == [[1.0, 0.0, 0.0, -1.0, 2.0, 0.0, -2.0, 0.0]]
    torch.testing.assert_close(quantize_rows(w, 3, 4, "symmetric")[0, :4], torch.tensor([1.0, -2 / 3, 1 / 3, -1.0]))
    assert quantize_rows(w, 1, 4, "symmetric").tolist() == [[0.6875, -0.6875, 0.6875, -0.6875, 1.25, 0.0, -1.25, 1.25]]
    with pytest.raises(ConfigError, match="divide"):
        quantize_rows(w, 2, 3)
    # midrise: 2**bits levels ±(k + 1/2)·Δ per group, no zero level; never worse than symmetric at the same bits
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 64, generator=g)
    for bits in (1, 2, 3):
        q = quantize_rows(w, bits, 16)
        for grp in q.reshape(32, 4, 16).flatten(0, 1):
            levels = grp.unique()
            assert len(levels) <= 2 ** bits and (levels != 0).all()
            step = 2 * levels.abs().min()  # the innermost levels are ±Δ/2
            torch.testing.assert_close(levels / step - 0.5, (levels / step - 0.5).round())
        err = (q - w).pow(2).mean()
        assert err <= (quantize_rows(w, bits, 16, "symmetric") - w).pow(2).mean() + 1e-6
    view = ModelView(tiny_model("llama"))  # d 64, ffn 96, fp32: 2 bits + a 16-bit scale per 16 = 3/16 of a matrix
    assert sketch_bytes(view, 3, VerifyConfig(bits=2, group=16, sketch="gate")) == 3 * 96 * 64 * 3 // 16 * 4
    assert sketch_bytes(view, 3, VerifyConfig(bits=2, group=16, sketch="act")) == 2 * 3 * 96 * 64 * 3 // 16 * 4


def test_full_proposal_is_the_activation_oracle(ids):
    model = tiny_model("llama")
    pred = _predictor(model, [1, 2, 3])
    cfg = GatingConfig(ffn_sparsity=0.5, first_layer=1)
    with attach_gating(model, VerifyScores(1.0, pred), cfg):
        verify = model(input_ids=ids).logits
    with attach_gating(model, LiveActivationScores(), cfg):
        oracle = model(input_ids=ids).logits
    torch.testing.assert_close(verify, oracle, atol=0, rtol=0)


def test_candidate_and_final_sparsity_are_counted(ids):
    model = tiny_model("llama")  # ffn 96
    pred = _predictor(model, [1, 2, 3])
    src, counter = VerifyScores(0.6, pred), SparsityCounter()
    with attach_gating(model, src, GatingConfig(ffn_sparsity=0.5, first_layer=1), counter=counter) as h:
        model(input_ids=ids)
        stats = h.stats()
    assert stats["realized_ffn_sparsity"] == pytest.approx(0.5)
    assert src.candidate_sparsity(0.5, 96) == pytest.approx(1 - round(0.6 * 96) / 96)
    assert src.candidate_stats[0.5][1] == 3 * ids.numel()  # one row per token and gated layer
    # fewer proposed than the final keep: the proposal grows to the keep (pure predictor top-k)
    src = VerifyScores(0.3, pred)
    with attach_gating(model, src, GatingConfig(ffn_sparsity=0.5, first_layer=1)):
        model(input_ids=ids)
    assert src.candidate_sparsity(0.5, 96) == pytest.approx(0.5)


def test_verify_refuses_heads_missing_layers_and_non_glu_gate(ids):
    model = tiny_model("llama")
    with pytest.raises(ConfigError, match="FFN neurons only"):
        attach_gating(model, VerifyScores(0.7, _predictor(model, [1, 2, 3])), GatingConfig(head_sparsity=0.3))
    with pytest.raises(ConfigError, match="no layer 1"):
        attach_gating(model, VerifyScores(0.7, _predictor(model, [2, 3])), GatingConfig(first_layer=1))
    with pytest.raises(ConfigError, match="gated FFN"):
        attach_gating(tiny_model("opt"), VerifyScores(0.7, None, "gate"), GatingConfig(first_layer=1))
    with pytest.raises(ConfigError, match="verify.q"):
        VerifyConfig(q=[0.5, 1.5]).validate()
    with pytest.raises(ConfigError, match="verify.quantizer"):
        VerifyConfig(quantizer="nf4").validate()
    with pytest.raises(ConfigError, match="unknown evaluate.verify"):
        verify_config(compose("experiment=research_sketch", "+evaluate.verify.bitz=3"))


def test_verify_bytes_by_hand():
    model = tiny_model("llama")  # 4 layers, d=64, ffn 96, fp32; per layer 30720 params
    view = ModelView(model)
    total = decoder_linear_bytes(view)
    stats = {"realized_ffn_sparsity": 0.5, "realized_head_sparsity": 0.0, "realized_candidate_sparsity": 0.25,
             "gated_layers": 3}
    # non-candidates: 24 neurons skip gate+up rows; every skipped neuron (48) skips its down column
    by_hand = 3 * (24 * 2 * 64 + 48 * 64) * 4
    verify, gate_verify = SELECTORS["predictor_verify"].decision, SELECTORS["gate_verify"].decision
    assert weight_bytes_skipped(view, verify, stats, selector_bytes=500) == pytest.approx((by_hand - 500) / total)
    assert weight_bytes_skipped(view, gate_verify, stats) == pytest.approx(3 * (24 * 64 + 48 * 64) * 4 / total)


def test_recording_matches_the_ffn_and_training_learns(tmp_path):
    model = tiny_model("llama")
    view = ModelView(model)
    g = torch.Generator().manual_seed(1)
    windows = torch.randint(0, 256, (40, 32), generator=g)
    record_ffn_io(model, windows, [1, 2], tmp_path / "rec", layer_inputs=(2,))
    x, a = load_layer(tmp_path / "rec", "x", 2).float(), load_layer(tmp_path / "rec", "a", 2).float()
    mlp = view.layer(2).mlp
    torch.testing.assert_close(mlp.act_fn(x @ mlp.gate_proj.weight.T) * (x @ mlp.up_proj.weight.T), a,
                               atol=2e-2, rtol=2e-2)  # fp16 storage
    trained = fit_from_recording(tmp_path / "rec", [1, 2], VerifyConfig(rank=8, epochs=1), model=model,
                                 rows=slice(0, 1024))
    assert trained.train_tokens == 1024 and trained.layers == [1, 2]
    held_x = x[1024:]
    trained.save(tmp_path / "v.safetensors")
    again = FFNInputPredictor.load(tmp_path / "v.safetensors")
    torch.testing.assert_close(again.predict_layer(1, held_x), trained.predict_layer(1, held_x))


def test_fit_layer_learns_a_low_rank_ranking():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3000, 32, generator=g)
    z = x @ torch.randn(32, 4, generator=g) @ torch.randn(4, 48, generator=g)  # a rank-4 log-importance
    target = normalized_target(torch.exp(z / z.std()), 1e-3)
    pred = FFNInputPredictor(32, 48, [5], rank=8)
    before = torch.nn.functional.mse_loss(pred.predict_layer(5, x[2500:]), target[2500:]).item()
    fit_layer(pred, 5, x[:2500].half(), target[:2500], VerifyConfig(rank=8, epochs=20, lr=1e-2, batch_size=128))
    after = torch.nn.functional.mse_loss(pred.predict_layer(5, x[2500:]), target[2500:]).item()
    assert after < 0.15 < before, (before, after)  # z-scored: the row mean scores 1.0


def test_pipeline_registers_verify_methods(tmp_path):
    from tests.test_pipeline import smoke
    from shadowsparse.pipeline import run
    run(smoke(tmp_path, "llm.name=random:llama", "stages.fit=false",
              "evaluate.methods=[predictor_verify,gate_verify,sketch_verify]",
              "++evaluate.verify={q: [0.75, 1.0], rank: 8, train_windows: 2, epochs: 1}"))
    rows = [json.loads(line) for line in (tmp_path / "run" / "results.jsonl").read_text().splitlines()]
    assert {r["method"] for r in rows} == {"predictor_verify", "gate_verify", "sketch_verify"}
    for r in rows:
        assert r["head_sparsity"] == 0 and r["realized_ffn_sparsity"] == pytest.approx(r["ffn_sparsity"], abs=0.02)
        assert r["realized_candidate_sparsity"] == pytest.approx(1 - r["verify_q"])  # round(0.75 * 96) = 72 proposed
        assert r["weight_bytes_skipped"] != 0
    # q = 1 proposes everything: both proposers reduce to the same top-|a| selection
    full = {(r["method"], r["ffn_sparsity"]): r["value"] for r in rows if r["verify_q"] == 1.0}
    for f in (0.3, 0.5, 0.7):
        assert full["predictor_verify", f] == pytest.approx(full["gate_verify", f], rel=1e-6)
        assert full["sketch_verify", f] == pytest.approx(full["gate_verify", f], rel=1e-6)
    assert (tmp_path / "run" / "verify_predictor.safetensors").exists()


def test_sketch_without_verify_is_a_top_k_of_the_estimate(ids):
    """method ``sketch`` (q = 0: the proposal is the keep set) equals an FFN that reads only the kept neurons' gate/up
    rows and down columns, chosen by the 3-bit estimate |silu(Q(W_g) x) * Q(W_u) x| alone (x rounded to int8 per
    group of 16: x_bits 8, the default)."""
    model = tiny_model("llama")
    view = ModelView(model)
    s, first = 0.5, 1
    sketch = VerifyConfig(bits=3, group=16, sketch="act")
    with attach_gating(model, VerifyScores(0.0, None, "sketch", sketch=sketch),
                       GatingConfig(ffn_sparsity=s, first_layer=first)):
        gated = model(input_ids=ids).logits

    def make_propose(l, mlp):
        qg, qu = quantize_rows(mlp.gate_proj.weight, 3, 16), quantize_rows(mlp.up_proj.weight, 3, 16)
        return lambda x: (mlp.act_fn(x8_grid(x, None, 16) @ qg.T) * (x8_grid(x, None, 16) @ qu.T)).abs()
    torch.testing.assert_close(gated, _sliced_logits(model, ids, first, make_propose, 1 - s, s), atol=2e-5, rtol=1e-4)


def test_default_run_evaluates_the_sketch_selectors():
    cfg = compose()  # what `make run` composes
    assert {"sketch", "sketch_threshold", "sketch_teal", "sketch_verify"} <= set(cfg.evaluate.methods)
    v = verify_config(cfg)
    assert (v.sketch, v.bits, v.group, v.quantizer, v.qs, v.calib_windows) == ("act", 3, 64, "gptq", [0.6], 32)


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_pipeline_sketch_rows_levels_and_bytes(tmp_path, family, caplog):
    from shadowsparse.pipeline import run
    from tests.test_pipeline import smoke
    caplog.set_level("INFO", logger="shadowsparse")
    run(smoke(tmp_path, f"llm.name=random:{family}", "stages.collect=false", "stages.fit=false",
              "evaluate.methods=[dense,sketch,sketch_verify]"))
    rows = [json.loads(line) for line in (tmp_path / "run" / "results.jsonl").read_text().splitlines()]
    if family == "opt":  # no gate to sketch: skipped, and the log says why
        assert [r["method"] for r in rows] == ["dense"]
        assert "sketch needs a gated FFN" in caplog.text and "sketch_verify needs a gated FFN" in caplog.text
        return
    levels = {m: [r["ffn_sparsity"] for r in rows if r["method"] == m] for m in ("sketch", "sketch_verify")}
    # default levels 0.3 / 0.5 / 0.7 / (0.5, heads 0.3): no head axis; q = 0.6 keeps 0.7 at 0.3 = the sketch row
    assert levels == {"sketch": [0.3, 0.5, 0.7], "sketch_verify": [0.5, 0.7]}
    assert "sketch selects FFN neurons only: level(s) ffn=0.50 heads=0.30 skipped" in caplog.text
    assert "sketch_verify q=0.60 proposes no more than it keeps at ffn=0.30" in caplog.text
    model = tiny_model("llama")
    view = ModelView(model)
    d, F, n = view.dims.hidden, view.dims.ffn, view.dims.n_layers - 1  # layer 0 feeds the (absent) predictor
    sketch = 2 * n * F * d * (3 + 16 / 64) / 16 * 4  # two 3-bit copies with a 16-bit scale per 64 inputs, fp32 units
    for r in rows[1:]:
        assert r["verify_bits"] == 3 and r["realized_ffn_sparsity"] == pytest.approx(r["ffn_sparsity"], abs=0.02)
        cand = r["realized_candidate_sparsity"]
        if r["method"] == "sketch":
            assert "verify_q" not in r and cand == r["realized_ffn_sparsity"]
        else:
            assert r["verify_q"] == 0.6 and cand == pytest.approx(1 - round(0.6 * F) / F)
        by_hand = n * F * d * 4 * (2 * cand + r["realized_ffn_sparsity"]) - int(sketch)
        assert r["weight_bytes_skipped"] == pytest.approx(by_hand / decoder_linear_bytes(view), rel=1e-6)



def test_pipeline_sketch_teal_rows_and_bytes(tmp_path):
    """sketch_teal's rows: FFN levels, teal at evaluate.teal.sketch_attn on the attention inputs (realized about
    that), the FFN half identical to sketch_threshold's masks, and the bytes the sum of the two decisions: the
    sketch's (its copy charged) plus the attention projections' skipped input columns."""
    from shadowsparse.pipeline import run
    from shadowsparse.report import method_label
    from tests.test_pipeline import smoke
    run(smoke(tmp_path, "llm.name=random:llama", "stages.collect=false", "stages.fit=false",
              "evaluate.methods=[dense,sketch_threshold,sketch_teal]", "evaluate.teal.sketch_attn=0.4"))
    rows = [json.loads(line) for line in (tmp_path / "run" / "results.jsonl").read_text().splitlines()]
    alone = {r["ffn_sparsity"]: r for r in rows if r["method"] == "sketch_threshold"}
    both = {r["ffn_sparsity"]: r for r in rows if r["method"] == "sketch_teal"}
    assert sorted(both) == sorted(alone) == [0.3, 0.5, 0.7]
    view = ModelView(tiny_model("llama"))
    d, n = view.dims, view.dims.n_layers - 1
    attn_cols = n * (d.hidden * (d.n_heads + 2 * d.n_kv_heads) * d.head_dim + d.hidden * d.n_heads * d.head_dim) * 4
    for s, r in both.items():
        assert r["attn_sparsity"] == 0.4 and method_label(r).endswith("attn=0.4")
        inputs = r["realized_input_sparsity"]
        assert inputs["realized_attn_in_sparsity"] == pytest.approx(0.4, abs=0.1)
        assert r["realized_candidate_sparsity"] == r["realized_ffn_sparsity"]
        sketch_part = weight_bytes_skipped(view, "verify", {**r, "gated_layers": n}, sketch_bytes(
            view, n, verify_config(smoke(tmp_path))))
        attn_part = (inputs["realized_attn_in_sparsity"] * (d.n_heads + 2 * d.n_kv_heads) / (2 * d.n_heads + 2 *
                     d.n_kv_heads) + inputs["realized_attn_out_sparsity"] * d.n_heads / (2 * d.n_heads + 2 *
                                                                                        d.n_kv_heads))
        by_hand = sketch_part + attn_part * attn_cols / decoder_linear_bytes(view)
        assert r["weight_bytes_skipped"] == pytest.approx(by_hand, rel=1e-6)
        assert r["weight_bytes_skipped"] > alone[s]["weight_bytes_skipped"]

def test_gptq_sketch_by_hand_and_on_correlated_inputs():
    from shadowsparse.quant import gptq_act_order, gptq_rows
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 64, generator=g)
    # a diagonal X^T X moves no error between channels: GPTQ is the plain per-group midrise copy, in any order
    for bits in (1, 2, 3):
        assert torch.equal(gptq_rows(w, 3 * torch.eye(64), bits, 16), quantize_rows(w, bits, 16))
        h = torch.diag(torch.rand(64, generator=g) + 0.5)
        ordered = gptq_act_order(w, h, bits, 16)  # groups formed in the order of diag(H): other groups, other steps
        assert len(ordered[0].unique()) > 1 and ordered.shape == w.shape
    # correlated inputs: the copy's outputs on them are closer than round-to-nearest's (what the sketch reads)
    x = torch.randn(2000, 64, generator=g) @ torch.randn(64, 64, generator=g)
    for bits in (2, 3):
        rtn = (x @ (quantize_rows(w, bits, 16) - w).T).norm()
        assert (x @ (gptq_rows(w, x.T @ x, bits, 16) - w).T).norm() < 0.85 * rtn
        assert (x @ (gptq_act_order(w, x.T @ x, bits, 16) - w).T).norm() < 0.85 * rtn


def test_pipeline_gptq_sketch_rows(tmp_path):
    from shadowsparse.pipeline import run
    from shadowsparse.report import method_label
    from tests.test_pipeline import smoke
    run(smoke(tmp_path, "llm.name=random:llama", "stages.collect=false", "stages.fit=false",
              "evaluate.methods=[sketch]", "evaluate.verify.quantizer=gptq", "++evaluate.verify.calib_windows=2",
              "gating.ffn_sparsity=0.5"))
    rows = [json.loads(line) for line in (tmp_path / "run" / "results.jsonl").read_text().splitlines()]
    assert [(r["method"], r["verify_quantizer"], method_label(r)) for r in rows] == [
        ("sketch", "gptq", "sketch 3-bit gptq x8")]
    with pytest.raises(ConfigError, match="calibration inputs"):
        VerifyScores(0.0, None, "sketch", sketch=VerifyConfig(quantizer="gptq"))


def test_depth_levels_keep_the_mean_grow_with_depth_and_clip():
    from shadowsparse.layer_levels import depth_levels
    layers = [1, 2, 3, 4, 5]
    assert depth_levels(0.5, layers, 0.0) == {layer: 0.5 for layer in layers}
    assert depth_levels(0.0, layers, 0.4) == {layer: 0.0 for layer in layers}  # a dense level stays dense
    up = depth_levels(0.5, layers, 0.4)
    assert [round(v, 6) for v in up.values()] == [0.3, 0.4, 0.5, 0.6, 0.7]
    assert sum(up.values()) / 5 == pytest.approx(0.5)
    down = depth_levels(0.5, layers, -0.4)
    assert [round(v, 6) for v in down.values()] == [0.7, 0.6, 0.5, 0.4, 0.3]
    steep = depth_levels(0.8, layers, 1.0)  # 0.3 .. 1.3, the top clipped at 0.95: a little less than asked
    assert max(steep.values()) == 0.95 and min(steep.values()) == pytest.approx(0.3)
    with pytest.raises(ConfigError, match="depth_slope"):
        VerifyConfig(depth_slope=1.5).validate()


def test_sketch_threshold_depth_slope_sets_each_layers_quantile(tmp_path):
    """The per-layer thresholds are the quantiles at depth_levels' sparsities (one array serves the hooks and the
    engine: selectors/verify.SketchThreshold.engine_parts), and a pipeline run realizes sparsity that grows with
    depth at the requested mean, labelled with its slope."""
    from shadowsparse.pipeline import run
    from shadowsparse.report import method_label
    from shadowsparse.verify import SketchThresholdScores
    from tests.test_pipeline import smoke
    g = torch.Generator().manual_seed(0)
    samples = {layer: torch.rand(4000, generator=g) for layer in (1, 2, 3)}
    src = SketchThresholdScores(samples, VerifyConfig(quantizer="midrise", depth_slope=0.4))
    thr = src.thresholds(0.5, 4)
    assert thr[0] == 0 and thr[1:].tolist() == pytest.approx([0.3, 0.5, 0.7], abs=0.03)
    run(smoke(tmp_path, "llm.name=random:llama", "stages.collect=false", "stages.fit=false",
              "evaluate.methods=[sketch_threshold]", "evaluate.verify.depth_slope=0.6", "gating.ffn_sparsity=0.5"))
    rows = [json.loads(line) for line in (tmp_path / "run" / "results.jsonl").read_text().splitlines()]
    assert [method_label(r) for r in rows] == ["sketch_threshold 3-bit gptq x8 slope=+0.6"]
    assert rows[0]["realized_ffn_sparsity"] == pytest.approx(0.5, abs=0.1)
    model = tiny_model("llama")  # the hooks on fresh text: each layer near its own level
    calib, text = (torch.randint(0, 100, (4, 32), generator=g) for _ in range(2))
    src = SketchThresholdScores.calibrate(model, calib, VerifyConfig(quantizer="midrise", depth_slope=0.6), 1)
    with attach_gating(model, src, GatingConfig(ffn_sparsity=0.5, first_layer=1)) as h, torch.no_grad():
        model(text)
        per_layer = h.stats()["realized_ffn_sparsity_per_layer"]  # gated layers 1, 2, 3
    assert per_layer == pytest.approx([0.2, 0.5, 0.8], abs=0.05)


def test_sensitivity_levels_keep_the_mean_and_spare_costly_layers():
    from shadowsparse.layer_levels import sensitivity_levels
    costs = {1: 0.04, 2: 0.01, 3: 0.0025, 4: -0.001}  # the last: noise below the floor, counted at the floor
    lv = sensitivity_levels(0.5, costs, 0.5)
    assert sum(lv.values()) / 4 == pytest.approx(0.5, abs=1e-9)
    assert lv[1] < lv[2] < lv[3] < lv[4] <= 0.95
    assert lv[1] / lv[2] == pytest.approx(0.5) and lv[2] / lv[3] == pytest.approx(0.5)  # (cost ratio 4) ** -0.5
    capped = sensitivity_levels(0.8, costs, 1.0)  # the cap binds: the others make up the mean
    assert max(capped.values()) == pytest.approx(0.95) and sum(capped.values()) / 4 == pytest.approx(0.8, abs=1e-9)
    assert sensitivity_levels(0.0, costs, 0.5) == {layer: 0.0 for layer in costs}
    with pytest.raises(ConfigError, match="allocation"):
        VerifyConfig(allocation="greedy").validate()


def test_ffn_sensitivity_probe_and_allocation_in_the_hooks():
    """The probe measures one cost per gated layer on the calibration windows and restores the model; a
    sketch_threshold source with allocation=sensitivity realizes levels in inverse order of its layers' costs."""
    from shadowsparse.layer_levels import ffn_sensitivity
    from shadowsparse.verify import SketchThresholdScores
    model = tiny_model("llama")
    g = torch.Generator().manual_seed(0)
    calib, text = (torch.randint(0, 100, (4, 32), generator=g) for _ in range(2))
    with torch.no_grad():
        before = model(text).logits
    costs = ffn_sensitivity(model, calib, [1, 2, 3])
    assert sorted(costs) == [1, 2, 3] and all(v != 0 and math.isfinite(v) for v in costs.values())
    with torch.no_grad():
        assert torch.equal(model(text).logits, before)  # every probe hook removed
    cfg = VerifyConfig(quantizer="midrise", allocation="sensitivity", allocation_power=1.0)
    src = SketchThresholdScores.calibrate(model, calib, cfg, 1)
    assert src.sensitivity == pytest.approx(costs)
    src.sensitivity = {1: 0.0025, 2: 0.04, 3: 0.01}  # a random model's costs are noise: set clear ones
    with attach_gating(model, src, GatingConfig(ffn_sparsity=0.5, first_layer=1)) as h, torch.no_grad():
        model(text)
        realized = dict(zip([1, 2, 3], h.stats()["realized_ffn_sparsity_per_layer"]))
    assert realized[1] > realized[3] > realized[2]  # the cheapest layer skips the most
    # levels ∝ 1/cost (400 : 25 : 100), mean 0.5: layer 1 capped at 0.95, then 0.11 and 0.44
    assert [realized[k] for k in (1, 2, 3)] == pytest.approx([0.95, 0.11, 0.44], abs=0.06)
    with pytest.raises(ConfigError, match="calibrate"):
        SketchThresholdScores({1: torch.rand(10)}, cfg).thresholds(0.5, 2)
