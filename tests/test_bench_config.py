"""benchmark.py's configuration: a Hydra app over conf/benchmark.yaml whose bench node is typed by a schema
(benchmark.BenchConfig in Hydra's ConfigStore). Composed here with Hydra's compose API, as `python benchmark.py`
would compose it, on the CPU and without building a model; the command line itself runs in subprocesses."""
import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, MissingConfigException

import benchmark  # registers the schema (benchmark_schema) in Hydra's ConfigStore
from shadowsparse.errors import ConfigError
from tests.conftest import ROOT

EXPERIMENTS = sorted(p.stem for p in (ROOT / "conf" / "bench").glob("*.yaml"))


def bench_config(*overrides: str):
    """The bench node of conf/benchmark.yaml composed with command-line style overrides."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="benchmark", overrides=list(overrides)).bench


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "benchmark.py", *args], cwd=ROOT, capture_output=True, text=True)


def test_default_config_and_experiments_extend_it():
    default = bench_config()
    assert list(default.batches) == [1, 8] and default.gen == 64 and default.out is None
    benchmark.check(default)
    smoke = bench_config("bench=smoke")
    assert list(smoke.models) == ["tiny-llama", "tiny-opt"] and smoke.gen == 8 and smoke.prompt == 16
    assert list(smoke.methods) == list(default.methods)  # keys an experiment leaves out come from default.yaml
    for name in EXPERIMENTS:  # every file of conf/bench/ composes against the schema and passes the range checks
        benchmark.check(bench_config(f"bench={name}"))


@pytest.mark.parametrize("override", ["bench.batches=abc", "bench.gen=abc", "bench.prompt=1.5",
                                      "bench.prefill_steps=[x,8]", "bench.methods=dense"])
def test_wrong_type_is_refused_when_composed(override):
    """The schema refuses a value of the wrong type while the config is composed: before main() runs."""
    with pytest.raises(ConfigCompositionException, match="Error merging override"):
        bench_config(override)


def test_unknown_key_and_experiment_are_refused():
    with pytest.raises(ConfigCompositionException, match="Could not override 'bench.gen_len'"):
        bench_config("bench.gen_len=8")
    with pytest.raises(MissingConfigException, match="Could not find 'bench/nope'"):
        bench_config("bench=nope")


@pytest.mark.parametrize("override,message", [("bench.batches=[1,9]", "batches must be in 1..8"),
                                              ("bench.prefill_steps=[0,8]", "prefill_steps must be integers in 1..64"),
                                              ("bench.gen=1", "gen must be >= 2"),
                                              ("bench.methods=[dense,nope]", r"unknown methods \['nope'\]")])
def test_values_out_of_range_are_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        benchmark.check(bench_config(override))


def test_command_line():
    """--help exits 0 and lists the experiments; bad input is named and exits non-zero before any model is built
    (a wrong type, an unknown experiment, a value out of range, and, on a machine without CUDA, the GPU itself)."""
    helped = _run("--help")
    assert helped.returncode == 0, helped.stderr
    assert "bench=opt13b" in helped.stdout and "prefill_steps" in helped.stdout
    listed = helped.stdout.split("Experiments (bench=<name>): ", 1)[1].splitlines()[0]
    assert listed.split(", ") == EXPERIMENTS  # the help names every file of conf/bench/
    bad = _run("bench.batches=abc")
    assert bad.returncode != 0 and "bench.batches=abc" in bad.stderr
    bad = _run("bench=nope")
    assert bad.returncode != 0 and "Could not find 'bench/nope'" in bad.stderr
    bad = _run("bench.prefill_steps=[0,8]")
    assert bad.returncode != 0 and "prefill_steps must be integers in 1..64" in bad.stderr
    if not torch.cuda.is_available():
        cpu = _run("bench=smoke")
        assert cpu.returncode != 0 and "needs a CUDA GPU" in cpu.stderr
