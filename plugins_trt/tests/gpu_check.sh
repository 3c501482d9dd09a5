#!/usr/bin/env bash
# Single entry point of the GPU check (run from the repo root): bash plugins_trt/tests/gpu_check.sh
# Picks the first Python whose PyTorch sees a CUDA GPU ($PYTHON first), then runs gpu_check.py:
# build the kernels for this GPU, run test_kernels_gpu.py, time against PyTorch; results in $OUT.
set -euo pipefail
cd "$(dirname "$0")/../.."
# nvcc is often installed without being on PATH.
for dir in /usr/local/cuda/bin /usr/local/cuda-*/bin; do
    if [ -x "$dir/nvcc" ]; then
        case ":$PATH:" in *":$dir:"*) ;; *) PATH="$PATH:$dir" ;; esac
    fi
done
export PATH
for candidate in "${PYTHON:-}" .venv/bin/python python3 python; do
    [ -n "$candidate" ] || continue
    command -v "$candidate" >/dev/null 2>&1 || continue
    if "$candidate" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
        echo "gpu_check: using $candidate ($("$candidate" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda)'))"
        exec timeout 600 "$candidate" plugins_trt/tests/gpu_check.py "$@"
    fi
done
echo "gpu_check: no Python with a CUDA-enabled PyTorch that sees a GPU (set PYTHON=/path/to/python)" >&2
exit 2
