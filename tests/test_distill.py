"""Sparse self-distillation (shadowsparse/distill.py) on tiny random models: the training sparsity keeps what it
says and passes gradients only through kept entries, the fine-tune lowers the held-out KL to the dense model under
that sparsity and leaves the caller's model alone, and a saved folder round-trips or is refused with the fix."""
import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from shadowsparse.arch import ModelView
from shadowsparse.distill import (DistillConfig, attach_topk, distill, keep_top, load_distilled,
                                  save_distilled, sparse_kl)
from shadowsparse.errors import ConfigError
from shadowsparse.llm import model_fingerprint
from tests.conftest import tiny_model


def windows(n=40, t=24, seed=0):
    return torch.randint(0, 256, (n, t), generator=torch.Generator().manual_seed(seed))


def test_keep_top_keeps_the_largest_and_passes_gradients_only_there():
    x = torch.tensor([[0.1, -3.0, 2.0, 0.5], [4.0, -0.2, 0.3, -5.0]], requires_grad=True)
    y = keep_top(x, 0.5)
    assert y.tolist() == [[0.0, -3.0, 2.0, 0.0], [4.0, 0.0, 0.0, -5.0]]
    y.sum().backward()
    assert x.grad.tolist() == [[0.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 1.0]]


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_attach_topk_drops_the_requested_fractions_from_first_layer_on(family):
    model = tiny_model(family)
    view, spec = ModelView(model), ModelView(model).spec
    seen = {}

    def observe(key):  # registered after attach_topk's hooks: sees what the projection reads
        return lambda m, args: seen.__setitem__(key, (args[0] == 0).float().mean().item())

    ids = windows(2)
    dense = model(input_ids=ids).logits
    hooks = attach_topk(model, ffn=0.75, attn=0.5, first_layer=1)
    for i in range(view.dims.n_layers):
        for p in (spec.ffn_down, spec.attn_in[0], spec.attn_out):
            hooks.append(view.module(i, p).register_forward_pre_hook(observe((i, p))))
    model(input_ids=ids)
    for h in hooks:
        h.remove()
    for i in range(1, view.dims.n_layers):
        assert seen[(i, spec.ffn_down)] == pytest.approx(0.75, abs=0.02)
        assert seen[(i, spec.attn_in[0])] == pytest.approx(0.5, abs=0.02)
        assert seen[(i, spec.attn_out)] == pytest.approx(0.5, abs=0.02)
    assert seen[(0, spec.attn_in[0])] == seen[(0, spec.attn_out)] == 0.0  # layer 0 dense (OPT's ReLU FFN has zeros
    # of its own, so its down input is not checked there)
    assert torch.equal(model(input_ids=ids).logits, dense)  # hooks removed: dense again


def test_distill_lowers_the_sparse_kl_and_keeps_the_base_model():
    model = tiny_model("llama")
    with torch.no_grad():  # a random tiny model predicts nearly uniform tokens: sharpen it so sparsity costs KL
        model.model.norm.weight.mul_(10)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = DistillConfig(ffn=0.9, attn=0.7, steps=40, batch_size=4, lr=1e-4, warmup_steps=2, val_windows=4)
    train = windows(20)
    kl_train = sparse_kl(copy.deepcopy(model), model, train[:-4], cfg)
    student, summary = distill(model, train, cfg)
    assert summary["steps"] == 40 and summary["train_tokens"] == 40 * 4 * 24
    assert sparse_kl(student, model, train[:-4], cfg) < 0.5 * kl_train  # measured 0.429 -> 0.109
    assert summary["val_kl_sparse"] < 0.9 * summary["val_kl_sparse_before"], summary  # 0.313 -> 0.215
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # the caller's model untouched
    changed = [n for n, p in student.named_parameters() if not torch.equal(p, before[n])]
    assert changed and not any("embed" in n or "lm_head" in n for n in changed)
    assert not any(p.requires_grad for p in student.parameters()) and not student.training


def test_a_half_precision_model_trains_as_fp32_and_comes_back_in_its_dtype():
    """AdamW's steps of ~lr·w vanish in bf16 (and fp16 overflows): the student trains as an fp32 copy."""
    model = tiny_model("llama").to(torch.bfloat16)
    model.is_quantized = True  # what transformers sets on a GGUF load: its own .float() / .half() then refuse
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    student, _ = distill(model, windows(12), DistillConfig(steps=3, batch_size=4, val_windows=2, lr=1e-3))
    assert all(p.dtype == torch.bfloat16 for p in student.parameters())
    params = [(n, p) for n, p in student.named_parameters() if "proj" in n]  # the linears (norms at 1.0 can round
    moved = sum(not torch.equal(p, before[n]) for n, p in params)           # back: bf16's step there is 2**-7)
    assert moved == len(params) and all(torch.isfinite(p).all() for _, p in params)  # every linear moved


def test_saved_student_round_trips_and_other_models_are_refused(tmp_path):
    model = tiny_model("llama")
    cfg = DistillConfig(steps=3, batch_size=4, val_windows=2)
    student, summary = distill(model, windows(12), cfg)
    folder = save_distilled(student, tmp_path / "d", model_fingerprint(model), cfg, summary)
    stored = load_file(str(folder / "model.safetensors"))
    assert stored and not any("embed" in k or "lm_head" in k for k in stored)  # the decoder's parameters only
    fresh = tiny_model("llama")
    meta = load_distilled(folder, fresh)
    assert meta["config"]["steps"] == 3
    ids = windows(2)
    assert torch.equal(fresh(input_ids=ids).logits, student(input_ids=ids).logits)
    with pytest.raises(ConfigError, match="another model"):
        load_distilled(folder, tiny_model("llama", seed=1))
    (folder / "model.safetensors").write_bytes(b"truncated")
    with pytest.raises(ConfigError, match="safetensors"):
        load_distilled(folder, tiny_model("llama"))
    with pytest.raises(ConfigError, match="no readable distilled model"):
        load_distilled(tmp_path / "missing", fresh)


@pytest.mark.parametrize("bad, match", [(dict(ffn=1.0), "distill.ffn"), (dict(attn=-0.1), "distill.attn"),
                                        (dict(steps=0), "distill.steps"), (dict(lr=0.0), "distill.lr")])
def test_bad_settings_are_refused_with_their_key(bad, match):
    with pytest.raises(ConfigError, match=match):
        distill(tiny_model("llama"), windows(8), DistillConfig(**bad))


def test_too_few_windows_and_moe_models_are_refused():
    with pytest.raises(ConfigError, match="val_windows"):
        distill(tiny_model("llama"), windows(4), DistillConfig(val_windows=4))
    with pytest.raises(ConfigError, match="mixture-of-experts"):
        attach_topk(tiny_model("mixtral"), 0.5, 0.0)


def test_pipeline_stage_trains_saves_and_a_run_directory_reloads_the_student(tmp_path):
    """stages.distill=true: the student replaces the model for every later stage (its dense row is the student's),
    <run>/distilled/ holds it, and both a rerun of the evaluation alone and load_gated(run_dir) gate it again."""
    from shadowsparse.generation import load_gated
    from shadowsparse.pipeline import run
    from tests.conftest import compose

    def cfg(*extra):
        return compose("experiment=smoke", f"paths.output_dir={tmp_path}/run", f"paths.cache_dir={tmp_path}/cache",
                       "distill.steps=3", "distill.batch_size=2", "distill.seq_len=32", "distill.lr=1e-3",
                       "evaluate.methods=[dense,sketch_teal]", "gating.levels=[{ffn:0.5,heads:0.0}]", *extra)
    metrics = run(cfg("stages.distill=true"))
    weights = tmp_path / "run" / "distilled" / "model.safetensors"
    assert weights.exists() and metrics["distill/steps"] == 3
    dense = metrics["dense/ppl@ffn0.00_heads0.00"]
    assert dense == pytest.approx(metrics["distill/eval_ppl_student"], rel=1e-6)
    assert abs(dense - metrics["distill/eval_ppl_base"]) > 1e-3 * dense  # the base model is not what was evaluated
    rows = [json.loads(line) for line in (tmp_path / "run" / "results.jsonl").read_text().splitlines()]
    assert rows and all(r["distilled"] and r["model"] == "random:llama (distilled)" for r in rows)
    stamp = weights.stat().st_mtime_ns
    again = run(cfg("stages.collect=false", "stages.fit=false", "evaluate.methods=[dense]"))
    assert again["dense/ppl@ffn0.00_heads0.00"] == pytest.approx(dense, rel=1e-6)
    assert again["distill/eval_ppl_base"] == metrics["distill/eval_ppl_base"]  # kept in every rerun's metrics
    rerun = run(cfg("stages.distill=true", "evaluate.methods=[dense]"))  # same settings: the student is reused
    assert weights.stat().st_mtime_ns == stamp and rerun["distill/steps"] == 3
    assert rerun["dense/ppl@ffn0.00_heads0.00"] == pytest.approx(dense, rel=1e-6)
    run(cfg("stages.distill=true", "distill.steps=2", "evaluate.methods=[dense]"))  # other settings: trained anew
    assert json.loads((tmp_path / "run" / "distilled" / "distill.json").read_text())["config"]["steps"] == 2
    from omegaconf import OmegaConf
    (tmp_path / "run" / ".hydra").mkdir()  # what train.py's Hydra run leaves: the run's config
    OmegaConf.save(cfg("stages.distill=true", "distill.steps=2"), tmp_path / "run" / ".hydra" / "config.yaml")
    g = load_gated(str(tmp_path / "run"), method="dense", engine="hooks", device="cpu")
    from shadowsparse.config import window_spec
    from shadowsparse.data import token_windows
    ids = token_windows(g.tok, window_spec(cfg().data.eval), "data.eval")
    assert g.perplexity(ids) == pytest.approx(run(cfg("stages.collect=false", "stages.fit=false",
                                                       "evaluate.methods=[dense]"))["dense/ppl@ffn0.00_heads0.00"],
                                              rel=1e-4)


def test_a_launched_rank_loads_rank_zeros_student_and_never_trains(tmp_path, monkeypatch):
    """A process Lightning launches for a multi-process stage re-runs the pipeline with stages.distill=true: it must
    load the student rank 0 saved (not train another into the same folder); without one (torchrun starts every
    rank at once) it is refused with the fix."""
    from shadowsparse.pipeline import run
    from tests.conftest import compose

    def cfg(out, *extra):
        return compose("experiment=smoke", f"paths.output_dir={out}", f"paths.cache_dir={tmp_path}/cache",
                       "distill.steps=2", "distill.batch_size=2", "distill.seq_len=32", "stages.distill=true",
                       "stages.collect=false", "stages.fit=false", "stages.evaluate=false", *extra)
    made = run(cfg(tmp_path / "run"))
    assert made["distill/steps"] == 2
    stamp = (tmp_path / "run" / "distilled" / "model.safetensors").stat().st_mtime_ns
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert run(cfg(tmp_path / "run"))["distill/train_seconds"] == made["distill/train_seconds"]  # loaded, not made
    assert (tmp_path / "run" / "distilled" / "model.safetensors").stat().st_mtime_ns == stamp
    with pytest.raises(ConfigError, match="this rank found no distilled model .*stages.distill=false"):
        run(cfg(tmp_path / "other"))
    monkeypatch.setenv("RANK", "1")  # torchrun: every rank starts at once, rank 0 may still be training
    with pytest.raises(ConfigError, match="run the distill stage in one process first.*with stages.distill=false"):
        run(cfg(tmp_path / "run"))


def test_training_through_a_selectors_own_hooks_gates_the_student_only():
    """distill(sparsity=...) trains under any gating context: here sketch_teal's hooks, built on the base model
    (its fixed sketch copy and thresholds), attached to the student; the base model stays dense."""
    from shadowsparse.generation import load_gated
    from shadowsparse.llm import LLMConfig, load_llm
    model, tok = load_llm(LLMConfig(name="random:llama", seed=0))
    with torch.no_grad():
        model.model.norm.weight.mul_(10)
    calib = windows(8, 32, seed=1)
    attach = load_gated(model, method="sketch_teal", ffn_sparsity=0.7, tokenizer=tok, calib=calib,
                        engine="hooks").decoder.attach
    ids = windows(2)
    dense_base = model(input_ids=ids).logits
    student = copy.deepcopy(model)
    with attach(student) as handle:
        gated_student = student(input_ids=ids).logits
        assert torch.equal(model(input_ids=ids).logits, dense_base)  # the base model is not gated
    assert not torch.allclose(gated_student, dense_base) and handle.stats()["realized_ffn_sparsity"] > 0.5
    entered = []

    def through(m):
        entered.append(m)
        return attach(m)
    cfg = DistillConfig(ffn=0.7, attn=0.3, steps=4, batch_size=4, lr=1e-4, warmup_steps=1, val_windows=4)
    out, summary = distill(model, windows(20), cfg, sparsity=through)
    assert len(entered) == 3 and all(m is out for m in entered)  # KL before, training, KL after: the student
    assert summary["val_kl_sparse"] > 0 and torch.equal(model(input_ids=ids).logits, dense_base)
