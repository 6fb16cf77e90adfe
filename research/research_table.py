"""Summarize outputs/research/probes.jsonl: mean over probe layers (and per layer) of the key probe metrics."""
import json
KEYS = ["mass50", "vmass50@0.6", "vmass50@0.7", "vmass50@0.8", "recall@0.7", "cvmass50@0.7"]
print("| variant | " + " | ".join(KEYS) + " | per layer mass50 (3/15/27) | s |")
print("|---|" + "---:|" * (len(KEYS) + 2))
for line in open("outputs/research/probes.jsonl"):
    r = json.loads(line)
    layers = [k for k in r if k.startswith("L")]
    subs = [(r["name"], {l: r[l] for l in layers})] if r["name"] != "baselines" else \
        [(f"baseline {v}", {l: r[l][v] for l in layers}) for v in ("static", "gate")]
    for name, per in subs:
        mean = {k: sum(per[l][k] for l in layers) / len(layers) for k in KEYS}
        print(f"| {name} | " + " | ".join(f"{mean[k]:.3f}" for k in KEYS) + " | "
              + " / ".join(f"{per[l]['mass50']:.3f}" for l in layers) + f" | {r.get('seconds', '')} |")
