#!/usr/bin/env bash
# GPU check of the kernels: build the CUDA module, the gpu tests of tests/test_ops.py, a benchmark
# against torch's fused AdamW and the copy bandwidth, launch and sync counts of one optimizer step,
# and hpa_reduce's bits on every backend; under 5 minutes, a summary at the end, exit status 0 only
# when every check passed. The logic is bench/gpu_check.py; this runs it with a python found as
# $PYTHON, else python3, else python.
#
#   bash bench/gpu_check.sh                      # on a GPU machine (torch with CUDA, triton, pytest, nvcc)
#   bash bench/gpu_check.sh --dry-run            # on CPU: every step it can (also HPA_GPU_CHECK_DRY_RUN=1)
#   bash bench/gpu_check.sh --steps tests,bits   # a subset (env always runs)
#   PYTHON=/path/to/python HPA_CUDA_ARCHS=90 bash bench/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then
  py="$PYTHON"
elif command -v python3 >/dev/null 2>&1; then
  py=python3
elif command -v python >/dev/null 2>&1; then
  py=python
else
  echo "gpu_check: no python found (set PYTHON)" >&2
  exit 2
fi
exec "$py" bench/gpu_check.py "$@"
