"""Print the pipeline rows of outputs/research/run*/results.jsonl (research runs) as a markdown table."""
import glob
import json
DENSE = 28.522
print("| run | method | sketch/rank | bits | q | FFN req → realized | candidates skipped | ppl | × dense | bytes skipped |")
print("|---|---|---|---:|---:|---|---:|---:|---:|---:|")
for f in sorted(glob.glob("outputs/research/run*/results.jsonl")):
    for line in open(f):
        r = json.loads(line)
        if r["metric"] != "ppl":
            continue
        kind = r.get("verify_sketch") or (f"rank {r['verify_rank']}" if "verify_rank" in r else "gate (exact)")
        print(f"| {f.split('/')[2]} | {r['method']} | {kind} | {r.get('verify_bits', '')} | {r.get('verify_q', '')} | "
              f"{r['ffn_sparsity']:.2f} → {r['realized_ffn_sparsity']:.3f} | {r.get('realized_candidate_sparsity', 0):.3f} | "
              f"{r['value']:.3f} | {r['value'] / DENSE:.3f} | {r['weight_bytes_skipped']:.3f} |")
