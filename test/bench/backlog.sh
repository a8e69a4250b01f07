#!/usr/bin/env bash
# backlog.sh: the backlog scenario against a brokerd built from this tree.
#
# Builds brokerd and the load tool, then runs the tool in -mode backlog
# (see test/bench/backlog.go), which itself starts brokerd on a fresh data
# directory and:
#   1. times exec -> CONNECTED on the empty directory;
#   2. reference: 1 producer, 1 consumer, window 64, $REF_DURATION on a queue
#      that never backs up;
#   3. fills one queue with $COUNT persistent 256-byte messages (4 producers,
#      window 64, no consumer), sampling brokerd's VmRSS/RssAnon/RssFile from
#      /proc/PID/status every 250 ms;
#   4. kill -9 brokerd, restarts it on the same directory, times exec ->
#      CONNECTED (and -> a probe message's round trip), reads its memory;
#   5. drains the queue with 4 consumers (client-individual, prefetch 256):
#      drain msg/s, every receipted message must arrive, duplicates counted;
#   6. stops brokerd; prints the summary, the targets (VmRSS <= 256 MiB with
#      the backlog pending, restart < 1 s, drain >= 0.8 x reference) and one
#      JSON line.
#
# Usage:
#   test/bench/backlog.sh                       # COUNT=200000, a quick check
#   COUNT=10000000 test/bench/backlog.sh        # the real case (fill takes minutes)
#   COUNT=1000000 test/bench/backlog.sh -series # extra flags go to the tool
#
# Environment:
#   COUNT          messages in the backlog               (default 200000)
#   REF_DURATION   reference run length                  (default 20s)
#   DATA_ROOT      where the data directory is created   (default ${TMPDIR:-/tmp})
#   STOMP_PORT     brokerd's STOMP port on 127.0.0.1     (default: a free one)
#   ADMIN_PORT     brokerd's admin port on 127.0.0.1     (default: a free one)
#   BROKER_ARGS    extra brokerd flags, e.g. "--store-sync batch"
#   BROKER_REV     build brokerd from this git revision (git archive into the
#                  scratch directory; the checkout is not touched), e.g. to
#                  measure the broker before a change (default: the working tree)
#   BROKER_BIN     use this brokerd binary instead of building one
#   TIME_LIMIT     seconds before the run is interrupted (default 300 + COUNT/1000)
#   KEEP=1         keep the data directory and the build directory
#   LOG=FILE       copy brokerd's log there (it is printed on failure anyway)
# brokerd reads BROKERD_<KEY> variables as configuration (and refuses unknown
# ones): e.g. BROKERD_STORE_SYNC=batch in the environment reaches it as
# store.sync; this script's own variables are therefore named BROKER_*.
#
# The script kills only what it started (the tool, and brokerd by the PID the
# tool recorded), removes its data directory and build directory, and exits
# with the tool's status: 0 clean run and every target met, 3 clean run with a
# target missed, 1 failure (loss, ERROR, broker not back, interrupted), 2 bad
# flags, 124 TIME_LIMIT reached (the tool was interrupted and still reported).
set -uo pipefail

COUNT=${COUNT:-200000}
REF_DURATION=${REF_DURATION:-20s}
DATA_ROOT=${DATA_ROOT:-${TMPDIR:-/tmp}}
BROKER_ARGS=${BROKER_ARGS:-}
TIME_LIMIT=${TIME_LIMIT:-$((300 + COUNT / 1000))}
KEEP=${KEEP:-0}
LOG=${LOG:-}

case $COUNT in '' | *[!0-9]*) echo "backlog.sh: COUNT must be a number" >&2; exit 2 ;; esac

root=$(cd "$(dirname "$0")/../.." && pwd)
work=$(mktemp -d "$DATA_ROOT/bench-backlog.XXXXXX") || exit 1
data=$work/data
bin=$work/bin
mkdir -p "$data" "$bin"
tool_pid=
cleanup() {
  local rc=$? pid
  trap - EXIT INT TERM
  if [ -n "$tool_pid" ] && kill -0 "$tool_pid" 2>/dev/null; then
    kill -TERM "$tool_pid" 2>/dev/null
    for _ in $(seq 100); do kill -0 "$tool_pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$tool_pid" 2>/dev/null
  fi
  # brokerd, if the tool could not stop it: only the PID it recorded, and
  # only if that process is still our binary.
  if [ -s "$work/brokerd.pid" ]; then
    pid=$(cat "$work/brokerd.pid")
    if [ "$(readlink "/proc/$pid/exe" 2>/dev/null)" = "$bin/brokerd" ]; then
      echo "backlog.sh: killing brokerd pid $pid" >&2
      kill -KILL "$pid" 2>/dev/null
    fi
  fi
  [ -n "$LOG" ] && [ -f "$work/brokerd.log" ] && cp "$work/brokerd.log" "$LOG"
  if [ "$KEEP" = 1 ]; then
    echo "backlog.sh: kept $work" >&2
  else
    rm -rf "$work"
  fi
  exit "$rc"
}
# Ctrl-C (or TERM): the tool ends its phase, stops brokerd and still
# reports; a second one makes it kill brokerd and exit at once.
on_signal() {
  if [ -n "$tool_pid" ]; then kill -TERM "$tool_pid" 2>/dev/null; else exit 130; fi
}
trap cleanup EXIT
trap on_signal INT TERM

# Disk: at 1M messages of 256 B the data directory reached ~890 MiB (bbolt
# plus the 64 MiB log; bbolt never shrinks), so ~1 KiB a message.
need=$((COUNT + 256 * 1024)) # KiB
avail=$(df -Pk "$data" | awk 'NR == 2 { print $4 }')
if [ "$avail" -lt "$need" ]; then
  echo "backlog.sh: $DATA_ROOT has $((avail / 1024)) MiB free, COUNT=$COUNT wants ~$((need / 1024)) MiB; set DATA_ROOT" >&2
  exit 1
fi

free_port() { # a port nothing listens on, from a random start
  local p
  for _ in $(seq 50); do
    p=$((20000 + RANDOM % 20000))
    if ! { exec 3<>"/dev/tcp/127.0.0.1/$p"; } 2>/dev/null; then echo "$p"; return 0; fi
    exec 3>&-
  done
  return 1
}
STOMP_PORT=${STOMP_PORT:-$(free_port)} || { echo "backlog.sh: no free port" >&2; exit 1; }
ADMIN_PORT=${ADMIN_PORT:-$(free_port)} || { echo "backlog.sh: no free port" >&2; exit 1; }
[ "$STOMP_PORT" != "$ADMIN_PORT" ] || ADMIN_PORT=$((STOMP_PORT + 1))

BROKER_REV=${BROKER_REV:-}
BROKER_BIN=${BROKER_BIN:-}
echo "backlog.sh: building the load tool into $bin" >&2
(cd "$root" && go build -o "$bin/bench" ./test/bench) || { echo "backlog.sh: build failed" >&2; exit 1; }
if [ -n "$BROKER_BIN" ]; then
  cp "$BROKER_BIN" "$bin/brokerd" || exit 1
  label="brokerd ($BROKER_BIN)"
elif [ -n "$BROKER_REV" ]; then
  rev=$(cd "$root" && git rev-parse --short "$BROKER_REV") || { echo "backlog.sh: no revision $BROKER_REV" >&2; exit 1; }
  echo "backlog.sh: building brokerd from revision $rev" >&2
  mkdir -p "$work/src"
  (cd "$root" && git archive "$rev") | tar -x -C "$work/src" &&
    (cd "$work/src" && go build -o "$bin/brokerd" ./cmd/brokerd) || { echo "backlog.sh: build of $rev failed" >&2; exit 1; }
  rm -rf "$work/src"
  label="brokerd@$rev"
else
  rev=$(cd "$root" && git rev-parse --short HEAD 2>/dev/null)
  dirty=$(cd "$root" && git status --porcelain 2>/dev/null | grep -vc ' test/bench/')
  echo "backlog.sh: building brokerd from the working tree (HEAD $rev, $dirty other uncommitted path(s))" >&2
  (cd "$root" && go build -o "$bin/brokerd" ./cmd/brokerd) || { echo "backlog.sh: build failed" >&2; exit 1; }
  label="brokerd@$rev"
  [ "$dirty" = 0 ] || label="$label+dirty"
fi

echo "backlog.sh: COUNT=$COUNT data in $data, STOMP 127.0.0.1:$STOMP_PORT, admin 127.0.0.1:$ADMIN_PORT, time limit ${TIME_LIMIT}s" >&2
# The tool stops its phase on SIGINT and still reports; after the limit it
# gets one, 60 s later a SIGKILL (and brokerd then dies in cleanup). timeout
# runs the tool in its own process group, so a Ctrl-C reaches it only once,
# through on_signal.
timeout --signal=INT --kill-after=60 "$TIME_LIMIT" \
  "$bin/bench" -mode backlog -label "$label" -count "$COUNT" -ref-duration "$REF_DURATION" \
  -addr "127.0.0.1:$STOMP_PORT" -admin "127.0.0.1:$ADMIN_PORT" \
  -broker "$bin/brokerd --data-dir $data --stomp-addr 127.0.0.1:$STOMP_PORT --admin-addr 127.0.0.1:$ADMIN_PORT $BROKER_ARGS" \
  -broker-log "$work/brokerd.log" -broker-pidfile "$work/brokerd.pid" "$@" &
tool_pid=$!
while :; do
  wait "$tool_pid"
  rc=$?
  kill -0 "$tool_pid" 2>/dev/null || break # else wait was cut short by a signal
done
tool_pid=
if [ "$rc" != 0 ] && [ "$rc" != 3 ] && [ -s "$work/brokerd.log" ]; then
  echo "--- backlog.sh: last lines of brokerd's log:" >&2
  tail -n 30 "$work/brokerd.log" >&2
fi
echo "backlog.sh: data directory size at the end: $(du -sh "$data" 2>/dev/null | cut -f1)" >&2
exit "$rc"
