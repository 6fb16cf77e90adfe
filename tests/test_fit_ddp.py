"""Predictor training with Lightning DDP by config: `python train.py ... trainer=ddp` on CPU (2 processes, gloo).
Lightning re-runs the command for rank 1; that process trains only (no LLM, no evaluation). FSDP needs GPUs and is
refused on CPU before any work."""
import os
import subprocess
import sys

import pytest

from shadowsparse.errors import ConfigError
from shadowsparse.pipeline import validate
from tests.conftest import ROOT, compose


def test_ddp_fit_two_cpu_processes_writes_a_loadable_checkpoint(tmp_path):
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    for k in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    proc = subprocess.run(
        [sys.executable, "train.py", "experiment=smoke", "trainer=ddp", "trainer.accelerator=cpu",
         "trainer.precision=32-true", "trainer.max_epochs=1", "stages.evaluate=false", f"hydra.run.dir={run_dir}",
         f"paths.output_dir={run_dir}", f"paths.cache_dir={cache}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "MEMBER: 2/2" in out  # two processes joined the process group
    rank1 = (run_dir / "train_ddp_process_1.log").read_text()
    assert "targets:" not in rank1, "the launched rank loaded the LLM or touched the targets cache"
    from shadowsparse.llm import LLMConfig, load_llm
    from shadowsparse.system import load_predictor
    model, _ = load_llm(LLMConfig(name="random:llama", seed=0))
    pred = load_predictor(str(run_dir / "predictor"), model)  # checks the model fingerprint too
    assert pred.n_params() > 0 and pred.targets_info["criterion"] == "activation"
    assert not (run_dir / "results.jsonl").exists()


def test_fsdp_on_cpu_and_unsupported_strategies_are_refused_before_any_work(tmp_path):
    paths = (f"paths.output_dir={tmp_path}/run", f"paths.cache_dir={tmp_path}/cache")
    validate(compose("experiment=smoke", "trainer=fsdp", *paths))  # GPUs: fine to plan on a CPU host
    with pytest.raises(ConfigError, match="trainer=fsdp needs GPUs.*trainer=ddp trainer.accelerator=cpu"):
        validate(compose("experiment=smoke", "trainer=fsdp", "trainer.accelerator=cpu", *paths))
    with pytest.raises(ConfigError, match="ddp_spawn would pickle"):
        validate(compose("experiment=smoke", "trainer.strategy=ddp_spawn", *paths))
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()
