#!/usr/bin/env bash
# Compare wsloop's topic server (`wsloop --pubsub`) with uWebSockets.js's `app.publish`
# (`node benches/uws_echo.js --pubsub`) under the same load (benches/loadgen.rs, modes broadcast
# and fanout): the same semantics on both (a client's request path is its topic; every message
# it sends reaches every subscriber of that topic, the sender included), one server after
# another on the same port, alternating servers over several rounds (A B A B ...); prints the
# medians and the ratio wsloop/uWS of each row. Everything stays on 127.0.0.1, is bounded in
# time, and every server started here is killed on exit.
#
#   benches/pubsub.sh                  # full comparison (about 10 minutes with the defaults)
#   benches/pubsub.sh --pin            # the same, servers on CPU 0 and the load generator on CPU 1
#   benches/pubsub.sh --smoke          # CI smoke: wsloop only, a few seconds of each mode; fails
#                                      # on errors (a message missing, dropped, out of order),
#                                      # never on timings
#
# The rows:
#   broadcast N   N clients in one topic; each round every client sends one 20-byte message,
#                 and the round ends when every client has received all N (uWebSockets'
#                 broadcast_test): rounds per second; every client must get exactly one message
#                 from each client per round.
#   fanout N:W    N subscribers and one publisher (a subscriber too) in one topic; the publisher
#                 sends 20-byte messages as fast as everyone receives them, with at most W not yet
#                 received by all (W * 22 bytes stays under the 64 KiB backpressure limit, so
#                 nothing may be dropped): deliveries per second; every client must get every
#                 message in order, and wsloop's wsloop_deliveries_dropped_total must stay 0.
# Each row also reports the server's CPU per delivery (utime + stime from /proc/PID/stat, and
# the nanosecond schedstat sum) over the measured interval.
#
# Options (defaults in brackets):
#   --rounds R          rounds of A B [5]
#   --duration S        measured seconds per run [5]
#   --warmup S          seconds of load before measuring [2]
#   --servers LIST      servers to run, in order ["wsloop uws"]
#   --broadcast LIST    broadcast rows, clients per topic ["100 1000"]
#   --fanout LIST       fanout rows as SUBSCRIBERS:WINDOW ["10000:1000 10000:10"]
#   --port P            port every server listens on [9001]; wsloop's metrics on P+1
#   --uws-modules DIR   an installed node_modules with the uWebSockets.js package (else it is
#                       installed into a temporary folder with npm)
#   --out DIR           where results go [target/bench-results/pubsub-DATE]
#   --pin               pin servers to CPU 0 and the load generator to CPU 1 (taskset)
#
# The servers: `wsloop --pubsub --idle-timeout 0 --backpressure-policy drop` (otherwise its
# defaults: 64 KiB backpressure, 16 KiB messages) and uws_echo.js --pubsub with maxBackpressure
# 64 KiB, closeOnBackpressureLimit off (a subscriber over it skips messages, as wsloop's drop
# policy), maxPayloadLength 16 KiB, compression and idle timeout off.
#
# Needs: cargo, and for uws: node 20 + npm.
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=5
DURATION=5
WARMUP=2
SERVERS="wsloop uws"
BROADCAST="100 1000"
FANOUT="10000:1000 10000:10"
PORT=9001
UWS_MODULES=""
OUT=""
PIN=0
SMOKE=0
UWS_PKG="@trufflesuite/uws-js-unofficial@20.30.0-unofficial.0"
MAX_MESSAGE=16384

while [ $# -gt 0 ]; do
    case "$1" in
        --rounds) ROUNDS=$2; shift 2 ;;
        --duration) DURATION=$2; shift 2 ;;
        --warmup) WARMUP=$2; shift 2 ;;
        --servers) SERVERS=$2; shift 2 ;;
        --broadcast) BROADCAST=$2; shift 2 ;;
        --fanout) FANOUT=$2; shift 2 ;;
        --port) PORT=$2; shift 2 ;;
        --uws-modules) UWS_MODULES=$2; shift 2 ;;
        --out) OUT=$2; shift 2 ;;
        --pin) PIN=1; shift ;;
        --smoke)
            SMOKE=1; SERVERS=wsloop; ROUNDS=1; DURATION=2; WARMUP=0.5
            BROADCAST="100"; FANOUT="1000:100"; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "pubsub.sh: unknown option $1 (try --help)" >&2; exit 2 ;;
    esac
done

ADDR="127.0.0.1:$PORT"
METRICS="127.0.0.1:$((PORT + 1))"
OUT=${OUT:-target/bench-results/pubsub-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
RESULTS="$OUT/results.txt"
: > "$RESULTS"

. benches/common.sh

build loadgen
WSLOOP=$(exe wsloop bin)
LOADGEN=$(exe loadgen bench)
for x in "$WSLOOP" "$LOADGEN"; do
    [ -x "$x" ] || { echo "pubsub.sh: build output not found ($x)" >&2; exit 1; }
done

case " $SERVERS " in
    *" uws "*)
        if [ -z "$UWS_MODULES" ]; then
            install_uws
            UWS_MODULES="$TMP/uws/node_modules"
        fi
        ;;
esac

SERVER_CPU=""; CLIENT_CPU=""
if [ "$PIN" = 1 ]; then SERVER_CPU="taskset -c 0"; CLIENT_CPU="taskset -c 1"; fi

# --- servers ---------------------------------------------------------------------------------
start_server() { # $1: wsloop | uws; sets SERVER_PID
    local name=$1 logf="$OUT/server-$1.log"
    case "$name" in
        wsloop)
            $SERVER_CPU "$WSLOOP" --pubsub --listen "$ADDR" --metrics-listen "$METRICS" \
                --idle-timeout 0 --shutdown-timeout 1 --backpressure-policy drop \
                >> "$logf" 2>&1 &
            ;;
        uws)
            NODE_PATH="$UWS_MODULES" $SERVER_CPU node benches/uws_echo.js --pubsub \
                --listen "$ADDR" --max-message-size "$MAX_MESSAGE" >> "$logf" 2>&1 &
            ;;
        *) echo "pubsub.sh: unknown server $name" >&2; exit 2 ;;
    esac
    SERVER_PID=$!
    await_server "$name" "$logf"
}

# wsloop's metrics, for the dropped deliveries the load generator checks.
metrics_of() { [ "$1" = wsloop ] && echo "--metrics-addr $METRICS" || true; }

# --- the machine -----------------------------------------------------------------------------
{
    describe_machine
    echo "pinned: $([ "$PIN" = 1 ] && echo 'servers CPU 0, load generator CPU 1' || echo no)"
    echo "load at start: $(uptime)"
} > "$OUT/machine.txt"
cat "$OUT/machine.txt" >&2

# --- the rows --------------------------------------------------------------------------------
for n in $BROADCAST; do
    for r in $(seq "$ROUNDS"); do
        for s in $SERVERS; do
            log "broadcast n=$n round $r/$ROUNDS: $s"
            start_server "$s"
            run_loadgen "$s" broadcast -n "$n" --warmup "$WARMUP" --duration "$DURATION" \
                $(metrics_of "$s")
            stop_server 0.5
        done
    done
done

for row in $FANOUT; do
    IFS=: read -r n w <<< "$row"
    for r in $(seq "$ROUNDS"); do
        for s in $SERVERS; do
            log "fanout n=$n window=$w round $r/$ROUNDS: $s"
            start_server "$s"
            run_loadgen "$s" fanout -n "$n" --window "$w" --warmup "$WARMUP" --duration "$DURATION" \
                $(metrics_of "$s")
            stop_server 0.5
        done
    done
done

fail=0
report_runs "a message missing, dropped, out of order, or a stall" || fail=1
if [ "$SMOKE" = 1 ]; then
    # The smoke checks that the tooling works end to end, never how fast: every run produced a
    # RESULT with work done, verified, and nothing dropped.
    grep -q 'mode=broadcast .*rounds=[1-9]' "$RESULTS" || { echo "smoke: no broadcast rounds" >&2; fail=1; }
    grep -q 'mode=fanout .*deliveries=[1-9].* server_dropped=0' "$RESULTS" ||
        { echo "smoke: no verified fan-out" >&2; fail=1; }
    [ "$fail" = 0 ] && echo "smoke: ok" >&2
fi
exit "$fail"
