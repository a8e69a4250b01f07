#!/usr/bin/env bash
# compare.sh: run the STOMP load tool (test/bench) against brokerd and RabbitMQ
# with identical parameters and print the figures side by side.
#
# Each window size (default: 1 and 64) is run once per broker, one run at a
# time: 1 producer, 1 consumer, 256-byte bodies, persistent:true (durable),
# ack client-individual, prefetch 256, $DURATION each. This script never
# starts or stops a broker; start them first, e.g. RabbitMQ with
# /work/shared/peers/rabbitmq start.
#
# Environment:
#   BROKERD_ADDR      brokerd STOMP address     (default 127.0.0.1:61613)
#   BROKERD_LOGIN     brokerd login/passcode    (default: none)
#   BROKERD_PASSCODE
#   RABBIT_ADDR       RabbitMQ STOMP address    (default 127.0.0.1:61623)
#   RABBIT_LOGIN      RabbitMQ login/passcode   (default guest/guest)
#   RABBIT_PASSCODE
#   DURATION          send duration per run     (default 10s)
#   WINDOWS           receipt windows to run    (default "1 64")
#   SERIES            1: per-second receipt p99 (-series), rows "sec p99 ..."
#                     (default 1; 0 to leave the flag out)
#   BROKERD_ADMIN     brokerd admin address: count the wraps of its
#                     write-ahead log per run, and show brokerd's own
#                     medians: frame read to RECEIPT written
#                     (brokerd_stomp_receipt_seconds) and one fdatasync of
#                     its log (brokerd_store_log_sync_seconds) (default: none)
#   BROKERD_PID       brokerd's PID: its peak VmRSS/RssAnon per run (default: none)
#   FSYNC_DIR         a directory on brokerd's disk (its data directory): just
#                     before every run, time one log-sized write+fdatasync
#                     there for FSYNC_TIME (default 2s) with `bench -mode
#                     fsync`, and show its p50 and the receipt p50 above it
#                     (what the broker's path adds to the disk) (default: none)
#   ROUNDS            repeat the whole comparison this many times, brokerd and
#                     RabbitMQ alternating, and end with the median of each
#                     round's brokerd/RabbitMQ throughput ratio (default 1);
#                     on a noisy machine one pair of runs is not a measurement
#
# The store's write-ahead log (64 MiB) wraps every ~200k messages of 256 B,
# i.e. every 10-15 s at window 64 on a 2-core machine; with DURATION=60s and
# BROKERD_ADMIN set, the "sec p99 worst" and "log wraps" rows show whether
# a wrap stalls commits (test/bench/walwrap.sh does this on its own brokerd) (window 1 alone commits too slowly to wrap in 60 s;
# add e.g. -producers 8).
# Extra arguments are passed to every run, after the defaults above, e.g.
#   test/bench/compare.sh -size 1024 -prefetch 64
#
# Exit status: 0 when every run succeeded (no loss, no ERROR), 1 otherwise.
set -uo pipefail

BROKERD_ADDR=${BROKERD_ADDR:-127.0.0.1:61613}
BROKERD_LOGIN=${BROKERD_LOGIN:-}
BROKERD_PASSCODE=${BROKERD_PASSCODE:-}
RABBIT_ADDR=${RABBIT_ADDR:-127.0.0.1:61623}
RABBIT_LOGIN=${RABBIT_LOGIN:-guest}
RABBIT_PASSCODE=${RABBIT_PASSCODE:-guest}
DURATION=${DURATION:-10s}
WINDOWS=${WINDOWS:-"1 64"}
SERIES=${SERIES:-1}
BROKERD_ADMIN=${BROKERD_ADMIN:-}
BROKERD_PID=${BROKERD_PID:-}
FSYNC_DIR=${FSYNC_DIR:-}
FSYNC_TIME=${FSYNC_TIME:-2s}
ROUNDS=${ROUNDS:-1}

root=$(cd "$(dirname "$0")/../.." && pwd)
tmp=$(mktemp -d "${TMPDIR:-/tmp}/bench-compare.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

(cd "$root" && go build -o "$tmp/bench" ./test/bench) || { echo "compare.sh: build failed" >&2; exit 1; }

targets=(brokerd rabbitmq)
status=0

run() { # TARGET WINDOW
  local t=$1 w=$2 addr login pass
  local -a opt=()
  shift 2
  if [ -n "$FSYNC_DIR" ]; then
    "$tmp/bench" -mode fsync -fsync-dir "$FSYNC_DIR" -duration "$FSYNC_TIME" -json \
      2>>"$tmp/$t-$w.err" | grep '^{' >"$tmp/$t-$w.fsync" || status=1
  fi
  if [ "$t" = brokerd ]; then
    addr=$BROKERD_ADDR login=$BROKERD_LOGIN pass=$BROKERD_PASSCODE
    [ -n "$BROKERD_ADMIN" ] && opt+=(-admin "$BROKERD_ADMIN")
    [ -n "$BROKERD_PID" ] && opt+=(-pid "$BROKERD_PID")
  else addr=$RABBIT_ADDR login=$RABBIT_LOGIN pass=$RABBIT_PASSCODE; fi
  [ "$SERIES" = 1 ] && opt+=(-series)
  echo "compare.sh: $t @ $addr window=$w for $DURATION ..." >&2
  "$tmp/bench" -json -label "$t" -addr "$addr" -login "$login" -passcode "$pass" \
    -producers 1 -consumers 1 -size 256 -persistent=true -ack client-individual -prefetch 256 \
    -window "$w" -duration "$DURATION" "${opt[@]}" "$@" >"$tmp/$t-$w.out" 2>>"$tmp/$t-$w.err"
  echo $? >"$tmp/$t-$w.rc"
  grep '^{' "$tmp/$t-$w.out" | tail -n 1 >"$tmp/$t-$w.json"
}

table() { # prints the comparison of the runs just done

field() { # FILE KEY -> raw JSON value (strings unquoted), empty if absent
  grep -o "\"$2\":[^,}]*" "$1" 2>/dev/null | head -n 1 | cut -d: -f2- | tr -d '"'
}

cell() { # FILE KEY FORMAT
  local v
  v=$(field "$1" "$2")
  if [ -z "$v" ]; then printf '%s' -; else printf "$3" "$v"; fi
}

echo
printf 'STOMP comparison: 1 producer, 1 consumer, 256 B, persistent, ack client-individual, prefetch 256, %s per run' "$DURATION"
[ $# -gt 0 ] && printf ', extra flags: %s' "$*"
echo
echo "brokerd at $BROKERD_ADDR, rabbitmq at $RABBIT_ADDR"
echo

# header rows
printf '%-18s' ""
for w in $WINDOWS; do printf ' | %-27s' "window=$w"; done
echo
printf '%-18s' "metric"
for w in $WINDOWS; do for t in "${targets[@]}"; do printf ' | %12s' "$t"; done; done
echo
printf '%-18s' "" | tr ' ' -
for w in $WINDOWS; do printf -- '-+-%s' "---------------------------"; done
echo

row() { # LABEL KEY FORMAT
  printf '%-18s' "$1"
  for w in $WINDOWS; do
    for t in "${targets[@]}"; do
      printf ' | %12s' "$(cell "$tmp/$t-$w.json" "$2" "$3")"
    done
  done
  echo
}

row "sent msg/s" send_rate '%.1f'
row "received msg/s" recv_rate '%.1f'
row "e2e p50 ms" lat_p50_ms '%.3f'
row "e2e p99 ms" lat_p99_ms '%.3f'
row "e2e max ms" lat_max_ms '%.3f'
row "receipt p50 ms" receipt_p50_ms '%.3f'
row "receipt p99 ms" receipt_p99_ms '%.3f'
row "receipt max ms" receipt_max_ms '%.3f'
if [ -n "$FSYNC_DIR" ]; then
  printf '%-18s' "disk fdatasync p50"
  for w in $WINDOWS; do for t in "${targets[@]}"; do
    printf ' | %12s' "$(cell "$tmp/$t-$w.fsync" fsync_p50_ms '%.3f')"
  done; done
  echo
  printf '%-18s' "receipt-fsync p50"
  for w in $WINDOWS; do for t in "${targets[@]}"; do
    r=$(field "$tmp/$t-$w.json" receipt_p50_ms) f=$(field "$tmp/$t-$w.fsync" fsync_p50_ms)
    if [ -n "$r" ] && [ -n "$f" ]; then v=$(awk -v r="$r" -v f="$f" 'BEGIN { printf "%.3f", r - f }'); else v=-; fi
    printf ' | %12s' "$v"
  done; done
  echo
fi
if [ "$SERIES" = 1 ]; then
  row "sec p99 median ms" sec_p99_median_ms '%.3f'
  row "sec p99 worst ms" sec_p99_worst_ms '%.3f'
  row "sec w/o receipt" sec_idle '%d'
fi
if [ -n "$BROKERD_ADMIN" ]; then
  row "log wraps" wal_wraps '%d'
  row "wraps waited" wal_switch_waits '%d'
  row "in-broker rcpt p50" broker_receipt_p50_ms '%.3f'
  row "its fdatasync p50" broker_log_sync_p50_ms '%.3f'
fi
if [ -n "$BROKERD_PID" ]; then
  printf '%-18s' "peak VmRSS MiB"
  for w in $WINDOWS; do
    for t in "${targets[@]}"; do
      v=$(field "$tmp/$t-$w.json" peak_rss)
      if [ -n "$v" ]; then v=$(awk -v b="$v" 'BEGIN { printf "%.1f", b / 1048576 }'); else v=-; fi
      printf ' | %12s' "$v"
    done
  done
  echo
fi
row "sent" sent '%d'
row "receipted" receipted '%d'
row "received" received '%d'
row "lost" lost '%d'
row "duplicated" duplicated '%d'
row "redelivered" redelivered '%d'

printf '%-18s' "status"
for w in $WINDOWS; do
  for t in "${targets[@]}"; do
    rc=$(cat "$tmp/$t-$w.rc")
    if [ "$rc" = 0 ]; then s=ok; else s="FAIL(rc=$rc)"; fi
    printf ' | %12s' "$s"
  done
done
echo

# stderr of failed runs
for w in $WINDOWS; do
  for t in "${targets[@]}"; do
    if [ "$(cat "$tmp/$t-$w.rc")" != 0 ] && [ -s "$tmp/$t-$w.err" ]; then
      echo
      echo "--- $t window=$w stderr:"
      cat "$tmp/$t-$w.err"
    fi
  done
done
}

median() { sort -g | awk '{ v[NR] = $1 } END { if (NR == 0) print "-"; else if (NR % 2) printf "%.2f", v[(NR + 1) / 2]; else printf "%.2f", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

for round in $(seq "$ROUNDS"); do
  [ "$ROUNDS" -gt 1 ] && echo "compare.sh: round $round of $ROUNDS" >&2
  for w in $WINDOWS; do
    for t in "${targets[@]}"; do
      rm -f "$tmp/$t-$w".*
      run "$t" "$w" "$@"
      [ "$(cat "$tmp/$t-$w.rc")" = 0 ] || status=1
    done
  done
  [ "$ROUNDS" -gt 1 ] && { echo; echo "=== round $round of $ROUNDS"; }
  table "$@"
  for w in $WINDOWS; do
    b=$(field "$tmp/brokerd-$w.json" send_rate) r=$(field "$tmp/rabbitmq-$w.json" send_rate)
    [ -n "$b" ] && [ -n "$r" ] && awk -v b="$b" -v r="$r" 'BEGIN { if (r > 0) printf "%.4f\n", b / r }' >>"$tmp/ratio-$w"
    if [ -n "$FSYNC_DIR" ]; then
      rc=$(field "$tmp/brokerd-$w.json" receipt_p50_ms) f=$(field "$tmp/brokerd-$w.fsync" fsync_p50_ms)
      [ -n "$rc" ] && [ -n "$f" ] && awk -v r="$rc" -v f="$f" 'BEGIN { printf "%.4f\n", r - f }' >>"$tmp/above-$w"
    fi
  done
done

echo
for w in $WINDOWS; do
  printf 'window=%s: brokerd/rabbitmq sent msg/s, median of %d round(s): %s' "$w" "$ROUNDS" "$(cat "$tmp/ratio-$w" 2>/dev/null | median)"
  [ -n "$FSYNC_DIR" ] && printf '; brokerd receipt p50 above fdatasync p50, median: %s ms' "$(cat "$tmp/above-$w" 2>/dev/null | median)"
  echo
done
exit $status
