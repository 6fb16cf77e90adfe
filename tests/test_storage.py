"""Targets storage: the plan logged before a collection, the free-disk refusal, score dtypes, top-k neuron targets
and layer inputs left out."""
import json
import shutil
from collections import namedtuple

import pytest
import torch
from safetensors import safe_open

import shadowsparse.targets as T
import shadowsparse.targets.score as S
from shadowsparse.errors import ConfigError
from shadowsparse.gating import n_keep
from shadowsparse.system import normalize_scores, spearman, topk_recall
from shadowsparse.targets import TargetsConfig, collect, load_targets, read_manifest, storage_plan
from tests.conftest import tiny_model

Dims = namedtuple("Dims", "n_layers n_heads ffn hidden")
OPT13B = Dims(n_layers=40, n_heads=40, ffn=20480, hidden=5120)


@pytest.fixture
def windows():
    return torch.randint(0, 256, (6, 16), generator=torch.Generator().manual_seed(3))


def test_storage_plan_of_opt13b_shapes():
    dense = storage_plan(TargetsConfig(), OPT13B, n_rows=1000)
    assert dense["bytes_per_row"] == {"features": 5120 * 4, "heads": 40 * 40 * 2, "neurons": 40 * 20480 * 2,
                                      "layer_inputs": 40 * 5120 * 2}
    assert dense["total_bytes"] == 1000 * (20480 + 3200 + 1638400 + 409600)
    top = storage_plan(TargetsConfig(neuron_topk=0.1, layer_inputs=False, score_dtype="float32"), OPT13B, 10)
    # k = 2048 of 20480 per (token, layer); indices fit int16 (20480 < 32768), values in float32
    assert top["neuron_topk"] == 2048
    assert top["bytes_per_row"] == {"features": 20480, "heads": 40 * 40 * 4, "neuron_idx": 40 * 2048 * 2,
                                    "neuron_val": 40 * 2048 * 4}
    assert T.index_dtype(40000) == torch.int32 and T.index_dtype(32767) == torch.int16


def fake_disk(monkeypatch, free: int):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(free * 2, free, free))


def test_a_disk_too_small_is_refused_before_any_forward_pass(tmp_path, monkeypatch, windows):
    model = tiny_model("llama")
    need = storage_plan(TargetsConfig(), model_dims(model), windows.numel())["total_bytes"]
    fake_disk(monkeypatch, need // 3)

    def no_forward(*a, **k):
        raise AssertionError("scored a window after the disk check should have refused")
    monkeypatch.setattr(S, "score_window", no_forward)
    with pytest.raises(ConfigError) as err:
        collect(model, windows, TargetsConfig(criterion="activation"), tmp_path / "t")
    msg = str(err.value)
    assert "free; collect with fewer windows (data.calib.n_windows=" in msg
    assert "targets.neuron_topk=0.1" in msg and "targets.layer_inputs=false" in msg
    assert "another filesystem (paths.cache_dir or paths.targets_dir)" in msg
    assert list(tmp_path.iterdir()) == []  # no work folder either
    # the suggested number of windows does fit
    fit = int(msg.split("data.calib.n_windows=")[1].split(" ")[0])
    assert 1 <= fit < len(windows)
    assert storage_plan(TargetsConfig(), model_dims(model), fit * windows.shape[1])["total_bytes"] <= need // 3


def test_disk_check_counts_the_shards_a_resumed_run_keeps(tmp_path, monkeypatch, windows):
    """A resumed collection needs room only for what is left: shards recorded by the interrupted run count."""
    from tests.test_targets import interrupt_after
    model, cfg = tiny_model("llama"), TargetsConfig(criterion="activation", shard_tokens=16)
    need = storage_plan(cfg, model_dims(model), windows.numel())["total_bytes"]
    with monkeypatch.context() as mp:
        interrupt_after(mp, 4)
        with pytest.raises(KeyboardInterrupt):
            collect(model, windows, cfg, tmp_path / "t")
    done = sum(s["bytes"] for s in json.loads((T.work_dir_for(tmp_path / "t") / T.PROGRESS).read_text())["shards"])
    assert done > need // 2
    fake_disk(monkeypatch, int((need - done) * 1.05) + 1)
    collect(model, windows, cfg, tmp_path / "t")  # fits: the 4 kept shards are not counted again
    fake_disk(monkeypatch, int((need - done) * 1.05) - 1)
    with pytest.raises(ConfigError, match="free; collect with"):
        collect(model, windows, cfg, tmp_path / "t2")


def model_dims(model):
    from shadowsparse.arch import ModelView
    return ModelView(model).dims


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_score_dtype_is_the_stored_dtype_of_the_same_scores(tmp_path, windows, dtype):
    model = tiny_model("llama")
    ref = collect(model, windows, TargetsConfig(criterion="plainact", score_dtype="float32", input_dtype="float32"),
                  tmp_path / "ref")
    out = collect(model, windows, TargetsConfig(criterion="plainact", score_dtype=dtype, input_dtype=dtype),
                  tmp_path / "t")
    _, r = load_targets(ref, model)
    m, t = load_targets(out, model)
    assert m["score_dtype"] == m["input_dtype"] == dtype and m["config"]["score_dtype"] == dtype
    for key in ("heads", "neurons", "layer_inputs"):
        assert t[key].dtype == getattr(torch, dtype)
        assert torch.equal(t[key], r[key].to(t[key].dtype))  # the same fp32 scores, only rounded on the way out
    assert torch.equal(t["features"], r["features"]) and t["features"].dtype == torch.float32
    assert m["total_bytes"] == sum(s["bytes"] for s in m["shards"])
    assert m["bytes_per_row"] == sum(m["bytes_per_row_by_key"].values())


def test_topk_neuron_targets_decode_to_the_dense_ranking(tmp_path, windows):
    model = tiny_model("llama")  # FFN width 96
    dense_dir = collect(model, windows, TargetsConfig(criterion="activation", score_dtype="float32"), tmp_path / "d")
    top_dir = collect(model, windows, TargetsConfig(criterion="activation", score_dtype="float32", neuron_topk=0.25),
                      tmp_path / "k")
    m = read_manifest(top_dir)
    assert (m["neuron_encoding"], m["neuron_topk"], m["index_dtype"], m["neuron_fill"]) == \
        ("topk", 24, "int16", T.NEURON_FILL)
    with safe_open(str(top_dir / m["shards"][0]["file"]), framework="pt") as f:
        assert set(f.keys()) == {"features", "heads", "neuron_idx", "neuron_val", "layer_inputs"}
        assert f.get_tensor("neuron_idx").dtype == torch.int16 and f.get_tensor("neuron_val").shape[-1] == 24
    dense_bytes = sum(s["bytes"] for s in read_manifest(dense_dir)["shards"])
    assert m["total_bytes"] < dense_bytes - windows.numel() * 4 * (96 - 24 * 1.5) * 4 + 4096  # 96 fp32 -> 24 (idx+val)

    _, d = load_targets(dense_dir, model)
    _, k = load_targets(top_dir, model)
    dn, kn = d["neurons"], k["neurons"]  # (N, L, 96)
    assert kn.shape == dn.shape
    top = dn.topk(24, -1)
    assert torch.equal(kn.gather(-1, top.indices), top.values)  # kept: exact values at the dense top-24 positions
    kept = torch.zeros_like(dn, dtype=torch.bool).scatter_(-1, top.indices, True)
    fill = (top.values[..., -1:] * T.NEURON_FILL).expand_as(dn)
    assert torch.equal(kn[~kept], fill[~kept])  # the rest: the documented fill
    assert (kn[~kept] < top.values[..., -1:].expand_as(dn)[~kept]).all()  # strictly below every kept score

    # the training targets built from them keep the ranking wherever the budget keeps <= k neurons
    zd, zk = normalize_scores(dn, 1e-3), normalize_scores(kn, 1e-3)
    for sparsity in (0.75, 0.9):
        kk = n_keep(96, sparsity)
        assert kk <= 24 and topk_recall(zk, zd, kk) == 1.0
    assert topk_recall(zk, zd, n_keep(96, 0.5)) < 1.0  # beyond k the fill ties: recall cannot be perfect there
    assert spearman(zk.gather(-1, top.indices), zd.gather(-1, top.indices)) > 0.999
    assert torch.equal(k["heads"], d["heads"]) and torch.equal(k["features"], d["features"])


def test_layer_inputs_can_be_left_out_and_a_reader_needing_them_is_told(tmp_path, windows):
    from shadowsparse.system import TargetsDataModule
    model = tiny_model("llama")
    out = collect(model, windows, TargetsConfig(criterion="activation", layer_inputs=False), tmp_path / "t")
    m = read_manifest(out)
    assert m["layer_inputs"] is False and "layer_inputs" not in m["bytes_per_row_by_key"]
    _, t = load_targets(out, model, keys=("features", "heads", "neurons"))
    assert t["features"].shape[0] == windows.numel()
    with pytest.raises(ConfigError, match="targets.layer_inputs=false.*targets.layer_inputs=true targets_overwrite"):
        TargetsDataModule(str(out), input_key="layer_inputs").setup()


@pytest.mark.parametrize("bad,match", [
    (dict(score_dtype="int8"), "targets.score_dtype must be one of"),
    (dict(input_dtype="fp16"), "targets.input_dtype must be one of"),
    (dict(neuron_topk=0), "neuron_topk must be null"),
    (dict(neuron_topk=1.0), "neuron_topk must be null"),
    (dict(neuron_topk=True), "neuron_topk must be null"),
    (dict(neuron_topk=96), r"keeps 96 of 96 neurons.*neuron_topk=null"),
    (dict(devices=0), "targets.devices must be an integer >= 1"),
    (dict(devices=2, strategy="fsdp"), "targets.strategy=ddp"),
    (dict(accelerator="tpu"), "targets.accelerator must be one of"),
])
def test_bad_storage_and_run_keys(tmp_path, windows, bad, match):
    with pytest.raises(ConfigError, match=match):
        collect(tiny_model("llama"), windows, TargetsConfig(criterion="activation", **bad), tmp_path / "t")
    assert list(tmp_path.iterdir()) == []


def test_an_interrupted_collection_is_resumed_only_by_the_same_process_layout(tmp_path, monkeypatch, windows):
    """progress records name their process layout: a 1-process run does not silently discard a 2-rank run's shards
    (nor the other way round); targets_overwrite does."""
    from shadowsparse.targets.collect_dp import ddp_layout
    from tests.test_targets import interrupt_after
    model, cfg = tiny_model("llama"), TargetsConfig(criterion="activation", shard_tokens=16)
    with monkeypatch.context() as mp:
        interrupt_after(mp, 3)
        with pytest.raises(KeyboardInterrupt):
            collect(model, windows, cfg, tmp_path / "t")
    work = T.work_dir_for(tmp_path / "t")
    identity = T.collection_identity(model, windows, cfg, "", 0)
    with pytest.raises(ConfigError, match=r"interrupted 1-process collection \(targets.devices=1\).*targets_overwrite"):
        T.check_work(work, identity, ddp_layout(len(windows), 1, 2), overwrite=False)
    T.check_work(work, identity, {T.PROGRESS: {}}, overwrite=False)  # its own layout resumes
    # and a 2-rank record is refused by a 1-process run
    rec = json.loads((work / T.PROGRESS).read_text())
    (work / T.PROGRESS).unlink()
    (work / "progress-r0.json").write_text(json.dumps({**rec, **ddp_layout(len(windows), 1, 2)["progress-r0.json"]}))
    with pytest.raises(ConfigError, match=r"interrupted 2-process collection \(targets.devices x targets.num_nodes"):
        collect(model, windows, cfg, tmp_path / "t")
    collect(model, windows, cfg, tmp_path / "t", overwrite=True)
    assert not work.exists()
