#!/usr/bin/env bash
# The decode-speed measurements of docs/benchmarks.md on one GPU host, in one go (rows and logs under $OUT):
#   scripts/gpu_bench.sh [tests] [nm24] [ffn] [decode] [decode-nopdl] [all-models]    (default: tests nm24 decode)
#   tests         the kernel / runtime / lazy-K/V equivalence tests on the GPU (full sizes, Triton compiled)
#   nm24          benchmarks/nm24_kernel.py: the 2:4 GEMVs and FFN blocks against cuBLAS, config sweep
#   ffn           benchmarks/ffn_kernel.py: the gated FFN block against cuBLAS and pre-sliced weights
#   decode        benchmark.py bench=opt13b at batch 1 (the targets), $METHODS
#   decode-nopdl  the same with programmatic dependent launch off (SHADOWSPARSE_PDL=0), in the same session
#   all-models    benchmark.py bench=all (SmolLM2, Llama-2-7B, OPT-13B shapes; batch 1 and 8; every method)
#   sketch        benchmark.py bench=llama2_7b at batch 1 and 8: dense, ffn50 (given sets) and the sketch selector in
#                 the engine (3 and 2 bits), alone and with heads50
#   teal          benchmark.py bench=llama2_7b at batch 1 and 8: input thresholds in the engine (teal 40/50% on every
#                 projection, threshold on the down projection, sketch FFN with teal attention), dense alongside
#   teal-masked   the input-threshold rows of `teal` with the masked-row kernel (SHADOWSPARSE_INPUT_COMPACT=0), A/B
#   selectors     benchmark.py over $SEL_MODELS (Llama-2-7B, Llama-3-8B GQA, Mistral-7B, OPT-13B shapes) at batch 1, 2
#                 and 8 ($SEL_BATCHES; the dense-fallback table of runtime/dispatch.py): every selector the engine serves ($SEL_METHODS), dense alongside; each model capped at $SEL_TIMEOUT s
#   moe           the MoE engine tests on the GPU (Triton compiled), then benchmark.py bench=mixtral (Mixtral-8x7B
#                 shapes, bf16, 123 GB with the engine's copies: an H200; MOE_LAYERS=16 fits an 80 GB card) at batch
#                 $MOE_BATCHES (default [1,8])
#   sparse-input  benchmarks/sparse_input_kernel.py: the input-sparse GEMV alone, compacted vs masked, at 40/50%
#   sketch-x8     the int8-x dp4a sketch (kernels/sketch_x8.py): its tests compiled, then benchmark.py on Llama-2-7B
#                 shapes at batch 1, 2, 8 (the fp32 and dp4a sketch_threshold, alone and with teal40attn), then
#                 benchmarks/sketch_kernel.py (both scoring kernels alone, every X8_CONFIGS entry)
# The GPU image lacks hydra-core/omegaconf: their wheels travel in .whl/ (README "Big models").
set -euo pipefail
OUT=${OUT:-outputs/gpu-bench}
METHODS=${METHODS:-'[dense,dense/kernels,ffn50,ffn50+heads50,predictor+ffn50+heads50,"2:4","2:4+ffn50"]'}
mkdir -p "$OUT"
if ! python3 -c "import hydra, omegaconf" 2>/dev/null; then
    [ -d .whl ] || { echo "hydra-core/omegaconf missing and no .whl/ folder: see README 'Big models'" >&2; exit 2; }
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HYDRA_FULL_ERROR=1
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/nvidia-smi.csv" 2>/dev/null || true
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee "$OUT/env.txt"

parts=("$@")
[ ${#parts[@]} -gt 0 ] || parts=(tests nm24 decode)
for part in "${parts[@]}"; do
    echo "== $part $(date -u +%H:%M:%S)"
    case $part in
        tests) python3 -m pytest -q -p no:cacheprovider -m "not slow" tests/test_kernels.py tests/test_lazy_kv.py \
                   tests/test_runtime.py tests/test_sketch_kernel.py tests/test_engine_selectors.py \
                   tests/test_sparse_input_kernel.py tests/test_engine_input_sparsity.py tests/test_dispatch.py \
                   ${TEST_ARGS:-} > "$OUT/tests.txt" 2>&1 || true
               tail -n 60 "$OUT/tests.txt" ;;  # the whole log comes back: failures keep their messages
        nm24) python3 benchmarks/nm24_kernel.py --out "$OUT/nm24.jsonl" 2>&1 | tee "$OUT/nm24.txt" ;;
        ffn) python3 benchmarks/ffn_kernel.py --tokens 1 8 --out "$OUT/ffn.jsonl" 2>&1 | tee "$OUT/ffn.txt" ;;
        decode) python3 benchmark.py bench=opt13b "bench.batches=[1]" "bench.methods=$METHODS" \
                    bench.out="$OUT/decode.jsonl" 2>&1 | tee "$OUT/decode.txt" ;;
        decode-nopdl) SHADOWSPARSE_PDL=0 python3 benchmark.py bench=opt13b "bench.batches=[1]" \
                          "bench.methods=$METHODS" bench.out="$OUT/decode-nopdl.jsonl" 2>&1 \
                          | tee "$OUT/decode-nopdl.txt" ;;
        all-models) python3 benchmark.py bench=all bench.out="$OUT/all.jsonl" 2>&1 | tee "$OUT/all.txt" ;;
        sketch) python3 benchmark.py bench=llama2_7b "bench.batches=[1,8]" \
                    "bench.methods=[dense,ffn50,sketch+ffn50,sketch2+ffn50,ffn50+heads50,sketch+ffn50+heads50]" \
                    bench.out="$OUT/sketch.jsonl" 2>&1 | tee "$OUT/sketch.txt" ;;
        teal) python3 benchmark.py bench=llama2_7b "bench.batches=[1,8]" \
                  "bench.methods=[dense,teal40,teal50,threshold+ffn50,sketch+ffn50,sketch+ffn50+teal40attn]" \
                  bench.out="$OUT/teal.jsonl" 2>&1 | tee "$OUT/teal.txt" ;;
        teal-masked) SHADOWSPARSE_INPUT_COMPACT=0 python3 benchmark.py bench=llama2_7b "bench.batches=[1,8]" \
                         "bench.methods=[dense,teal40,teal50,threshold+ffn50]" bench.out="$OUT/teal-masked.jsonl" 2>&1 \
                         | tee "$OUT/teal-masked.txt" ;;
        selectors) for m in ${SEL_MODELS:-llama-2-7b llama-3-8b mistral-7b opt-13b}; do
                       timeout "${SEL_TIMEOUT:-900}" python3 benchmark.py "bench.models=[$m]" "bench.batches=${SEL_BATCHES:-[1,2,8]}" \
                           "bench.methods=${SEL_METHODS:-[dense,ffn50+heads50,predictor+ffn50+heads50,teal40,teal50,threshold+ffn50,gate+ffn50,gate_verify+ffn50,sketch+ffn50,sketch_thr+ffn50,sketch_verify+ffn50,sketch+ffn50+teal40attn,sketch_thr+ffn50+teal40attn]}" \
                           bench.out="$OUT/selectors.jsonl" 2>&1 | tee -a "$OUT/selectors.txt" || true
                   done ;;
        moe) python3 -m pytest -q -p no:cacheprovider tests/test_engine_moe.py tests/test_kernels.py -k "moe or in_rows" \
                 > "$OUT/moe-tests.txt" 2>&1 || true
             tail -n 30 "$OUT/moe-tests.txt"
             python3 benchmark.py bench=mixtral "bench.batches=${MOE_BATCHES:-[1,8]}" ${MOE_LAYERS:+bench.layers=$MOE_LAYERS} \
                 bench.out="$OUT/mixtral.jsonl" 2>&1 \
                 | tee "$OUT/mixtral.txt" ;;
        sparse-input) python3 benchmarks/sparse_input_kernel.py --tokens 1 8 --sparsity 0.4 0.5 --per-sm 2 4 \
                          --configs 6 --out "$OUT/sparse-input.jsonl" 2>&1 | tee "$OUT/sparse-input.txt" ;;
        sketch-x8) python3 -m pytest -q -p no:cacheprovider tests/test_sketch_x8.py tests/test_sketch_kernel.py \
                       > "$OUT/sketch-x8-tests.txt" 2>&1 || true
                   tail -n 15 "$OUT/sketch-x8-tests.txt"
                   timeout "${SEL_TIMEOUT:-900}" python3 benchmark.py "bench.models=[llama-2-7b]" \
                       "bench.batches=${SEL_BATCHES:-[1,2,8]}" \
                       "bench.methods=[dense,sketch_thr+ffn50,sketch8_thr+ffn50,sketch_thr+ffn50+teal40attn,sketch8_thr+ffn50+teal40attn]" \
                       bench.out="$OUT/sketch-x8.jsonl" 2>&1 | tee "$OUT/sketch-x8.txt" || true
                   timeout "${KERNEL_TIMEOUT:-300}" python3 benchmarks/sketch_kernel.py --shapes llama-2-7b --rows 1,2,8 \
                       --out "$OUT/sketch-x8-kernel.jsonl" 2>&1 | tee "$OUT/sketch-x8-kernel.txt" || true ;;
        *) echo "unknown part '$part': use tests, nm24, ffn, decode, decode-nopdl, all-models, sketch, teal," \
                "teal-masked, selectors, moe, sparse-input or sketch-x8" >&2
           exit 2 ;;
    esac
done
