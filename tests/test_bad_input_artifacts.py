"""The bad-input table, artifacts part (issue 15 B): predictor files (safetensors + config.json; old pickled
checkpoints only on request), predictors attached where they do not belong, sequence masks across prompts, a second
attach, feature layers and criteria that disagree, and LTE on the model's device.

train.py-level rows go through `python train.py` in this process (tests/test_bad_input.py's helpers) and must exit 2
with one `error:` line naming the problem and the fix, leaving nothing behind; API-level rows must raise ConfigError
with the fix in the message."""
import json
import logging
import os
import re
import sys
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch

from shadowsparse import GatingConfig, SharedPredictor, attach_gating
from shadowsparse.arch import ModelView
from shadowsparse.errors import ConfigError
from shadowsparse.gating import PerLayerScores, PredictorScores
from shadowsparse.llm import LLMConfig, check_fingerprint, load_llm, model_fingerprint
from shadowsparse.pipeline import run
from shadowsparse.predictor import PerLayerPredictor, PretrainedPredictor
from shadowsparse.system import PredictorSystem, load_predictor, spearman, topk_recall
from tests.conftest import ROOT, compose, tiny_model
from tests.test_bad_input import python_train_py, snapshot


def fit_only(tmp, name, *overrides):
    """A smoke run's collect + fit (no evaluation): its targets folder and predictor folder."""
    run(compose("experiment=smoke", "stages.evaluate=false", "stages.report=false", f"paths.output_dir={tmp}/{name}",
                f"paths.targets_dir={tmp}/{name}-targets", *overrides))
    return tmp / f"{name}-targets", tmp / name / "predictor"


def legacy_ckpt(path: Path, model, **hparams) -> Path:
    """An old-format predictor checkpoint (a pickled Lightning checkpoint), as the fit stage used to write it."""
    dims = ModelView(model).dims
    system = PredictorSystem(dict(d_model=dims.hidden, n_layers=dims.n_layers, n_heads=dims.n_heads, ffn=dims.ffn,
                                  feature_layer=0), {"kind": "shared", "hidden": 32, "rank": 8}, {"loss": "mse"},
                             manifest_model=model_fingerprint(model),
                             targets_info={"criterion": "activation", "granularity": "token", "feature_layer": 0},
                             **hparams)
    torch.save({"state_dict": system.state_dict(), "hyper_parameters": dict(system.hparams),
                "pytorch-lightning_version": L.__version__}, path)
    return path


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A smoke run's targets and predictor (random:llama, activation, feature layer 0), one trained after layer 2,
    an old pickled checkpoint of the same model, and broken copies of the predictor."""
    tmp = tmp_path_factory.mktemp("artifacts")
    targets, pred = fit_only(tmp, "run")
    _, pred_fl2 = fit_only(tmp, "fl2", "targets.feature_layer=2")
    model = tiny_model("llama")
    legacy = legacy_ckpt(tmp / "legacy.ckpt", model)
    raw = legacy.read_bytes()
    (tmp / "truncated.ckpt").write_bytes(raw[: len(raw) // 2])
    (tmp / "empty.ckpt").write_bytes(b"")
    (tmp / "text.ckpt").write_text("this is not a checkpoint\n")
    broken = {}
    for name, file, content in [("trunc-weights", "model.safetensors", "half"), ("empty-weights", "model.safetensors", b""),
                                ("text-weights", "model.safetensors", b"hello world, not tensors"),
                                ("text-config", "config.json", b"not json {"), ("empty-config", "config.json", b""),
                                ("no-config", "config.json", None), ("no-weights", "model.safetensors", None),
                                ("future-config", "config.json", "future")]:
        folder = tmp / name
        folder.mkdir()
        for f in ("config.json", "model.safetensors"):
            (folder / f).write_bytes((pred / f).read_bytes())
        if content is None:
            (folder / file).unlink()
        elif content == "half":
            data = (pred / file).read_bytes()
            (folder / file).write_bytes(data[: len(data) // 2])
        elif content == "future":
            cfg = json.loads((pred / file).read_text())
            (folder / file).write_text(json.dumps({**cfg, "format_version": 99}))
        else:
            (folder / file).write_bytes(content)
        broken[name] = folder
    return {"targets": targets, "pred": pred, "pred_fl2": pred_fl2, "legacy": legacy, "tmp": tmp, **broken,
            **{k: tmp / f"{k}.ckpt" for k in ("truncated", "empty", "text")}}


# (id, overrides — {placeholders} from `made` —, regex: the problem ... the fix)
EVAL = "stages.collect=false stages.fit=false paths.targets_dir={targets}"
CASES = [
    ("predictor-feature-layer-2-next-to-static", EVAL + " evaluate.methods=[dense,predictor,static] "
     "paths.predictor_ckpt={pred_fl2}",
     r"reads the hidden state after layer 2 \(trained with targets.feature_layer=2\), but static read\(s\) the "
     r"targets at .* collected after layer 0; .*collect the targets with targets.feature_layer=2"),
    ("llama-predictor-on-opt", "llm.name=random:opt " + EVAL.replace("{targets}", "{tmp}/unused") +
     " evaluate.methods=[dense,predictor] paths.predictor_ckpt={pred}",
     r"predictor checkpoint .* was made from another model than the one loaded \(made from 'random:llama' "
     r"\(llama, .*loaded: 'random:opt' \(opt, .*re-run the stage that makes it for this model"),
    ("predictor-of-another-model-in-bf16", "llm.seed=7 llm.dtype=bfloat16 " + EVAL.replace("{targets}", "{tmp}/u") +
     " evaluate.methods=[predictor] paths.predictor_ckpt={pred}",
     r"made from 'random:llama' \(llama, .*float32, hash \w+\); loaded: 'random:llama' \(llama, .*bfloat16"),
    ("empty-predictor-file", EVAL + " evaluate.methods=[dense,predictor] paths.predictor_ckpt={empty}",
     r"empty.ckpt' is empty \(0 bytes\).*re-run the fit stage \(stages.fit=true\)"),
    ("text-predictor-file", EVAL + " evaluate.methods=[dense,predictor] paths.predictor_ckpt={text}",
     r"text.ckpt' is neither a predictor folder nor a Lightning checkpoint .*re-run the fit stage"),
    ("truncated-old-checkpoint", EVAL + " evaluate.methods=[dense,predictor] paths.predictor_ckpt={truncated} "
     "paths.allow_pickle=true", r"truncated.ckpt' is truncated or corrupt .*re-run the fit stage"),
    ("old-pickled-checkpoint-without-opt-in", EVAL + " evaluate.methods=[dense,predictor] "
     "paths.predictor_ckpt={legacy}",
     r"legacy.ckpt' is a pickled Lightning checkpoint .*refused by default.*paths.allow_pickle=true"),
    ("truncated-safetensors", EVAL + " evaluate.methods=[dense,predictor] paths.predictor_ckpt={trunc-weights}",
     r"trunc-weights/model.safetensors' could not be read as safetensors .*truncated.*re-run the fit stage"),
    ("text-predictor-config", EVAL + " evaluate.methods=[dense,predictor] paths.predictor_ckpt={text-config}",
     r"text-config/config.json' is not a predictor config \(empty, truncated or another file.*re-run the fit stage"),
    ("missing-predictor", EVAL + " evaluate.methods=[dense,predictor] paths.predictor_ckpt={tmp}/none",
     r"predictor checkpoint .*none' does not exist; run the fit stage first .*paths.predictor_ckpt"),
]


def fill(template: str, made: dict, tmp_path) -> list[str]:
    return re.sub(r"\{([\w-]+)\}", lambda m: str(tmp_path if m[1] == "tmp" else made[m[1]]), template).split()


@pytest.mark.parametrize("case,overrides,message", CASES, ids=[c[0] for c in CASES])
def test_bad_artifact_exits_2_with_the_fix_and_nothing_written(tmp_path, made, monkeypatch, capsys, case, overrides,
                                                               message):
    args = fill(overrides, made, tmp_path)
    before = snapshot(made["tmp"])
    monkeypatch.setattr(sys, "argv", list(sys.argv))  # restored after python_train_py replaces it
    with pytest.raises(SystemExit) as exit_:
        python_train_py("experiment=smoke", f"hydra.run.dir={tmp_path}/run", f"paths.cache_dir={tmp_path}/cache",
                        *args)
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err[-3000:]
    assert err.count("error: ") == 1 and "Traceback" not in err
    assert re.search(message, err), err[-3000:]
    assert not (tmp_path / "run" / "results.jsonl").exists() and not (tmp_path / "cache").exists()
    assert not (tmp_path / "run" / "predictor").exists() and not (tmp_path / "run" / "checkpoints").exists()
    assert snapshot(made["tmp"]) == before  # the artifacts it read are untouched


# the other broken predictor files, through the loader train.py calls (the same ConfigError becomes its error line)
FILES = [
    ("empty-safetensors", "empty-weights", r"empty-weights/model.safetensors' could not be read as safetensors "
     r"\(.*\): the file is empty, truncated or not a predictor; re-run the fit stage"),
    ("text-safetensors", "text-weights", r"text-weights/model.safetensors' could not be read as safetensors "
     r".*re-run the fit stage"),
    ("empty-predictor-config", "empty-config", r"empty-config/config.json' is not a predictor config \(empty, "
     r"truncated or another file.*re-run the fit stage"),
    ("folder-without-config", "no-config", r"no-config' holds no config.json.*re-run the fit stage"),
    ("folder-without-weights", "no-weights", r"no-weights/model.safetensors' is missing.*re-run the fit stage"),
    ("newer-format", "future-config", r"has format_version 99; this shadowsparse reads up to 1: upgrade"),
    ("truncated-old-checkpoint-opted-out", "truncated", r"truncated.ckpt' is truncated or corrupt \(an incomplete "
     r"zip archive, \d+ bytes\); re-run the fit stage"),
]


@pytest.mark.parametrize("case,key,message", FILES, ids=[c[0] for c in FILES])
def test_broken_predictor_files_are_refused_naming_the_file_and_the_fix(made, case, key, message):
    before = snapshot(made["tmp"])
    with pytest.raises(ConfigError, match=message):
        load_predictor(made[key], tiny_model("llama"))
    with pytest.raises(ConfigError, match=message):  # the same through the selector's path, opted in to pickle
        load_predictor(made[key], allow_pickle=True)
    assert snapshot(made["tmp"]) == before


# -- the predictor format ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [SharedPredictor, PerLayerPredictor])
def test_save_pretrained_round_trip_is_exact_and_refuses_another_model(tmp_path, cls):
    model = tiny_model("llama")
    d = ModelView(model).dims
    torch.manual_seed(0)
    pred = cls(d.hidden, d.n_layers, d.n_heads, d.ffn, 0).eval()
    folder = pred.save_pretrained(tmp_path / "p", model_fingerprint=model_fingerprint(model),
                                  targets_info={"criterion": "plainact", "feature_layer": 0})
    assert sorted(f.name for f in folder.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((folder / "config.json").read_text())
    assert config["format"] == "shadowsparse-predictor" and config["format_version"] == 1
    assert config["kind"] == cls.kind and config["model"]["hash"] == model_fingerprint(model)["hash"]
    back = cls.from_pretrained(folder, model=model)
    also = PretrainedPredictor.from_pretrained(folder)  # whichever kind the folder holds
    assert type(back) is cls and type(also) is cls and back.targets_info["criterion"] == "plainact"
    for a, b in zip(pred.state_dict().values(), back.state_dict().values()):
        assert torch.equal(a, b)
    other = SharedPredictor if cls is PerLayerPredictor else PerLayerPredictor
    with pytest.raises(ConfigError, match=f"is a {cls.kind} predictor, not {other.kind}; load it with {cls.__name__}"):
        other.from_pretrained(folder)
    with pytest.raises(ConfigError, match=r"made from another model than the one loaded .*'random:llama'.*"
                                          r"'random:llama'.*re-run the stage"):
        cls.from_pretrained(folder, model=tiny_model("llama", seed=7))
    pred.save_pretrained(folder)  # replaces the folder whole, nothing left beside it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p"]


def test_old_checkpoint_loads_only_with_allow_pickle_and_a_warning(made, tmp_path):
    model = tiny_model("llama")
    with pytest.raises(ConfigError, match=r"pickled Lightning checkpoint .*allow_pickle"):
        load_predictor(made["legacy"], model)
    with pytest.warns(UserWarning, match=r"weights-only unpickler .*convert it once with .save_pretrained"):
        old = load_predictor(made["legacy"], model, allow_pickle=True)
    assert old.targets_info["criterion"] == "activation"
    new = load_predictor(old.save_pretrained(tmp_path / "converted"), model)
    x = torch.randn(3, ModelView(model).dims.hidden)
    assert all(torch.equal(a, b) for a, b in zip(old(x), new(x)))
    run_dir = tmp_path / "old-run"  # a run directory of the old layout: its predictor.ckpt, once opted in
    run_dir.mkdir()
    (run_dir / "predictor.ckpt").write_bytes(made["legacy"].read_bytes())
    for path in (run_dir, run_dir / "predictor"):
        with pytest.raises(ConfigError, match=r"the run holds an old pickled predictor.ckpt: set paths.allow_pickle="
                                              r"true if you made it yourself|pickled Lightning checkpoint"):
            load_predictor(path, model)
        with pytest.warns(UserWarning, match="allow_pickle=True"):
            assert load_predictor(path, model, allow_pickle=True).source_path == str(run_dir / "predictor.ckpt")
    raw = tmp_path / "raw.ckpt"  # a plain (non-zip) pickle cut short
    raw.write_bytes(b"\x80\x04\x95" + b"\x00" * 20)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ConfigError, match=r"raw.ckpt' could not be read \(.*\): it is truncated, corrupt, not "
                                              r"a predictor checkpoint.*; re-run the fit stage"):
            load_predictor(raw, model, allow_pickle=True)


class _RunsCode:
    """A pickled object whose unpickling would run a shell command (what a hostile checkpoint holds)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_old_checkpoint_that_would_run_code_is_refused_even_with_allow_pickle(made, tmp_path):
    model = tiny_model("llama")
    marker = tmp_path / "ran"
    hostile = tmp_path / "hostile.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"payload": _RunsCode(marker)}}, hostile)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ConfigError, match=r"hostile.ckpt' could not be read \(UnpicklingError: .*holds objects "
                                              r"other than tensors and plain containers"):
            load_predictor(hostile, model, allow_pickle=True)
    assert not marker.exists()


def test_run_dir_and_old_predictor_ckpt_paths_resolve_to_the_folder(made):
    model = tiny_model("llama")
    run_dir = made["pred"].parent
    for path in (run_dir, run_dir / "predictor.ckpt", made["pred"] / "model.safetensors"):
        assert load_predictor(path, model).source_path == str(made["pred"])


def test_no_loader_in_the_package_unpickles_by_default():
    """torch.load / pickle appear only in the opt-in legacy loader, after its refusal, and only as torch's
    weights-only unpickler; nothing calls weights_only=False or Lightning's load_from_checkpoint."""
    hits = []
    for path in sorted((ROOT / "shadowsparse").rglob("*.py")):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            if re.search(r"torch\.load\(|pickle\.load|cloudpickle|dill\.|weights_only\s*=\s*False|allow_pickle\s*=\s*"
                         r"True|load_from_checkpoint\(", code):
                hits.append((str(path.relative_to(ROOT)), n, code.strip()))
    assert {h[0] for h in hits} == {"shadowsparse/system.py"}, hits
    source = (ROOT / "shadowsparse/system.py").read_text()
    legacy = source[source.index("def _load_legacy"):]
    assert legacy.index("if not allow_pickle:") < legacy.index("torch.load(")
    assert not [h for h in hits if re.search(r"weights_only\s*=\s*False|load_from_checkpoint\(|pickle\.load", h[2])]
    assert all("weights_only=True" in h[2] for h in hits if "torch.load(" in h[2]), hits


# -- attaching a predictor --------------------------------------------------------------------------------------


def _predictor(model, feature_layer=0, cls=SharedPredictor):
    torch.manual_seed(0)
    d = ModelView(model).dims
    return cls(d.hidden, d.n_layers, d.n_heads, d.ffn, feature_layer).eval()


def _hooks(model):
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def test_first_layer_at_or_before_the_feature_layer_is_refused_at_attach(ids):
    model = tiny_model("llama")
    for fl, first in ((0, 0), (1, 1), (1, 0)):
        with pytest.raises(ConfigError, match=rf"first_layer={first} gates layer {first}, but the predictor reads the "
                                              rf"hidden state after layer {fl} .*set first_layer to at least {fl + 1}"):
            attach_gating(model, _predictor(model, fl), GatingConfig(ffn_sparsity=0.5, first_layer=first))
        assert _hooks(model) == 0
    with attach_gating(model, _predictor(model, 0), GatingConfig(ffn_sparsity=0.5, first_layer=1)):  # still fine
        model(input_ids=ids)


def test_a_predictor_for_another_model_is_refused_at_attach_naming_both(made):
    opt = tiny_model("opt")
    llama_pred = load_predictor(made["pred"])  # no model given: checked when attached
    with pytest.raises(ConfigError, match=r"predictor was made from another model than the one loaded \(made from "
                                          r"'random:llama' \(llama, .*loaded: 'random:opt' \(opt, .*re-run the stage"):
        attach_gating(opt, llama_pred, GatingConfig(ffn_sparsity=0.5))
    bare = _predictor(tiny_model("llama"))  # built by hand: no fingerprint, its dims are checked
    with pytest.raises(ConfigError, match=r"predictor was built for a model with d_model=64, n_layers=4, n_heads=4, "
                                          r"ffn=96, but the model it is attached to, 'random:opt' \(opt, .*has .*ffn=128"
                                          r"; use a predictor trained for this model"):
        attach_gating(opt, bare, GatingConfig(ffn_sparsity=0.5))
    assert _hooks(opt) == 0


def test_the_same_model_in_bf16_keeps_its_predictor_and_messages_name_the_models(made, tmp_path):
    bf16, _ = load_llm(LLMConfig(name="random:llama", dtype="bfloat16"))
    fp32 = tiny_model("llama")
    assert model_fingerprint(bf16)["hash"] != model_fingerprint(fp32)["hash"]  # the checksum moved with rounding
    check_fingerprint(model_fingerprint(fp32), bf16, "x")  # ... but it is the same model
    pred = load_predictor(made["pred"], bf16)
    with attach_gating(bf16, pred, GatingConfig(ffn_sparsity=0.5)) as h:
        bf16(input_ids=torch.randint(0, 256, (1, 8)))
        assert h.stats()["realized_ffn_sparsity"] == pytest.approx(0.5, abs=0.02)
    other, _ = load_llm(LLMConfig(name="random:llama", dtype="bfloat16", seed=7))
    with pytest.raises(ConfigError, match=r"made from 'random:llama' \(llama, 4 layers, hidden 64, FFN 96, float32, "
                                          r"hash \w+\); loaded: 'random:llama' \(.*bfloat16, hash \w+\)"):
        load_predictor(made["pred"], other)
    with pytest.raises(ConfigError):  # same dtype, another model: the hash decides, no tolerance
        check_fingerprint(model_fingerprint(fp32), tiny_model("llama", seed=7), "x")
    run(compose("experiment=smoke", "llm.dtype=bfloat16", "stages.collect=false", "stages.fit=false",  # train.py
                "evaluate.methods=[predictor]", "gating.ffn_sparsity=0.5", f"paths.predictor_ckpt={made['pred']}",
                f"paths.output_dir={tmp_path}/run", f"paths.cache_dir={tmp_path}/cache"))
    rows = [json.loads(x) for x in (tmp_path / "run" / "results.jsonl").read_text().splitlines()]
    assert [(r["method"], r["criterion"], r["realized_ffn_sparsity"]) for r in rows] == [
        ("predictor", "activation", pytest.approx(0.5, abs=0.02))]


def test_a_second_attach_is_refused_until_the_first_is_removed(ids):
    model = tiny_model("llama")
    pred = _predictor(model)
    first = attach_gating(model, pred, GatingConfig(ffn_sparsity=0.5))
    n = _hooks(model)
    with pytest.raises(ConfigError, match=r"already gated by an earlier attach_gating \(ffn_sparsity=0.5, "
                                          r"head_sparsity=0.0\), still attached: the hooks would stack .*call "
                                          r"\.remove\(\) on the earlier handle"):
        attach_gating(model, pred, GatingConfig(ffn_sparsity=0.3))
    assert _hooks(model) == n  # the refused attach left nothing
    first.remove()
    with attach_gating(model, pred, GatingConfig(ffn_sparsity=0.3)) as second:
        model(input_ids=ids)
        assert second.stats()["realized_ffn_sparsity"] == pytest.approx(0.302, abs=0.01)
    assert _hooks(model) == 0
    with attach_gating(model, pred, GatingConfig(ffn_sparsity=0.0)):  # keeps everything: no hooks, nothing to stack
        with attach_gating(model, pred, GatingConfig(ffn_sparsity=0.5)):
            pass


@pytest.mark.parametrize("cls", [SharedPredictor, PerLayerPredictor])
@torch.no_grad()
def test_sequence_masks_are_recomputed_for_a_new_prompt_and_reused_while_decoding(ids, cls):
    model = tiny_model("llama")
    pred = _predictor(model, cls=cls)
    cfg = GatingConfig(ffn_sparsity=0.5, granularity="sequence")

    def stored(src):  # the tensor the hooks hold (a new object each time the mask is recomputed)
        return src._neurons if isinstance(src, PredictorScores) else src._neurons[3]

    twin = tiny_model("llama")  # the same weights: masks of a prompt alone, while `model` stays gated

    def fresh(prompt):  # the mask of this prompt alone, from a new attach
        with attach_gating(twin, pred, cfg) as h:
            twin(input_ids=prompt)
            return stored(h.source).clone()

    seen = []
    with attach_gating(model, pred, cfg) as h:
        assert isinstance(h.source, PredictorScores if cls is SharedPredictor else PerLayerScores)
        hook = model.register_forward_hook(lambda *a: seen.append(stored(h.source)))
        model.generate(input_ids=ids[:1, :8], attention_mask=torch.ones(1, 8, dtype=torch.long), max_new_tokens=3,
                       do_sample=False, pad_token_id=0)
        assert len(seen) == 3 and all(s is seen[0] for s in seen)  # decode steps reuse the prompt's mask
        assert torch.equal(seen[0], fresh(ids[:1, :8]))
        model(input_ids=ids[:1, 8:9])  # a 1-token prompt after a longer one: its own mask
        assert seen[-1] is not seen[0] and torch.equal(seen[-1], fresh(ids[:1, 8:9]))
        model(input_ids=ids[:2, :8])  # batch 2, then a 1-token batch of 1: recomputed, no size mismatch
        model(input_ids=ids[1:2, 5:6])
        assert seen[-1].shape[0] == 1 and torch.equal(seen[-1], fresh(ids[1:2, 5:6]))
        hook.remove()


# -- labels and layers of an evaluation -------------------------------------------------------------------------


def test_an_activation_predictor_next_to_a_plainact_oracle_keeps_its_own_criterion(made, tmp_path):
    run(compose("experiment=smoke", "targets=plainact", "stages.fit=false", "evaluate.methods=[predictor,oracle]",
                "gating.ffn_sparsity=0.5", f"paths.predictor_ckpt={made['pred']}", f"paths.output_dir={tmp_path}/run",
                f"paths.cache_dir={tmp_path}/cache"))
    rows = [json.loads(x) for x in (tmp_path / "run" / "results.jsonl").read_text().splitlines()]
    assert [(r["method"], r["criterion"]) for r in rows] == [("predictor", "activation"), ("oracle", "plainact")]


def test_the_fit_is_skipped_when_no_evaluated_method_reads_the_predictor(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="shadowsparse")
    metrics = run(compose("experiment=smoke", "evaluate.methods=[dense,threshold]", "evaluate.threshold_windows=2",
                          "gating.ffn_sparsity=0.5", f"paths.output_dir={tmp_path}/run",
                          f"paths.cache_dir={tmp_path}/cache"))
    assert "fit: skipped, no evaluated method reads the predictor" in caplog.text
    assert not (tmp_path / "run" / "predictor").exists() and not (tmp_path / "run" / "checkpoints").exists()
    assert "predictor_params" not in metrics and (tmp_path / "run" / "results.jsonl").exists()


def test_the_fit_writes_lightning_checkpoints_and_resumes_from_them(tmp_path, caplog):
    """ModelCheckpoint keeps best.ckpt (validation loss) and last.ckpt; a rerun of the same fit in the same run dir
    (after a kill, or with more epochs) resumes from last.ckpt, read with weights_only=True."""
    caplog.set_level(logging.INFO)
    args = ["experiment=smoke", "stages.evaluate=false", f"paths.output_dir={tmp_path}/run",
            f"paths.targets_dir={tmp_path}/targets"]
    run(compose(*args, "trainer.max_epochs=1"))
    ckpts = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["best.ckpt", "fit.json", "last.ckpt"]
    assert "resuming" not in caplog.text
    metrics = run(compose(*args, "trainer.max_epochs=2"))
    assert f"fit: resuming from {ckpts / 'last.ckpt'}" in caplog.text
    assert "Restored all states from the checkpoint" in caplog.text
    assert json.loads((tmp_path / "run" / "predictor" / "config.json").read_text())["fit"]["epochs"] == 2
    assert metrics["fit/best_val_loss"] > 0
    caplog.clear()
    run(compose(*args, "trainer.max_epochs=1", "predictor.model.hidden=32"))  # another fit: starts over
    assert "holds the checkpoints of another fit configuration; starting over" in caplog.text
    assert "resuming" not in caplog.text


# -- LTE on the model's device ----------------------------------------------------------------------------------


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")])])
def test_a_tiny_lte_stage_trains_and_routes_on_the_models_device(tmp_path, device):
    """experiment=lte_smollm2 llm.device=cuda trainer=gpu failed in the k-means (index on the CPU, rows on cuda)."""
    from shadowsparse.lte import load_lte, stage_lte
    cfg = compose("experiment=smoke", f"llm.device={device}", f"trainer={'gpu' if device == 'cuda' else 'cpu'}",
                  "evaluate.methods=[dense,lte]", "lte.expert_size=8", "lte.stage1_steps=2", "lte.stage2_steps=2",
                  "lte.seq_len=32", "lte.val_windows=2", "lte.val_every=2", "lte.warmup_steps=1",
                  "lte.router_fit_windows=2", f"paths.output_dir={tmp_path}/run", f"paths.cache_dir={tmp_path}/c")
    model, tok = load_llm(LLMConfig(name=cfg.llm.name, device=device))
    summary = stage_lte(cfg, model, tok, tmp_path / "run")
    assert summary["lte/steps"] == 4
    lte = load_lte(tmp_path / "run" / "lte", model)
    ids = torch.randint(0, 256, (2, 16), device=device)
    with lte.applied(model) as source, attach_gating(model, source, GatingConfig(ffn_sparsity=0.5)) as h:
        logits = model(input_ids=ids).logits
        assert logits.device.type == device and torch.isfinite(logits).all()
        assert h.stats()["realized_ffn_sparsity"] == pytest.approx(0.5, abs=0.01)


# -- held-out metrics through torchmetrics ----------------------------------------------------------------------


def test_spearman_and_topk_recall_match_hand_computations():
    g = torch.Generator().manual_seed(0)
    pred, true = torch.randn(3, 5, 40, generator=g), torch.randn(3, 5, 40, generator=g)

    def ranks(t):
        return t.argsort(-1).argsort(-1).float()
    rp, rt = ranks(pred), ranks(true)
    rp, rt = rp - rp.mean(-1, keepdim=True), rt - rt.mean(-1, keepdim=True)
    hand = ((rp * rt).sum(-1) / (rp.norm(dim=-1) * rt.norm(dim=-1))).mean()
    assert float(spearman(pred, true)) == pytest.approx(float(hand), abs=1e-5)
    assert float(spearman(true, true)) == pytest.approx(1.0, abs=1e-6)
    k = 10
    tp = torch.zeros_like(pred, dtype=torch.bool).scatter_(-1, pred.topk(k, -1).indices, True)
    tt = torch.zeros_like(true, dtype=torch.bool).scatter_(-1, true.topk(k, -1).indices, True)
    assert float(topk_recall(pred, true, k)) == pytest.approx(float((tp & tt).sum(-1).float().mean() / k))
    assert float(topk_recall(true, true, k)) == 1.0


# -- the other artifacts: LTE folders and the predict-then-verify predictor (safetensors + JSON) -----------------


def test_broken_lte_and_verify_predictor_files_are_refused_with_the_fix(tmp_path):
    from shadowsparse.lte import LTEArtifact, LTEConfig, Routers, group_neurons, load_lte
    from shadowsparse.verify_predictor import FFNInputPredictor
    model = tiny_model("llama")
    view = ModelView(model)
    d = view.dims
    routers = Routers(d.hidden, d.ffn, [1, 2, 3], group_neurons(view, [1, 2, 3], 8, "contiguous"))
    folder = LTEArtifact(LTEConfig(expert_size=8), routers, model_fingerprint=model_fingerprint(model)).save(
        tmp_path / "lte")
    assert load_lte(folder, model).routers.layers == [1, 2, 3]
    data = (folder / "routers.safetensors").read_bytes()
    (folder / "routers.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ConfigError, match=r"routers.safetensors' could not be read as safetensors .*truncated; "
                                          r"re-run the LTE training"):
        load_lte(folder, model)
    (folder / "lte.json").write_text("")
    with pytest.raises(ConfigError, match=r"lte.json' is not an LTE config \(empty, truncated"):
        load_lte(folder, model)

    pred = FFNInputPredictor(d.hidden, d.ffn, [1, 2, 3], rank=4)
    path = tmp_path / "verify_predictor.safetensors"
    pred.save(path, model_fingerprint(model))
    assert FFNInputPredictor.load(path, model).layers == [1, 2, 3]
    with pytest.raises(ConfigError, match=r"verify predictor .* was made from another model than the one loaded"):
        FFNInputPredictor.load(path, tiny_model("llama", seed=7))
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ConfigError, match=r"could not be read \(.*\): it is truncated, corrupt or not a verify "
                                          r"predictor; delete it \(it is retrained\) or point paths.verify_ckpt"):
        FFNInputPredictor.load(path, model)
