
import json

import pytest
import torch

from shadowsparse.errors import ConfigError
from shadowsparse.targets import TargetsConfig, collect, load_targets, read_manifest
from tests.conftest import tiny_model


@pytest.fixture
def windows():
    return torch.randint(0, 256, (5, 16), generator=torch.Generator().manual_seed(1))


def test_collect_writes_shards_and_manifest(tmp_path, windows):
    model = tiny_model("llama")
    out = collect(model, windows, TargetsConfig(criterion="activation", shard_tokens=32), tmp_path / "t")
    m = read_manifest(out)
    assert m["n_rows"] == 80 and m["n_tokens"] == 80 and m["criterion"] == "activation"
    assert len(m["shards"]) == 3 and all(len(s["sha256"]) == 64 for s in m["shards"])
    _, t = load_targets(out, model)
    assert t["features"].shape == (80, 64) and t["heads"].shape == (80, 4, 4) and t["neurons"].shape == (80, 4, 96)
    assert [f.name for f in tmp_path.iterdir()] == ["t"]  # no work folder or temp file left behind
    assert sorted(f.name for f in out.iterdir()) == ["manifest.json"] + [s["file"] for s in m["shards"]]


def test_sequence_granularity_one_row_per_window(tmp_path, windows):
    model = tiny_model("opt")
    out = collect(model, windows, TargetsConfig(criterion="plainact", granularity="sequence"), tmp_path / "t")
    _, t = load_targets(out, model)
    assert t["features"].shape[0] == 5 and t["neurons"].shape == (5, 4, 128)


def test_targets_of_another_model_are_refused(tmp_path, windows):
    out = collect(tiny_model("llama", seed=0), windows, TargetsConfig(criterion="activation"), tmp_path / "t")
    with pytest.raises(ConfigError, match="another model"):
        load_targets(out, tiny_model("llama", seed=1))


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_damaged_shard_is_refused_by_name(tmp_path, windows, damage):
    model = tiny_model("llama")
    out = collect(model, windows, TargetsConfig(criterion="activation", shard_tokens=32), tmp_path / "t")
    name = read_manifest(out)["shards"][1]["file"]
    shard = out / name
    data = shard.read_bytes()
    if damage == "flip":  # same size, one byte of tensor data changed: only the sha256 can tell
        shard.write_bytes(data[:-9] + bytes([data[-9] ^ 0xFF]) + data[-8:])
    elif damage == "truncate":
        shard.write_bytes(data[: len(data) // 2])
    else:
        shard.unlink()
    reason = {"flip": "corrupted", "truncate": "truncated", "delete": "missing"}[damage]
    with pytest.raises(ConfigError, match=rf"{name}' is {reason}.*re-collect with targets_overwrite=true"):
        load_targets(out, model)


def test_failed_collection_leaves_nothing(tmp_path, windows, monkeypatch):
    model = tiny_model("llama")
    import shadowsparse.targets.store as store

    def boom(*a, **k):
        raise RuntimeError("interrupted")
    monkeypatch.setattr(store, "save_file", boom)
    with pytest.raises(RuntimeError):
        collect(model, windows, TargetsConfig(criterion="activation", shard_tokens=16), tmp_path / "t")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("bad", [dict(criterion="nope"), dict(granularity="batch"), dict(feature_layer=3)])
def test_bad_targets_config(tmp_path, windows, bad):
    with pytest.raises(ConfigError):
        collect(tiny_model("llama"), windows, TargetsConfig(**{"criterion": "activation", **bad}), tmp_path / "t")
    assert not (tmp_path / "t").exists()


def test_missing_targets_folder(tmp_path):
    with pytest.raises(ConfigError, match="run the collect stage"):
        read_manifest(tmp_path / "none")


def shard_digests(out):
    """(manifest shard list, sha256 of each file as found on disk)."""
    from shadowsparse.targets import file_sha256
    shards = read_manifest(out)["shards"]
    return shards, [file_sha256(out / s["file"]) for s in shards]


def interrupt_after(monkeypatch, n_batches):
    """Make score_window raise on its (n_batches + 1)-th call, as a Ctrl-C in the middle of a collection would."""
    import shadowsparse.targets.score as score  # score_rows looks score_window up here
    real, calls = score.score_window, []

    def scorer(*a, **k):
        calls.append(1)
        if len(calls) > n_batches:
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(score, "score_window", scorer)


@pytest.mark.parametrize("batch_size,shard_tokens", [(1, 32), (2, 40)])
def test_interrupted_collection_resumes_byte_identical(tmp_path, monkeypatch, batch_size, shard_tokens):
    from shadowsparse.targets import PROGRESS, work_dir_for
    model = tiny_model("llama")
    wins = torch.randint(0, 256, (9, 16), generator=torch.Generator().manual_seed(2))
    cfg = TargetsConfig(criterion="activation", shard_tokens=shard_tokens, batch_size=batch_size)
    reference = collect(model, wins, cfg, tmp_path / "ref")
    out, work = tmp_path / "t", work_dir_for(tmp_path / "t")
    with monkeypatch.context() as mp:
        interrupt_after(mp, 4 if batch_size == 2 else 5)
        with pytest.raises(KeyboardInterrupt):
            collect(model, wins, cfg, out)
    done = json.loads((work / PROGRESS).read_text())["shards"]
    assert not out.exists() and len(done) == 2 and done[0]["windows"][0] == 0
    assert done[0]["windows"][1] == done[1]["windows"][0]  # contiguous: the resume point is the last end
    (work / "shard-00002.safetensors.tmp").write_bytes(b"half a shard")  # a kill inside a shard write
    first_inode = (work / done[0]["file"]).stat().st_ino
    out = collect(model, wins, cfg, out)
    m = read_manifest(out)
    assert m["resumed_at_window"] == done[1]["windows"][1] and not work.exists()
    assert (out / done[0]["file"]).stat().st_ino == first_inode  # kept, not recomputed
    assert sorted(f.name for f in out.iterdir()) == ["manifest.json"] + [s["file"] for s in m["shards"]]
    assert shard_digests(out) == shard_digests(reference)
    assert [(out / s["file"]).read_bytes() == (reference / s["file"]).read_bytes() for s in m["shards"]] == \
        [True] * len(m["shards"])


def test_resume_recomputes_from_a_damaged_recorded_shard(tmp_path, monkeypatch, windows):
    from shadowsparse.targets import PROGRESS, work_dir_for
    model = tiny_model("opt")
    cfg = TargetsConfig(criterion="plainact", shard_tokens=16)
    reference = collect(model, windows, cfg, tmp_path / "ref")
    with monkeypatch.context() as mp:
        interrupt_after(mp, 4)
        with pytest.raises(KeyboardInterrupt):
            collect(model, windows, cfg, tmp_path / "t")
    work = work_dir_for(tmp_path / "t")
    second = json.loads((work / PROGRESS).read_text())["shards"][1]["file"]
    (work / second).write_bytes((work / second).read_bytes()[:100])
    out = collect(model, windows, cfg, tmp_path / "t")
    assert read_manifest(out)["resumed_at_window"] == 1  # after shard 0, the last good one
    assert shard_digests(out) == shard_digests(reference)


@pytest.mark.parametrize("change", ["criterion", "seed", "data", "model"])
def test_resume_refuses_a_work_folder_of_another_configuration(tmp_path, monkeypatch, windows, change):
    from shadowsparse.targets import work_dir_for
    model, cfg = tiny_model("llama"), TargetsConfig(criterion="activation", shard_tokens=16)
    with monkeypatch.context() as mp:
        interrupt_after(mp, 3)
        with pytest.raises(KeyboardInterrupt):
            collect(model, windows, cfg, tmp_path / "t")
    work = work_dir_for(tmp_path / "t")
    before = sorted((f.name, f.read_bytes()) for f in work.iterdir())
    other = dict(model=model, windows=windows, cfg=cfg, seed=0)
    other.update({"criterion": {"cfg": TargetsConfig(criterion="plainact", shard_tokens=16)}, "seed": {"seed": 1},
                  "data": {"windows": windows.flip(0)}, "model": {"model": tiny_model("llama", seed=1)}}[change])
    args = (other["model"], other["windows"], other["cfg"], tmp_path / "t")
    with pytest.raises(ConfigError, match=rf"another configuration \(differs in \[.*targets_overwrite=true"):
        collect(*args, seed=other["seed"])
    assert sorted((f.name, f.read_bytes()) for f in work.iterdir()) == before  # untouched by the refusal
    assert not (tmp_path / "t").exists()
    out = collect(*args, seed=other["seed"], overwrite=True)
    fresh = collect(*args[:3], tmp_path / "fresh", seed=other["seed"])
    assert shard_digests(out) == shard_digests(fresh) and not work.exists()


def test_same_seed_gives_bit_identical_targets(tmp_path):
    """The whole collect stage twice from scratch (model built from the seed, data read, scores taken): every
    shard's sha256 equal; another seed (another random model) differs, so the comparison can fail."""
    from shadowsparse.pipeline import run
    from tests.conftest import compose

    def collect_with(seed, name, criterion="activation"):
        run(compose("experiment=smoke", f"seed={seed}", f"targets.criterion={criterion}", "stages.fit=false",
                    "stages.evaluate=false", "stages.report=false", "targets.shard_tokens=128",
                    f"paths.output_dir={tmp_path}/{name}-run", f"paths.targets_dir={tmp_path}/{name}"))
        return shard_digests(tmp_path / name)

    a = collect_with(3, "a")
    assert len(a[0]) == 4 and collect_with(3, "b") == a
    assert collect_with(4, "c")[1] != a[1]
    grasp = collect_with(3, "g1", "grasp")  # double backward: the criterion most exposed to nondeterminism
    assert collect_with(3, "g2", "grasp") == grasp


def test_a_work_folder_in_use_is_refused(tmp_path, windows):
    """Two runs filling one work folder would interleave shards: the second is refused while the first holds it."""
    import fcntl
    import os
    from shadowsparse.targets import work_dir_for
    work = work_dir_for(tmp_path / "t")
    work.mkdir()
    fd = os.open(work, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # as a live collection does
        with pytest.raises(ConfigError, match="another process is collecting into .*own paths.targets_dir"):
            collect(tiny_model("llama"), windows, TargetsConfig(criterion="activation"), tmp_path / "t")
    finally:
        os.close(fd)
    assert read_manifest(collect(tiny_model("llama"), windows, TargetsConfig(criterion="activation"),
                                 tmp_path / "t"))["n_rows"] == 80  # the lock dies with its holder
