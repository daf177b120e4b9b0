#!/usr/bin/env bash
# Builds the test configuration (Debug: ASan + UBSan) and runs every CPU test with ctest.
# GPU tests carry the ctest label "gpu" and are left out here (run them with
# `ctest --test-dir build-test -L gpu` on a machine with a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${SY_TEST_BUILD_DIR:-build-test}
cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Debug -DSY_BUILD_BENCH=OFF >/dev/null
cmake --build "$BUILD" -j"$(nproc)"
ctest --test-dir "$BUILD" -LE gpu --output-on-failure -j"$(nproc)" --timeout 600
