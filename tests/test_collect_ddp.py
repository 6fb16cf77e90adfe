"""Data-parallel collection through Lightning DDP on CPU (gloo, 2 processes), from `python train.py` as a user runs
it: a multi-rank run killed with SIGKILL (the whole process group), rerun with the same command, resumes each rank
after its last complete shard and publishes the same targets, bit for bit, as one process; rank 0 then goes on
through fit and evaluate while rank 1 leaves."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from shadowsparse.pipeline import run
from shadowsparse.targets import MANIFEST, load_targets, read_manifest, work_dir_for
from tests.conftest import ROOT, compose

# 7 windows of 64 tokens in batches of 2: 4 batches, rank 0 gets windows [0, 4), rank 1 [4, 7) (a short last batch).
# plainact: a gradient criterion, so the Lightning predict loop must leave autograd on. One shard per batch.
ARGS = ["experiment=smoke", "targets=plainact", "targets.batch_size=2", "data.calib.n_windows=7",
        "targets.shard_tokens=96", "threads=1"]
DDP = ["targets.devices=2", "targets.accelerator=cpu", "trainer.max_epochs=1", "evaluate.methods=[dense,predictor]"]

# rank 0 slowed down (2 s per scored batch) so the kill lands after its first shard; the delay changes no number.
# Lightning re-runs train.py itself for rank 1, so rank 1 runs at full speed and finishes its block first.
SLOW_TRAIN = """
import sys, time, runpy
sys.path.insert(0, {root!r})
import shadowsparse.targets.score as score
real = score.score_window
def slow(*a, **k):
    time.sleep(2.0)
    return real(*a, **k)
score.score_window = slow
sys.argv = [{train!r}, *{args!r}]
runpy.run_path({train!r}, run_name="__main__")
"""


def records(work):
    out = {}
    for r in (0, 1):
        try:
            out[r] = json.loads((work / f"progress-r{r}.json").read_text())["shards"]
        except (FileNotFoundError, ValueError, KeyError):
            out[r] = []
    return out


@pytest.fixture(scope="module")
def killed_then_resumed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    targets, work = tmp / "t", work_dir_for(tmp / "t")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [*ARGS, *DDP, f"paths.targets_dir={targets}"]
    slow = [sys.executable, "-c", SLOW_TRAIN.format(root=str(ROOT), train=str(ROOT / "train.py"),
                                                    args=[*args, f"hydra.run.dir={tmp}/run-killed"])]
    proc = subprocess.Popen(slow, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group: the kill takes Lightning's rank 1 too
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None and len(records(work)[0]) < 1:
        time.sleep(0.05)
    alive = proc.poll() is None
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    err = proc.stderr.read()
    proc.stderr.close()
    assert alive, f"the collection ended before the kill:\n{err[-3000:]}"
    at_kill = records(work)
    inodes = {s["file"]: (work / s["file"]).stat().st_ino for r in at_kill.values() for s in r}
    resumed = subprocess.run([sys.executable, "train.py", *args, f"hydra.run.dir={tmp}/run"], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    return tmp, at_kill, inodes, resumed


def test_two_ranks_give_the_targets_of_one_process_bit_for_bit(killed_then_resumed, tmp_path):
    tmp, _, _, _ = killed_then_resumed
    run(compose(*ARGS, "stages.fit=false", "stages.evaluate=false", "stages.report=false",
                f"paths.targets_dir={tmp_path}/ref", f"paths.output_dir={tmp_path}/ref-run"))
    ref_m, ref = load_targets(tmp_path / "ref")
    m, got = load_targets(tmp / "t")
    assert set(got) == set(ref) == {"features", "heads", "neurons", "layer_inputs"}
    for key in ref:
        assert got[key].dtype == ref[key].dtype and torch.equal(got[key], ref[key]), key
    for key in ("n_rows", "n_tokens", "n_windows", "seq_len", "criterion", "model", "config", "score_dtype"):
        assert m[key] == ref_m[key], key
    assert m["n_rows"] == 7 * 64 and m["world_size"] == 2
    # one manifest, shards in global window order, each rank's own files
    assert [s["windows"] for s in m["shards"]] == [[0, 2], [2, 4], [4, 6], [6, 7]]
    assert [(s["file"], s["rank"]) for s in m["shards"]] == [
        ("shard-r0-00000.safetensors", 0), ("shard-r0-00001.safetensors", 0),
        ("shard-r1-00000.safetensors", 1), ("shard-r1-00001.safetensors", 1)]
    assert [r["windows"] for r in m["ranks"]] == [[0, 4], [4, 7]]
    assert sorted(f.name for f in (tmp / "t").iterdir()) == sorted([MANIFEST] + [s["file"] for s in m["shards"]])
    assert not work_dir_for(tmp / "t").exists()


def test_a_killed_multi_rank_run_resumes_each_rank_after_its_last_shard(killed_then_resumed):
    tmp, at_kill, inodes, resumed = killed_then_resumed
    assert len(at_kill[0]) == 1 and len(at_kill[1]) == 2  # rank 0 (slowed) was mid-block, rank 1 done
    assert not (tmp / "t").exists() or (tmp / "t" / MANIFEST).exists()
    log = resumed.stdout + resumed.stderr
    assert "rank 0 resumes after 1 complete shards (window 2 of [0, 4))" in log
    assert "rank 1 resumes after 2 complete shards (window 7 of [4, 7))" in log
    m = read_manifest(tmp / "t")
    assert m["resumed_at_window"] == [2, 7]
    assert {f: (tmp / "t" / f).stat().st_ino for f in inodes} == inodes  # kept shards were not rewritten


def test_rank_0_alone_runs_the_later_stages(killed_then_resumed):
    tmp, _, _, _ = killed_then_resumed
    metrics = json.loads((tmp / "run" / "metrics.json").read_text())
    assert 0 <= metrics["val/recall_ffn"] <= 1 and "predictor/ppl@ffn0.50_heads0.00" in metrics
    rows = [json.loads(line) for line in (tmp / "run" / "results.jsonl").read_text().splitlines()]
    assert sorted({r["method"] for r in rows}) == ["dense", "predictor"]
    assert len([r for r in rows if r["method"] == "dense"]) == 1  # evaluated once, not once per rank
    child = (tmp / "run" / "train_ddp_process_1.log").read_text()
    assert "rank 1 done; leaving" in child and "predictor:" not in child


@pytest.mark.parametrize("n,step,world", [(7, 2, 2), (12, 1, 3), (5, 4, 4), (1, 1, 2), (64, 8, 3)])
def test_rank_blocks_are_contiguous_whole_batches_covering_every_window(n, step, world):
    from shadowsparse.targets.collect_dp import rank_block
    blocks = [rank_block(n, step, r, world) for r in range(world)]
    assert blocks[0][0] == 0 and blocks[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:]))  # contiguous, in rank order
    assert all(lo % step == 0 for lo, _ in blocks)  # each starts on a 1-process batch boundary
    sizes = [hi - lo for lo, hi in blocks]
    assert max(sizes) - min(sizes) <= step  # balanced to a batch


@pytest.mark.parametrize("keys,device,match", [
    (dict(devices=2), "auto", "llm.device=auto splits one model"),
    (dict(devices=2, accelerator="cpu"), "cuda", "targets.accelerator=cpu runs every rank's model on the CPU"),
    (dict(devices=2, accelerator="gpu"), "cuda", "GPUs per node requested"),
])
def test_bad_ddp_collection_configs_are_refused_before_loading(keys, device, match):
    from shadowsparse.targets.collect_dp import validate_collect
    from shadowsparse.errors import ConfigError
    from shadowsparse.targets import TargetsConfig
    if "GPUs" in match and torch.cuda.device_count() >= 2:
        pytest.skip("this machine has the GPUs")
    with pytest.raises(ConfigError, match=match):
        validate_collect(TargetsConfig(**keys), device)
    validate_collect(TargetsConfig(devices=1), device)  # one process: any device


def test_a_ddp_collection_inside_a_hydra_sweep_is_refused(tmp_path):
    """Lightning re-runs the command line per rank: under -m each rank would start the whole sweep."""
    proc = subprocess.run([sys.executable, "train.py", "-m", "experiment=smoke", "targets.devices=2", "seed=0,1",
                           f"paths.targets_dir={tmp_path}/t", f"hydra.sweep.dir={tmp_path}/sweep"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2 and "collect once without -m first" in proc.stderr
    assert not (tmp_path / "t").exists() and not work_dir_for(tmp_path / "t").exists()
