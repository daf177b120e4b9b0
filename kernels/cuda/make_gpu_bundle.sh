#!/usr/bin/env bash
# Packs the CUDA kernel tests and benchmark with the shared libraries they need into one
# folder that runs on a GPU host with only the NVIDIA driver (no Debian packages there).
#
#   kernels/cuda/make_gpu_bundle.sh [build_dir]      (default build-cuda; run from repo root)
#
# Result: <build_dir>/gpu-bundle/{kernels_gpu_tests, cuda_kernels_bench, libabsl_*.so.*,
# run.sh, compat/{libstdc++.so.6, libgcc_s.so.1}}. The binaries link the CUDA runtime
# statically and load cuBLAS with dlopen if the host has it. Needs on the host: glibc >= 2.34
# and libstdc++ with GLIBCXX_3.4.29 (gcc 11+); compat/ holds this machine's libstdc++ for
# hosts whose own is older (it needs glibc >= 2.36), used only when the first try fails.
set -euo pipefail
build=${1:-build-cuda}
out=$build/gpu-bundle
rm -rf "$out"
mkdir -p "$out/compat"
cp "$build/tests/kernels_gpu_tests" "$build/bench/cuda_kernels_bench" "$out/"
ldd "$out/kernels_gpu_tests" "$out/cuda_kernels_bench" | awk '/=> \// {print $3}' | sort -u |
  while read -r lib; do
    case "$(basename "$lib")" in
      libabsl_*) cp -L "$lib" "$out/" ;;
      libstdc++.so.*|libgcc_s.so.*) cp -L "$lib" "$out/compat/" ;;
    esac
  done
cat > "$out/run.sh" <<'RUN'
#!/usr/bin/env bash
# Runs the CUDA kernel tests (failing, not skipping, if the GPU is unusable) and the benchmark.
cd "$(dirname "$0")"
nvidia-smi -L || true
ldd --version | head -1
export SY_REQUIRE_GPU=1
export LD_LIBRARY_PATH="$PWD${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
if ! ./kernels_gpu_tests --gtest_list_tests > /dev/null 2>&1; then
  echo "host libstdc++ too old or missing: using compat/"
  export LD_LIBRARY_PATH="$PWD/compat:$LD_LIBRARY_PATH"
fi
./kernels_gpu_tests; tests_rc=$?
./cuda_kernels_bench; bench_rc=$?
echo "kernels_gpu_tests rc=$tests_rc cuda_kernels_bench rc=$bench_rc"
exit $(( tests_rc != 0 || bench_rc != 0 ))
RUN
chmod +x "$out/run.sh"
du -sh "$out"
