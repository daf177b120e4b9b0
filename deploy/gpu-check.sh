#!/usr/bin/env bash
# The GPU check, sized for one call on a lent GPU machine (under 10 minutes):
#
#   deploy/gpu-check.sh --bundle   here, without a GPU: Release build with CUDA in build-cuda
#                                  and kernels/cuda/make_gpu_bundle.sh → build-cuda/gpu-bundle
#                                  (carry that folder to the GPU host)
#   deploy/gpu-check.sh            on the GPU host: runs the bundle (or, without one, builds
#                                  first where the build packages are installed)
#
# Runs every gpu-labelled test binary with SY_REQUIRE_GPU=1 (no usable GPU fails instead of
# skipping), the CUDA kernel benchmark, the NCCL dispatch benchmark, the model benchmark with
# the cuda backend beside the CPU one, and `switchyard run --device cuda`, then prints one table:
# step, exit code, seconds, and the line that sums the step up. Logs go to $OUT when it is set
# (the device tool brings that folder back), else to /tmp/gpu-check. Exit 0 only when every
# step passed.
set -uo pipefail
cd "$(dirname "$0")/.."
BUILD=${SY_GPU_BUILD_DIR:-build-cuda}
BUNDLE=$BUILD/gpu-bundle
LOGS=${OUT:-/tmp/gpu-check}
mkdir -p "$LOGS"

build_bundle() {
  cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DSY_ENABLE_CUDA=ON \
    -DSY_BUILD_TESTS=ON -DSY_BUILD_BENCH=ON >/dev/null || return 1
  cmake --build "$BUILD" -j"$(nproc)" --target kernels_gpu_tests parallel_gpu_tests \
    model_gpu_tests cuda_kernels_bench dispatch_bench model_bench switchyard || return 1
  bash kernels/cuda/make_gpu_bundle.sh "$BUILD"
}

if [ "${1:-}" = "--bundle" ]; then
  build_bundle
  exit $?
fi

if [ ! -x "$BUNDLE/run-one.sh" ]; then
  echo "no bundle at $BUNDLE: building (needs the build packages of deploy/install-deps.sh)"
  build_bundle > "$LOGS/build.log" 2>&1 || { tail -30 "$LOGS/build.log"; exit 1; }
fi

if command -v nvidia-smi > /dev/null; then nvidia-smi -L | head -4; else echo "no nvidia-smi"; fi
names=() rcs=() secs=() sums=()
step() {  # step NAME TIMEOUT_S SUMMARY_REGEX BINARY [ARGS...]
  local name=$1 limit=$2 pattern=$3
  shift 3
  local t0 rc
  t0=$(date +%s%N)
  timeout "$limit" "$BUNDLE/run-one.sh" "$@" > "$LOGS/$name.log" 2>&1
  rc=$?
  names+=("$name")
  rcs+=("$rc")
  secs+=("$(( ($(date +%s%N) - t0) / 1000000 ))")
  sums+=("$(grep -E "$pattern" "$LOGS/$name.log" | tail -1 | cut -c1-90)")
}
step kernels_gpu_tests 240 '(PASSED|FAILED)' kernels_gpu_tests
step parallel_gpu_tests 120 '(PASSED|FAILED)' parallel_gpu_tests
step cuda_kernels_bench 180 '.' cuda_kernels_bench
step dispatch_bench_nccl 120 'results checked|FAILED|skipped' dispatch_bench --engines=nccl
step model_gpu_tests 240 '(PASSED|FAILED)' model_gpu_tests
# The serving path's products on the GPU (--device cuda) beside the CPU on this host's cores.
# (The first writes the bench checkpoint, ~1.3 GB, to the cache; the second reuses it.)
step model_bench_cuda 240 'checks passed|FAIL' model_bench --backend cuda --reps 2 --decode-steps 8 \
  --batches 1,8,64
step model_bench_cpu 120 'checks passed|FAIL' model_bench --backend cpu --threads "$(nproc)" --reps 1 \
  --decode-steps 4 --batches 1,8
step run_device_cuda 120 '.' switchyard run --device cuda --prompt-ids 1,17,42,99 \
  --max-new-tokens 16 --ids-only

failed=0
printf '\n| step | rc | ms | summary |\n|---|---|---|---|\n'
for i in "${!names[@]}"; do
  printf '| %s | %s | %s | %s |\n' "${names[$i]}" "${rcs[$i]}" "${secs[$i]}" "${sums[$i]}"
  [ "${rcs[$i]}" = 0 ] || failed=1
done
echo "logs: $LOGS"
exit $failed
