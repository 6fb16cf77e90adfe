"""The bad-input table: each case goes through train.py's main() (the `python train.py ...` entry point, in this
process to keep the table fast; one case also as a real subprocess) and must exit 2 with a message that names the
problem and the fix, leaving no partial artifact: no results.jsonl, no collected or half-collected targets.
Rows that need another shape (a sweep, a run folder used twice, a read-only cache, the order of the checks, the logs
of a smoke run) are test functions below the table."""
import json
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from shadowsparse.pipeline import run
from tests.conftest import ROOT, compose

# (id, overrides — {placeholders} filled from the `made` fixture —, regex: the problem ... the fix)
CASES = [
    ("unknown-model-path", "llm.name=./no/such/model", r"does not exist; give an existing folder or a hub id"),
    ("unknown-random-family", "llm.name=random:gpt9", r"no tiny config for family 'gpt9'; use random:<family> with one "
     r"of llama, .*gpt2"),
    ("unregistered-family", "llm.name={phi}",
     r"architecture 'phi' is not registered \(supported: .*\)\. Add it before loading: .*register_arch\('phi', "
     r"ArchSpec\(family='phi', layers_path=.*README: Adding a model family"),
    ("mixture-of-experts-shared-expert", "llm.name={qwen2_moe}",
     r"'qwen2_moe' is a mixture-of-experts model \(4 experts per layer\) that shadowsparse does not gate: it has a "
     r"shared expert .*Supported mixture-of-experts families: mixtral, qwen3_moe, olmoe"),
    ("non-causal-model", "llm.name={bert}",
     r"is an encoder-only 'bert' model .* not a decoder-only causal LM .*; give a causal LM"),
    ("ffn-sparsity-1", "gating.ffn_sparsity=1.0", r"sparsity must be in \[0, 1\).*set gating.ffn_sparsity"),
    ("ffn-sparsity-negative", "gating.ffn_sparsity=-0.1", r"got ffn=-0.1.*set gating.ffn_sparsity"),
    ("head-sparsity-1", "gating.ffn_sparsity=0.5 gating.head_sparsity=1.5", r"heads=1.5.*gating.head_sparsity"),
    ("n-not-below-m", "sparsity=wanda sparsity.pattern=4:2", r"needs 0 < N < M, got 4:2; e.g. 2:4"),
    ("lte-on-a-static-mask", "sparsity=wanda evaluate.methods=[dense,lte]",
     r"lte fine-tunes the decoder weights, which would refill a static sparsity mask; .*sparsity=none"),
    ("distill-on-a-static-mask", "sparsity=wanda stages.distill=true",
     r"stages.distill fine-tunes every decoder weight, which would refill a static sparsity mask; .*sparsity=none"),
    ("distill-fewer-windows-than-held-out", "stages.distill=true distill.n_windows=3",
     r"distill.n_windows null or > distill.val_windows=4; got seq_len=256 n_windows=3"),
    ("distill-level-out-of-range", "stages.distill=true distill.ffn=1.0",
     r"distill.ffn \(the fraction dropped in training\) must be in \[0, 1\), got 1.0"),
    ("unknown-criterion", "targets.criterion=nope", r"criterion 'nope' is not registered; choose one of"),
    ("unknown-predictor-kind", "predictor.model.kind=transformer",
     r"unknown predictor.model.kind 'transformer'; choose one of \['per_layer', 'shared'\]"),
    ("unknown-loss", "predictor.fit.loss=hinge", r"predictor.fit.loss must be mse, listnet or bce, got 'hinge'"),
    ("unknown-budget", "gating.budget=everywhere", r"budget must be 'local', 'global' or 'hybrid'"),
    ("conflicting-budget-and-predictor", "predictor=per_layer gating.budget=global",
     r"per_layer predictor scores one layer at a time: use budget=local"),
    ("unknown-method", "evaluate.methods=[dense,magic]", r"unknown evaluation method\(s\) \['magic'\]; registered: dense"),
    ("sketch-teal-attention-sparsity-out-of-range", "evaluate.teal.sketch_attn=1.2",
     r"evaluate.teal.sketch_attn \(sketch_teal's sparsity on the attention inputs\) must be in \(0, 1\), got 1.2"),
    ("unknown-teal-allocation", "evaluate.teal.allocation=layerwise",
     r"evaluate.teal.allocation must be one of \('uniform', 'greedy'\), got 'layerwise'"),
    ("teal-level-above-greedy-range", "evaluate.methods=[dense,teal] evaluate.teal.allocation=greedy "
     "evaluate.teal.max_sparsity=0.3 gating.ffn_sparsity=0.5", r"teal levels \[0.5\] exceed evaluate.teal.max_sparsity"),
    ("unknown-eval-task", "evaluate.tasks=[mmlu]", r"unknown task\(s\) \['mmlu'\]; shipped tasks are"),
    ("unknown-calib-task", "data.calib.task=mmlu", r"unknown task\(s\) \['mmlu'\]; shipped tasks are"),
    ("empty-data-file", "data.calib.source.data_files={empty}", r"is empty; give a file or split with text"),
    ("missing-data-file", "data.calib.source.data_files={tmp}/none.jsonl",
     r"none.jsonl' does not exist; point data_files at a local file"),
    ("eval-longer-than-context", "data.eval.seq_len=512",
     r"data.eval.seq_len=512 exceeds the model's maximum context of 256 tokens.*set data.eval.seq_len to at most 256"),
    ("calib-longer-than-context", "data.calib.seq_len=257", r"data.calib.seq_len=257 exceeds .*at most 256"),
    ("unwritable-output-dir", "paths.output_dir=/proc/forbidden/run",
     r"paths.output_dir='/proc/forbidden/run' is not writable .*point paths.output_dir at a folder you can write"),
    ("unwritable-targets-dir", "paths.targets_dir=/proc/forbidden/targets",
     r"paths.targets_dir='/proc/forbidden/targets' is not writable .*point paths.targets_dir at"),
    ("missing-targets", "stages.collect=false paths.targets_dir={tmp}/none",
     r"no targets at .*none' \(manifest.json missing\); run the collect stage first"),
    ("targets-of-another-model", "llm.seed=7 stages.collect=false paths.targets_dir={targets}",
     r"targets at .* was made from another model .*re-run the stage that makes it for this model"),
    ("unknown-random-shape", "llm.name=random-shape:opt-14b", r"unknown model shape 'opt-14b'; choose from \["),
    ("unknown-llm-device", "llm.device=gpu", r"llm.device must be cpu, cuda, cuda:<index> or auto"),
    ("fsdp-on-cpu", "trainer=fsdp trainer.accelerator=cpu", r"trainer=fsdp needs GPUs .*set trainer.accelerator=gpu"),
    ("unknown-trainer-strategy", "trainer.strategy=deepspeed",
     r"trainer.strategy='deepspeed' is not supported; use trainer=ddp or trainer=fsdp"),
    ("unknown-wandb-mode", "logger=wandb logger.mode=sometimes",
     r"logger.mode must be online, offline or disabled, got 'sometimes'"),
    # issue 15: nothing silent, nothing half-written
    ("calib-n-windows-negative", "data.calib.n_windows=-1",
     r"data.calib.n_windows=-1 is not a number of windows; set data.calib.n_windows to a count >= 1 .*or to null"),
    ("eval-n-windows-zero", "data.eval.n_windows=0",
     r"data.eval.n_windows=0 is not a number of windows; set data.eval.n_windows to a count >= 1 .*or to null"),
    ("ffn-sparsity-not-a-number", "gating.ffn_sparsity=abc",
     r"gating.ffn_sparsity='abc' is not a number .*; set gating.ffn_sparsity to a number, e.g. "
     r"gating.ffn_sparsity=0.5"),
    ("eval-n-windows-not-a-number", "data.eval.n_windows=many",
     r"data.eval.n_windows='many' is not a whole number .*; set data.eval.n_windows to a whole number, e.g."),
    ("calib-seq-len-not-an-integer", "data.calib.seq_len=1.5", r"data.calib.seq_len=1.5 is not a whole number"),
    ("targets-shard-tokens-not-a-number", "targets.shard_tokens=lots",
     r"targets.shard_tokens='lots' is not a whole number .*; set targets.shard_tokens to a whole number"),
    ("targets-layer-inputs-not-a-bool", "targets.layer_inputs=maybe",
     r"targets.layer_inputs='maybe' is not true or false .*; set targets.layer_inputs to true or false"),
    ("fit-lr-not-a-number", "predictor.fit.lr=fast",
     r"predictor.fit.lr='fast' is not a number .*; set predictor.fit.lr to a number, e.g. predictor.fit.lr=0.5"),
    ("unknown-llm-option", "llm=gpt9",
     r"Could not find 'llm/gpt9'; choose one of hf, random, smollm2 \(llm=<option>\)"),
    ("eval-text-shorter-than-a-window", "data.eval.source.data_files={short}",
     r"data.eval.source \(.*short.txt\) holds 11 tokens, fewer than one window of data.eval.seq_len=64; lower "
     r"data.eval.seq_len \(to at most 11\) or point data.eval.source at more text"),
    ("unwritable-run-dir", "hydra.run.dir=/proc/forbidden/run",
     r"hydra.run.dir='/proc/forbidden/run' is not writable .*; point hydra.run.dir at a folder you can write"),
    ("predictor-of-another-model", "llm.seed=7 stages.collect=false stages.fit=false evaluate.methods=[predictor] "
     "paths.predictor_ckpt={ckpt} paths.targets_dir={tmp}/unused",
     r"checkpoint .* was made from another model .*re-run the stage that makes it for this model"),
]


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """Artifacts the cases point at: a smoke run's targets and predictor (random:llama, seed 0), a BERT folder, the
    configs of a model of an unregistered family (Phi-2) and of a mixture of experts with a shared expert (Qwen2-MoE),
    an empty data file."""
    from transformers import BertConfig, BertModel, PhiConfig, Qwen2MoeConfig
    tmp = tmp_path_factory.mktemp("made")
    run(compose("experiment=smoke", "stages.evaluate=false", "stages.report=false", f"paths.output_dir={tmp}/run",
                f"paths.targets_dir={tmp}/targets"))
    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=37))
    bert.save_pretrained(tmp / "bert")
    PhiConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2).save_pretrained(tmp / "phi")
    Qwen2MoeConfig(vocab_size=100, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                   shared_expert_intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                   num_key_value_heads=1, num_experts=4, num_experts_per_tok=2).save_pretrained(tmp / "qwen2_moe")
    (tmp / "empty.jsonl").write_text('{"text": ""}\n')
    (tmp / "short.txt").write_text("hello world")  # 11 tokens of the random models' byte tokenizer
    return {"targets": tmp / "targets", "ckpt": tmp / "run" / "predictor.ckpt", "bert": tmp / "bert",
            "phi": tmp / "phi", "qwen2_moe": tmp / "qwen2_moe",
            "empty": tmp / "empty.jsonl", "short": tmp / "short.txt"}


def python_train_py(*args):
    """`python train.py ARGS` in this process: the script run as __main__, as the interpreter would."""
    sys.argv = [str(ROOT / "train.py"), *args]
    runpy.run_path(str(ROOT / "train.py"), run_name="__main__")


def snapshot(folder):
    return sorted((p.relative_to(folder), p.stat().st_mtime_ns) for p in folder.rglob("*"))


@pytest.mark.parametrize("case,overrides,message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_exits_2_with_the_fix_and_no_artifact(tmp_path, made, monkeypatch, capsys, case, overrides,
                                                        message):
    args = overrides.format(tmp=tmp_path, **made).split()
    before = snapshot(made["targets"])
    monkeypatch.setattr(sys, "argv", list(sys.argv))  # restored after python_train_py replaces it
    with pytest.raises(SystemExit) as exit_:
        python_train_py("experiment=smoke", f"hydra.run.dir={tmp_path}/run", f"paths.cache_dir={tmp_path}/cache",
                        *args)
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err[-3000:]
    assert err.count("error: ") == 1 and "Traceback" not in err
    assert re.search(message, err), err[-3000:]
    assert not (tmp_path / "run" / "results.jsonl").exists() and not (tmp_path / "cache").exists()
    assert not list(tmp_path.glob("**/manifest.json")) and not list(tmp_path.glob("**/*.partial"))
    assert snapshot(made["targets"]) == before  # a refused run leaves the targets it read untouched


def test_unwritable_output_dir_as_a_real_process(tmp_path):
    """The process boundary: `python train.py` itself exits 2 with one line, no traceback."""
    proc = subprocess.run([sys.executable, "train.py", "experiment=smoke", "paths.output_dir=/proc/forbidden",
                           f"hydra.run.dir={tmp_path}/run", f"paths.cache_dir={tmp_path}/cache"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "error: paths.output_dir='/proc/forbidden' is not writable" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "cache").exists()


def refused(capsys, *args) -> str:
    """`python train.py ARGS` must exit 2 with exactly one error line and no traceback; returns that line."""
    with pytest.raises(SystemExit) as exit_:
        python_train_py(*args)
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err[-3000:]
    assert err.count("error: ") == 1 and "Traceback" not in err, err[-3000:]
    return next(line for line in err.splitlines() if line.startswith("error: "))


def results(run_dir) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "results.jsonl").read_text().splitlines()]


def test_a_sweep_with_one_bad_value_runs_no_job(tmp_path, monkeypatch, capsys):
    """Every job's composed config is validated before the first job runs: job 1's value refuses the whole sweep,
    and nothing is written (no sweep folder, no job folder, no cache); a value of the wrong type likewise."""
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    line = refused(capsys, "-m", "experiment=smoke", "gating.ffn_sparsity=0.3,1.5,0.7",
                   f"hydra.sweep.dir={tmp_path}/sweep", f"paths.cache_dir={tmp_path}/cache")
    assert re.search(r"sweep job 1 of 3 \(.*gating.ffn_sparsity=1.5\): sparsity must be in \[0, 1\).*"
                     r"set gating.ffn_sparsity.*no job of the sweep was run", line), line
    line = refused(capsys, "-m", "experiment=smoke", "gating.ffn_sparsity=0.3,abc",
                   f"hydra.sweep.dir={tmp_path}/sweep", f"paths.cache_dir={tmp_path}/cache")
    assert re.search(r"sweep job 1 of 2 .*gating.ffn_sparsity='abc' is not a number .*gating.ffn_sparsity=0.5", line)
    line = refused(capsys, "-m", "experiment=smoke", "gating.ffn_sparsity=0.3,0.5",
                   "hydra.sweep.dir=/proc/forbidden/sw")
    assert "hydra.sweep.dir='/proc/forbidden/sw' is not writable" in line and "point hydra.sweep.dir at" in line
    assert list(tmp_path.iterdir()) == []


def test_a_rerun_into_the_same_run_dir_replaces_its_results(tmp_path, monkeypatch, capsys):
    """The same hydra.run.dir twice: the second run's rows replace the first's (never both in one table); a refused
    rerun leaves the earlier results as they were. No .partial file stays behind."""
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    run_dir = tmp_path / "run"
    args = ["experiment=smoke", f"hydra.run.dir={run_dir}", f"paths.cache_dir={tmp_path}/cache", "stages.collect=false",
            "stages.fit=false", "evaluate.methods=[dense]"]
    python_train_py(*args)
    first = results(run_dir)
    assert [r["method"] for r in first] == ["dense"]
    python_train_py(*args)  # the same run again: its rows once, not twice
    assert results(run_dir) == first
    kept = (run_dir / "results.jsonl").read_bytes()
    refused(capsys, *args, "data.eval.n_windows=0")
    assert (run_dir / "results.jsonl").read_bytes() == kept
    assert not list(tmp_path.glob("**/*.partial"))


def test_the_evaluation_text_is_measured_before_the_model_loads(tmp_path, made, monkeypatch, capsys):
    """An evaluation text shorter than one window is refused before any model loads (or targets are collected)."""
    import shadowsparse.pipeline

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the evaluation text was checked")
    monkeypatch.setattr(shadowsparse.pipeline, "load_llm", no_model)
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    line = refused(capsys, "experiment=smoke", f"hydra.run.dir={tmp_path}/run", f"paths.cache_dir={tmp_path}/cache",
                   f"data.eval.source.data_files={made['short']}")
    assert "fewer than one window of data.eval.seq_len=64" in line
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run" / "results.jsonl").exists()


def test_a_read_only_cache_that_holds_the_targets_is_only_read(tmp_path, monkeypatch, capsys):
    """Matching targets in a read-only cache are used (only read); targets that would have to be written there are
    refused before the collection, naming the key and the fix."""
    import errno
    import tempfile
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    cache = tmp_path / "cache"
    common = ["experiment=smoke", f"paths.cache_dir={cache}", "stages.fit=false", "evaluate.methods=[static]",
              "gating.ffn_sparsity=0.5"]
    python_train_py(*common, f"hydra.run.dir={tmp_path}/collect", "stages.evaluate=false", "stages.report=false")
    assert len(list(cache.glob("targets/*/manifest.json"))) == 1
    before = snapshot(cache)
    mkdtemp = tempfile.mkdtemp

    def read_only_mount(*args, dir=None, **kwargs):  # chmod does not stop root: a read-only mount refuses writes
        if dir is not None and Path(dir).absolute().is_relative_to(cache):
            raise OSError(errno.EROFS, "Read-only file system")
        return mkdtemp(*args, dir=dir, **kwargs)
    monkeypatch.setattr(tempfile, "mkdtemp", read_only_mount)
    python_train_py(*common, f"hydra.run.dir={tmp_path}/run")
    assert [r["method"] for r in results(tmp_path / "run")] == ["static"]
    assert snapshot(cache) == before
    line = refused(capsys, *common, "llm.seed=7", f"hydra.run.dir={tmp_path}/other")  # another model's targets
    assert f"paths.cache_dir='{cache}' is not writable (Read-only file system); point paths.cache_dir at" in line
    assert snapshot(cache) == before and not (tmp_path / "other" / "results.jsonl").exists()
    assert not list(tmp_path.glob("**/*.partial"))


def test_a_smoke_run_logs_no_third_party_noise(tmp_path):
    """Each Lightning line once (not also through Lightning's own console handler), no Lightning advert, no torch
    _pytree deprecation warning, no tokenizer warning about sequences longer than the model (the text is cut into
    windows on purpose)."""
    proc = subprocess.run([sys.executable, "train.py", "experiment=smoke", "stages.evaluate=false",
                           "stages.report=false", "trainer.max_epochs=1", "trainer.enable_progress_bar=false",
                           f"hydra.run.dir={tmp_path}/run", f"paths.cache_dir={tmp_path}/cache"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert out.count("GPU available") == 1, out[-3000:]
    for noise in ("💡", "litlogger", "LeafSpec", "Token indices sequence length"):
        assert noise not in out, noise
