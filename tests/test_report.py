"""Report CLI and the notebook, run top to bottom on a tiny run (no Jupyter needed: code cells exec in order)."""
import json
import subprocess
import sys

import pytest

from shadowsparse.pipeline import run
from tests.conftest import ROOT, compose


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    run(compose("experiment=smoke", f"paths.output_dir={tmp}/runs/a", f"paths.cache_dir={tmp}/cache",
                "evaluate.methods=[dense,predictor,static,oracle,threshold]", "evaluate.threshold_windows=2"))
    return tmp


def test_run_writes_table_plots(tiny_run):
    run_dir = tiny_run / "runs" / "a"
    assert (run_dir / "quality.png").stat().st_size > 1000 and (run_dir / "frontier.png").stat().st_size > 1000


def test_report_cli_markdown_csv_plots(tiny_run, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "shadowsparse.report", str(tiny_run / "runs"), "--markdown",
                           "--csv", str(tmp_path / "t.csv"), "--plot", str(tmp_path / "q.png"),
                           "--frontier", str(tmp_path / "f.png")], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "| random:llama | wikitext2 | - | dense |" in proc.stdout
    lines = (tmp_path / "t.csv").read_text().splitlines()
    assert lines[0].startswith("model,dataset,static mask,method") and len(lines) == 1 + 1 + 4 * 4
    assert (tmp_path / "q.png").exists() and (tmp_path / "f.png").exists()


def test_report_cli_bad_input(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "shadowsparse.report", str(tmp_path / "nothing")], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 1 and "no results.jsonl" in proc.stderr


def test_notebook_runs_top_to_bottom(tiny_run, tmp_path, monkeypatch):
    monkeypatch.setenv("SHADOWSPARSE_RUNS", str(tiny_run / "runs"))
    monkeypatch.setenv("SHADOWSPARSE_TARGETS", str(tiny_run / "cache" / "targets"))
    monkeypatch.setenv("SHADOWSPARSE_NOTEBOOK_OUT", str(tmp_path))
    nb = json.loads((ROOT / "notebooks" / "results.ipynb").read_text())
    namespace: dict = {}
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            exec(compile("".join(cell["source"]), "results.ipynb", "exec"), namespace)
    for name in ("quality.png", "frontier.png", "importance.png"):
        assert (tmp_path / name).stat().st_size > 1000
