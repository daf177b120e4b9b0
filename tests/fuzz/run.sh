#!/usr/bin/env bash
# Runs every libFuzzer target of a fuzz build (-DSY_FUZZ=ON, clang) one after another and
# prints one line per target: runs, seconds, coverage, corpus size, result.
#   tests/fuzz/run.sh BUILD_DIR -runs=3000           # CI: a few thousand inputs each
#   tests/fuzz/run.sh BUILD_DIR -max_total_time=600  # the long run (10 minutes each)
# Each target starts from tests/fuzz/seeds/<target> (when present) and keeps what it finds in
# BUILD_DIR/fuzz-corpus/<target>; a crash leaves its input in BUILD_DIR/fuzz-artifacts and
# makes the script exit non-zero.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
build=${1:?usage: run.sh BUILD_DIR [libFuzzer flags]}
shift
failed=0
printf '%-24s %10s %8s %8s %8s  %s\n' target runs seconds cov corpus result
for bin in "$build"/tests/fuzz/*_fuzz; do
  [ -x "$bin" ] || continue
  name=$(basename "$bin")
  corpus="$build/fuzz-corpus/$name"
  mkdir -p "$corpus" "$build/fuzz-artifacts"
  seeds=()
  [ -d "$here/seeds/$name" ] && seeds=("$here/seeds/$name")
  log="$build/fuzz-artifacts/$name.log"
  start=$(date +%s)
  "$bin" "$@" -max_len=65536 -rss_limit_mb=4096 -timeout=30 -print_final_stats=1 \
    -artifact_prefix="$build/fuzz-artifacts/$name-" "$corpus" "${seeds[@]}" >"$log" 2>&1
  rc=$?
  secs=$(( $(date +%s) - start ))
  runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1)
  cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 | grep -o '[0-9]*')
  n=$(find "$corpus" -type f | wc -l)
  result=clean
  if [ $rc -ne 0 ]; then result="FAILED (rc $rc, see $log)"; failed=1; fi
  printf '%-24s %10s %8s %8s %8s  %s\n' "$name" "${runs:-?}" "$secs" "${cov:-?}" "$n" "$result"
done
exit $failed
