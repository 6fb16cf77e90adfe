"""results.jsonl of one or many runs -> a table (rich in the terminal, markdown or CSV on request) and PNG plots:
quality against requested FFN sparsity (one line per method, dense as a reference line) and against weight bytes
skipped (the frontier on which methods are compared fairly).

    python -m shadowsparse.report outputs/runs/<run> [outputs/multirun/<sweep> ...] [--markdown] [--csv out.csv]
                                  [--plot quality.png] [--frontier frontier.png]
"""
from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

RESULTS = "results.jsonl"
PARTIAL_RESULTS = RESULTS + ".partial"  # the rows of an evaluation still running (or killed): never read as results


def append_result(run_dir: str | Path, row: dict) -> None:
    """One JSON object per evaluation, appended to results.jsonl.partial as each finishes (a crash keeps the finished
    rows there); publish_results makes them results.jsonl once the evaluation stage is over."""
    with open(Path(run_dir) / PARTIAL_RESULTS, "a") as f:
        f.write(json.dumps(row) + "\n")


def publish_results(run_dir: str | Path) -> Path:
    """The finished evaluation's rows become results.jsonl in one rename. A rerun into the same run folder replaces
    the rows of the run before (the table never mixes two runs, nor shows half of one); an evaluation with no row
    removes them."""
    run_dir = Path(run_dir)
    final, partial = run_dir / RESULTS, run_dir / PARTIAL_RESULTS
    if final.exists():
        n = sum(1 for line in final.read_text().splitlines() if line.strip())
        logging.getLogger("shadowsparse").info("%s: replacing the %d row(s) of an earlier run in this folder", final, n)
    if partial.exists():
        os.replace(partial, final)
    else:
        final.unlink(missing_ok=True)
    return final


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


COLUMNS = ["model", "dataset", "static mask", "method", "criterion", "granularity", "ffn req", "ffn real", "head req",
           "head real", "metric", "value", "x dense", "bytes skipped"]


def static_label(r: dict) -> str:
    """The static weight mask under a row: metric and pattern ('wanda 2:4'), or '-' for the unpruned model."""
    return f"{r.get('sparsity_metric') or ''} {r['nm']}".strip() if r.get("nm") else "-"


def method_label(r: dict) -> str:
    """The method with the settings that tell its variants apart: a sketch's bit width, a verify stage's proposal
    ('sketch_verify 3-bit q=0.6'), int8 x ('x8'), a depth slope ('slope=+0.2') or a measured allocation
    ('alloc=sens^0.5'), the attention inputs' sparsity next to a sketched FFN ('sketch_teal ... attn=0.3')."""
    bits = f" {r['verify_bits']}-bit" if r.get("verify_bits") else ""
    if r.get("verify_quantizer") not in (None, "midrise"):  # the data-free copy goes unnamed (older rows have none)
        bits += f" {r['verify_quantizer']}"
    if r.get("verify_x_bits") and r.get("verify_bits"):  # the sketch reads int8 x (the dp4a kernel's estimate)
        bits += " x8"
    if r.get("verify_depth_slope"):  # per-layer levels growing with depth (layer_levels.depth_levels)
        bits += f" slope={r['verify_depth_slope']:+g}"
    if r.get("verify_allocation") == "sensitivity":  # per-layer levels from measured costs (layer_levels.py)
        bits += f" alloc=sens^{r['verify_allocation_power']:g}"
    q = f" q={r['verify_q']:g}" if r.get("verify_q") is not None else ""
    attn = f" attn={r['attn_sparsity']:g}" if r.get("attn_sparsity") is not None else ""  # sketch_teal's teal part
    return f"{r['method']}{bits}{q}{attn}"


def table_rows(rows: list[dict]) -> list[list[str]]:
    """Rows formatted for display; 'x dense' divides by the dense row of the same model and dataset (the unpruned
    one: a statically masked model is compared with the model it came from)."""
    dense = {(r["model"], r["dataset"], r["metric"]): r["value"] for r in rows
             if r["method"] == "dense" and not r.get("nm")}
    out = []
    for r in rows:
        base = dense.get((r["model"], r["dataset"], r["metric"]))
        ratio = f"{r['value'] / base:.3f}" if base and r["metric"] == "ppl" else "-"
        out.append([r["model"].split("/")[-1], r["dataset"], static_label(r), method_label(r),
                    str(r.get("criterion") or "-"),
                    r.get("granularity") or "-", f"{r['ffn_sparsity']:.2f}", f"{r['realized_ffn_sparsity']:.3f}",
                    f"{r['head_sparsity']:.2f}", f"{r['realized_head_sparsity']:.3f}", r["metric"],
                    f"{r['value']:.3f}", ratio, f"{r.get('weight_bytes_skipped', 0.0):.3f}"])
    return out


def write_csv(rows: list[dict], path: str | Path) -> Path:
    import csv
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        w.writerows(table_rows(rows))
    return Path(path)


def _series_label(r: dict) -> str:
    static = f"{static_label(r)} + " if r.get("nm") else ""
    return (f"{static}{method_label(r)} ({r.get('criterion') or '-'}, {r.get('granularity') or '-'}, "
            f"heads {r['head_sparsity']:.2f})")


def _line_plot(series: dict, path: str | Path, xlabel: str, ylabel: str, hlines: list[tuple[float, str]]) -> Path:
    """One line per series key (points sorted by x), horizontal reference lines, log y axis; saved as PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for y, label in hlines:
        ax.axhline(y, color="black", lw=1, ls="--", label=label)
    for key, pts in sorted(series.items()):
        pts = sorted(pts)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=key)
    ax.set(xlabel=xlabel, ylabel=ylabel, yscale="log")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_quality(rows: list[dict], path: str | Path) -> Path:
    """Perplexity against requested FFN sparsity, one line per method; dense drawn as a horizontal reference."""
    rows = [r for r in rows if r["metric"] == "ppl"]
    series: dict = {}
    for r in rows:
        if r["method"] != "dense":
            series.setdefault(_series_label(r), []).append((r["ffn_sparsity"], r["value"]))
    dense = [(r["value"], f"dense ({r['model'].split('/')[-1]}, {r['dataset']}, static {static_label(r)})")
             for r in rows if r["method"] == "dense"]
    return _line_plot(series, path, "requested FFN sparsity (fraction skipped per token)", "perplexity", dense)


SUMMARY_COLUMNS = ["model", "static mask", "method", "criterion", "budget", "ffn", "heads", "ppl", "x dense", "mean acc", "tasks",
                   "bytes skipped", "selector params", "MFLOP/token"]


def summary_rows(rows: list[dict]) -> list[list[str]]:
    """One line per (model, method, criterion, granularity, budget, level): perplexity, its ratio to dense, and the
    mean accuracy over the lm-eval tasks evaluated (acc, not acc_norm)."""
    groups: dict = {}
    for r in rows:
        key = (r["model"], method_label(r), r.get("criterion"), r.get("granularity"), r.get("budget"),
               r["ffn_sparsity"], r["head_sparsity"], static_label(r))
        groups.setdefault(key, []).append(r)
    dense = {r["model"]: r["value"] for r in rows if r["method"] == "dense" and r["metric"] == "ppl" and not r.get("nm")}
    out = []
    for key, rs in groups.items():
        ppl = [r for r in rs if r["metric"] == "ppl"]
        accs = [r["value"] for r in rs if r["metric"] == "acc"]
        p = ppl[0]["value"] if ppl else None
        ratio = f"{p / dense[key[0]]:.3f}" if p and dense.get(key[0]) else "-"
        out.append([key[0].split("/")[-1], key[7], key[1], str(key[2] or "-"), str(key[4] or "-"), f"{key[5]:.2f}",
                    f"{key[6]:.2f}", f"{p:.3f}" if p else "-", ratio,
                    f"{sum(accs) / len(accs):.3f}" if accs else "-", str(len(accs)),
                    f"{(ppl or rs)[0].get('weight_bytes_skipped', 0.0):.3f}",
                    f"{rs[0]['predictor_params']:,}" if rs[0].get("predictor_params") else "0",
                    f"{rs[0]['predictor_flops_per_token'] / 1e6:.1f}" if rs[0].get("predictor_flops_per_token") else "0"])
    return out


def markdown(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(r) + " |" for r in table_rows(rows)]
    lines += ["", "| " + " | ".join(SUMMARY_COLUMNS) + " |", "|" + "---|" * len(SUMMARY_COLUMNS)]
    lines += ["| " + " | ".join(r) + " |" for r in summary_rows(rows)]
    return "\n".join(lines)


def print_table(rows: list[dict], title: str = "shadowsparse results") -> None:
    from rich.console import Console
    from rich.table import Table
    table = Table(title=title)
    for c in COLUMNS:
        table.add_column(c, justify="right" if c not in ("model", "dataset", "method", "criterion") else "left")
    for r in table_rows(rows):
        table.add_row(*r)
    console = Console(width=200)
    console.print(table)
    if any(r["metric"] != "ppl" for r in rows):  # tasks were evaluated: one line per method and level
        summary = Table(title="summary: perplexity and mean task accuracy")
        for c in SUMMARY_COLUMNS:
            summary.add_column(c, justify="left" if c in ("model", "method", "criterion", "budget") else "right")
        for r in summary_rows(rows):
            summary.add_row(*r)
        console.print(summary)


def plot_frontier(rows: list[dict], path: str | Path) -> Path:
    """Perplexity / dense against weight_bytes_skipped, one line per (method, criterion, head sparsity)."""
    dense = {(r["model"], r["dataset"]): r["value"] for r in rows
             if r["method"] == "dense" and r["metric"] == "ppl" and not r.get("nm")}
    series: dict = {}
    for r in rows:
        base = dense.get((r["model"], r["dataset"]))
        if (r["method"] == "dense" and not r.get("nm")) or r["metric"] != "ppl" or not base:
            continue
        series.setdefault(_series_label(r), []).append((r.get("weight_bytes_skipped", 0.0), r["value"] / base))
    return _line_plot(series, path, "decoder-linear weight bytes skipped per token (fraction)",
                      "perplexity / dense", [(1.0, "dense")])


def table_columns(rows: list[dict]) -> tuple[list[str], list[list]]:
    """results.jsonl rows as (columns, data) for a wandb.Table: the union of keys in first-seen order; values that
    are not scalars (e.g. teal's per-projection realized sparsity) as JSON text, missing ones as None."""
    columns: list[str] = []
    for r in rows:
        columns += [k for k in r if k not in columns]

    def cell(v):
        return v if v is None or isinstance(v, (bool, int, float, str)) else json.dumps(v)
    return columns, [[cell(r.get(c)) for c in columns] for r in rows]


def log_wandb(rows: list[dict], images: dict[str, str | Path], init: dict | None = None) -> str | None:
    """Log the results table and the report plots to the active wandb run (the one the fit stage's WandbLogger
    opened, which carries the config and training curves), or to a new one made with ``init`` (wandb.init keyword
    arguments) when no stage opened one; then finish the run. Returns the run's directory."""
    import wandb
    run = wandb.run if wandb.run is not None else wandb.init(**(init or {}))
    payload: dict = {}
    if rows:
        columns, data = table_columns(rows)
        # mixed types: a column is None in some rows (dense has no criterion) and text or numbers in others
        payload["results"] = wandb.Table(columns=columns, data=data, allow_mixed_types=True)
    for key, path in images.items():
        if Path(path).exists():
            payload[key] = wandb.Image(str(path))
    if payload:
        run.log(payload)
    run_dir = run.dir
    run.finish()
    return run_dir


def main(argv: list[str]) -> int:
    md = "--markdown" in argv
    outputs = {}
    for flag in ("--csv", "--plot", "--frontier"):
        if flag in argv:
            i = argv.index(flag)
            if i + 1 >= len(argv):
                print(f"error: {flag} needs a file name", file=sys.stderr)
                return 2
            outputs[flag] = argv[i + 1]
    paths = [a for a in argv if not a.startswith("--") and a not in outputs.values()]
    if not paths:
        print("usage: python -m shadowsparse.report <run dirs or results.jsonl> [--markdown] [--csv out.csv] "
              "[--plot quality.png] [--frontier frontier.png]", file=sys.stderr)
        return 2
    try:
        rows = read_results(paths)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(markdown(rows)) if md else print_table(rows)
    if "--csv" in outputs:
        print(f"csv: {write_csv(rows, outputs['--csv'])}")
    if "--plot" in outputs:
        print(f"plot: {plot_quality(rows, outputs['--plot'])}")
    if "--frontier" in outputs:
        print(f"frontier: {plot_frontier(rows, outputs['--frontier'])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
