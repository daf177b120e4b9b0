#!/usr/bin/env bash
# Soak benchmark: the daemon under steady load for a long time, with TLS on.
#   bench/soak.sh [BINARY] [SECONDS]     (defaults: build/server/switchyard, 600)
# Serves the built-in demo model with TLS (a throwaway CA and certificate) and API keys, then
# runs `loadgen --concurrency 64` in rounds of about a minute until SECONDS have passed,
# sampling the daemon's RSS every 5 s. Prints a row per round (requests, errors, tokens/s,
# p99 TTFT / ITL / E2E, RSS) and checks: no failed request, RSS after the first round within
# 2 % of its first post-warm-up sample, and each round's p99 ITL within 2x of the median
# round's. Exit status 0 when every check holds. Not run by ctest.
set -euo pipefail
bin=$(readlink -f "${1:-build/server/switchyard}")
total=${2:-600}
conc=${SOAK_CONCURRENCY:-64}
work=$(mktemp -d /tmp/sy-soak.XXXXXX)
trap 'kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; rm -rf "$work"' EXIT

# A CA and a server certificate for 127.0.0.1.
openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=soak-ca \
  -keyout "$work/ca.key" -out "$work/ca.pem" 2>/dev/null
openssl req -newkey rsa:2048 -nodes -subj /CN=127.0.0.1 -keyout "$work/server.key" \
  -out "$work/server.csr" 2>/dev/null
printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\n' >"$work/san.ext"
openssl x509 -req -in "$work/server.csr" -CA "$work/ca.pem" -CAkey "$work/ca.key" \
  -CAcreateserial -days 2 -extfile "$work/san.ext" -out "$work/server.pem" 2>/dev/null
head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$work/key"
cp "$work/key" "$work/keys"

"$bin" serve --model demo --host 127.0.0.1 --port 0 --metrics-port 0 \
  --tls-cert "$work/server.pem" --tls-key "$work/server.key" --api-key-file "$work/keys" \
  --max-num-seqs "$conc" --max-queue 1024 >"$work/serve.out" 2>"$work/serve.err" &
pid=$!
for _ in $(seq 1 600); do
  grep -q "serving on" "$work/serve.out" 2>/dev/null && break
  sleep 0.1
done
port=$(grep -o 'listening on [^ ]*' "$work/serve.out" | head -1 | sed 's/.*://')
[ -n "$port" ] || { echo "soak: the daemon did not start"; cat "$work/serve.err"; exit 1; }
rss() { awk '/VmRSS/ {print $2}' "/proc/$pid/status"; }

# Size a round to about a minute from a short calibration run.
lg=("$bin" loadgen --addr "127.0.0.1:$port" --tls-ca "$work/ca.pem" --api-key-file "$work/key"
    --concurrency "$conc" --prompt-len 64 --max-new-tokens 64 --timeout 300)
cal=$("${lg[@]}" --requests "$conc")
rps=$(awk '/request throughput/ {print $NF}' <<<"$cal")
per_round=$(awk -v r="$rps" -v c="$conc" 'BEGIN {n = int(r * 60); if (n < c) n = c; print n}')
echo "soak: demo model, TLS + API key, $conc streams, rounds of $per_round requests, ${total} s"
printf '%5s %8s %6s %10s %10s %10s %10s %10s\n' round requests failed 'tok/s' \
  'TTFT p99' 'ITL p99' 'E2E p99' 'RSS MiB'
start=$(date +%s)
round=0
failed_total=0
: >"$work/rss"
: >"$work/itl"
while [ $(( $(date +%s) - start )) -lt "$total" ]; do
  round=$((round + 1))
  ( while kill -0 "$pid" 2>/dev/null; do rss >>"$work/rss.$round"; sleep 5; done ) &
  sampler=$!
  out=$("${lg[@]}" --requests "$per_round" --seed "$round" || true)
  kill "$sampler" 2>/dev/null || true
  wait "$sampler" 2>/dev/null || true
  kill -0 "$pid" || { echo "soak: the daemon died"; cat "$work/serve.err"; exit 1; }
  ok=$(awk '/successful requests/ {print $NF}' <<<"$out")
  failed=$(awk '/failed requests/ {print $NF}' <<<"$out")
  tps=$(awk '/output token throughput/ {print $NF}' <<<"$out")
  p99() { awk -v k="$1" '$1 == k {print $5}' <<<"$out"; }
  now_rss=$(rss)
  [ "$round" -gt 1 ] && cat "$work/rss.$round" >>"$work/rss"
  p99 ITL >>"$work/itl"
  failed_total=$((failed_total + ${failed:-1}))
  printf '%5d %8s %6s %10s %10s %10s %10s %10.1f\n' "$round" "$ok" "$failed" "$tps" \
    "$(p99 TTFT)" "$(p99 ITL)" "$(p99 E2E)" "$(awk -v k="$now_rss" 'BEGIN {print k / 1024}')"
done
status=0
echo
if [ "$failed_total" -eq 0 ]; then echo "check: no failed request: ok"
else echo "check: $failed_total failed requests: FAIL"; status=1; fi
if [ -s "$work/rss" ]; then
  read -r first lo hi < <(awk 'NR == 1 {f = $1; lo = $1; hi = $1} {if ($1 < lo) lo = $1; if ($1 > hi) hi = $1}
                               END {print f, lo, hi}' "$work/rss")
  spread=$(awk -v f="$first" -v lo="$lo" -v hi="$hi" 'BEGIN {printf "%.2f", 100 * (hi - lo) / f}')
  verdict=$(awk -v s="$spread" 'BEGIN {print (s <= 2.0) ? "ok" : "FAIL"}')
  echo "check: RSS after warm-up $((lo / 1024))-$((hi / 1024)) MiB, spread ${spread} % (<= 2 %): $verdict"
  [ "$verdict" = ok ] || status=1
else
  echo "check: RSS: only one round, nothing after warm-up to compare: FAIL"; status=1
fi
read -r med worst < <(sort -n "$work/itl" | awk '{v[NR] = $1} END {print v[int((NR + 1) / 2)], v[NR]}')
verdict=$(awk -v m="$med" -v w="$worst" 'BEGIN {print (w <= 2 * m) ? "ok" : "FAIL"}')
echo "check: p99 ITL median round ${med} ms, worst ${worst} ms (<= 2x): $verdict"
[ "$verdict" = ok ] || status=1
exit $status
