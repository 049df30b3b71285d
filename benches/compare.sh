#!/usr/bin/env bash
# Compare wsloop's echo server with uWebSockets.js and a single-threaded tokio-tungstenite echo
# server under the same load (benches/loadgen.rs), one server after another on the same port,
# alternating servers (A B C A B C ...) over several rounds; prints the medians and the ratio
# wsloop/peer of each row. Everything stays on 127.0.0.1, is bounded in time, and every server
# started here is killed on exit.
#
#   benches/compare.sh                 # full comparison (about 15 minutes with the defaults)
#   benches/compare.sh --smoke         # CI smoke: wsloop only, 5 s of echo + a short handshake
#                                      # and idle run; fails on errors, never on timings
#
# Options (defaults in brackets):
#   --rounds R        rounds of A B C [3]
#   --duration S      measured seconds per echo/handshake run [5]
#   --warmup S        seconds of load before measuring [1]
#   --servers LIST    servers to run, in order ["wsloop uws tokio"]; also available:
#                     wsloop-tuned (wsloop with GLIBC_TUNABLES=glibc.cpu.x86_rep_movsb_threshold=
#                     4194304: glibc copies without `rep movsb`, see BENCHMARKS.md);
#                     wsloop-N (wsloop --threads N) and uws-N (uWebSockets.js with N worker
#                     threads), for the scaling row
#   --client-threads T  load generator threads for the echo rows [1]
#   --rows LIST       echo rows as SIZE:N:K ["20:100:1 20:1000:1 20:10000:1 1024:100:1
#                     1024:1000:1 1024:10000:1 16384:100:1 16384:1000:1 16384:10000:1 20:100:16"]
#   --idle-n N        connections held for the idle-memory row [10000] (0: skip)
#   --handshake-c C   concurrent cycles for the handshake-rate row [50] (0: skip)
#   --port P          port every server listens on [9001]
#   --out DIR         where results go [target/bench-results/DATE]
#   --pin             pin servers to CPU 0 and the load generator to CPU 1 (taskset)
#
# Needs: cargo, and for uws: node 20 + npm (the package is installed into a temporary folder).
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=3
DURATION=5
WARMUP=1
SERVERS="wsloop uws tokio"
ROWS="20:100:1 20:1000:1 20:10000:1 1024:100:1 1024:1000:1 1024:10000:1 16384:100:1 16384:1000:1 16384:10000:1 20:100:16"
IDLE_N=10000
HANDSHAKE_C=50
CLIENT_THREADS=1
PORT=9001
OUT=""
PIN=0
SMOKE=0
UWS_PKG="@trufflesuite/uws-js-unofficial@20.30.0-unofficial.0"
MAX_MESSAGE=65536

while [ $# -gt 0 ]; do
    case "$1" in
        --rounds) ROUNDS=$2; shift 2 ;;
        --duration) DURATION=$2; shift 2 ;;
        --warmup) WARMUP=$2; shift 2 ;;
        --servers) SERVERS=$2; shift 2 ;;
        --rows) ROWS=$2; shift 2 ;;
        --idle-n) IDLE_N=$2; shift 2 ;;
        --handshake-c) HANDSHAKE_C=$2; shift 2 ;;
        --client-threads) CLIENT_THREADS=$2; shift 2 ;;
        --port) PORT=$2; shift 2 ;;
        --out) OUT=$2; shift 2 ;;
        --pin) PIN=1; shift ;;
        --smoke)
            SMOKE=1; SERVERS=wsloop; ROUNDS=1; DURATION=5; WARMUP=0.5
            ROWS="1024:100:1"; IDLE_N=100; HANDSHAKE_C=10; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "compare.sh: unknown option $1 (try --help)" >&2; exit 2 ;;
    esac
done

ADDR="127.0.0.1:$PORT"
OUT=${OUT:-target/bench-results/$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
RESULTS="$OUT/results.txt"
: > "$RESULTS"

. benches/common.sh

build loadgen tokio_echo
WSLOOP=$(exe wsloop bin)
LOADGEN=$(exe loadgen bench)
TOKIO=$(exe tokio_echo bench)
for x in "$WSLOOP" "$LOADGEN"; do
    [ -x "$x" ] || { echo "compare.sh: build output not found ($x)" >&2; exit 1; }
done
case " $SERVERS " in *" tokio "*) [ -x "$TOKIO" ] || { echo "compare.sh: tokio_echo not built" >&2; exit 1; } ;; esac

case " $SERVERS " in
    *" uws "*|*" uws-"*) install_uws ;;
esac

SERVER_CPU=""; CLIENT_CPU=""
if [ "$PIN" = 1 ]; then SERVER_CPU="taskset -c 0"; CLIENT_CPU="taskset -c 1"; fi

# --- servers ---------------------------------------------------------------------------------
start_server() { # $1: wsloop | uws | tokio; sets SERVER_PID
    local name=$1 logf="$OUT/server-$1.log"
    case "$name" in
        wsloop)
            $SERVER_CPU "$WSLOOP" --listen "$ADDR" --idle-timeout 0 --shutdown-timeout 1 \
                --max-message-size "$MAX_MESSAGE" >> "$logf" 2>&1 &
            ;;
        wsloop-tuned)
            GLIBC_TUNABLES=glibc.cpu.x86_rep_movsb_threshold=4194304 $SERVER_CPU "$WSLOOP" \
                --listen "$ADDR" --idle-timeout 0 --shutdown-timeout 1 \
                --max-message-size "$MAX_MESSAGE" >> "$logf" 2>&1 &
            ;;
        wsloop-[0-9]*)
            $SERVER_CPU "$WSLOOP" --listen "$ADDR" --idle-timeout 0 --shutdown-timeout 1 \
                --max-message-size "$MAX_MESSAGE" --threads "${name#wsloop-}" >> "$logf" 2>&1 &
            ;;
        uws|uws-[0-9]*)
            local workers=1
            [ "$name" = uws ] || workers=${name#uws-}
            NODE_PATH="$TMP/uws/node_modules" $SERVER_CPU node benches/uws_echo.js \
                --listen "$ADDR" --max-message-size "$MAX_MESSAGE" --workers "$workers" \
                >> "$logf" 2>&1 &
            ;;
        tokio)
            $SERVER_CPU "$TOKIO" --listen "$ADDR" --max-message-size "$MAX_MESSAGE" >> "$logf" 2>&1 &
            ;;
        *) echo "compare.sh: unknown server $name" >&2; exit 2 ;;
    esac
    SERVER_PID=$!
    await_server "$name" "$logf"
}

# --- the machine -----------------------------------------------------------------------------
{
    describe_machine
    echo "load at start: $(uptime)"
} > "$OUT/machine.txt"
cat "$OUT/machine.txt" >&2

# --- the rows --------------------------------------------------------------------------------
for row in $ROWS; do
    IFS=: read -r size n k <<< "$row"
    for r in $(seq "$ROUNDS"); do
        for s in $SERVERS; do
            log "echo size=$size n=$n k=$k round $r/$ROUNDS: $s"
            start_server "$s"
            run_loadgen "$s" echo -s "$size" -n "$n" -k "$k" --warmup "$WARMUP" \
                --duration "$DURATION" --threads "$CLIENT_THREADS"
            stop_server
        done
    done
done

if [ "$HANDSHAKE_C" -gt 0 ]; then
    for r in $(seq "$ROUNDS"); do
        for s in $SERVERS; do
            log "handshake rate c=$HANDSHAKE_C round $r/$ROUNDS: $s"
            start_server "$s"
            run_loadgen "$s" handshake -c "$HANDSHAKE_C" --warmup "$WARMUP" --duration "$DURATION"
            stop_server
        done
    done
fi

if [ "$IDLE_N" -gt 0 ]; then
    for r in $(seq "$ROUNDS"); do
        for s in $SERVERS; do
            log "idle memory n=$IDLE_N round $r/$ROUNDS: $s"
            start_server "$s" # fresh: the RSS before is the server's as started
            run_loadgen "$s" idle -n "$IDLE_N" --settle 2
            stop_server
        done
    done
fi

echo "load at end: $(uptime)" >> "$OUT/machine.txt"
"$LOADGEN" report "$RESULTS" | tee "$OUT/report.md"
echo "results: $RESULTS, report: $OUT/report.md, machine: $OUT/machine.txt" >&2

if [ "$SMOKE" = 1 ]; then
    # The smoke checks that the tooling works end to end, never how fast: every run produced a
    # RESULT with work done and no errors.
    fail=0
    grep -q 'mode=echo .*echoes=[1-9]' "$RESULTS" || { echo "smoke: no echoes" >&2; fail=1; }
    grep -q 'mode=handshake .*cycles=[1-9]' "$RESULTS" || { echo "smoke: no handshakes" >&2; fail=1; }
    grep -q 'mode=idle .*open=100 ' "$RESULTS" || { echo "smoke: idle connections not all open" >&2; fail=1; }
    if grep -q 'failed=1\| errors=[1-9]' "$RESULTS"; then echo "smoke: errors" >&2; fail=1; fi
    [ "$fail" = 0 ] && echo "smoke: ok" >&2
    exit "$fail"
fi
