#!/usr/bin/env bash
# cluster.sh: a brokerd cluster against RabbitMQ (single node and a 3-node
# quorum queue), with the STOMP load tool (test/bench), in one run.
#
# It builds brokerd and the load tool from this tree, starts its own 3-node
# brokerd cluster on loopback (temporary data directories, free ports,
# --replication-factor 2 --write-quorum 2, store sync left at its default),
# waits until every node reports "converged": true with 3 nodes in its
# active set (then 2 s more for promotion), and starts the two RabbitMQ peers
# unless they already answer:
#   $PEERS/rabbitmq start           single node, STOMP 127.0.0.1:61623
#   $PEERS/rabbitmq-cluster start   3 nodes, STOMP 127.0.0.1:61641-61643
# On exit (normal, error or Ctrl-C) it stops the brokerd nodes by PID and
# only the peers it started itself (with "$PEERS/... stop").
#
# Every run: 256-byte bodies, persistent:true, ack client-individual,
# prefetch 256, $DURATION of sending, one run at a time, a new queue each.
#   1p/1c, window 1 and 64 (WINDOWS):
#     brokerd-cluster  producer on node 1, consumer on node 2
#     rabbit-single    producer and consumer on 127.0.0.1:61623
#     rabbit-quorum    quorum queue (x-queue-type:quorum, durable:true on
#                      SEND and SUBSCRIBE), producer on 61641, consumer on 61642
#   4p/4c, window 64 (SPREAD_PRODUCERS / SPREAD_CONSUMERS):
#     brokerd-cluster  producers round-robin over nodes 1,2,3, consumers
#                      over nodes 2,3,1
#     rabbit-quorum    producers over 61641,61642,61643, consumers over
#                      61642,61643,61641
# The table shows per run msg/s (receipted/s), receipt p50/p99, and the
# ratios of brokerd's msg/s to RabbitMQ's (single node and quorum queue);
# a second table has the counts, the longest gap between two receipts of one
# producer, and the status.
#
# Environment:
#   DURATION          send duration per run               (default 10s)
#   WINDOWS           windows of the 1p/1c runs           (default "1 64")
#   SPREAD            0 to skip the 4p/4c runs            (default 1)
#   SPREAD_PRODUCERS, SPREAD_CONSUMERS                    (default 4, 4)
#   PEERS             directory of the peer scripts       (default /work/shared/peers)
#   RABBIT_LOGIN, RABBIT_PASSCODE                          (default guest/guest)
#   BROKERD_ARGS      extra brokerd flags for every node  (default: none)
#   KEEP              1: keep the temporary directory (brokerd logs and
#                     data, every run's output) instead of deleting it
#   TMPDIR            where the temporary directory goes  (default /tmp)
# Extra arguments go to every run of the load tool, after the defaults.
#
# Exit status: 0 when every run succeeded; 1 when a run lost a receipted
# message, got an ERROR frame or failed otherwise (a connection lost, a
# control receipt missing, hung: killed after DURATION + 120 s), or a
# brokerd node died; 2 when the setup failed (build, cluster, peers);
# 130 after Ctrl-C. After a failure the relevant lines of the brokerd logs
# (WARN/ERROR, and the last lines) are printed.
#
# Ctrl-C: the first one stops the current run's producers (it still drains
# and reports) and skips the remaining runs; a second one kills it.
set -uo pipefail

DURATION=${DURATION:-10s}
WINDOWS=${WINDOWS:-"1 64"}
SPREAD=${SPREAD:-1}
SPREAD_PRODUCERS=${SPREAD_PRODUCERS:-4}
SPREAD_CONSUMERS=${SPREAD_CONSUMERS:-4}
PEERS=${PEERS:-/work/shared/peers}
RABBIT_LOGIN=${RABBIT_LOGIN:-guest}
RABBIT_PASSCODE=${RABBIT_PASSCODE:-guest}
BROKERD_ARGS=${BROKERD_ARGS:-}
KEEP=${KEEP:-0}
RABBIT_SINGLE=127.0.0.1:61623
RABBIT_CLUSTER=(127.0.0.1:61641 127.0.0.1:61642 127.0.0.1:61643)

me=cluster.sh
root=$(cd "$(dirname "$0")/../.." && pwd)
tmp=$(mktemp -d "${TMPDIR:-/tmp}/bench-cluster.XXXXXX") || exit 2

brokerd_pids=()   # PIDs of the nodes this script started
started_peers=()  # peer scripts this script started ("rabbitmq", "rabbitmq-cluster")
peer_jobs=()      # PIDs of peer start commands still running
tool_pid=
interrupted=0
failed_nodes=0

log() { echo "$me: $*" >&2; }

cleanup() {
  local rc=$? pid i
  trap '' INT TERM
  [ -n "$tool_pid" ] && kill -KILL "$tool_pid" 2>/dev/null
  for pid in "${peer_jobs[@]}"; do kill -TERM "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; done # a peer still starting
  if [ "${#brokerd_pids[@]}" -gt 0 ]; then
    log "stopping brokerd nodes (pids ${brokerd_pids[*]})"
    for pid in "${brokerd_pids[@]}"; do kill -TERM "$pid" 2>/dev/null; done
    for pid in "${brokerd_pids[@]}"; do
      for ((i = 0; i < 100; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -0 "$pid" 2>/dev/null && { log "brokerd pid $pid still running 10 s after SIGTERM: SIGKILL"; kill -KILL "$pid" 2>/dev/null; }
      wait "$pid" 2>/dev/null
    done
  fi
  for p in "${started_peers[@]}"; do
    log "stopping $p (started by this script)"
    "$PEERS/$p" stop >&2 || log "$PEERS/$p stop failed"
  done
  if [ "$KEEP" = 1 ]; then log "kept $tmp"; else rm -rf "$tmp"; fi
  exit "$rc"
}
trap cleanup EXIT
on_signal() {
  if [ "$interrupted" = 1 ] || [ -z "$tool_pid" ]; then
    interrupted=1
    log "interrupted: stopping"
    exit 130
  fi
  interrupted=1
  log "interrupted: stopping this run's producers (it still reports); the other runs are skipped (again to stop at once)"
  kill -INT "$tool_pid" 2>/dev/null
}
trap on_signal INT TERM

# ---------------------------------------------------------------------------
# build

log "building brokerd and the load tool into $tmp"
(cd "$root" && go build -o "$tmp/brokerd" ./cmd/brokerd && go build -o "$tmp/bench" ./test/bench) ||
  { log "build failed"; exit 2; }
rev=$(cd "$root" && git rev-parse --short HEAD 2>/dev/null)
dirty=$(cd "$root" && git status --porcelain 2>/dev/null | grep -vc ' test/bench/')
brokerd_label="brokerd@$rev"
[ "${dirty:-0}" = 0 ] || brokerd_label="$brokerd_label+dirty"

# ---------------------------------------------------------------------------
# RabbitMQ peers: started in the background while the brokerd cluster forms

stomp_ready() { # HOST:PORT -> 0 when a CONNECT gets CONNECTED
  local host=${1%:*} port=${1##*:} ok=1
  { exec 3<>"/dev/tcp/$host/$port"; } 2>/dev/null || return 1
  printf 'CONNECT\naccept-version:1.2\nhost:/\nlogin:%s\npasscode:%s\n\n\0' "$RABBIT_LOGIN" "$RABBIT_PASSCODE" >&3
  timeout 3 head -c 9 <&3 2>/dev/null | grep -q CONNECTED && ok=0
  exec 3>&-
  return $ok
}

start_peer() { # NAME ADDR...: start $PEERS/NAME unless every ADDR answers
  local name=$1 a up=1
  shift
  for a in "$@"; do stomp_ready "$a" || { up=0; break; }; done
  if [ "$up" = 1 ]; then
    log "$name already running ($*): using it, leaving it running"
    return 0
  fi
  [ -x "$PEERS/$name" ] || { log "no $PEERS/$name"; return 1; }
  log "starting $name ($PEERS/$name start, log in $tmp/$name.start.log)"
  started_peers+=("$name") # stop it on exit even if start fails halfway
  "$PEERS/$name" start >"$tmp/$name.start.log" 2>&1 &
  peer_jobs+=($!)
}
start_peer rabbitmq "$RABBIT_SINGLE" || exit 2
start_peer rabbitmq-cluster "${RABBIT_CLUSTER[@]}" || exit 2

# ---------------------------------------------------------------------------
# brokerd cluster

used_ports=" "
free_port() { # a TCP port nothing listens on and not handed out yet
  local p
  for _ in $(seq 200); do
    p=$((20000 + RANDOM % 30000))
    case "$used_ports" in *" $p "*) continue ;; esac
    if ! { exec 3<>"/dev/tcp/127.0.0.1/$p"; } 2>/dev/null; then
      used_ports="$used_ports$p "
      echo "$p"
      return 0
    fi
    exec 3>&-
  done
  return 1
}

declare -a STOMP ADMIN GOSSIP
for i in 1 2 3; do
  # free_port runs in a subshell: record the ports here
  for v in STOMP ADMIN GOSSIP; do
    p=$(free_port) || { log "no free port"; exit 2; }
    used_ports="$used_ports$p "
    eval "$v[$i]=$p"
  done
done
for i in 1 2 3; do
  join=()
  [ "$i" != 1 ] && join=(--join "127.0.0.1:${GOSSIP[1]}")
  mkdir -p "$tmp/n$i"
  # shellcheck disable=SC2086
  "$tmp/brokerd" --node-name "n$i" --data-dir "$tmp/n$i/data" \
    --stomp-addr "127.0.0.1:${STOMP[$i]}" --admin-addr "127.0.0.1:${ADMIN[$i]}" \
    --gossip-addr "127.0.0.1:${GOSSIP[$i]}" "${join[@]}" \
    --replication-factor 2 --write-quorum 2 $BROKERD_ARGS >"$tmp/n$i/brokerd.log" 2>&1 &
  brokerd_pids+=($!)
  log "brokerd n$i pid $! STOMP 127.0.0.1:${STOMP[$i]} admin 127.0.0.1:${ADMIN[$i]} gossip 127.0.0.1:${GOSSIP[$i]}"
done
N=("" "127.0.0.1:${STOMP[1]}" "127.0.0.1:${STOMP[2]}" "127.0.0.1:${STOMP[3]}")

node_logs() { # the relevant lines of every node's log
  local i
  for i in 1 2 3; do
    echo "--- brokerd n$i (pid ${brokerd_pids[$((i - 1))]}) log $tmp/n$i/brokerd.log: WARN/ERROR lines (last 40), then the last 15 lines"
    grep -E 'level=(WARN|ERROR)|panic|fatal' "$tmp/n$i/brokerd.log" | tail -n 40
    echo "    ..."
    tail -n 15 "$tmp/n$i/brokerd.log"
  done
}

converged() { # ADMIN_PORT -> 0 when converged with 3 active
  local j
  j=$(curl -s --max-time 2 "http://127.0.0.1:$1/v1/cluster") || return 1
  if command -v jq >/dev/null; then
    [ "$(jq -r '(.converged|tostring) + " " + ((.active_set // [])|length|tostring)' <<<"$j" 2>/dev/null)" = "true 3" ]
  else
    tr -d ' \n' <<<"$j" | grep -q '"converged":true' &&
      [ "$(tr -d ' \n' <<<"$j" | grep -o '"active_set":\[[^]]*\]' | grep -o '"[0-9a-f]*"' | wc -l)" = 3 ]
  fi
}

log "waiting for the brokerd cluster to converge"
deadline=$((SECONDS + 60))
while :; do
  ok=1
  for i in 1 2 3; do
    kill -0 "${brokerd_pids[$((i - 1))]}" 2>/dev/null || { log "brokerd n$i exited during startup"; node_logs >&2; exit 2; }
    converged "${ADMIN[$i]}" || ok=0
  done
  [ "$ok" = 1 ] && break
  if [ "$SECONDS" -ge "$deadline" ]; then
    log "the brokerd cluster did not converge within 60 s"
    for i in 1 2 3; do echo "--- n$i /v1/cluster:"; curl -s --max-time 2 "http://127.0.0.1:${ADMIN[$i]}/v1/cluster"; echo; done >&2
    node_logs >&2
    exit 2
  fi
  [ "$interrupted" = 1 ] && exit 130
  sleep 0.2
done
sleep 2 # promotion
log "brokerd cluster converged (3 active)"

for pid in "${peer_jobs[@]}"; do
  wait "$pid" || { log "a RabbitMQ peer did not start:"; cat "$tmp"/rabbitmq*.start.log >&2; exit 2; }
done
peer_jobs=()
[ "$interrupted" = 1 ] && exit 130
for a in "$RABBIT_SINGLE" "${RABBIT_CLUSTER[@]}"; do
  stomp_ready "$a" || { log "RabbitMQ at $a does not answer"; exit 2; }
done

# ---------------------------------------------------------------------------
# runs

secs() { # a Go duration like 10s, 1m30s, 500ms -> whole seconds, rounded up
  awk -v d="$1" 'BEGIN { t = 0; while (match(d, /^[0-9.]+(ms|h|m|s)/)) {
      u = substr(d, RSTART, RLENGTH); n = u + 0; sub(/^[0-9.]+/, "", u)
      t += (u == "h") ? n * 3600 : (u == "m") ? n * 60 : (u == "ms") ? n / 1000 : n
      d = substr(d, RLENGTH + 1) }
    printf "%d", (t == int(t)) ? t : int(t) + 1 }'
}
limit=$(($(secs "$DURATION") + 120))

status=0
runs=()     # run keys in order
declare -A desc

run() { # KEY DESCRIPTION -- load tool flags
  local key=$1 d=$2 rc
  shift 3
  runs+=("$key")
  desc[$key]=$d
  if [ "$interrupted" = 1 ]; then echo skipped >"$tmp/$key.rc"; return; fi
  log "$key: $d for $DURATION ..."
  # timeout puts the tool in its own process group: a Ctrl-C reaches it
  # only through on_signal. After the limit it gets SIGINT (it stops and
  # still reports), 30 s later SIGKILL.
  timeout --signal=INT --kill-after=30 "$limit" \
    "$tmp/bench" -json -size 256 -persistent=true -ack client-individual -prefetch 256 \
    -duration "$DURATION" "$@" "${EXTRA[@]}" >"$tmp/$key.out" 2>"$tmp/$key.err" &
  tool_pid=$!
  while :; do
    wait "$tool_pid"
    rc=$?
    kill -0 "$tool_pid" 2>/dev/null || break # else wait was cut short by a signal
  done
  tool_pid=
  echo "$rc" >"$tmp/$key.rc"
  grep '^{' "$tmp/$key.out" | tail -n 1 >"$tmp/$key.json"
  [ "$rc" = 0 ] || status=1
  if [[ $key == brokerd-* ]]; then
    for i in 1 2 3; do
      if ! kill -0 "${brokerd_pids[$((i - 1))]}" 2>/dev/null; then
        log "brokerd n$i (pid ${brokerd_pids[$((i - 1))]}) has exited"
        failed_nodes=1 status=1
      fi
    done
  fi
  [ "$rc" = 0 ] || log "$key: FAILED (exit $rc): $(head -c 2000 "$tmp/$key.err")"
}

EXTRA=("$@")
rabbit=(-login "$RABBIT_LOGIN" -passcode "$RABBIT_PASSCODE")
quorum=(-header x-queue-type:quorum -header durable:true)
R=("${RABBIT_CLUSTER[@]}")
scenarios=()
for w in $WINDOWS; do
  s="w$w-1p1c"
  scenarios+=("$s")
  run "brokerd-$s" "brokerd cluster, window $w, producer on n1, consumer on n2" -- \
    -label "$brokerd_label" -window "$w" -producers 1 -consumers 1 -addr "${N[1]}" -consumer-addr "${N[2]}"
  run "single-$s" "rabbitmq single node, window $w" -- \
    -label rabbit-single -window "$w" -producers 1 -consumers 1 -addr "$RABBIT_SINGLE" "${rabbit[@]}"
  run "quorum-$s" "rabbitmq quorum queue, window $w, producer on ${R[0]}, consumer on ${R[1]}" -- \
    -label rabbit-quorum -window "$w" -producers 1 -consumers 1 -addr "${R[0]}" -consumer-addr "${R[1]}" "${rabbit[@]}" "${quorum[@]}"
done
if [ "$SPREAD" = 1 ]; then
  p=$SPREAD_PRODUCERS c=$SPREAD_CONSUMERS
  s="w64-${p}p${c}c"
  scenarios+=("$s")
  run "brokerd-$s" "brokerd cluster, window 64, $p producers over n1,n2,n3, $c consumers over n2,n3,n1" -- \
    -label "$brokerd_label" -window 64 -producers "$p" -consumers "$c" \
    -addr "${N[1]},${N[2]},${N[3]}" -consumer-addr "${N[2]},${N[3]},${N[1]}"
  run "quorum-$s" "rabbitmq quorum queue, window 64, $p producers over ${R[0]},${R[1]},${R[2]}, $c consumers over ${R[1]},${R[2]},${R[0]}" -- \
    -label rabbit-quorum -window 64 -producers "$p" -consumers "$c" \
    -addr "${R[0]},${R[1]},${R[2]}" -consumer-addr "${R[1]},${R[2]},${R[0]}" "${rabbit[@]}" "${quorum[@]}"
fi

# ---------------------------------------------------------------------------
# tables

field() { # FILE KEY -> raw JSON value (strings unquoted), empty if absent
  grep -o "\"$2\":[^,}]*" "$1" 2>/dev/null | head -n 1 | cut -d: -f2- | tr -d '"'
}
cell() { # KEY FIELD FORMAT
  local v
  v=$(field "$tmp/$1.json" "$2")
  if [ -z "$v" ]; then printf -- -; else printf "$3" "$v"; fi
}
ratio() { # KEY_A KEY_B: msg/s of A / msg/s of B
  local a b
  a=$(field "$tmp/$1.json" send_rate) b=$(field "$tmp/$2.json" send_rate)
  if [ -n "$a" ] && [ -n "$b" ]; then awk -v a="$a" -v b="$b" 'BEGIN { if (b > 0) printf "%.2f", a / b; else printf "-" }'; else printf -- -; fi
}
run_status() { # KEY
  local rc lost err
  [ -f "$tmp/$1.rc" ] || { printf -- -; return; }
  rc=$(cat "$tmp/$1.rc")
  case "$rc" in
  skipped) printf skipped; return ;;
  124 | 137) printf 'HUNG(killed)'; return ;;
  esac
  lost=$(field "$tmp/$1.json" lost) err=$(field "$tmp/$1.json" broker_error)
  if [ "$rc" = 0 ]; then printf ok
  elif [ "$err" = true ]; then printf 'FAIL:ERROR'
  elif [ -n "$lost" ] && [ "$lost" != 0 ]; then printf 'FAIL:lost'
  else printf 'FAIL(rc=%s)' "$rc"; fi
}

echo
echo "brokerd cluster vs RabbitMQ: 256 B, persistent, ack client-individual, prefetch 256, $DURATION per run${EXTRA[*]:+, extra flags: ${EXTRA[*]}}"
echo "brokerd: $brokerd_label, 3 nodes, R=2 W=2, store sync default; n1 ${N[1]} n2 ${N[2]} n3 ${N[3]}"
echo "rabbit-single: $RABBIT_SINGLE; rabbit-quorum: quorum queue on ${R[*]}"
echo "msg/s: receipted per second; p50/p99: SEND to RECEIPT in ms; ratios: brokerd msg/s / RabbitMQ msg/s"
echo
printf '%-12s | %-26s | %-26s | %-26s | %-13s\n' "" "brokerd cluster" "rabbit single" "rabbit quorum" "brokerd/rabbit"
printf '%-12s |' "scenario"
for _ in 1 2 3; do printf ' %8s %8s %8s |' "msg/s" "p50" "p99"; done
printf ' %6s %6s\n' single quorum
printf '%s\n' "-------------+----------------------------+----------------------------+----------------------------+--------------"
for s in "${scenarios[@]}"; do
  printf '%-12s |' "$s"
  for t in brokerd single quorum; do
    if [ -f "$tmp/$t-$s.rc" ]; then
      printf ' %8s %8s %8s |' "$(cell "$t-$s" send_rate '%.1f')" "$(cell "$t-$s" receipt_p50_ms '%.2f')" "$(cell "$t-$s" receipt_p99_ms '%.2f')"
    else
      printf ' %8s %8s %8s |' "" "" ""
    fi
  done
  printf ' %6s %6s\n' "$(ratio "brokerd-$s" "single-$s")" "$(ratio "brokerd-$s" "quorum-$s")"
done
echo
printf '%-22s %9s %9s %9s %6s %6s %6s %10s  %s\n' run sent receipted received lost dup redeliv "gap ms" status
for k in "${runs[@]}"; do
  printf '%-22s %9s %9s %9s %6s %6s %6s %10s  %s\n' "$k" \
    "$(cell "$k" sent '%d')" "$(cell "$k" receipted '%d')" "$(cell "$k" received '%d')" \
    "$(cell "$k" lost '%d')" "$(cell "$k" duplicated '%d')" "$(cell "$k" redelivered '%d')" \
    "$(cell "$k" max_receipt_gap_ms '%.1f')" "$(run_status "$k")"
done
echo "(gap ms: the longest time between two consecutive receipts of one producer)"

brokerd_failed=$failed_nodes
for k in "${runs[@]}"; do
  rc=$(cat "$tmp/$k.rc" 2>/dev/null)
  [ "$rc" = 0 ] || [ "$rc" = skipped ] && continue
  echo
  echo "--- $k (${desc[$k]}): exit $rc, stderr:"
  cat "$tmp/$k.err"
  [[ $k == brokerd-* ]] && brokerd_failed=1
done
if [ "$brokerd_failed" = 1 ]; then
  echo
  node_logs
fi
[ "$interrupted" = 1 ] && exit 130
exit $status
