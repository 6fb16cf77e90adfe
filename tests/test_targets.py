
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
    assert not list(tmp_path.glob("*.tmp-*"))  # nothing half-written left behind


def test_sequence_granularity_one_row_per_window(tmp_path, windows):
    model = tiny_model("opt")
    out = collect(model, windows, TargetsConfig(criterion="plainact", granularity="sequence"), tmp_path / "t")
    _, t = load_targets(out, model)
    assert t["features"].shape[0] == 5 and t["neurons"].shape == (5, 4, 128)


def test_targets_of_another_model_are_refused(tmp_path, windows):
    out = collect(tiny_model("llama", seed=0), windows, TargetsConfig(criterion="activation"), tmp_path / "t")
    with pytest.raises(ConfigError, match="another model"):
        load_targets(out, tiny_model("llama", seed=1))


def test_corrupt_shard_is_refused(tmp_path, windows):
    model = tiny_model("llama")
    out = collect(model, windows, TargetsConfig(criterion="activation"), tmp_path / "t")
    shard = out / read_manifest(out)["shards"][0]["file"]
    shard.write_bytes(shard.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(ConfigError, match="sha256"):
        load_targets(out, model)


def test_failed_collection_leaves_nothing(tmp_path, windows, monkeypatch):
    model = tiny_model("llama")
    import shadowsparse.targets as targets

    def boom(*a, **k):
        raise RuntimeError("interrupted")
    monkeypatch.setattr(targets, "save_file", boom)
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
