"""logger=wandb, offline: the run holds the resolved config, the training metrics, the results table (a wandb.Table
of results.jsonl) and the report plots (wandb.Image of the PNGs), with no network and no API key."""
import json
import time

import pytest

from shadowsparse.pipeline import run, wandb_init_kwargs
from tests.conftest import compose


@pytest.fixture
def offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc login either


def test_wandb_offline_run_has_config_table_and_plots(tmp_path, offline):
    run(compose("experiment=smoke", "logger=wandb", f"paths.output_dir={tmp_path}/run",
                f"paths.cache_dir={tmp_path}/cache", "evaluate.methods=[dense,predictor]", "gating.ffn_sparsity=0.5",
                "trainer.max_epochs=1"))
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, "one run: the fit stage's, reused by the report stage"
    files = runs[0] / "files"
    # config, metrics and summary live in the run's record log (protobuf, strings stored as they are; wandb >= 0.19
    # has no offline reader in Python); wandb's service process appends them asynchronously, shortly after finish()
    needles = (b"random:llama", b"shard_tokens", b"predictor_params", b"val/recall_ffn", b"table-file")
    deadline = time.time() + 60
    while True:
        records = next(runs[0].glob("run-*.wandb")).read_bytes()
        missing = [n for n in needles if n not in records]
        if not missing or time.time() > deadline:
            break
        time.sleep(0.5)
    assert not missing, missing
    tables = list((files / "media" / "table").glob("results_*.table.json"))
    assert len(tables) == 1
    table = json.loads(tables[0].read_text())
    rows = [json.loads(line) for line in (tmp_path / "run" / "results.jsonl").read_text().splitlines()]
    assert len(table["data"]) == len(rows) == 2
    value = table["columns"].index("value")
    assert [r[value] for r in table["data"]] == [r["value"] for r in rows]
    images = sorted(p.name for p in (files / "media" / "images" / "plots").glob("*.png"))
    assert [name.split("_")[0] for name in images] == ["frontier", "quality"]


def test_online_without_an_api_key_goes_offline(tmp_path, offline, monkeypatch):
    monkeypatch.delenv("WANDB_MODE")
    cfg = compose("logger=wandb", "logger.mode=online", f"paths.output_dir={tmp_path}/run")
    assert wandb_init_kwargs(cfg, tmp_path)["mode"] == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_init_kwargs(cfg, tmp_path)["mode"] == "online"
    with pytest.raises(Exception, match="logger.mode must be online, offline or disabled"):
        wandb_init_kwargs(compose("logger=wandb", "logger.mode=sometimes"), tmp_path)
