#!/usr/bin/env bash
# TLS (issue 16): wsloop serving wss:// beside wsloop serving plain ws:// and a tokio-tungstenite
# server on tokio-rustls (benches/tokio_echo.rs --tls-cert/--tls-key), in the same run: echoes
# of 20 B, 1 KiB and 16 KiB at 100 and 1,000 connections (one message in flight each), TLS
# handshakes per second (connect, full TLS handshake, upgrade, close handshake; C concurrent;
# no session resumption), and idle memory per connection; one server after another on the same
# port, alternating (A B C A B C ...) over several rounds; prints the medians and the ratios
# wsloop-tls/peer of each row. The load generator speaks wss:// with rustls (`loadgen
# --tls-ca`, the `ring` provider as the servers', TLS 1.3). A test CA and a server certificate
# for localhost and 127.0.0.1 (ECDSA P-256) are made with the openssl CLI in a temporary folder
# removed on exit, never committed. Everything stays on 127.0.0.1, is bounded in time, and
# every server started here is killed on exit.
#
#   benches/tls.sh                 # full run (about 10 minutes with the defaults)
#   benches/tls.sh --smoke         # CI smoke: wsloop-tls and tokio-tls, 2 s of 1 KiB echoes, a
#                                  # short handshake run, 100 idle wss:// connections and
#                                  # benches/idle_tls.py with 50; fails on errors (an echo that
#                                  # differs, a handshake or upgrade that fails, a connection
#                                  # that is not TLS 1.3), never on timings
#
# The servers (each a line of `variant` below):
#   wsloop-tls   wsloop --tls-cert --tls-key (wss://)
#   wsloop       wsloop without TLS (ws://): what TLS costs
#   tokio-tls    tokio_echo --tls-cert --tls-key: tokio-tungstenite over tokio-rustls, one task
#                per connection on the current_thread runtime, rustls configured as wsloop's
#
# Options (defaults in brackets):
#   --rounds R          rounds of every row [3]
#   --duration S        measured seconds per echo and handshake run [5]
#   --warmup S          seconds of load before measuring [1]
#   --servers LIST      echo servers, in order ["wsloop-tls wsloop tokio-tls"]
#   --rows LIST         echo rows as SIZE:N ["20:100 20:1000 1024:100 1024:1000 16384:100
#                       16384:1000"]
#   --handshake-servers L  ["wsloop-tls tokio-tls wsloop"] (wsloop: the plain rate, for context)
#   --handshake-c C     concurrent cycles of the handshake rows [50] (0: skip)
#   --idle-servers L    ["wsloop-tls wsloop tokio-tls"]
#   --idle-n N          connections held for the idle rows [5000] (0: skip)
#   --idle-py-n N       connections of benches/idle_tls.py (wss:// minus ws:// after one echo
#                       each, on wsloop) [2000] (0: skip)
#   --wsloop-args A     more arguments for every wsloop server (e.g. a TLS rate limit to lift)
#   --port P            port every server listens on [9001]
#   --out DIR           where results go [target/bench-results/tls-DATE]
#   --base-bin PATH     also measure another wsloop binary serving wss:// (server `base-tls`),
#                       e.g. the previous commit's, to compare two versions in one run
#   --pin               pin servers to CPU 0 and the load generator to CPU 1 (taskset)
#
# Needs: cargo, openssl (the CLI), python3.
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=3
DURATION=5
WARMUP=1
SERVERS="wsloop-tls wsloop tokio-tls"
ROWS="20:100 20:1000 1024:100 1024:1000 16384:100 16384:1000"
HANDSHAKE_SERVERS="wsloop-tls tokio-tls wsloop"
HANDSHAKE_C=50
IDLE_SERVERS="wsloop-tls wsloop tokio-tls"
IDLE_N=5000
IDLE_PY_N=2000
WSLOOP_ARGS=""
PORT=9001
OUT=""
PIN=0
BASE_BIN=""
SMOKE=0
MAX_MESSAGE=65536

while [ $# -gt 0 ]; do
    case "$1" in
        --rounds) ROUNDS=$2; shift 2 ;;
        --duration) DURATION=$2; shift 2 ;;
        --warmup) WARMUP=$2; shift 2 ;;
        --servers) SERVERS=$2; shift 2 ;;
        --rows) ROWS=$2; shift 2 ;;
        --handshake-servers) HANDSHAKE_SERVERS=$2; shift 2 ;;
        --handshake-c) HANDSHAKE_C=$2; shift 2 ;;
        --idle-servers) IDLE_SERVERS=$2; shift 2 ;;
        --idle-n) IDLE_N=$2; shift 2 ;;
        --idle-py-n) IDLE_PY_N=$2; shift 2 ;;
        --wsloop-args) WSLOOP_ARGS=$2; shift 2 ;;
        --port) PORT=$2; shift 2 ;;
        --out) OUT=$2; shift 2 ;;
        --base-bin) BASE_BIN=$2; shift 2 ;;
        --pin) PIN=1; shift ;;
        --smoke)
            SMOKE=1; SERVERS="wsloop-tls tokio-tls"; HANDSHAKE_SERVERS=$SERVERS
            IDLE_SERVERS=wsloop-tls; ROUNDS=1; DURATION=2; WARMUP=0.5; ROWS=1024:100
            HANDSHAKE_C=10; IDLE_N=100; IDLE_PY_N=50; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "tls.sh: unknown option $1 (try --help)" >&2; exit 2 ;;
    esac
done

ADDR="127.0.0.1:$PORT"
OUT=${OUT:-target/bench-results/tls-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
RESULTS="$OUT/results.txt"
: > "$RESULTS"

. benches/common.sh

# --- the test PKI: a CA and a certificate for localhost and 127.0.0.1, in TMP ----------------
. benches/pki.sh
make_test_pki "$TMP/pki"
CERT="$TMP/pki/cert.pem"; KEY="$TMP/pki/key.pem"; CA="$TMP/pki/ca.pem"

# --- the servers: one line each ---------------------------------------------------------------
declare -A KIND SERVER_ARGS LOADGEN_ARGS
variant() { KIND[$1]=$2; SERVER_ARGS[$1]=$3; LOADGEN_ARGS[$1]=$4; }
#       name        runs    its arguments                        the load generator's arguments
# The load generator connects from one address, which may hold a sixteenth of the handshakes in
# progress (--tls-max-handshakes / 16): a cap of 16,384 lets it open 1,000 at once.
variant wsloop-tls  wsloop  "--tls-cert $CERT --tls-key $KEY --tls-max-handshakes 16384" "--tls-ca $CA"
variant wsloop      wsloop  ""                                   ""
variant tokio-tls   tokio   "--tls-cert $CERT --tls-key $KEY"    "--tls-ca $CA"
variant base-tls    base    "--tls-cert $CERT --tls-key $KEY --tls-max-handshakes 16384" "--tls-ca $CA"
for s in $SERVERS $HANDSHAKE_SERVERS $IDLE_SERVERS; do
    [ -n "${KIND[$s]:-}" ] || { echo "tls.sh: unknown server $s" >&2; exit 2; }
done

build loadgen tokio_echo
WSLOOP=$(exe wsloop bin)
LOADGEN=$(exe loadgen bench)
TOKIO=$(exe tokio_echo bench)
for x in "$WSLOOP" "$LOADGEN" "$TOKIO"; do
    [ -x "$x" ] || { echo "tls.sh: build output not found ($x)" >&2; exit 1; }
done

SERVER_CPU=""; CLIENT_CPU=""
if [ "$PIN" = 1 ]; then SERVER_CPU="taskset -c 0"; CLIENT_CPU="taskset -c 1"; fi

start_server() { # $1: a variant; sets SERVER_PID
    local name=$1 logf="$OUT/server-$1.log"
    # shellcheck disable=SC2086 # the variant's arguments are words
    case "${KIND[$name]}" in
        wsloop|base)
            local bin=$WSLOOP
            [ "${KIND[$name]}" = base ] && bin=${BASE_BIN:?--base-bin PATH is needed for base-tls}
            $SERVER_CPU "$bin" --listen "$ADDR" --idle-timeout 0 --shutdown-timeout 1 \
                --max-message-size "$MAX_MESSAGE" ${SERVER_ARGS[$name]} $WSLOOP_ARGS \
                >> "$logf" 2>&1 &
            ;;
        tokio)
            $SERVER_CPU "$TOKIO" --listen "$ADDR" --max-message-size "$MAX_MESSAGE" \
                ${SERVER_ARGS[$name]} >> "$logf" 2>&1 &
            ;;
    esac
    SERVER_PID=$!
    await_server "$name" "$logf"
}

# --- the machine -----------------------------------------------------------------------------
{
    describe_machine
    echo "openssl: $(openssl version)"
    echo "certificate: ECDSA P-256 (openssl req -newkey ec), TLS 1.3 negotiated (RESULT lines: tls=)"
    echo "servers: echo $SERVERS; handshake $HANDSHAKE_SERVERS; idle $IDLE_SERVERS"
    echo "pinned: $([ "$PIN" = 1 ] && echo 'servers CPU 0, load generator CPU 1' || echo no)"
    echo "load at start: $(uptime)"
} > "$OUT/machine.txt"
cat "$OUT/machine.txt" >&2

# --- the rows --------------------------------------------------------------------------------
run_rounds() { # $1: what, $2: the servers; then the load generator's mode and arguments
    local what=$1 servers=$2 r s
    shift 2
    for r in $(seq "$ROUNDS"); do
        echo "load before $what round $r: $(cut -d' ' -f1-3 /proc/loadavg)" >> "$OUT/machine.txt"
        for s in $servers; do
            log "$what round $r/$ROUNDS: $s"
            start_server "$s" # fresh: the idle rows' RSS before is the server's as started
            # shellcheck disable=SC2086 # the variant's arguments are words
            run_loadgen "$s" "$@" ${LOADGEN_ARGS[$s]}
            stop_server 0.5
        done
    done
}

for row in $ROWS; do
    IFS=: read -r size n <<< "$row"
    run_rounds "echo size=$size n=$n" "$SERVERS" \
        echo -s "$size" -n "$n" -k 1 --warmup "$WARMUP" --duration "$DURATION"
done
if [ "$HANDSHAKE_C" -gt 0 ]; then
    run_rounds "handshake rate c=$HANDSHAKE_C" "$HANDSHAKE_SERVERS" \
        handshake -c "$HANDSHAKE_C" --warmup "$WARMUP" --duration "$DURATION"
fi
if [ "$IDLE_N" -gt 0 ]; then
    run_rounds "idle memory n=$IDLE_N" "$IDLE_SERVERS" idle -n "$IDLE_N" --settle 2
fi

fail=0
if [ "$IDLE_PY_N" -gt 0 ]; then
    # Its own method: N connections that each did one 100-byte echo, wss:// minus ws://.
    log "benches/idle_tls.py, $IDLE_PY_N connections"
    if ! timeout 300 python3 benches/idle_tls.py "$WSLOOP" "$IDLE_PY_N" > "$OUT/idle_tls.txt" 2>&1; then
        echo "tls.sh: benches/idle_tls.py failed:" >&2
        fail=1
    fi
    cat "$OUT/idle_tls.txt" >&2
fi

report_runs "an echo that differs, a TLS handshake or upgrade that failed" \
    --base wsloop-tls || fail=1
[ -s "$OUT/idle_tls.txt" ] && { echo; echo "### benches/idle_tls.py"; echo; sed 's/^/    /' "$OUT/idle_tls.txt"; } | tee -a "$OUT/report.md"

# Every run against a TLS server spoke TLS 1.3 (the load generator fails a connection that does
# not complete its TLS handshake; this checks the RESULT lines say so).
for s in $SERVERS $HANDSHAKE_SERVERS $IDLE_SERVERS; do
    case "$s" in *-tls)
        if grep "server=$s " "$RESULTS" | grep -qv ' tls=1\.3 '; then
            echo "tls.sh: a run against $s did not report tls=1.3" >&2
            fail=1
        fi ;;
    esac
done
if [ "$SMOKE" = 1 ]; then
    # The smoke checks that the tooling works end to end, never how fast: every run did work
    # over TLS, without errors.
    for s in $SERVERS; do
        grep -q "mode=echo server=$s .*echoes=[1-9].* tls=1.3 errors=0" "$RESULTS" ||
            { echo "smoke: no verified wss:// echoes from $s" >&2; fail=1; }
    done
    for s in $HANDSHAKE_SERVERS; do
        grep -q "mode=handshake server=$s .*cycles=[1-9].* tls=1.3 errors=0" "$RESULTS" ||
            { echo "smoke: no TLS handshake cycles with $s" >&2; fail=1; }
    done
    for s in $IDLE_SERVERS; do
        grep -q "mode=idle server=$s .*open=$IDLE_N .*tls=1.3 errors=0" "$RESULTS" ||
            { echo "smoke: idle wss:// connections to $s not all open" >&2; fail=1; }
    done
    grep -q "^TLS costs" "$OUT/idle_tls.txt" || { echo "smoke: no idle_tls.py figure" >&2; fail=1; }
    [ "$fail" = 0 ] && echo "smoke: ok" >&2
fi
exit "$fail"
