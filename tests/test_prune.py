"""Static masks: patterns, metrics, SparseGPT, E-Sparse shuffles, allocation, squash/export, the pipeline stage."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from shadowsparse.arch import ModelView
from shadowsparse.errors import ConfigError
from shadowsparse.prune import Pattern, SparsityConfig, sparsify_, squash_
from shadowsparse.prune import esparse
from shadowsparse.prune.allocation import hutchinson_traces, spread
from shadowsparse.prune.metrics import get_metric
from shadowsparse.prune.patterns import keep_mask, nm_counts, nm_keep, row_keep
from shadowsparse.prune.sparsegpt import sparsegpt_prune
from shadowsparse.prune.sparsify import fold_neuron_perm_, permute_input_, target_linears
from shadowsparse.prune.stats import InputStats
from tests.conftest import tiny_model


def calib(n=4, t=32, seed=1):
    return torch.randint(0, 256, (n, t), generator=torch.Generator().manual_seed(seed))


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("text,label,ratio", [("2:4", "2:4", 0.5), ("4:8", "4:8", 0.5), ("1:4", "1:4", 0.75),
                                              ("unstructured:0.5", "unstructured:0.5", 0.5)])
def test_pattern_parse(text, label, ratio):
    p = Pattern.parse(text)
    assert p.label == label and p.ratio == pytest.approx(ratio)


@pytest.mark.parametrize("bad", ["4:2", "2:2", "0:4", "two:four", "unstructured:1.0", "unstructured:-0.1"])
def test_pattern_bad_input(bad):
    with pytest.raises(ConfigError):
        Pattern.parse(bad)


def test_nm_and_row_masks_exact():
    s = torch.randn(6, 16)
    keep = nm_keep(s, 2, 4)
    assert (keep.reshape(6, 4, 4).sum(-1) == 2).all()
    # the kept ones are the group's two largest
    g = s.reshape(6, 4, 4)
    assert torch.equal(keep.reshape(6, 4, 4), g >= g.topk(2, -1).values[..., -1:])
    r = row_keep(s, 0.25)
    assert (r.sum(1) == 12).all()


def nm_ok(model, n, m, modules="all"):
    view = ModelView(model)
    for i in range(view.dims.n_layers):
        for path, lin in target_linears(view, i, modules).items():
            counts = nm_counts(lin.weight, m)
            assert (counts == n).all(), (i, path, counts.unique())


@pytest.mark.parametrize("family", ["llama", "opt"])
@pytest.mark.parametrize("metric", ["magnitude", "wanda", "sparsegpt", "esparse"])
@pytest.mark.parametrize("pattern", ["2:4", "4:8", "unstructured:0.5"])
def test_every_metric_realizes_its_pattern(family, metric, pattern):
    model = tiny_model(family)
    rep = sparsify_(model, SparsityConfig(metric=metric, pattern=pattern, batch_size=2), calib())
    assert rep["realized_weight_sparsity"] == pytest.approx(0.5, abs=1e-3)
    p = Pattern.parse(pattern)
    if p.is_nm:  # exactly N non-zeros in every group of M (random weights have no zeros of their own)
        nm_ok(model, p.n, p.m)
    out = logits(model, calib(1, 16, seed=5))
    assert torch.isfinite(out).all()


def test_esparse_shuffles_preserve_function():
    """Folding a neuron permutation into gate/up/down and gathering permuted inputs leave the logits unchanged."""
    for family in ("llama", "opt"):
        model = tiny_model(family)
        ids = calib(2, 16, seed=3)
        ref = logits(model, ids)
        view = ModelView(model)
        g = torch.Generator().manual_seed(0)
        for i in range(view.dims.n_layers):
            fold_neuron_perm_(view, i, torch.randperm(view.dims.ffn, generator=g))
            for path in view.spec.attn_in + view.spec.ffn_in:
                lin = view.module(i, path)
                permute_input_(lin, torch.randperm(lin.in_features, generator=g))
        torch.testing.assert_close(logits(model, ids), ref, rtol=1e-5, atol=1e-5)
        assert squash_(model) == view.dims.n_layers * (len(view.spec.attn_in) + len(view.spec.ffn_in))
        torch.testing.assert_close(logits(model, ids), ref, rtol=1e-5, atol=1e-5)
        assert not any(m._forward_pre_hooks for m in model.modules())


def test_esparse_shuffle_keeps_more_mass():
    """Channels with clustered importance: the shuffles raise the metric mass N:M keeps, never lower it."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 64, generator=g)
    importance = torch.ones(64)
    importance[:16] = 10.0  # important channels side by side: plain 2:4 must drop half of them
    scores = w.abs() * importance
    perm = esparse.shuffle_for(scores, importance, 2, 4, {"block": 16, "trials": 8}, g)
    assert sorted(perm.tolist()) == list(range(64))
    plain = esparse.kept_mass(scores, 2, 4)
    shuffled = esparse.kept_mass(scores[:, perm], 2, 4)
    assert shuffled > plain * 1.1
    local = esparse.local_block_shuffle(scores, 2, 4, 16, 8, g)
    assert esparse.kept_mass(scores[:, local], 2, 4) >= plain


def test_channel_entropy_against_hand_count():
    x = torch.tensor([[0.0, 1.0], [1.0, 1.0], [2.0, 1.0], [3.0, 1.0]])
    h = esparse.channel_entropy(x, bins=4)
    assert h[0].item() == pytest.approx(torch.log(torch.tensor(4.0)).item(), rel=1e-6)  # uniform over 4 bins
    assert h[1].item() == 0.0  # a constant channel carries no information


def layer0_inputs(family="llama"):
    """Inputs of layer 0's q_proj and down_proj on calibration text, and the linears."""
    model = tiny_model(family)
    view = ModelView(model)
    mods = {"q": view.module(0, view.spec.attn_in[0]), "down": view.ffn_down(0)}
    xs = {k: [] for k in mods}
    hs = [m.register_forward_pre_hook(lambda mod, a, k=k: xs[k].append(a[0].reshape(-1, a[0].shape[-1])))
          for k, m in mods.items()]
    logits(model, calib(8, 32))
    for h in hs:
        h.remove()
    return {k: (mods[k].weight.detach().clone(), torch.cat(xs[k]).double()) for k in mods}


@pytest.mark.parametrize("pattern", ["unstructured:0.5", "2:4"])
def test_sparsegpt_reconstructs_better_than_magnitude_and_wanda(pattern):
    p = Pattern.parse(pattern)
    for w, x in layer0_inputs().values():
        st = InputStats(w.shape[1], gram=True)
        st.add(x)
        errs = {}
        for name in ("magnitude", "wanda"):
            metric = get_metric(name)
            keep = keep_mask(metric.score(w, st, {}), p, p.ratio, metric.group)
            errs[name] = ((w.double() * keep - w.double()) @ x.T).pow(2).sum().item()
        pruned = sparsegpt_prune(w, st.hessian(), p, p.ratio, blocksize=32)
        assert (pruned == 0).double().mean().item() == pytest.approx(0.5, abs=1e-3)
        errs["sparsegpt"] = ((pruned.double() - w.double()) @ x.T).pow(2).sum().item()
        assert errs["sparsegpt"] < errs["wanda"] and errs["sparsegpt"] < errs["magnitude"], errs


def test_spread_hits_the_mean_exactly():
    scores = {f"m{i}": float(s) for i, s in enumerate([3.0, 1.0, 0.5, 7.0, 2.0, 2.0])}
    sizes = {f"m{i}": n for i, n in enumerate([100, 300, 50, 200, 1000, 10])}
    out = spread(scores, sizes, p=0.5, alpha=0.1)
    mean = sum(out[k] * sizes[k] for k in out) / sum(sizes.values())
    assert mean == pytest.approx(0.5, abs=1e-9)
    assert all(0.4 - 1e-9 <= v <= 0.6 + 1e-9 for v in out.values())
    assert out["m3"] < out["m2"]  # the most important keeps the most
    with pytest.raises(ConfigError):
        spread(scores, sizes, p=0.95, alpha=0.1)


def test_hutchinson_matches_exact_trace():
    """Many probes on a small matrix approach the exact trace of its Hessian block (computed column by column)."""
    model = tiny_model("llama")
    ids = calib(1, 12, seed=7)
    k = ModelView(model).module(0, "self_attn.k_proj").weight  # (32, 64): 2048 parameters
    est = hutchinson_traces(model, {"k": k}, ids, samples=300, seed=0)["k"]
    k.requires_grad_(True)
    from shadowsparse.llm import eager_attention
    with eager_attention(model, True):
        g = torch.autograd.grad(model(input_ids=ids, labels=ids).loss, k, create_graph=True)[0].flatten()
        eye = torch.eye(g.numel())
        rows = torch.autograd.grad(g, k, eye, is_grads_batched=True)[0].reshape(g.numel(), -1)
    k.requires_grad_(False)
    exact = rows.diagonal().sum().item()
    # Rademacher probes: Var[vᵀHv] = 2 Σ_{i≠j} H_ij², so the mean of 300 lies within 4 standard errors
    var = 2 * (rows.pow(2).sum() - rows.diagonal().pow(2).sum()).item()
    assert abs(est - exact) < 4 * (var / 300) ** 0.5, (est, exact, var)
    assert abs(est - exact) < 0.5 * abs(exact)


@pytest.mark.parametrize("allocation", ["sensitivity", "owl"])
def test_nonuniform_allocation_keeps_the_mean(allocation):
    model = tiny_model("llama")
    rep = sparsify_(model, SparsityConfig(metric="wanda", pattern="unstructured", ratio=0.5, allocation=allocation,
                                          alpha=0.1, hutchinson_samples=2, hutchinson_windows=1), calib())
    assert rep["allocated_mean"] == pytest.approx(0.5, abs=1e-9)
    assert rep["realized_weight_sparsity"] == pytest.approx(0.5, abs=0.01)  # per-row rounding only
    per_matrix = []
    view = ModelView(model)
    for i in range(view.dims.n_layers):
        for lin in target_linears(view, i).values():
            per_matrix.append((lin.weight == 0).double().mean().item())
    assert max(per_matrix) - min(per_matrix) > 0.05  # it really allocates
    assert all(0.4 - 0.02 <= s <= 0.6 + 0.02 for s in per_matrix)


def test_config_errors():
    with pytest.raises(ConfigError, match="unknown pruning metric"):
        SparsityConfig(metric="random").validate()
    with pytest.raises(ConfigError, match="allocation=uniform"):
        SparsityConfig(metric="wanda", pattern="2:4", allocation="owl").validate()
    model = tiny_model("llama")  # hidden 64, ffn 96: 3:5 cannot tile them
    with pytest.raises(ConfigError, match="multiple of M"):
        sparsify_(model, SparsityConfig(metric="magnitude", pattern="3:7"), calib())


@pytest.mark.parametrize("family,metric", [("llama", "esparse"), ("opt", "sparsegpt")])
def test_squashed_model_reloads_with_plain_transformers(tmp_path, family, metric):
    from transformers import AutoModelForCausalLM
    model = tiny_model(family)
    sparsify_(model, SparsityConfig(metric=metric, pattern="2:4", batch_size=2), calib())
    ids = calib(2, 16, seed=9)
    ref = logits(model, ids)
    squash_(model)
    model.save_pretrained(tmp_path / "m")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    torch.testing.assert_close(logits(plain, ids), ref, rtol=1e-5, atol=1e-5)


def test_pipeline_static_mask_then_gating(tmp_path):
    """sparsity=... masks before collect: targets, predictor and every row belong to the masked model."""
    from shadowsparse.pipeline import run
    from tests.test_pipeline import smoke
    cfg = smoke(tmp_path, "sparsity=esparse", "sparsity.pattern=2:4", "sparsity.export=true",
                "evaluate.methods=[dense,predictor,threshold]", "gating.ffn_sparsity=0.5")
    run(cfg)
    rows = [json.loads(x) for x in (tmp_path / "run" / "results.jsonl").read_text().splitlines()]
    assert {r["method"] for r in rows} == {"dense", "predictor", "threshold"}
    for r in rows:
        assert r["nm"] == "2:4" and r["sparsity_metric"] == "esparse"
        assert r["realized_weight_sparsity"] == pytest.approx(0.5, abs=1e-3)
    gated = [r for r in rows if r["method"] != "dense"]
    assert all(r["realized_ffn_sparsity"] == pytest.approx(0.5, abs=0.02) for r in gated)
    report = json.loads((tmp_path / "run" / "sparsity.json").read_text())
    assert report["per_kind"]["down_proj"] == pytest.approx(0.5)
    from transformers import AutoModelForCausalLM
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "pruned_model")
    assert (plain.model.layers[0].mlp.up_proj.weight == 0).double().mean().item() == pytest.approx(0.5)
    # the targets of the masked model are cached apart from the dense model's
    run(smoke(tmp_path, "evaluate.methods=[dense]", "stages.fit=false"))
    assert len(list((tmp_path / "cache" / "targets").iterdir())) == 2


@pytest.mark.parametrize("override,message", [
    ("sparsity=wanda sparsity.allocation=owl sparsity.pattern=2:4", "allocation=uniform"),
    ("sparsity=wanda sparsity.ratio=1.2", r"\[0, 1\)"),
    ("sparsity.metric=obs", "unknown pruning metric"),
])
def test_bad_sparsity_config_is_refused_before_any_artifact(tmp_path, override, message):
    from shadowsparse.pipeline import run
    from tests.test_pipeline import smoke
    with pytest.raises(ConfigError, match=message):
        run(smoke(tmp_path, *override.split()))
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run" / "results.jsonl").exists()


def test_pipeline_static_mask_on_a_mixture_of_experts_model(tmp_path):
    """An MoE model through the pipeline: each expert's matrices pruned 2:4 (Wanda on its routed tokens), the masked
    experts exported as plain transformers weights, and the rows' realized FFN sparsity counted against the routed
    neurons a token computes (k*F), not all E*F."""
    from transformers import AutoModelForCausalLM
    from shadowsparse.pipeline import run
    from tests.test_pipeline import smoke
    run(smoke(tmp_path, "llm.name=random:mixtral", "sparsity=wanda", "sparsity.pattern=2:4", "sparsity.export=true",
              "evaluate.methods=[dense,predictor,threshold]", "gating.ffn_sparsity=0.5"))
    rows = [json.loads(x) for x in (tmp_path / "run" / "results.jsonl").read_text().splitlines()]
    assert {r["method"] for r in rows} == {"dense", "predictor", "threshold"}
    assert all(r["nm"] == "2:4" and r["realized_weight_sparsity"] == pytest.approx(0.5, abs=1e-6) for r in rows)
    assert [r["realized_ffn_sparsity"] for r in rows if r["method"] == "predictor"] == [pytest.approx(0.5, abs=1e-9)]
    assert [r["realized_ffn_sparsity"] for r in rows if r["method"] == "threshold"] == [pytest.approx(0.5, abs=0.05)]
    report = json.loads((tmp_path / "run" / "sparsity.json").read_text())
    assert report["per_kind"]["expert_gate_up"] == report["per_kind"]["expert_down"] == pytest.approx(0.5)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "pruned_model")
    experts = plain.model.layers[0].mlp.experts  # transformers' own fused module again, the zeros kept
    assert (experts.gate_up_proj == 0).double().mean().item() == pytest.approx(0.5)
    assert (experts.down_proj == 0).double().mean().item() == pytest.approx(0.5)
    # load_gated serves the run's masked model (its mask recomputed), not the dense one: the rows' perplexities
    import shadowsparse as ss
    from shadowsparse.config import window_spec
    from shadowsparse.data import token_windows
    from omegaconf import OmegaConf
    cfg = smoke(tmp_path, "llm.name=random:mixtral", "sparsity=wanda", "sparsity.pattern=2:4")
    (tmp_path / "run" / ".hydra").mkdir()
    OmegaConf.save(cfg, tmp_path / "run" / ".hydra" / "config.yaml")  # as train.py's Hydra run directory holds
    for method in ("dense", "predictor"):
        g = ss.load_gated(tmp_path / "run", method=method, ffn_sparsity=0.5, engine="hooks")
        windows = token_windows(g.tok, window_spec(cfg.data.eval), "data.eval")
        assert g.perplexity(windows) == pytest.approx(next(r["value"] for r in rows if r["method"] == method),
                                                      rel=1e-6), method
