#!/usr/bin/env bash
# walwrap.sh: receipt latency across wraps of brokerd's write-ahead log.
#
# Builds brokerd and the load tool, starts brokerd on a fresh data directory
# and runs the tool with -series (per-second receipt p99/max), -admin (wraps
# of the store's 64 MiB log, checkpoints or segment switches, placed in their
# second) and -pid (brokerd's memory), once per entry of RUNS, one after the other. Each
# run prints its summary (overall receipt p50/p99/max, the worst seconds,
# seconds within 1 s of a log wrap against the others) and its JSON line
# (with the whole series). brokerd is stopped and the directory removed at
# the end.
#
# A 256-byte message costs ~320 B of log (SEND + ACK), so the log wraps about
# every 200k messages: every ~10-15 s at window 64 on a 2-core machine, but
# only every few minutes at window 1 with one producer. The default runs are
# therefore window 64 with 1 producer, and window 1 with 16 producers (each
# waits for its receipt before the next SEND; group commit serves them
# together).
#
# Usage:
#   test/bench/walwrap.sh                        # DURATION=60s each
#   DURATION=30s test/bench/walwrap.sh
#   RUNS="64:1 1:1" DURATION=300s test/bench/walwrap.sh
#   test/bench/walwrap.sh -size 1024             # extra flags go to every run
#
# Environment:
#   RUNS          WINDOW:PRODUCERS entries          (default "64:1 1:16")
#   DURATION      send duration per run             (default 60s)
#   CONSUMERS     consumers per run                 (default 1 for 1 producer, else 4)
#   DATA_ROOT     where the data directory goes     (default ${TMPDIR:-/tmp})
#   BROKER_ARGS  extra brokerd flags
#   KEEP=1        keep the data and build directory
# brokerd reads BROKERD_<KEY> variables as configuration (and refuses unknown
# ones): e.g. BROKERD_STORE_SYNC=batch in the environment reaches it as
# store.sync; this script's own variables are therefore named BROKER_*.
#
# Exit status: 0 when every run succeeded, 1 otherwise. Kills only the
# brokerd it started (by PID).
set -uo pipefail

RUNS=${RUNS:-"64:1 1:16"}
DURATION=${DURATION:-60s}
CONSUMERS=${CONSUMERS:-}
DATA_ROOT=${DATA_ROOT:-${TMPDIR:-/tmp}}
BROKER_ARGS=${BROKER_ARGS:-}
KEEP=${KEEP:-0}

root=$(cd "$(dirname "$0")/../.." && pwd)
work=$(mktemp -d "$DATA_ROOT/bench-walwrap.XXXXXX") || exit 1
bin=$work/bin
mkdir -p "$work/data" "$bin"
broker_pid=
bench_pid=
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  [ -n "$bench_pid" ] && kill -TERM "$bench_pid" 2>/dev/null && sleep 1 && kill -KILL "$bench_pid" 2>/dev/null
  if [ -n "$broker_pid" ] && kill -0 "$broker_pid" 2>/dev/null; then
    kill -TERM "$broker_pid"
    for _ in $(seq 100); do kill -0 "$broker_pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$broker_pid" 2>/dev/null
  fi
  if [ "$KEEP" = 1 ]; then echo "walwrap.sh: kept $work" >&2; else rm -rf "$work"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() {
  local p
  for _ in $(seq 50); do
    p=$((20000 + RANDOM % 20000))
    if ! { exec 3<>"/dev/tcp/127.0.0.1/$p"; } 2>/dev/null; then echo "$p"; return 0; fi
    exec 3>&-
  done
  return 1
}
stomp=$(free_port) && admin=$(free_port) || { echo "walwrap.sh: no free port" >&2; exit 1; }
[ "$stomp" != "$admin" ] || admin=$((stomp + 1))

(cd "$root" && go build -o "$bin/brokerd" ./cmd/brokerd && go build -o "$bin/bench" ./test/bench) ||
  { echo "walwrap.sh: build failed" >&2; exit 1; }

# shellcheck disable=SC2086 # BROKER_ARGS is a list of flags
"$bin/brokerd" --data-dir "$work/data" --stomp-addr "127.0.0.1:$stomp" --admin-addr "127.0.0.1:$admin" \
  $BROKER_ARGS >"$work/brokerd.log" 2>&1 &
broker_pid=$!
for _ in $(seq 300); do
  if { exec 3<>"/dev/tcp/127.0.0.1/$stomp"; } 2>/dev/null; then exec 3>&-; break; fi
  kill -0 "$broker_pid" 2>/dev/null || { echo "walwrap.sh: brokerd exited:" >&2; cat "$work/brokerd.log" >&2; exit 1; }
  sleep 0.1
done
echo "walwrap.sh: brokerd pid $broker_pid, STOMP 127.0.0.1:$stomp, admin 127.0.0.1:$admin, data $work/data" >&2

status=0
for spec in $RUNS; do
  w=${spec%%:*} p=${spec#*:}
  c=$CONSUMERS
  [ -n "$c" ] || { [ "$p" = 1 ] && c=1 || c=4; }
  echo "walwrap.sh: window=$w producers=$p consumers=$c for $DURATION" >&2
  "$bin/bench" -label "brokerd w$w p$p" -addr "127.0.0.1:$stomp" -admin "127.0.0.1:$admin" -pid "$broker_pid" \
    -series -window "$w" -producers "$p" -consumers "$c" -duration "$DURATION" "$@" &
  bench_pid=$!
  wait "$bench_pid" || status=1
  bench_pid=
  echo
done
if ! kill -0 "$broker_pid" 2>/dev/null; then
  echo "walwrap.sh: brokerd died; its log:" >&2
  tail -n 30 "$work/brokerd.log" >&2
  status=1
fi
exit $status
