#!/usr/bin/env bash
# The Docker Compose deployment, run for real, the way a user runs it (ctest label `docker`):
#   installs what is missing (docker.io, docker-compose, debootstrap), starts a Docker engine
#   when none runs (and stops it again), makes the debian:bookworm-slim base image when it is
#   missing (debootstrap + docker import: no registry is reachable here), builds the images,
#   brings up the leader with 2 workers and Prometheus on a private subnet, checks greedy
#   tokens through the published port against `switchyard run` on the host, scales to 3
#   workers under load (no request may fail), checks that Prometheus scrapes every rank and
#   that every dashboard panel's query returns data, stops one worker (it drains out and
#   exits 0), checks that a worker with the wrong secret and a leader with a missing model
#   fail with clear messages while the group keeps serving, and tears everything down
#   (also when it fails).
# usage: deploy/compose-test.sh [HOST_SWITCHYARD_BINARY]   (default: build/server/switchyard)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
HOST_BIN=$(readlink -f "${1:-build/server/switchyard}")
PROJECT=sycompose$$
WORK=$(mktemp -d /tmp/sy-compose.XXXXXX)
COMPOSE=(docker-compose -p "$PROJECT" -f deploy/docker-compose.yml)
T0=$(date +%s)
log() { echo "compose-test [$(( $(date +%s) - T0 )) s]: $*" >&2; }
fail() { log "FAIL: $*"; exit 1; }

SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"

# ---- what is needed ---------------------------------------------------------------------
missing=()
for p in docker.io docker-compose debootstrap curl python3; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing ${missing[*]}"
  $SUDO apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
DOCKER=/usr/bin/docker  # Debian's client matches Debian's engine
[ -x "$DOCKER" ] || DOCKER=docker

STARTED_DOCKERD=""
cleanup() {
  local rc=$?
  if [ -n "${LOADGEN_PID:-}" ]; then kill "$LOADGEN_PID" 2>/dev/null || true; fi
  if "$DOCKER" info >/dev/null 2>&1; then
    if [ $rc -ne 0 ]; then
      log "logs of the failed run:"
      "${COMPOSE[@]}" logs --no-color --tail=60 >&2 2>/dev/null || true
    fi
    "${COMPOSE[@]}" --profile dashboard down -v --remove-orphans -t 5 >/dev/null 2>&1 || true
    left=$("$DOCKER" ps -aq --filter "label=com.docker.compose.project=$PROJECT"; \
           "$DOCKER" network ls -q --filter "label=com.docker.compose.project=$PROJECT"; \
           "$DOCKER" volume ls -q --filter "label=com.docker.compose.project=$PROJECT")
    [ -z "$left" ] || { log "left behind: $left"; rc=1; }
  fi
  if [ -n "$STARTED_DOCKERD" ]; then
    kill "$STARTED_DOCKERD" 2>/dev/null || true
    wait "$STARTED_DOCKERD" 2>/dev/null || true
  fi
  rm -rf "$WORK"
  [ $rc -eq 0 ] && log "PASS" || log "FAILED (status $rc)"
  exit $rc
}
trap cleanup EXIT

# ---- the engine and the base image --------------------------------------------------------
if ! "$DOCKER" info >/dev/null 2>&1; then
  log "starting a Docker engine (vfs storage, no iptables)"
  $SUDO dockerd --storage-driver=vfs --iptables=false --ip-masq=false >"$WORK/dockerd.log" 2>&1 &
  STARTED_DOCKERD=$!
  for _ in $(seq 1 120); do "$DOCKER" info >/dev/null 2>&1 && break; sleep 0.5; done
  "$DOCKER" info >/dev/null 2>&1 || fail "the Docker engine did not start: $(tail -5 "$WORK/dockerd.log")"
fi
# Under vfs every image layer and every container is a full copy of its tree: the run needs
# about 5.6 GB at its peak (measured), so a disk short of that fails here, saying so, and not
# half-way through a scale-up.
DOCKER_ROOT=$("$DOCKER" info -f '{{.DockerRootDir}}')
if [ "$("$DOCKER" info -f '{{.Driver}}')" = vfs ]; then
  NEED_MB=${SWITCHYARD_TEST_DOCKER_DISK_MB:-6000}
  FREE_MB=$(df --output=avail -BM "$DOCKER_ROOT" | tail -1 | tr -dc 0-9)
  [ "$FREE_MB" -ge "$NEED_MB" ] || fail "Docker's vfs storage ($DOCKER_ROOT) has $FREE_MB MB free; this test needs about $NEED_MB MB (set SWITCHYARD_TEST_DOCKER_DISK_MB to override)"
fi
if ! "$DOCKER" image inspect debian:bookworm-slim >/dev/null 2>&1; then
  MIRROR=$( (grep -h -E '^(URIs:|deb )' /etc/apt/sources.list.d/*.sources /etc/apt/sources.list \
              2>/dev/null || true) | grep -o -E 'https?://[^ ]+' | head -1 || true)
  MIRROR=${MIRROR:-http://deb.debian.org/debian}
  log "making debian:bookworm-slim with debootstrap from $MIRROR"
  $SUDO debootstrap --variant=minbase bookworm "$WORK/rootfs" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 \
    || fail "debootstrap: $(tail -5 "$WORK/debootstrap.log")"
  $SUDO tar -C "$WORK/rootfs" -c . | "$DOCKER" import - debian:bookworm-slim >/dev/null
  $SUDO rm -rf "$WORK/rootfs"
fi

# ---- build and start -----------------------------------------------------------------------
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
export SWITCHYARD_GRPC_PORT=$(free_port) SWITCHYARD_METRICS_PORT=$(free_port)
export SWITCHYARD_PROMETHEUS_PORT=$(free_port)
export SWITCHYARD_SUBNET=${SWITCHYARD_TEST_SUBNET:-10.231.$(( $$ % 200 + 20 )).0/24}
ADDR=127.0.0.1:$SWITCHYARD_GRPC_PORT
PROM=http://127.0.0.1:$SWITCHYARD_PROMETHEUS_PORT
log "building the images"
"${COMPOSE[@]}" build >"$WORK/build.log" 2>&1 || fail "build: $(tail -20 "$WORK/build.log")"
# Under the vfs storage driver every layer is a full copy of its tree: the build stage's
# layers (compilers and sources, about 1 GB each) are dropped once the runtime image exists,
# so the containers that follow (two full copies each) have the disk; so is the runtime image
# an earlier run left untagged. Only untagged images of this project's Dockerfile go.
"$DOCKER" image prune -f --filter label=org.switchyard.stage >/dev/null
log "images built; Docker's disk: $(df -h --output=used,avail "$DOCKER_ROOT" | tail -1 | awk '{print $1 " used, " $2 " free"}')"
T_BUILT=$(date +%s)
log "up: leader, 2 workers, prometheus (subnet $SWITCHYARD_SUBNET, gRPC on $ADDR)"
"${COMPOSE[@]}" up -d >"$WORK/up.log" 2>&1 || fail "up: $(cat "$WORK/up.log")"

world() {  # ranks in the epoch in force, or -1 (Admin answers tokenless calls on the leader's host)
  "$DOCKER" exec "${PROJECT}_leader_1" switchyard status --json 2>/dev/null |
    python3 -c 'import json,sys; m=json.load(sys.stdin); print(-1 if m.get("reforming") else m.get("worldSize", -1))' 2>/dev/null || echo -1
}
wait_world() {  # N TIMEOUT_S
  for _ in $(seq 1 $(( $2 * 5 ))); do [ "$(world)" = "$1" ] && return 0; sleep 0.2; done
  fail "the group did not reach $1 ranks in $2 s (now $(world))"
}
for _ in $(seq 1 300); do
  "$DOCKER" exec "${PROJECT}_leader_1" switchyard health --quiet && break
  sleep 0.5
done
"$DOCKER" exec "${PROJECT}_leader_1" switchyard health --quiet || fail "the leader is not SERVING"
"$HOST_BIN" health --addr "$ADDR" >/dev/null || fail "health through the published port"
wait_world 3 120
log "leader SERVING, 3 ranks"

# ---- greedy tokens through the published port equal a one-process run on the host ----------
for ids in 1,5,9 300,2,77,4 12; do
  want=$("$HOST_BIN" run --model demo --prompt-ids "$ids" --max-new-tokens 12 --ids-only --ignore-eos 2>/dev/null | tr -s ' \n' ' ' | sed 's/ $//')
  got=$("$HOST_BIN" generate --addr "$ADDR" --prompt-ids "$ids" --max-new-tokens 12 --ids-only --ignore-eos 2>/dev/null | tr -s ' \n' ' ' | sed 's/ $//')
  [ -n "$want" ] && [ "$want" = "$got" ] || fail "prompt $ids: served '$got', run on the host '$want'"
done
log "greedy tokens match the host's one-process run"

# ---- scale up under load --------------------------------------------------------------------
# At a fixed rate, so the load lasts about 40 s however fast the group serves: longer than
# a scale-up takes.
REQUESTS=${SWITCHYARD_TEST_REQUESTS:-800}
"$HOST_BIN" loadgen --addr "$ADDR" --concurrency 16 --rate 20 --requests "$REQUESTS" \
  --prompt-len 16 --max-new-tokens 24 >"$WORK/loadgen.log" 2>&1 &
LOADGEN_PID=$!
sleep 2
"${COMPOSE[@]}" up -d --no-recreate --scale worker=3 >"$WORK/scale.log" 2>&1 || fail "scale: $(cat "$WORK/scale.log")"
wait_world 4 120
kill -0 "$LOADGEN_PID" 2>/dev/null || fail "the load ended before the scale-up did (raise SWITCHYARD_TEST_REQUESTS)"
log "scaled to 3 workers under load"
wait "$LOADGEN_PID" || fail "loadgen: $(tail -20 "$WORK/loadgen.log")"
LOADGEN_PID=""
grep -E "^failed requests +0$" "$WORK/loadgen.log" >/dev/null || fail "requests failed: $(cat "$WORK/loadgen.log")"
grep -E "^successful requests +$REQUESTS$" "$WORK/loadgen.log" >/dev/null || fail "$(cat "$WORK/loadgen.log")"
log "$REQUESTS requests across a scale-up, none failed"

# ---- Prometheus: every rank scraped, every dashboard panel has data -----------------------
for _ in $(seq 1 60); do
  up=$(curl -s "$PROM/api/v1/targets" | python3 -c '
import json,sys
t=json.load(sys.stdin)["data"]["activeTargets"]
print(sum(1 for x in t if x["health"]=="up"), len(t))' 2>/dev/null || echo "0 0")
  [ "$up" = "4 4" ] && break
  sleep 1
done
[ "$up" = "4 4" ] || fail "Prometheus targets up/all: $up (want 4 4: the leader and 3 workers)"
log "Prometheus scrapes the leader and all 3 workers"
python3 - "$PROM" deploy/grafana/switchyard.json <<'PY' || fail "dashboard queries"
import json, sys, urllib.parse, urllib.request
prom, path = sys.argv[1], sys.argv[2]
dash = json.load(open(path))
bad = []
for p in dash["panels"]:
    for t in p["targets"]:
        q = urllib.parse.urlencode({"query": t["expr"]})
        r = json.load(urllib.request.urlopen(f"{prom}/api/v1/query?{q}", timeout=10))
        if r.get("status") != "success" or not r["data"]["result"]:
            bad.append(f'{p["title"]}: {t["expr"]}')
if bad:
    print("no data for:\n  " + "\n  ".join(bad), file=sys.stderr)
    sys.exit(1)
print(f"{sum(len(p['targets']) for p in dash['panels'])} panel queries return data", file=sys.stderr)
PY

# ---- a worker stopped drains out and exits 0 ------------------------------------------------
"$DOCKER" stop -t 90 "${PROJECT}_worker_3" >/dev/null
code=$("$DOCKER" inspect -f '{{.State.ExitCode}}' "${PROJECT}_worker_3")
[ "$code" = "0" ] || fail "a stopped worker exited $code: $("$DOCKER" logs --tail 20 "${PROJECT}_worker_3" 2>&1)"
wait_world 3 60
log "a stopped worker drained out and exited 0"

# ---- bad input ------------------------------------------------------------------------------
set +e
out=$("${COMPOSE[@]}" run --rm --no-deps -e SWITCHYARD_CLUSTER_SECRET=wrong worker 2>&1)
code=$?
set -e
[ "$code" = "3" ] && echo "$out" | grep -q "PERMISSION_DENIED" || fail "a wrong secret: exit $code: $out"
"$HOST_BIN" health --addr "$ADDR" >/dev/null || fail "the group stopped serving after a refused join"
set +e
out=$("${COMPOSE[@]}" run --rm --no-deps leader serve --model=/models/no-such-checkpoint 2>&1)
code=$?
set -e
[ "$code" != "0" ] && echo "$out" | grep -q "/models/no-such-checkpoint" || fail "a missing model: exit $code: $out"
log "a wrong secret (exit 3) and a missing model path (exit $code) fail with clear messages"
log "built in $(( T_BUILT - T0 )) s, ran in $(( $(date +%s) - T_BUILT )) s"
