"""kill -9 in the middle of `python train.py` collecting targets, rerun the same command: it resumes after the last
complete shard and the targets are byte-identical to an uninterrupted run."""
import json
import os
import signal
import subprocess
import sys
import time

from shadowsparse.pipeline import run
from shadowsparse.targets import MANIFEST, PROGRESS, work_dir_for
from tests.conftest import ROOT, compose
from tests.test_targets import shard_digests

COLLECT_ONLY = ["experiment=smoke", "stages.fit=false", "stages.evaluate=false", "stages.report=false",
                "data.calib.n_windows=12", "targets.shard_tokens=128"]  # 12 windows of 64 tokens: 6 shards

# The real entry point, with each scored batch slowed down so the kill lands mid-collection on any machine.
# The delay changes no number: the scores are computed by the unmodified function.
SLOW_TRAIN = """
import sys, time
sys.path.insert(0, {root!r})
import shadowsparse.targets.score as score
real = score.score_window
def slow(*a, **k):
    time.sleep(0.4)
    return real(*a, **k)
score.score_window = slow
sys.argv = [{train!r}, *{args!r}]
import runpy
runpy.run_path({train!r}, run_name="__main__")
"""


def train_cmd(args, slow=False):
    if slow:
        return [sys.executable, "-c", SLOW_TRAIN.format(root=str(ROOT), train=str(ROOT / "train.py"), args=args)]
    return [sys.executable, "train.py", *args]


def test_kill_9_mid_collection_then_rerun_resumes_to_identical_targets(tmp_path):
    targets, work = tmp_path / "targets", work_dir_for(tmp_path / "targets")
    args = [*COLLECT_ONLY, f"paths.targets_dir={targets}", f"hydra.run.dir={tmp_path}/run"]
    proc = subprocess.Popen(train_cmd(args, slow=True), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    done: list = []
    deadline = time.time() + 240
    while len(done) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
        try:
            done = json.loads((work / PROGRESS).read_text())["shards"]
        except (FileNotFoundError, ValueError, KeyError):  # not written yet
            pass
    assert proc.poll() is None, f"collection ended before the kill:\n{proc.stderr.read()[-3000:]}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert not targets.exists()  # a killed run publishes nothing
    done = json.loads((work / PROGRESS).read_text())["shards"]
    assert 2 <= len(done) < 6
    kept = {s["file"]: (work / s["file"]).stat().st_ino for s in done}

    again = subprocess.run(train_cmd(args), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming {targets} after {len(done)} complete shards" in again.stdout + again.stderr
    assert not work.exists() and not (targets / PROGRESS).exists()
    manifest = json.loads((targets / MANIFEST).read_text())
    assert manifest["resumed_at_window"] == done[-1]["windows"][1]
    assert {f: (targets / f).stat().st_ino for f in kept} == kept  # the shards from before the kill were kept

    # the same configuration, uninterrupted, in this process
    run(compose(*COLLECT_ONLY, f"paths.targets_dir={tmp_path}/fresh", f"paths.output_dir={tmp_path}/fresh-run"))
    resumed, fresh = shard_digests(targets), shard_digests(tmp_path / "fresh")
    assert len(resumed[0]) == 6 and resumed == fresh
    assert all((targets / s["file"]).read_bytes() == (tmp_path / "fresh" / s["file"]).read_bytes()
               for s in resumed[0])
