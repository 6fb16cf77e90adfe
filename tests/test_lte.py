"""LTE on tiny random models: losses move the right way, hard routing realizes the requested sparsity in whole
experts, LoRA touches only adapters and routers, checkpoints round-trip, and the pipeline evaluates it."""
import json

import pytest
import torch

from shadowsparse.arch import ModelView
from shadowsparse.errors import ConfigError
from shadowsparse.gating import GatingConfig, attach_gating
from shadowsparse.lte import (LTEConfig, LTEScores, Routers, efficiency_loss, group_neurons, load_lte,
                              separability_loss)
from shadowsparse.lte.routers import balanced_kmeans
from shadowsparse.lte.train import make_trainable, train_lte
from shadowsparse.pipeline import run
from tests.conftest import compose, tiny_model

TINY = dict(expert_size=8, stage1_steps=3, stage2_steps=3, batch_size=2, seq_len=24, val_windows=2, val_every=3,
            warmup_steps=1)


def windows(n=16, t=24, seed=0):
    return torch.randint(0, 256, (n, t), generator=torch.Generator().manual_seed(seed))


def routers_for(model, expert_size=8, first_layer=1, init_score=0.9, grouping="cluster"):
    view = ModelView(model)
    layers = list(range(first_layer, view.dims.n_layers))
    groups = group_neurons(view, layers, expert_size, grouping)
    torch.manual_seed(0)
    return Routers(view.dims.hidden, view.dims.ffn, layers, groups, init_score)


def test_balanced_clusters_are_a_partition_into_equal_experts():
    model = tiny_model("llama")
    view = ModelView(model)
    groups = group_neurons(view, [0, 1], 8, "cluster")  # (2, F)
    assert groups.shape == (2, view.dims.ffn)
    for row in groups:
        assert torch.bincount(row).tolist() == [8] * (view.dims.ffn // 8)
    assert torch.equal(groups, group_neurons(view, [0, 1], 8, "cluster"))  # deterministic
    # clustering finds planted structure: rows drawn around 4 directions come back as 4 pure groups
    g = torch.Generator().manual_seed(1)
    centers = torch.randn(4, 16, generator=g)
    rows = centers.repeat_interleave(6, 0) + 0.05 * torch.randn(24, 16, generator=g)
    assign = balanced_kmeans(rows, 4)
    assert all(len(set(assign[i * 6:(i + 1) * 6].tolist())) == 1 for i in range(4))
    assert torch.equal(group_neurons(view, [0], 8, "contiguous")[0], torch.arange(view.dims.ffn) // 8)


def soft_forward(model, routers, ids):
    source = LTEScores(routers, soft=True)
    with attach_gating(model, source, GatingConfig(ffn_sparsity=0.5, first_layer=routers.first_layer, count=False)):
        logits = model(input_ids=ids).logits
    return logits, [source.scores[i] for i in routers.layers]


def test_efficiency_loss_lowers_the_mean_router_score(ids):
    model = tiny_model("llama")
    routers = routers_for(model)
    opt = torch.optim.Adam(routers.parameters(), lr=0.05)
    means = []
    for _ in range(5):
        logits, scores = soft_forward(model, routers, ids)
        lm = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        loss = lm + 1.0 * efficiency_loss(scores)
        means.append(float(efficiency_loss(scores).detach()))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert means[-1] < means[0] - 0.05, means


def test_separability_pushes_scores_away_from_the_threshold(ids):
    model = tiny_model("opt")
    routers = routers_for(model, init_score=0.52)  # everything starts just above tau = 0.5
    opt = torch.optim.Adam(routers.parameters(), lr=0.05)
    dist = []
    for _ in range(5):
        _, scores = soft_forward(model, routers, ids)
        dist.append(float(torch.cat([(s.detach() - 0.5).abs().flatten() for s in scores]).mean()))
        opt.zero_grad()
        separability_loss(scores, 0.5, 0.01).backward()
        opt.step()
    assert dist[-1] > dist[0] + 0.05, dist


def test_soft_routing_scales_each_expert_by_its_score(ids):
    """Stage 1's FFN is sum_i s_i E_i(x): with every score at 1 (huge bias) it is the dense model."""
    model = tiny_model("llama")
    routers = routers_for(model)
    for lin in routers.linears.values():
        torch.nn.init.zeros_(lin.weight)
        torch.nn.init.constant_(lin.bias, 50.0)
    dense = model(input_ids=ids).logits
    torch.testing.assert_close(soft_forward(model, routers, ids)[0], dense)


@pytest.mark.parametrize("family", ["llama", "opt"])
@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.75])
def test_hard_routing_realizes_the_requested_sparsity_in_whole_experts(family, sparsity, ids):
    model = tiny_model(family)
    routers = routers_for(model)
    view = ModelView(model)
    raw, gated = {}, {}
    record = lambda store, i: (lambda m, a: store.__setitem__(i, a[0].detach()))  # noqa: E731
    probes = [view.ffn_down(i).register_forward_pre_hook(record(raw, i)) for i in routers.layers]  # before gating
    source = LTEScores(routers)
    with attach_gating(model, source, GatingConfig(ffn_sparsity=sparsity)) as handle:
        probes += [view.ffn_down(i).register_forward_pre_hook(record(gated, i)) for i in routers.layers]  # after
        model(input_ids=ids)
        assert handle.stats()["realized_ffn_sparsity"] == pytest.approx(sparsity, abs=1e-6)
        assert handle.gated_layers == routers.layers
    for p in probes:
        p.remove()
    for i in routers.layers:
        experts = source.expert_mask(i)  # (..., E) 0/1
        assert experts.sum(-1).eq(routers.n_experts - round(sparsity * routers.n_experts)).all()
        # the down projection saw exactly the kept experts' neurons: whole groups of 8 on or off
        torch.testing.assert_close(gated[i], raw[i] * routers.to_neurons(i, experts), rtol=0, atol=0)


def test_threshold_route_keeps_experts_above_tau_and_counts_them(ids):
    model = tiny_model("llama")
    routers = routers_for(model, init_score=0.5)  # scores straddle tau: some experts on, some off
    source = LTEScores(routers, route="threshold", tau=0.5)
    with attach_gating(model, source, GatingConfig(ffn_sparsity=0.5)) as handle:
        model(input_ids=ids)
        realized = handle.stats()["realized_ffn_sparsity"]
    expected = torch.stack([(source.scores[i] <= 0.5).float().mean() for i in routers.layers]).mean()
    assert 0.0 < realized < 1.0 and realized == pytest.approx(float(expected), abs=1e-6)


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_lora_trains_only_adapters_and_routers_and_leaves_base_weights_bit_equal(family):
    base = tiny_model(family)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    cfg = LTEConfig(**TINY, finetune="lora").validate()
    model = tiny_model(family)
    make_trainable(model, cfg)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    routers = routers_for(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad] + list(routers.parameters()), lr=1e-2)
    ids = windows(2)
    for _ in range(2):
        logits, scores = soft_forward(model, routers, ids)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()) \
            + efficiency_loss(scores)
        opt.zero_grad()
        loss.backward()
        with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
        assert with_grad == trainable  # every adapter, and nothing else of the model
        assert all(p.grad is not None for p in routers.parameters())
        opt.step()
    for name, p in model.named_parameters():
        if "lora_" not in name:
            key = name.replace(".base_layer", "")
            assert torch.equal(p, before[key]), name  # bit-equal
    assert any(not torch.equal(p, torch.zeros_like(p)) for n, p in model.named_parameters() if "lora_B" in n)


@pytest.mark.parametrize("finetune", ["full", "lora"])
def test_moe_finetuning_leaves_the_models_routers_alone(finetune):
    """Mixtral: full fine-tuning trains attention and the experts' 3-D weights but not the model's routers (which
    experts a token computes stays the base model's choice); LoRA adapts the attention linears only (the experts
    are not linears peft wraps)."""
    model = tiny_model("mixtral")
    make_trainable(model, LTEConfig(**TINY, finetune=finetune).validate())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(n.endswith("mlp.gate.weight") for n in trainable)
    if finetune == "full":
        assert {"model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.self_attn.q_proj.weight"} <= trainable
    else:
        assert trainable and all("lora_" in n and ".self_attn." in n for n in trainable)


@pytest.mark.parametrize("family,finetune", [("llama", "full"), ("opt", "lora"), ("gpt2", "lora")])
def test_checkpoint_round_trip_gives_the_same_logits(tmp_path, family, finetune):
    """gpt2: LoRA on Conv1D weights stored (in, out); the adapters (out, in) are merged transposed."""
    base = tiny_model(family)
    cfg = LTEConfig(**TINY, finetune=finetune).validate()
    artifact, trained = train_lte(base, windows(), cfg, first_layer=1)
    assert artifact.summary["steps"] == 6 and artifact.summary["val_realized_sparsity"] == pytest.approx(0.5)
    ids = windows(2, seed=3)
    gcfg = GatingConfig(ffn_sparsity=0.5, first_layer=1)
    with attach_gating(trained, artifact.source(), gcfg):
        expected = trained(input_ids=ids).logits
    pristine = {k: v.clone() for k, v in base.state_dict().items()}
    assert all(torch.equal(v, pristine[k]) for k, v in tiny_model(family).state_dict().items())  # base untouched
    artifact.save(tmp_path / "lte")
    fresh = tiny_model(family)
    loaded = load_lte(tmp_path / "lte", fresh)
    with loaded.applied(fresh) as source, attach_gating(fresh, source, gcfg) as handle:
        got = fresh(input_ids=ids).logits
        assert handle.stats()["realized_ffn_sparsity"] == pytest.approx(0.5)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, base(input_ids=ids).logits, atol=1e-3)  # it did change the model
    assert all(torch.equal(v, pristine[k]) for k, v in fresh.state_dict().items())  # restored bit for bit
    with pytest.raises(ConfigError, match="another model"):
        load_lte(tmp_path / "lte", tiny_model(family, seed=5))


def smoke(tmp_path, *overrides):
    return compose("experiment=smoke", f"paths.output_dir={tmp_path}/run", f"paths.cache_dir={tmp_path}/cache",
                   "lte.expert_size=8", "lte.stage1_steps=2", "lte.stage2_steps=2", "lte.seq_len=32",
                   "lte.val_windows=2", "lte.val_every=2", "lte.warmup_steps=1", *overrides)


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_lte_method_end_to_end_through_the_pipeline(tmp_path, family):
    run(smoke(tmp_path, f"llm.name=random:{family}", "evaluate.methods=[dense,lte]"))
    rows = [json.loads(line) for line in (tmp_path / "run" / "results.jsonl").read_text().splitlines()]
    lte = [r for r in rows if r["method"] == "lte"]
    assert [r["ffn_sparsity"] for r in lte] == [0.3, 0.5, 0.7]  # the FFN-only levels of gating/default
    for r in lte:
        assert r["realized_ffn_sparsity"] == pytest.approx(r["ffn_sparsity"], abs=0.07)  # whole experts of 8
        assert r["weight_bytes_skipped"] > 0 and r["router_params"] > 0 and r["lte_trained_sparsity"] == 0.5
        assert r["realized_head_sparsity"] == 0 and r["first_gated_layer"] == 1
    assert (tmp_path / "run" / "lte" / "routers.safetensors").exists()
    assert (tmp_path / "run" / "lte" / "model.safetensors").exists()
    # evaluate alone reuses the saved LTE: the same numbers
    (tmp_path / "run" / "results.jsonl").unlink()
    run(smoke(tmp_path, f"llm.name=random:{family}", "evaluate.methods=[lte]", "stages.fit=false",
              "stages.collect=false"))
    again = [json.loads(line) for line in (tmp_path / "run" / "results.jsonl").read_text().splitlines()]
    assert [r["value"] for r in again] == [r["value"] for r in lte]
    # load_gated serves the run's LTE: the fine-tuned weights swapped in, the routers in the decode engine equal
    # the hooks (runtime/ffn_select.LTEFFNSelector)
    import shadowsparse as ss
    from omegaconf import OmegaConf
    (tmp_path / "run" / ".hydra").mkdir()  # what train.py's Hydra run leaves: the run's config
    OmegaConf.save(smoke(tmp_path, f"llm.name=random:{family}"), tmp_path / "run" / ".hydra" / "config.yaml")
    fast = ss.load_gated(tmp_path / "run", method="lte", ffn_sparsity=0.5, engine="kernels")
    ref = ss.load_gated(tmp_path / "run", method="lte", ffn_sparsity=0.5, engine="hooks")
    windows = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(2))
    assert fast.perplexity(windows) == pytest.approx(ref.perplexity(windows), rel=1e-5)
    # the fine-tuned model, not the base one: the run's own row on its evaluation windows
    from shadowsparse.config import window_spec
    from shadowsparse.data import token_windows
    evaluation = token_windows(ref.tok, window_spec(smoke(tmp_path).data.eval), "data.eval")
    row = next(r["value"] for r in lte if r["ffn_sparsity"] == 0.5)
    assert ref.perplexity(evaluation) == pytest.approx(row, rel=1e-5)
    assert fast.perplexity(windows, token_by_token=True) == pytest.approx(ref.perplexity(windows), rel=1e-5)
    assert fast.stats()["realized_ffn_sparsity"] == pytest.approx(0.5, abs=1e-6)


def test_lte_on_a_mixture_of_experts_model_through_the_pipeline(tmp_path):
    """Mixtral: LTE's groups inside the model's experts, routers warm-started on each token's routed groups, full
    fine-tuning of attention and experts with the model's own routers frozen; rows count the routed neurons;
    load_gated reproduces the row on the hooks and in the decode engine (the MoE FFN ranks the routed neurons by
    their group's router score: the best routed groups, whole)."""
    import shadowsparse as ss
    from omegaconf import OmegaConf
    from safetensors.torch import load_file
    from shadowsparse.config import window_spec
    from shadowsparse.data import token_windows
    cfg = smoke(tmp_path, "llm.name=random:mixtral", "evaluate.methods=[dense,lte]", "gating.ffn_sparsity=0.5")
    run(cfg)
    rows = [json.loads(line) for line in (tmp_path / "run" / "results.jsonl").read_text().splitlines()]
    (lte,) = [r for r in rows if r["method"] == "lte"]
    assert lte["realized_ffn_sparsity"] == pytest.approx(0.5, abs=1e-9) and lte["weight_bytes_skipped"] > 0
    saved = load_file(tmp_path / "run" / "lte" / "model.safetensors")
    assert any(k.endswith("experts.gate_up_proj") for k in saved)  # the experts were fine-tuned
    assert not any(k.endswith("mlp.gate.weight") for k in saved)  # the model's routers were not
    (tmp_path / "run" / ".hydra").mkdir()
    OmegaConf.save(cfg, tmp_path / "run" / ".hydra" / "config.yaml")
    ref = ss.load_gated(tmp_path / "run", method="lte", ffn_sparsity=0.5, engine="hooks")
    windows = token_windows(ref.tok, window_spec(cfg.data.eval), "data.eval")
    assert ref.perplexity(windows) == pytest.approx(lte["value"], rel=1e-6)
    fast = ss.load_gated(tmp_path / "run", method="lte", ffn_sparsity=0.5, engine="auto")
    assert fast.engine == "kernels"
    assert fast.perplexity(windows) == pytest.approx(lte["value"], rel=1e-5)
    assert fast.perplexity(windows[:1, :24], token_by_token=True) == pytest.approx(
        ref.perplexity(windows[:1, :24]), rel=1e-5)
    assert fast.stats()["realized_ffn_sparsity"] == pytest.approx(0.5, abs=1e-6)


def test_lte_bytes_skipped_charges_the_routers_and_lora_runs_through_the_pipeline(tmp_path):
    run(smoke(tmp_path, "evaluate.methods=[lte]", "gating.ffn_sparsity=0.5", "lte.grouping=contiguous",
              "lte.finetune=lora", "lte.lora.r=4"))
    assert (tmp_path / "run" / "lte" / "adapters.safetensors").exists()
    assert not (tmp_path / "run" / "lte" / "model.safetensors").exists()
    (row,) = [json.loads(line) for line in (tmp_path / "run" / "results.jsonl").read_text().splitlines()]
    assert row["lte_finetune"] == "lora"
    model = tiny_model("llama")
    view = ModelView(model)
    from shadowsparse.accounting import decoder_linear_bytes, weight_bytes_skipped
    from shadowsparse.selectors import SELECTORS
    stats = {"realized_ffn_sparsity": row["realized_ffn_sparsity"], "realized_head_sparsity": 0.0,
             "gated_layers": view.dims.n_layers - 1}
    # an early decision: gate, up and down of each neuron
    free = weight_bytes_skipped(view, SELECTORS["predictor"].decision, stats)
    assert row["weight_bytes_skipped"] == pytest.approx(free - row["router_params"] * 4 / decoder_linear_bytes(view))


@pytest.mark.parametrize("override,message", [
    ("lte.ffn_sparsity=1.0", "lte.ffn_sparsity must be in"),
    ("lte.ffn_sparsity=-0.1", "lte.ffn_sparsity must be in"),
    ("lte.route=sometimes", "lte.route must be one of"),
    ("lte.finetune=half", "lte.finetune must be one of"),
    ("lte.grouping=random", "lte.grouping must be one of"),
    ("+lte.nonsense=1", "unknown lte option"),
])
def test_bad_lte_config_is_refused_before_any_artifact(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        run(smoke(tmp_path, "evaluate.methods=[dense,lte]", override))
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run" / "results.jsonl").exists()


def test_expert_size_must_divide_the_ffn_and_unknown_families_are_refused():
    model = tiny_model("llama")  # F = 96
    with pytest.raises(ConfigError, match="does not divide the FFN width 96"):
        train_lte(model, windows(), LTEConfig(**{**TINY, "expert_size": 7}), first_layer=1)
    from transformers import PhiConfig, PhiForCausalLM  # Phi-2: a family with no ArchSpec registered
    phi = PhiForCausalLM(PhiConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, vocab_size=260,
                                   bos_token_id=256, eos_token_id=256))
    with pytest.raises(ConfigError, match="architecture 'phi' is not registered .*register_arch"):
        train_lte(phi, windows(), LTEConfig(**TINY), first_layer=1)


def test_routers_refuse_a_gating_start_they_do_not_cover(ids):
    model = tiny_model("llama")
    routers = routers_for(model, first_layer=2)
    with pytest.raises(ConfigError, match="set lte.first_layer"):
        attach_gating(model, LTEScores(routers), GatingConfig(ffn_sparsity=0.5, first_layer=1))


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_warm_start_routers_rank_experts_by_activation_mass(family):
    """The fitted router keeps more of the per-expert activation mass at 50% than the random one it replaces."""
    from shadowsparse.lte.warmstart import fit_routers_
    model = tiny_model(family)
    view = ModelView(model)
    data = windows(12, 32)

    def kept_mass(routers):  # fraction of sum |a| that top-50% routing keeps, over routed layers and tokens
        source = LTEScores(routers)
        raw = {}
        hooks = [view.ffn_down(i).register_forward_pre_hook(lambda m, a, i=i: raw.__setitem__(i, a[0].abs()))
                 for i in routers.layers]
        with attach_gating(model, source, GatingConfig(ffn_sparsity=0.5)):
            model(input_ids=data)
        for h in hooks:
            h.remove()
        return float(sum((raw[i] * routers.to_neurons(i, source.expert_mask(i))).sum() / raw[i].sum()
                         for i in routers.layers) / len(routers.layers))

    routers = routers_for(model)
    before = kept_mass(routers)
    stats = fit_routers_(model, routers, data, init_score=0.9)
    assert 0.2 < stats["router_fit_r2"] <= 1.0
    assert kept_mass(routers) > before + 0.03
    scores = LTEScores(routers)
    with attach_gating(model, scores, GatingConfig(ffn_sparsity=0.5)):
        model(input_ids=data)
    mean = torch.stack([scores.scores[i].mean() for i in routers.layers]).mean()
    assert 0.75 < float(mean) < 0.97  # centred on init_score: stage 1 still starts near dense


def test_lte_experiment_composes_into_a_valid_config():
    from shadowsparse.lte.stage import lte_config
    cfg = compose("experiment=lte_smollm2", "paths.output_dir=x")
    lcfg = lte_config(cfg)
    assert "lte" in cfg.evaluate.methods and cfg.gating.ffn_sparsity == lcfg.ffn_sparsity == 0.5
    assert lcfg.total_steps > 0 and lcfg.finetune == "full"
    assert cfg.llm.name == "embedded:smollm2"
