#!/usr/bin/env bash
# Everything that needs a GPU, each step under its own time cap so a slow step costs only itself
# (8 minutes in all on the H200 on 2026-12-04; the caps add up to more, so under a 10-minute
# limit run it as `timeout 585 bash bench/gpu.sh`; STEPS="name ..." runs only the steps named):
#   1. the CUDA kernels: build for this GPU, check against the PyTorch reference, time them
#      against the same PyTorch ops (plugins_trt/tests/gpu_check.sh);
#   2. the torch-backend benchmark on the LLaVA-1.5-7B shape (random weights, fp16):
#      pruned vs ideal vs full at every budget, batch 1 and 4;
#   3. CUDA graphs: the recorded decode step and requests, and `generate --cuda-graph`, against
#      the eager ones (pytest -m gpu), then step 2 again with --cuda-graph (vision, prefill and
#      decode replayed), then decode at budget 64, batch 1 and 8, eager and --cuda-graph;
#   4. the LLaVA-NeXT-7B shape (2x2 images, 2928 visual tokens unpruned): budgets 160, 320
#      and 640 against full, batch 1 (the paper's 2.7x TTFT at 320), eager and --cuda-graph;
#   5. prefix reuse on the 7B shape: time per answer for 1, 4 and 16 questions about one
#      image, the image prefilled once against a full prefill per question (budget 64).
# Results land in build/gpu; with $OUT set (the device tool's output folder, which takes back
# at most 8 files) they are also packed into $OUT/gpu_results.tgz, with the summary beside it.
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS=build/gpu
rm -rf "$RESULTS" && mkdir -p "$RESULTS"
export PYTHONUNBUFFERED=1 VISIONDROP_CACHE=${VISIONDROP_CACHE:-/tmp/visiondrop-cache}
status=0
# step NAME SECONDS COMMAND...: run COMMAND under a time cap, its output in $RESULTS/NAME.log.
step() {
    local name=$1 seconds=$2 started=$SECONDS
    shift 2
    [ -z "${STEPS:-}" ] || [[ " $STEPS " == *" $name "* ]] || return 0  # STEPS="a b": only those steps
    echo "== $name (cap ${seconds} s)"
    timeout "$seconds" "$@" > "$RESULTS/$name.log" 2>&1
    local code=$?
    tail -n 25 "$RESULTS/$name.log"
    echo "== $name: exit $code after $((SECONDS - started)) s" | tee -a "$RESULTS/summary.txt"
    [ $code -eq 0 ] || status=1
}
pack() {
    [ -n "${OUT:-}" ] || return 0
    tar czf "$OUT/gpu_results.tgz" -C "$RESULTS" . && cp "$RESULTS/summary.txt" "$OUT/" 2>/dev/null
}
trap pack EXIT
# The package itself (editable, no downloads: the device has none). Its dependencies must be there:
# the device tool's H200 image lacks pydantic and has an older transformers, so carry wheels of the
# constraints' versions in .whl and put them first on PYTHONPATH (the device README says how):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl $(grep -E \
#     '^(pydantic|pydantic_core|annotated-types|typing-inspection|transformers)==' constraints-cpu.txt)
python3 -m pip install -q --no-deps --no-build-isolation -e . || { echo "could not install the package (pip install -e . needs setuptools>=68)"; exit 1; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$RESULTS/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$RESULTS/gpu.txt"
BENCH_7B=(python3 cli.py bench --model llava-1.5-7b-shape --backend torch --device cuda --dtype fp16)
step kernels 120 env OUT="$RESULTS/kernels" bash plugins_trt/tests/gpu_check.sh
step bench_7b 160 "${BENCH_7B[@]}" --budgets 32,64,128,192 --batch 1,4 --max-new-tokens 16 --warmup 1 --repeats 4 \
    --json "$RESULTS/bench_7b.json" --plot "$RESULTS/bench_7b.png"
step cuda_graph_tests 90 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_static_decode.py tests/test_static_prefill.py
step bench_7b_cuda_graph 120 "${BENCH_7B[@]}" --cuda-graph --budgets 32,64,128,192 --batch 1,4 --max-new-tokens 16 \
    --warmup 1 --repeats 4 --json "$RESULTS/bench_7b_cuda_graph.json"
for mode in eager cuda-graph; do
    step "decode_$mode" 60 "${BENCH_7B[@]}" --budgets 64 --batch 1,8 --max-new-tokens 32 --warmup 1 --repeats 3 \
        $([ "$mode" = cuda-graph ] && echo --cuda-graph) --json "$RESULTS/bench_7b_decode_$mode.json"
done
for mode in eager cuda-graph; do
    step "bench_next_7b_$mode" 65 python3 cli.py bench --model llava-next-7b-shape --backend torch --device cuda --dtype fp16 \
        --batch 1 --max-new-tokens 16 --warmup 1 --repeats 3 $([ "$mode" = cuda-graph ] && echo --cuda-graph) \
        --json "$RESULTS/bench_next_7b_$mode.json"
done
step questions 45 "${BENCH_7B[@]}" --budgets 64 --questions-per-image 1,4,16 --max-new-tokens 8 --warmup 1 --repeats 2 \
    --json "$RESULTS/bench_7b_questions.json"
exit $status
