"""results.jsonl of one or many runs -> a table (rich in the terminal, markdown on request).

    python -m shadowsparse.report outputs/runs/<run> [more runs ...] [--markdown]
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

RESULTS = "results.jsonl"


def append_result(run_dir: str | Path, row: dict) -> None:
    """One JSON object per evaluation, appended as each finishes (a crash keeps the finished rows)."""
    with open(Path(run_dir) / RESULTS, "a") as f:
        f.write(json.dumps(row) + "\n")


def read_results(paths: list[str | Path]) -> list[dict]:
    rows = []
    for p in paths:
        p = Path(p)
        files = [p] if p.is_file() else sorted(p.rglob(RESULTS))
        if not files:
            raise FileNotFoundError(f"no {RESULTS} under '{p}'; give a run directory of train.py")
        for f in files:
            rows += [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    return rows


COLUMNS = ["model", "dataset", "method", "criterion", "granularity", "ffn req", "ffn real", "head req", "head real",
           "metric", "value", "x dense", "bytes skipped"]


def table_rows(rows: list[dict]) -> list[list[str]]:
    """Rows formatted for display; 'x dense' divides by the dense row of the same model and dataset."""
    dense = {(r["model"], r["dataset"], r["metric"]): r["value"] for r in rows if r["method"] == "dense"}
    out = []
    for r in rows:
        base = dense.get((r["model"], r["dataset"], r["metric"]))
        ratio = f"{r['value'] / base:.3f}" if base and r["metric"] == "ppl" else "-"
        out.append([r["model"].split("/")[-1], r["dataset"], r["method"], str(r.get("criterion") or "-"),
                    r.get("granularity", "-"), f"{r['ffn_sparsity']:.2f}", f"{r['realized_ffn_sparsity']:.3f}",
                    f"{r['head_sparsity']:.2f}", f"{r['realized_head_sparsity']:.3f}", r["metric"],
                    f"{r['value']:.3f}", ratio, f"{r.get('weight_bytes_skipped', 0.0):.3f}"])
    return out


def markdown(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(r) + " |" for r in table_rows(rows)]
    return "\n".join(lines)


def print_table(rows: list[dict], title: str = "shadowsparse results") -> None:
    from rich.console import Console
    from rich.table import Table
    table = Table(title=title)
    for c in COLUMNS:
        table.add_column(c, justify="right" if c not in ("model", "dataset", "method", "criterion") else "left")
    for r in table_rows(rows):
        table.add_row(*r)
    Console(width=200).print(table)


def main(argv: list[str]) -> int:
    md = "--markdown" in argv
    paths = [a for a in argv if not a.startswith("--")]
    if not paths:
        print("usage: python -m shadowsparse.report <run_dir or results.jsonl> [...] [--markdown]", file=sys.stderr)
        return 2
    try:
        rows = read_results(paths)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(markdown(rows)) if md else print_table(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
