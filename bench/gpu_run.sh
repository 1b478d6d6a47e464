#!/usr/bin/env bash
# The first GPU run in one command, from the repository root of a machine with a CUDA GPU:
#
#   bash bench/gpu_run.sh            # results in $OUT/gpu-<device>/ (or bench/results/gpu-<device>/)
#
# Steps, each with its own time limit so the whole run stays under 8 minutes (the limits sum to
# 445 s, plus 5 s each to kill a step that overruns) and a failing step does not stop the others: (1) the environment (nvidia-smi, versions);
# (2) build sparseode._C with the CUDA kernels for this GPU's architecture only (editable install,
# all cores); (3) the GPU tests: tests/ops/test_cuda.py (CUDA C++ and compiled Triton per-layer
# kernels), tests/ops/test_cuda_field.py (the fused field's Triton kernel, the CUDA feature-major
# kernel and non-finite pass), tests/ops/test_gpu_readiness.py; (4) bench/gpu_field.py (the fused
# field against dense cuBLAS / FFJORD-style A); (5) bench/gpu_kernels.py on a reduced grid (one
# pruned layer against cuBLAS and cuSPARSE). Every step's output goes to <step>.log beside
# summary.txt (status and seconds per step). Nothing here is timed against a target: the numbers are
# whatever the run measures, named after the device.
set -uo pipefail

cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET  # the compiled kernels, not the interpreter

device=$($PY -c "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else '')" 2>/dev/null)
if [ -z "$device" ]; then
  echo "bench/gpu_run.sh: no CUDA GPU visible to torch ($($PY -c 'import torch; print(torch.__version__, torch.version.cuda)' 2>&1))" >&2
  exit 2
fi
slug=$(echo "$device" | tr '[:upper:]' '[:lower:]' | sed -E 's/[^a-z0-9]+/-/g; s/^-+|-+$//g')
dir="${OUT:-bench/results}/gpu-$slug"
mkdir -p "$dir"
summary="$dir/summary.txt"
echo "device: $device" > "$summary"
failed=0

# step <name> <seconds> <command...>: runs it under a time limit, logs it, records status and time.
step() {
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  echo "== $name (limit ${limit}s): $*"
  timeout --kill-after=5 "$limit" "$@" > "$dir/$name.log" 2>&1
  local rc=$?
  local status=ok
  [ $rc -eq 124 ] && status="timed out after ${limit}s"
  [ $rc -ne 0 ] && [ $rc -ne 124 ] && status="failed (exit $rc)"
  [ $rc -ne 0 ] && failed=1
  printf '%-14s %-26s %4ds\n' "$name" "$status" $((SECONDS - t0)) | tee -a "$summary"
  tail -n 3 "$dir/$name.log"
}

arch=$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
step environment 10 bash -c "nvidia-smi; $PY -c 'import torch, sys; print(sys.version); print(torch.__version__, torch.version.cuda); import triton; print(\"triton\", triton.__version__)'; nvcc --version"
step build 170 env SPARSEODE_CUDA=1 TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS="$(nproc)" \
  $PY -m pip install --no-build-isolation --no-deps -e .
step tests 110 $PY -m pytest -q -rfEs tests/ops/test_cuda.py tests/ops/test_cuda_field.py tests/ops/test_gpu_readiness.py
step field_bench 110 $PY bench/gpu_field.py --out "$dir" --warmup 10 --rep 40
step kernel_bench 45 $PY bench/gpu_kernels.py --hidden 1024 4096 --batch 4096 --densities 0.1 0.05 \
  --dtypes float16 float32 --warmup 10 --rep 40 --json "$dir/gpu-kernels.json" --csv "$dir/gpu-kernels.csv"
echo "total ${SECONDS}s" | tee -a "$summary"
echo "results in $dir"
exit $failed
