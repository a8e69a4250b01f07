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
#                     write-ahead log per run (default: none)
#   BROKERD_PID       brokerd's PID: its peak VmRSS/RssAnon per run (default: none)
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
  if [ "$t" = brokerd ]; then
    addr=$BROKERD_ADDR login=$BROKERD_LOGIN pass=$BROKERD_PASSCODE
    [ -n "$BROKERD_ADMIN" ] && opt+=(-admin "$BROKERD_ADMIN")
    [ -n "$BROKERD_PID" ] && opt+=(-pid "$BROKERD_PID")
  else addr=$RABBIT_ADDR login=$RABBIT_LOGIN pass=$RABBIT_PASSCODE; fi
  [ "$SERIES" = 1 ] && opt+=(-series)
  echo "compare.sh: $t @ $addr window=$w for $DURATION ..." >&2
  "$tmp/bench" -json -label "$t" -addr "$addr" -login "$login" -passcode "$pass" \
    -producers 1 -consumers 1 -size 256 -persistent=true -ack client-individual -prefetch 256 \
    -window "$w" -duration "$DURATION" "${opt[@]}" "$@" >"$tmp/$t-$w.out" 2>"$tmp/$t-$w.err"
  echo $? >"$tmp/$t-$w.rc"
  grep '^{' "$tmp/$t-$w.out" | tail -n 1 >"$tmp/$t-$w.json"
}

for w in $WINDOWS; do
  for t in "${targets[@]}"; do
    run "$t" "$w" "$@"
    [ "$(cat "$tmp/$t-$w.rc")" = 0 ] || status=1
  done
done

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
if [ "$SERIES" = 1 ]; then
  row "sec p99 median ms" sec_p99_median_ms '%.3f'
  row "sec p99 worst ms" sec_p99_worst_ms '%.3f'
  row "sec w/o receipt" sec_idle '%d'
fi
if [ -n "$BROKERD_ADMIN" ]; then
  row "log wraps" wal_wraps '%d'
  row "wraps waited" wal_switch_waits '%d'
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
exit $status
