#!/usr/bin/env bash
# Packs the GPU test and benchmark binaries with the shared libraries they need into one folder
# that runs on a GPU host with only the NVIDIA driver and CUDA's own libraries (no Debian
# packages there). deploy/gpu-check.sh runs it.
#
#   kernels/cuda/make_gpu_bundle.sh [build_dir]      (default build-cuda; run from repo root)
#
# Result: <build_dir>/gpu-bundle/{kernels_gpu_tests, parallel_gpu_tests, model_gpu_tests,
# cuda_kernels_bench, dispatch_bench, model_bench, switchyard, lib/*.so.*,
# compat/{libstdc++.so.6, libgcc_s.so.1}, run-one.sh}.
# The binaries link the CUDA runtime statically and load cuBLAS with dlopen; NCCL
# (libnccl.so.2) and cuBLAS are not packed (hundreds of MB): run-one.sh finds them on the
# host, in the system's library path or in the pip packages nvidia-nccl-cu13 / nvidia-cublas.
# Needs on the host: glibc >= 2.34 and libstdc++ with GLIBCXX_3.4.29 (gcc 11+); compat/ holds
# this machine's libstdc++ for hosts whose own is older (it needs glibc >= 2.36), used only
# when the first try fails.
set -euo pipefail
build=${1:-build-cuda}
out=$build/gpu-bundle
bins=("$build/tests/kernels_gpu_tests" "$build/tests/parallel_gpu_tests"
      "$build/tests/model_gpu_tests" "$build/bench/cuda_kernels_bench"
      "$build/bench/dispatch_bench" "$build/bench/model_bench" "$build/server/switchyard")
rm -rf "$out"
mkdir -p "$out/compat" "$out/lib"
cp "${bins[@]}" "$out/"
ldd "${bins[@]}" | awk '/=> \// {print $3}' | sort -u |
  while read -r lib; do
    case "$(basename "$lib")" in
      # glibc, the driver, NCCL and CUDA's libraries come from the host.
      libc.so.*|libm.so.*|libdl.so.*|librt.so.*|libpthread.so.*|ld-linux*|libcuda.so.*) ;;
      libnccl.so.*|libcublas*|libcudart*) ;;
      libstdc++.so.*|libgcc_s.so.*) cp -L "$lib" "$out/compat/" ;;
      *) cp -L "$lib" "$out/lib/" ;;
    esac
  done
cat > "$out/run-one.sh" <<'RUN'
#!/usr/bin/env bash
# run-one.sh BINARY [ARGS...]: one bundled binary with the bundle's libraries, NCCL and cuBLAS
# found on this host, and SY_REQUIRE_GPU=1 (a GPU test without a usable GPU fails).
here=$(cd "$(dirname "$0")" && pwd)
bin=$1
shift
export SY_REQUIRE_GPU=1
path=$here/lib
for pkg in nvidia.nccl nvidia.cublas nvidia.cu13; do
  dir=$(python3 -c "import $pkg; print(list($pkg.__path__)[0])" 2>/dev/null)
  [ -n "$dir" ] && [ -d "$dir/lib" ] && path=$path:$dir/lib
done
export LD_LIBRARY_PATH="$path${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
if ! "$here/$bin" --help > /dev/null 2>&1 && ldd "$here/$bin" | grep -q "GLIBCXX.*not found"; then
  echo "host libstdc++ too old: using compat/"
  export LD_LIBRARY_PATH="$here/compat:$LD_LIBRARY_PATH"
fi
exec "$here/$bin" "$@"
RUN
chmod +x "$out/run-one.sh"
du -sh "$out"
