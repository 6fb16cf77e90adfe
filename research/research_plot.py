"""Quality vs weight_bytes_skipped frontier: docs/results.md's compare runs and the research runs (docs/research.md)."""
import glob
import json

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

DENSE = 28.522
rows = []
for f in glob.glob("outputs/compare/*/results.jsonl") + glob.glob("outputs/compare/predictors/*/results.jsonl") + \
        glob.glob("outputs/research/run*/results.jsonl") + glob.glob("outputs/research/shared64k/results.jsonl"):
    rows += [{**json.loads(line), "_file": f} for line in open(f)]
series = {}
for r in rows:
    if r["metric"] != "ppl" or r["dataset"] != "wikitext2" or r["method"] == "dense" or r.get("head_sparsity"):
        continue
    m = r["method"]
    if m in ("qgate_verify", "sketch_verify"):
        label = f"sketch {r['verify_bits']}b" + (" gate-only" if r.get("verify_sketch") == "gate" else "") + (" + verify" if r["realized_candidate_sparsity"] < r["ffn_sparsity"] - 1e-3
                                                 else "")
    elif m == "predictor_verify":
        label = f"learned (FFN input, {r['verify_train_tokens'] // 1024}K tok)" + (
            " + verify" if r["realized_candidate_sparsity"] < r["ffn_sparsity"] - 1e-3 else "")
    elif m == "gate_verify":
        label = "gate + verify"
    elif m == "predictor" and "shared64k" in r.get("_file", ""):
        label = "shared predictor, 64K tok"
    else:
        label = {"gate": "gate (CATS)", "predictor": "shared predictor", "per_layer": "per-layer predictor"}.get(m, m)
    series.setdefault(label, []).append((r["weight_bytes_skipped"], r["value"] / DENSE, r["ffn_sparsity"]))
fig, ax = plt.subplots(figsize=(11, 6))
colors = plt.get_cmap("tab20").colors
for i, (label, pts) in enumerate(sorted(series.items())):
    pts.sort()
    x, y, s = zip(*pts)
    ours = label.startswith(("sketch", "learned", "gate +"))
    ax.plot(x, y, ("s" if ours else "o") + ("-" if len(pts) > 1 else ""), label=label, ms=6 if ours else 4,
            color=colors[i % len(colors)])
    for xi, yi, si in pts:
        ax.annotate(f"{si:.1f}", (xi, yi), fontsize=6, xytext=(2, 2), textcoords="offset points")
ax.set_yscale("log")
ax.set_ylim(0.98, 8)
ax.axhline(1.0, color="gray", lw=0.5)
ax.set_xlabel("decoder-linear weight bytes skipped per token (fraction)")
ax.set_ylabel("WikiText-2 perplexity / dense")
ax.set_title("SmolLM2-135M, FFN gating (labels: requested FFN sparsity)")
ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
fig.tight_layout()
fig.savefig("docs/research-frontier.png", dpi=130)
print({k: len(v) for k, v in series.items()})
