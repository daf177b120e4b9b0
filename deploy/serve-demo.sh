#!/usr/bin/env bash
# Builds the release `switchyard` binary and starts the daemon on the built-in demo model
# (written to ~/.cache/switchyard on first start). Extra arguments go to `switchyard serve`.
set -euo pipefail
cd "$(dirname "$0")/.."
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DSY_BUILD_TESTS=OFF >/dev/null
cmake --build build -j"$(nproc)" --target switchyard
exec ./build/server/switchyard serve "$@"
