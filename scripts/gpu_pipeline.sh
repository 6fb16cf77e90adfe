#!/usr/bin/env bash
# The OPT-13B-shaped pipeline with random weights (llm.name=random-shape:opt-13b: no download) on a GPU host without
# network. Parts (default: all = 1gpu 2gpu auto):
#   1gpu  collection + predictor fit + dense and gated perplexity (4 windows) on GPU 0
#   2gpu  the same collection data-parallel on 2 GPUs (targets.devices=2), then the fit with trainer=ddp on 2 GPUs
#   auto  the model split over the 2 GPUs by accelerate (llm.device=auto), evaluated with 1gpu's predictor: the same
#         perplexities as on one GPU (needs 1gpu's run)
# Prints and writes wall time and tokens/s of each collection, and compares the 1- and 2-GPU targets.
#
#   scripts/gpu_pipeline.sh [all | 1gpu 2gpu auto ...]
#
# Packages the GPU image lacks (hydra-core, omegaconf, antlr4) travel as wheels in .whl/ (README "Big models");
# `datasets` is not needed there: local json/text files are read without it. Knobs (environment):
#   N_WINDOWS (32) x SEQ (1024) calibration tokens; TOPK (0.1) neurons kept per (token, layer) on disk;
#   EPOCHS (1) predictor epochs; WORK (outputs/gpu-work: kept between calls on a warm machine) targets and runs;
#   OUT (outputs/gpu) logs + summary.json.
#   CPU_SMOKE=1: the same steps with a tiny shape on the CPU (2 gloo processes for "2gpu"): checks this script.
set -euo pipefail
cd "$(dirname "$0")/.."
PARTS="${*:-all}"
[ "$PARTS" = all ] && PARTS="1gpu 2gpu auto"
OUT=${OUT:-$PWD/outputs/gpu}
WORK=${WORK:-$PWD/outputs/gpu-work}
N_WINDOWS=${N_WINDOWS:-32}
SEQ=${SEQ:-1024}
TOPK=${TOPK:-0.1}
EPOCHS=${EPOCHS:-1}
mkdir -p "$OUT" "$WORK"

if ! python3 -c "import hydra, omegaconf" 2>/dev/null; then
    [ -d .whl ] || { echo "hydra-core/omegaconf missing and no .whl/ folder: see README 'Big models'" >&2; exit 2; }
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HYDRA_FULL_ERROR=1
# keep NVLink multicast off (the host's GPUs are shared; see the device notes)
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
nvidia-smi --query-gpu=index,name,memory.total,memory.used --format=csv > "$OUT/nvidia-smi.csv" 2>/dev/null || true
python3 -c "import torch, transformers, lightning; print('torch', torch.__version__, 'transformers', \
transformers.__version__, 'lightning', lightning.__version__, 'gpus', torch.cuda.device_count())" | tee "$OUT/env.txt"

# What every run shares: the model (random weights in OPT-13B's exact shapes, fp16, built on the GPU), the shipped C4
# sample as calibration text, compact targets (top-k neurons, no per-layer inputs: the shared predictor reads only
# the feature layer's output), quiet Lightning bars (logs go to files).
COMMON=(experiment=opt13b llm.name=random-shape:opt-13b targets=activation
        "data.calib.n_windows=$N_WINDOWS" "data.calib.seq_len=$SEQ" "targets.neuron_topk=$TOPK"
        targets.layer_inputs=false trainer.enable_progress_bar=false)
ACCEL=gpu
if [ "${CPU_SMOKE:-0}" = 1 ]; then
    ACCEL=cpu
    COMMON=(experiment=opt13b llm.name=random-shape:tiny-opt targets=activation llm.device=cpu llm.dtype=float32
            data.calib.n_windows=8 data.calib.seq_len=256 "targets.neuron_topk=$TOPK" targets.layer_inputs=false
            trainer.enable_progress_bar=false trainer.accelerator=cpu trainer.precision=32-true
            predictor.model.hidden=64 predictor.model.rank=8 targets.shard_tokens=512)
fi

run_part() {  # name, targets name, extra overrides...
    local name=$1; shift
    local t0=$SECONDS
    local targets=$1; shift  # the targets folder this part collects or reads
    [ "$targets" = "$name" ] && rm -rf "$WORK/targets-$name"
    rm -rf "$WORK/run-$name"
    set +e
    python3 train.py "${COMMON[@]}" "paths.targets_dir=$WORK/targets-$targets" "paths.output_dir=$WORK/run-$name" \
        "hydra.run.dir=$WORK/run-$name" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    set -e
    echo "$name: exit $rc, $((SECONDS - t0)) s wall (model build + collection + the rest); log $OUT/$name.log"
    [ $rc -eq 0 ] || { tail -40 "$OUT/$name.log"; STATUS=$rc; }
}
STATUS=0  # a failed part does not stop the next one (device time is scarce); the script's exit status reports it

EVAL=(data.eval.n_windows=4 "data.eval.seq_len=2048" gating.ffn_sparsity=0.5)
[ "$ACCEL" = cpu ] && EVAL=(data.eval.n_windows=4 data.eval.seq_len=256 gating.ffn_sparsity=0.5)
if [[ " $PARTS " == *" 1gpu "* ]]; then
    # collect + fit on one GPU, then dense and predictor-gated (FFN 50%) perplexity on 4 WikiText-2 windows (random
    # weights and top-10% targets: this checks plumbing, memory and speed at scale, not the quality)
    CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0} run_part 1gpu 1gpu "trainer.max_epochs=$EPOCHS" \
        "evaluate.methods=[dense,predictor]" "${EVAL[@]}"
fi
if [[ " $PARTS " == *" 2gpu "* ]]; then
    # the same collection over 2 GPUs (each rank a whole model, half the windows), then the predictor trained with
    # DDP on both (the process Lightning adds for GPU 1 loads no model: it only trains)
    TRAIN=(trainer=ddp trainer.devices=2)
    [ "$ACCEL" = cpu ] && TRAIN=(trainer=ddp trainer.accelerator=cpu trainer.precision=32-true)
    run_part 2gpu 2gpu targets.devices=2 "targets.accelerator=$ACCEL" "trainer.max_epochs=$EPOCHS" "${TRAIN[@]}" \
        stages.evaluate=false stages.report=false
fi
if [[ " $PARTS " == *" auto "* ]]; then
    # one model over both GPUs (accelerate's dispatch hooks + our gating hooks), 1gpu's predictor, same windows
    DEV=(llm.device=auto); [ "$ACCEL" = cpu ] && DEV=(llm.device=cpu)
    run_part auto 1gpu "${DEV[@]}" stages.collect=false stages.fit=false "evaluate.methods=[dense,predictor]" \
        "paths.predictor_ckpt=$WORK/run-1gpu/predictor" "${EVAL[@]}"
fi

python3 - "$WORK" "$OUT" <<'EOF'
"""Collection time and tokens/s from each manifest; the 2-GPU targets compared with the 1-GPU ones."""
import json, sys
from pathlib import Path
work, out = Path(sys.argv[1]), Path(sys.argv[2])
summary = {}
for name in ("1gpu", "2gpu"):
    m = work / f"targets-{name}" / "manifest.json"
    if not m.exists():
        continue
    man = json.loads(m.read_text())
    row = {k: man.get(k) for k in ("n_tokens", "n_windows", "seq_len", "seconds", "bytes_per_row", "total_bytes",
                                    "neuron_topk", "world_size")}
    row["tokens_per_s"] = round(man["n_tokens"] / man["seconds"], 1) if man.get("seconds") else None
    metrics = work / f"run-{name}" / "metrics.json"
    if metrics.exists():
        row["metrics"] = json.loads(metrics.read_text())
    results = work / f"run-{name}" / "results.jsonl"
    if results.exists():
        row["results"] = [{k: r[k] for k in ("method", "ffn_sparsity", "value", "realized_ffn_sparsity")}
                          for r in map(json.loads, results.read_text().splitlines())]
    summary[name] = row
    # the manifest's seconds: scoring + writing; with DDP also launching the other ranks and building their models
    print(f"{name}: {row['n_tokens']} tokens collected in {row['seconds']} s = {row['tokens_per_s']} tokens/s; "
          f"{row['bytes_per_row']:,} bytes/token, {row['total_bytes'] / 1e9:.2f} GB on disk")
auto = work / "run-auto" / "results.jsonl"
if auto.exists():  # the split model gives the 1-GPU perplexities (same weights, same windows, same predictor)
    rows = [json.loads(x) for x in auto.read_text().splitlines()]
    summary["auto"] = {"results": [{k: r[k] for k in ("method", "ffn_sparsity", "value", "realized_ffn_sparsity")}
                                   for r in rows]}
    one = {(r["method"], r["ffn_sparsity"]): r["value"] for r in summary.get("1gpu", {}).get("results", [])}
    rel = [abs(r["value"] / one[(r["method"], r["ffn_sparsity"])] - 1) for r in rows
           if (r["method"], r["ffn_sparsity"]) in one]
    summary["auto"]["max_rel_diff_vs_1gpu"] = max(rel) if rel else None
    print(f"auto (model split over GPUs): {summary['auto']['results']}; max relative difference to 1 GPU "
          f"{summary['auto']['max_rel_diff_vs_1gpu']}")
if {"1gpu", "2gpu"} <= set(summary):
    from shadowsparse.targets import TargetsReader
    a, b = (TargetsReader(work / f"targets-{n}", None, verify=[], keys=("features", "heads", "neurons"))
            for n in ("1gpu", "2gpu"))
    diffs = {}
    for key in ("features", "heads", "neurons"):
        for lo in (0, a.n_rows // 2, a.n_rows - 64):  # first, middle and last rows (each rank's block)
            x, y = a.rows(key, lo, lo + 64).float(), b.rows(key, lo, lo + 64).float()
            diffs[key] = max(diffs.get(key, 0.0), (x - y).abs().max().item())
    summary["max_abs_diff_1gpu_vs_2gpu"] = diffs
    t1, t2 = summary["1gpu"]["seconds"], summary["2gpu"]["seconds"]
    summary["speedup_2gpu"] = round(t1 / t2, 2) if t1 and t2 else None
    print(f"2 GPUs vs 1: {summary['speedup_2gpu']}x; max |difference| of sampled rows {diffs}")
(out / "summary.json").write_text(json.dumps(summary, indent=2))
EOF
exit $STATUS
