#!/usr/bin/env bash
# What CI runs (`.ci/run`), in three parts:
#  1. the test configuration (Debug: ASan + UBSan): every CPU test, the Docker Compose
#     deployment included (GPU tests carry the ctest label "gpu" and are left out here; run
#     them with `ctest --test-dir build-test -L gpu` on a machine with a GPU);
#  2. a ThreadSanitizer build of the concurrency suites (label "tsan");
#  3. every libFuzzer target of a clang fuzz build, a few thousand inputs each; the same clang
#     build compiles the `switchyard` binary, so clang's lock analysis (-Wthread-safety, an
#     error) covers every library the daemon links.
set -euo pipefail
cd "$(dirname "$0")/.."
jobs=$(nproc)
BUILD=${SY_TEST_BUILD_DIR:-build-test}
cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Debug -DSY_BUILD_BENCH=OFF >/dev/null
cmake --build "$BUILD" -j"$jobs"
ctest --test-dir "$BUILD" -LE gpu --output-on-failure -j"$jobs" --timeout 600

TSAN=${SY_TSAN_BUILD_DIR:-build-tsan}
cmake -S . -B "$TSAN" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DSY_TSAN=ON -DSY_SANITIZE=OFF \
  -DSY_BUILD_BENCH=OFF -DSY_ENABLE_CUDA=OFF >/dev/null
cmake --build "$TSAN" -j"$jobs" --target parallel_tests scheduler_tests
ctest --test-dir "$TSAN" -L tsan --output-on-failure -j"$jobs" --timeout 600

FUZZ=${SY_FUZZ_BUILD_DIR:-build-fuzz}
CC=clang CXX=clang++ cmake -S . -B "$FUZZ" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DSY_FUZZ=ON \
  -DSY_SANITIZE=OFF -DSY_BUILD_TESTS=OFF -DSY_BUILD_BENCH=OFF -DSY_ENABLE_CUDA=OFF >/dev/null
targets=$(cd tests/fuzz && ls *_fuzz.cc | sed 's/\.cc$//')
# shellcheck disable=SC2086
cmake --build "$FUZZ" -j"$jobs" --target $targets switchyard
bash tests/fuzz/run.sh "$FUZZ" -runs=3000
