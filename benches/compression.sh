#!/usr/bin/env bash
# permessage-deflate (issue 15): wsloop's compression profiles beside Node `ws` with
# `perMessageDeflate: true` (benches/ws_deflate_echo.js), echoing a realistic JSON message of
# about 1 KiB (`loadgen echo --json`: deterministic, compresses about 3x), one server after
# another on the same port, alternating (A B C A B C ...) over several rounds; prints the
# medians and the ratios wsloop-shared/peer of each row: messages/s, server CPU per message,
# bytes on the wire per message both ways, latency; then the idle memory per connection of each
# profile. Everything stays on 127.0.0.1, is bounded in time, and every server started here is
# killed on exit. (uWebSockets.js from npm, the peer of compare.sh, is not here: its
# @trufflesuite/uws-js-unofficial build has no permessage-deflate.)
#
#   benches/compression.sh             # full run (about 8 minutes with the defaults)
#   benches/compression.sh --smoke     # CI smoke: wsloop --compression shared only, a few seconds
#                                      # of compressed echoes and 100 idle connections; fails on
#                                      # errors (an echo that does not inflate to the message, a
#                                      # 101 without the extension, an echo not compressed),
#                                      # never on timings
#
# The servers (each a line of `variant` below; the load generator offers
# "permessage-deflate; client_no_context_takeover; server_no_context_takeover" with --deflate):
#   wsloop-shared     wsloop --compression shared
#   wsloop-dedicated  wsloop --compression dedicated, offered what a browser offers (context
#                     takeover both ways; the default offer would be served by the shared compressor)
#   wsloop-off        wsloop with compression off: the same JSON, uncompressed (what
#                     compression costs)
#   node-ws           Node ws, perMessageDeflate: true (its defaults: threshold 1024 bytes, zlib
#                     level 6, 32 KiB window; it accepts the offer's server_no_context_takeover,
#                     so it compresses each echo on its own, as wsloop-shared does)
#   node-ws-takeover  the same server, offered what a browser offers ("permessage-deflate;
#                     client_max_window_bits"): ws keeps its context (its default), and since
#                     the load sends one message again and again, each echo compresses to a
#                     back-reference to the previous one: a best case that real traffic, whose
#                     messages differ, does not get (for context)
#
# Options (defaults in brackets):
#   --rounds R        rounds of the echo rows [5]
#   --idle-rounds R   rounds of the idle rows [3]
#   --duration S      measured seconds per echo run [5]
#   --warmup S        seconds of load before measuring [1]
#   --servers LIST    echo servers, in order ["wsloop-shared wsloop-off node-ws node-ws-takeover",
#                     with wsloop-dedicated after wsloop-shared when available]
#   --idle-servers L  idle-memory servers ["wsloop-off wsloop-shared node-ws", wsloop-dedicated
#                     likewise]
#   --conns LIST      connections of the echo rows, 1 message in flight each ["100 1000"]
#   --size S          the JSON message's minimum size [1024] (it is 1,084 bytes then)
#   --idle-n N        connections held for the idle rows [10000] (0: skip)
#   --port P          port every server listens on [9001]
#   --ws-modules DIR  a node_modules holding ws (else target/interop-node/node_modules, which
#                     .ci/run installs, if it holds ws WS_VERSION, or an install into a
#                     temporary folder)
#   --out DIR         where results go [target/bench-results/compression-DATE]
#   --pin             pin servers to CPU 0 and the load generator to CPU 1 (taskset)
#
# Needs: cargo, and for node-ws: node 20 + npm.
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=5
IDLE_ROUNDS=3
DURATION=5
WARMUP=1
SERVERS=""
IDLE_SERVERS=""
CONNS="100 1000"
SIZE=1024
IDLE_N=10000
PORT=9001
WS_MODULES=""
OUT=""
PIN=0
SMOKE=0
# The version tests/interop.rs and .ci/run install.
WS_VERSION=8.23.0
MAX_MESSAGE=65536

while [ $# -gt 0 ]; do
    case "$1" in
        --rounds) ROUNDS=$2; shift 2 ;;
        --idle-rounds) IDLE_ROUNDS=$2; shift 2 ;;
        --duration) DURATION=$2; shift 2 ;;
        --warmup) WARMUP=$2; shift 2 ;;
        --servers) SERVERS=$2; shift 2 ;;
        --idle-servers) IDLE_SERVERS=$2; shift 2 ;;
        --conns) CONNS=$2; shift 2 ;;
        --size) SIZE=$2; shift 2 ;;
        --idle-n) IDLE_N=$2; shift 2 ;;
        --port) PORT=$2; shift 2 ;;
        --ws-modules) WS_MODULES=$2; shift 2 ;;
        --out) OUT=$2; shift 2 ;;
        --pin) PIN=1; shift ;;
        --smoke)
            SMOKE=1; SERVERS=wsloop-shared; IDLE_SERVERS=wsloop-shared; ROUNDS=1; IDLE_ROUNDS=1
            DURATION=2; WARMUP=0.5; CONNS=100; IDLE_N=100; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "compression.sh: unknown option $1 (try --help)" >&2; exit 2 ;;
    esac
done

ADDR="127.0.0.1:$PORT"
OUT=${OUT:-target/bench-results/compression-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
RESULTS="$OUT/results.txt"
: > "$RESULTS"

. benches/common.sh

# --- the servers: one line each ---------------------------------------------------------------
declare -A KIND SERVER_ARGS LOADGEN_ARGS
variant() { KIND[$1]=$2; SERVER_ARGS[$1]=$3; LOADGEN_ARGS[$1]=$4; }
#       name              runs    its arguments             the load generator's arguments
variant wsloop-shared     wsloop  "--compression shared"    "--deflate"
variant wsloop-dedicated  wsloop  "--compression dedicated" "--deflate --deflate-offer=permessage-deflate;client_max_window_bits"
variant wsloop-off        wsloop  ""                        ""
variant node-ws           node    ""                        "--deflate"
variant node-ws-takeover  node    ""                        "--deflate --deflate-offer=permessage-deflate;client_max_window_bits"

build loadgen
WSLOOP=$(exe wsloop bin)
LOADGEN=$(exe loadgen bench)
for x in "$WSLOOP" "$LOADGEN"; do
    [ -x "$x" ] || { echo "compression.sh: build output not found ($x)" >&2; exit 1; }
done

# The dedicated profile runs when this build has it (its --compression accepts the value).
DEDICATED=""
if "$WSLOOP" --compression dedicated --help > /dev/null 2>&1; then DEDICATED=wsloop-dedicated; fi
SERVERS=${SERVERS:-"wsloop-shared $DEDICATED wsloop-off node-ws node-ws-takeover"}
IDLE_SERVERS=${IDLE_SERVERS:-"wsloop-off wsloop-shared $DEDICATED node-ws"}
for s in $SERVERS $IDLE_SERVERS; do
    [ -n "${KIND[$s]:-}" ] || { echo "compression.sh: unknown server $s" >&2; exit 2; }
done

case " $SERVERS $IDLE_SERVERS " in
    *" node-ws"*)
        if [ -z "$WS_MODULES" ]; then
            WS_MODULES=target/interop-node/node_modules
            if [ "$(node -p "require('./$WS_MODULES/ws/package.json').version" 2>/dev/null)" != "$WS_VERSION" ]; then
                install_npm "ws@$WS_VERSION" "$TMP/ws"
                WS_MODULES="$TMP/ws/node_modules"
            fi
        fi
        WS_MODULES=$(cd "$WS_MODULES" && pwd)
        ;;
esac

SERVER_CPU=""; CLIENT_CPU=""
if [ "$PIN" = 1 ]; then SERVER_CPU="taskset -c 0"; CLIENT_CPU="taskset -c 1"; fi

start_server() { # $1: a variant; sets SERVER_PID
    local name=$1 logf="$OUT/server-$1.log"
    # shellcheck disable=SC2086 # the variant's arguments are words
    case "${KIND[$name]}" in
        wsloop)
            $SERVER_CPU "$WSLOOP" --listen "$ADDR" --idle-timeout 0 --shutdown-timeout 1 \
                --max-message-size "$MAX_MESSAGE" ${SERVER_ARGS[$name]} >> "$logf" 2>&1 &
            ;;
        node)
            # It listens on ADDR only once its permessage-deflate self-check has passed.
            NODE_PATH="$WS_MODULES" $SERVER_CPU node benches/ws_deflate_echo.js --listen "$ADDR" \
                --max-message-size "$MAX_MESSAGE" ${SERVER_ARGS[$name]} >> "$logf" 2>&1 &
            ;;
    esac
    SERVER_PID=$!
    await_server "$name" "$logf"
}

# --- the machine -----------------------------------------------------------------------------
{
    describe_machine
    echo "ws: $([ -n "$WS_MODULES" ] && node -p "require('$WS_MODULES/ws/package.json').version" || echo none)"
    echo "servers: $SERVERS; idle: $IDLE_SERVERS"
    echo "pinned: $([ "$PIN" = 1 ] && echo 'servers CPU 0, load generator CPU 1' || echo no)"
    echo "load at start: $(uptime)"
} > "$OUT/machine.txt"
cat "$OUT/machine.txt" >&2

# --- the rows --------------------------------------------------------------------------------
for n in $CONNS; do
    for r in $(seq "$ROUNDS"); do
        echo "load before echo n=$n round $r: $(cut -d' ' -f1-3 /proc/loadavg)" >> "$OUT/machine.txt"
        for s in $SERVERS; do
            log "echo json>=$SIZE n=$n round $r/$ROUNDS: $s"
            start_server "$s"
            # shellcheck disable=SC2086
            run_loadgen "$s" echo --json -s "$SIZE" -n "$n" -k 1 --warmup "$WARMUP" \
                --duration "$DURATION" ${LOADGEN_ARGS[$s]}
            stop_server
        done
    done
done

if [ "$IDLE_N" -gt 0 ]; then
    for r in $(seq "$IDLE_ROUNDS"); do
        echo "load before idle round $r: $(cut -d' ' -f1-3 /proc/loadavg)" >> "$OUT/machine.txt"
        for s in $IDLE_SERVERS; do
            log "idle memory n=$IDLE_N round $r/$IDLE_ROUNDS: $s"
            start_server "$s" # fresh: the RSS before is the server's as started
            # shellcheck disable=SC2086
            run_loadgen "$s" idle -n "$IDLE_N" --settle 2 ${LOADGEN_ARGS[$s]}
            stop_server 0.5
        done
    done
fi

fail=0
report_runs "an echo that differs or does not inflate, a 101 without the extension" \
    --base wsloop-shared || fail=1
if [ "$SMOKE" = 1 ]; then
    # The smoke checks that the tooling works end to end, never how fast: echoes were verified,
    # every one came back compressed (the message is over the 1,024-byte threshold), and every
    # idle connection negotiated the extension.
    grep -q 'mode=echo .*echoes=[1-9].* deflate=1 compressed_in_pct=100.0 ' "$RESULTS" ||
        { echo "smoke: no compressed echoes" >&2; fail=1; }
    grep -q "mode=idle .*open=$IDLE_N .*deflate=1 errors=0" "$RESULTS" ||
        { echo "smoke: idle connections not all open with permessage-deflate" >&2; fail=1; }
    [ "$fail" = 0 ] && echo "smoke: ok" >&2
fi
exit "$fail"
