"""The bad-input table: each case goes through train.py's main() (the `python train.py ...` entry point, in this
process to keep the table fast; one case also as a real subprocess) and must exit 2 with a message that names the
problem and the fix, leaving no partial artifact: no results.jsonl, no collected or half-collected targets."""
import re
import runpy
import subprocess
import sys

import pytest
import torch

from shadowsparse.pipeline import run
from tests.conftest import ROOT, compose

# (id, overrides — {placeholders} filled from the `made` fixture —, regex: the problem ... the fix)
CASES = [
    ("unknown-model-path", "llm.name=./no/such/model", r"does not exist; give an existing folder or a hub id"),
    ("unknown-random-family", "llm.name=random:gpt9", r"no tiny config for family 'gpt9'; use random:llama"),
    ("non-causal-model", "llm.name={bert}",
     r"is an encoder-only 'bert' model .* not a decoder-only causal LM .*; give a causal LM"),
    ("ffn-sparsity-1", "gating.ffn_sparsity=1.0", r"sparsity must be in \[0, 1\).*set gating.ffn_sparsity"),
    ("ffn-sparsity-negative", "gating.ffn_sparsity=-0.1", r"got ffn=-0.1.*set gating.ffn_sparsity"),
    ("head-sparsity-1", "gating.ffn_sparsity=0.5 gating.head_sparsity=1.5", r"heads=1.5.*gating.head_sparsity"),
    ("n-not-below-m", "sparsity=wanda sparsity.pattern=4:2", r"needs 0 < N < M, got 4:2; e.g. 2:4"),
    ("lte-on-a-static-mask", "sparsity=wanda evaluate.methods=[dense,lte]",
     r"lte fine-tunes the decoder weights, which would refill a static sparsity mask; .*sparsity=none"),
    ("unknown-criterion", "targets.criterion=nope", r"criterion 'nope' is not registered; choose one of"),
    ("unknown-predictor-kind", "predictor.model.kind=transformer",
     r"unknown predictor.model.kind 'transformer'; choose one of \['per_layer', 'shared'\]"),
    ("unknown-loss", "predictor.fit.loss=hinge", r"predictor.fit.loss must be mse, listnet or bce, got 'hinge'"),
    ("unknown-budget", "gating.budget=everywhere", r"budget must be 'local', 'global' or 'hybrid'"),
    ("conflicting-budget-and-predictor", "predictor=per_layer gating.budget=global",
     r"per_layer predictor scores one layer at a time: use budget=local"),
    ("unknown-method", "evaluate.methods=[dense,magic]", r"unknown evaluation method\(s\) \['magic'\]; registered: dense"),
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
    ("predictor-of-another-model", "llm.seed=7 stages.collect=false stages.fit=false evaluate.methods=[predictor] "
     "paths.predictor_ckpt={ckpt} paths.targets_dir={tmp}/unused",
     r"checkpoint .* was made from another model .*re-run the stage that makes it for this model"),
]


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """Artifacts the cases point at: a smoke run's targets and predictor (random:llama, seed 0), a BERT folder, an
    empty data file."""
    from transformers import BertConfig, BertModel
    tmp = tmp_path_factory.mktemp("made")
    run(compose("experiment=smoke", "stages.evaluate=false", "stages.report=false", f"paths.output_dir={tmp}/run",
                f"paths.targets_dir={tmp}/targets"))
    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=37))
    bert.save_pretrained(tmp / "bert")
    (tmp / "empty.jsonl").write_text('{"text": ""}\n')
    return {"targets": tmp / "targets", "ckpt": tmp / "run" / "predictor.ckpt", "bert": tmp / "bert",
            "empty": tmp / "empty.jsonl"}


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
