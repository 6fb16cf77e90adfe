"""The whole pipeline on tiny random models, through the real composed config."""
import json
import subprocess
import sys

import pytest

from shadowsparse.pipeline import run
from tests.conftest import ROOT, compose

SCHEMA = {"method", "criterion", "ffn_sparsity", "head_sparsity", "nm", "granularity", "dataset", "metric", "value",
          "realized_ffn_sparsity", "realized_head_sparsity", "model", "n_tokens", "weight_bytes_skipped"}


def smoke(tmp_path, *overrides):
    return compose("experiment=smoke", f"paths.output_dir={tmp_path}/run", f"paths.cache_dir={tmp_path}/cache",
                   *overrides)


@pytest.mark.parametrize("family,criterion", [("llama", "plainact"), ("opt", "activation"), ("mistral", "plainact")])
def test_pipeline_end_to_end(tmp_path, family, criterion):
    cfg = smoke(tmp_path, f"llm.name=random:{family}", f"targets={criterion}")
    metrics = run(cfg)
    rows = [json.loads(line) for line in (tmp_path / "run" / "results.jsonl").read_text().splitlines()]
    # the default methods; the sketch selectors need SwiGLU (FFN levels: 3 rows each of sketch, sketch_threshold and
    # sketch_teal, 2 sketch_verify q=0.6 rows)
    sketch = {"sketch", "sketch_threshold", "sketch_teal", "sketch_verify"} if family != "opt" else set()
    assert {r["method"] for r in rows} == {"dense", "predictor", "oracle", "static"} | sketch
    assert len(rows) == 1 + 3 * 4 + (11 if sketch else 0)
    assert all(r["budget"] == ("local" if r["method"] != "dense" else None) for r in rows)
    for r in rows:
        assert SCHEMA <= set(r), SCHEMA - set(r)
        if r["method"] != "dense":
            assert r["criterion"] == (criterion if r["method"] not in sketch else None)  # training-free: none
            # thresholds (sketch_threshold) realize about the level on text other than their calibration's
            threshold = r["method"] in ("sketch_threshold", "sketch_teal")
            assert abs(r["realized_ffn_sparsity"] - r["ffn_sparsity"]) < (0.1 if threshold else 0.02)
    assert (tmp_path / "run" / "predictor" / "model.safetensors").exists()
    assert "val/recall_ffn" in metrics and metrics["predictor_params"] > 0
    # stages read only artifacts: evaluate alone reuses the targets and the checkpoint
    (tmp_path / "run" / "results.jsonl").unlink()
    run(smoke(tmp_path, f"llm.name=random:{family}", f"targets={criterion}", "stages.collect=false",
              "stages.fit=false", "evaluate.methods=[dense,predictor]"))
    again = [json.loads(line) for line in (tmp_path / "run" / "results.jsonl").read_text().splitlines()]
    assert [r["value"] for r in again] == [r["value"] for r in rows if r["method"] in ("dense", "predictor")]


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_per_layer_predictor_and_training_free_methods(tmp_path, family):
    run(smoke(tmp_path, f"llm.name=random:{family}", "predictor=per_layer", "predictor.model.rank=8",
              "predictor.model.lookahead=1", "evaluate.methods=[dense,predictor,threshold,gate,teal]",
              "evaluate.threshold_windows=2"))
    rows = [json.loads(line) for line in (tmp_path / "run" / "results.jsonl").read_text().splitlines()]
    methods = [r["method"] for r in rows]
    assert methods.count("per_layer") == 4 and methods.count("threshold") == 4
    assert methods.count("gate") == (3 if family == "llama" else 0)  # FFN-only levels, SwiGLU only
    assert methods.count("teal") == 3  # FFN-only levels
    for r in rows:
        if r["method"] == "teal":
            assert abs(r["realized_input_sparsity"]["realized_attn_in_sparsity"] - r["ffn_sparsity"]) < 0.25
            assert r["weight_bytes_skipped"] > 0
    for r in rows:
        if r["method"] == "per_layer":
            assert r["realized_ffn_sparsity"] == pytest.approx(r["ffn_sparsity"], abs=0.02)
            assert r["predictor_params"] > 0


def test_global_budget_pipeline_with_token_normalized_predictor(tmp_path):
    run(smoke(tmp_path, "gating.budget=hybrid", "gating.min_keep=0.2", "predictor.fit.normalize=token",
              "evaluate.methods=[predictor,oracle,static]"))
    rows = [json.loads(line) for line in (tmp_path / "run" / "results.jsonl").read_text().splitlines()]
    assert {r["budget"] for r in rows} == {"hybrid"} and len(rows) == 12
    for r in rows:
        assert r["realized_ffn_sparsity"] == pytest.approx(r["ffn_sparsity"], abs=0.01)


def test_lm_eval_tasks_on_the_gated_model(tmp_path):
    run(smoke(tmp_path, "evaluate.tasks=[copa,winogrande,arc_easy]", "evaluate.task_limit=3",
              "evaluate.methods=[dense,predictor,oracle,threshold]", "evaluate.threshold_windows=2",
              "gating.ffn_sparsity=0.5", "targets=activation"))
    rows = [json.loads(line) for line in (tmp_path / "run" / "results.jsonl").read_text().splitlines()]
    task_rows = [r for r in rows if r["dataset"] != "wikitext2"]
    # 4 methods x (copa acc, winogrande acc, arc_easy acc + acc_norm)
    assert len(task_rows) == 4 * 4
    for r in task_rows:
        assert r["metric"] in ("acc", "acc_norm") and 0 <= r["value"] <= 1 and r["n_examples"] == 3
        if r["method"] in ("predictor", "oracle"):  # counted inside lm-eval's own forward passes
            assert r["realized_ffn_sparsity"] == pytest.approx(0.5, abs=0.01)


def test_task_rows_for_selectors_with_hooks_of_their_own(tmp_path, monkeypatch):
    """teal and sketch_teal attach their own hooks: their task rows go through the same attachment as their
    perplexity row (a fresh count each), and the TEAL calibration is taken once for both."""
    from shadowsparse.teal import TealThresholds
    calls = []
    calibrate = TealThresholds.calibrate.__func__
    monkeypatch.setattr(TealThresholds, "calibrate",
                        classmethod(lambda cls, *a, **k: calls.append(1) or calibrate(cls, *a, **k)))
    run(smoke(tmp_path, "evaluate.tasks=[copa]", "evaluate.task_limit=4", "evaluate.methods=[teal,sketch_teal]",
              "evaluate.threshold_windows=2", "gating.ffn_sparsity=0.5"))
    rows = [json.loads(line) for line in (tmp_path / "run" / "results.jsonl").read_text().splitlines()]
    assert len(calls) == 1
    assert sorted((r["method"], r["dataset"]) for r in rows) == [
        ("sketch_teal", "copa"), ("sketch_teal", "wikitext2"), ("teal", "copa"), ("teal", "wikitext2")]
    for r in rows:
        assert SCHEMA <= set(r), SCHEMA - set(r)
        assert r["ffn_sparsity"] == 0.5 and r["criterion"] is None and r["weight_bytes_skipped"] > 0
        inputs = r["realized_input_sparsity"]
        assert 0.1 < inputs["realized_attn_in_sparsity"] < 0.9  # counted inside lm-eval's own passes too
        if r["dataset"] == "copa":
            assert r["metric"] == "acc" and r["n_examples"] == 4 and r["n_tokens"] is None
        if r["method"] == "sketch_teal":
            assert r["attn_sparsity"] == 0.3 and 0.2 < r["realized_ffn_sparsity"] < 0.8


def test_collect_on_task_data_with_answer_only_loss(tmp_path):
    from shadowsparse.targets import read_manifest
    run(smoke(tmp_path, "data.calib.task=copa", "data.calib.n_windows=6", "targets=plainact",
              "targets.granularity=sequence", "gating.granularity=sequence", "evaluate.methods=[predictor,static]"))
    manifest = read_manifest(next((tmp_path / "cache" / "targets").iterdir()))
    assert manifest["loss"] == "answer tokens" and manifest["n_rows"] == 6 and manifest["seq_len"] is None
    rows = [json.loads(line) for line in (tmp_path / "run" / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 8


def test_sequence_granularity_and_single_level_sweep_key(tmp_path):
    cfg = smoke(tmp_path, "targets.granularity=sequence", "gating.granularity=sequence", "gating.ffn_sparsity=0.5",
                "evaluate.methods=[predictor,oracle]")
    run(cfg)
    rows = [json.loads(line) for line in (tmp_path / "run" / "results.jsonl").read_text().splitlines()]
    assert [(r["method"], r["ffn_sparsity"], r["granularity"]) for r in rows] == [
        ("predictor", 0.5, "sequence"), ("oracle", 0.5, "sequence")]


# bad input (unknown names, out-of-range values, other models' artifacts, ...): tests/test_bad_input.py


def test_generate_cli_on_a_smoke_run(tmp_path):
    proc = subprocess.run([sys.executable, "train.py", "experiment=smoke", "evaluate.methods=[dense,predictor]",
                           f"hydra.run.dir={tmp_path}/run", f"paths.cache_dir={tmp_path}/cache"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    gen = subprocess.run([sys.executable, "-m", "shadowsparse.generate", f"run_dir={tmp_path}/run", "prompt=Hello",
                          "max_new_tokens=6", "ffn_sparsity=0.5"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert gen.returncode == 0, gen.stderr[-2000:]
    assert gen.stdout.startswith("Hello") and "FFN 0.500 (requested 0.500)" in gen.stdout


@pytest.mark.parametrize("experiment", ["smollm2", "smoke", "opt13b", "compare", "static_nm"])
def test_every_experiment_composes(experiment):
    cfg = compose(f"experiment={experiment}", "paths.output_dir=x")
    assert cfg.llm.name and cfg.targets.criterion and cfg.stages.evaluate


@pytest.mark.parametrize("group,option", [("llm", "hf"), ("llm", "random"), ("data", "hub"), ("targets", "activation"),
                                          ("trainer", "gpu"), ("logger", "csv"), ("logger", "wandb"),
                                          ("sparsity", "magnitude"), ("sparsity", "wanda"), ("sparsity", "sparsegpt"),
                                          ("sparsity", "esparse")])
def test_every_config_option_composes(group, option):
    cfg = compose(f"{group}={option}", "paths.output_dir=x")
    assert cfg[group] is not None


def test_wandb_offline_logger_runs_without_network(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    run(smoke(tmp_path, "logger=wandb", "evaluate.methods=[dense]"))
    assert list((tmp_path / "run").rglob("*.wandb"))


def test_multirun_sweep_reuses_one_collection(tmp_path):
    proc = subprocess.run([sys.executable, "train.py", "-m", "experiment=smoke", "predictor=shared,per_layer",
                           "gating.ffn_sparsity=0.3,0.6", "evaluate.methods=[predictor]",
                           f"hydra.sweep.dir={tmp_path}/sweep", f"paths.cache_dir={tmp_path}/cache"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(list((tmp_path / "cache" / "targets").iterdir())) == 1  # four jobs, one collection
    rows = [json.loads(x) for f in sorted((tmp_path / "sweep").glob("*/results.jsonl"))
            for x in f.read_text().splitlines()]
    assert sorted((r["method"], r["ffn_sparsity"]) for r in rows) == [
        ("per_layer", 0.3), ("per_layer", 0.6), ("predictor", 0.3), ("predictor", 0.6)]
