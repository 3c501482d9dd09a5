#!/usr/bin/env bash
# Everything that needs a GPU, in one call (e.g. the device tool's H200; ~10 minutes):
#   1. the CUDA kernels: build for sm_90, check against the PyTorch reference, time them
#      against the same PyTorch ops (plugins_trt/tests/gpu_check.sh);
#   2. the torch-backend benchmark on the LLaVA-1.5-7B shape (random weights, fp16):
#      pruned vs ideal vs full at every budget, batch 1 and 4;
#   3. prefix reuse on the same shape: time per answer for 1, 4 and 16 questions about one
#      image, the image prefilled once against a full prefill per question (budget 64);
#   4. the LLaVA-NeXT-7B shape (2x2 images, 2928 visual tokens unpruned): budgets 160, 320
#      and 640 against full, batch 1 (the paper's 2.7x TTFT at 320);
#   5. decode as CUDA graphs: the recorded step against the eager one (pytest -m gpu), then
#      the 7B shape at budget 64, batch 1 and 8, eager and --cuda-graph in the same run order.
# Results land in $OUT (the device tool's output folder) or build/gpu.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-build/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 VISIONDROP_CACHE=${VISIONDROP_CACHE:-/tmp/visiondrop-cache}
status=0
# The package itself (editable, no downloads: the device has none); its dependencies are there already.
python3 -m pip install -q --no-deps --no-build-isolation -e . || { echo "could not install the package (pip install -e . needs setuptools>=68)"; exit 1; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
bash plugins_trt/tests/gpu_check.sh || status=1
python3 cli.py bench --model llava-1.5-7b-shape --backend torch --device cuda --dtype fp16 \
    --budgets 32,64,128,192,full --batch 1,4 --max-new-tokens 32 --warmup 2 --repeats 10 \
    --json "$OUT/bench_7b.json" --plot "$OUT/bench_7b.png" 2>&1 | tee "$OUT/bench_7b.log" || status=1
python3 cli.py bench --model llava-1.5-7b-shape --backend torch --device cuda --dtype fp16 --budgets 64 \
    --questions-per-image 1,4,16 --max-new-tokens 16 --warmup 1 --repeats 5 \
    --json "$OUT/bench_7b_questions.json" 2>&1 | tee "$OUT/bench_7b_questions.log" || status=1
python3 cli.py bench --model llava-next-7b-shape --backend torch --device cuda --dtype fp16 \
    --batch 1 --max-new-tokens 32 --warmup 2 --repeats 10 \
    --json "$OUT/bench_next_7b.json" 2>&1 | tee "$OUT/bench_next_7b.log" || status=1
python3 -m pytest -q -m gpu tests/test_static_decode.py 2>&1 | tee "$OUT/cuda_graph_test.log" || status=1
for mode in eager cuda-graph; do
    python3 cli.py bench --model llava-1.5-7b-shape --backend torch --device cuda --dtype fp16 --budgets 64 \
        --batch 1,8 --max-new-tokens 64 --warmup 2 --repeats 5 $([ "$mode" = cuda-graph ] && echo --cuda-graph) \
        --json "$OUT/bench_7b_decode_$mode.json" 2>&1 | tee "$OUT/bench_7b_decode_$mode.log" || status=1
done
exit $status
