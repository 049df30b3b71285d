#!/usr/bin/env bash
# Where an echoed message's time goes, per server: syscalls per echo (strace -c -f), user-space
# instructions per echo and heap calls per echo (valgrind --tool=callgrind). Each measurement is
# the difference of two runs that send exactly COUNT1 and COUNT2 messages (loadgen --count), so
# start-up, the handshakes and shutdown cancel out. With --handshake, the same per handshake
# (connect, upgrade, close): two runs of D1 and D2 seconds, divided by the difference in cycles.
# Everything stays on 127.0.0.1 and stops by itself; every server started here is killed on exit.
#
#   benches/profile.sh                        # wsloop and tokio, 20-byte echoes, 100 connections
#   benches/profile.sh --servers "wsloop tokio uws" --size 1024
#   benches/profile.sh --handshake --servers "wsloop uws"
#   benches/profile.sh --tls --size 1024       # the same over wss:// (wsloop and tokio-rustls)
#
# Options (defaults in brackets):
#   --servers LIST    wsloop, tokio, uws ["wsloop tokio"]; uws needs node + npm, and callgrind
#                     on node (a JIT) is slow and approximate
#   --size S --n N --k K   the echo load [20, 100, 1]
#   --counts "C1 C2"  messages in the two runs of wsloop [20000 60000]; other servers use a
#                     tenth of that under callgrind (they cost more instructions per echo)
#   --wsloop-args A   extra wsloop flags ["--idle-timeout 0"]; e.g. "--idle-timeout 120" to see
#                     the cost of re-arming the idle timer on every message
#   --handshake       profile handshakes instead of echoes (50 concurrent cycles)
#   --durations "D1 D2"  seconds of the two handshake runs [3 9]
#   --tls             serve and load over wss:// (wsloop --tls-cert, tokio_echo --tls-cert,
#                     loadgen --tls-ca; a test CA and certificate from benches/pki.sh in a
#                     temporary folder); not with uws
#   --no-callgrind / --no-strace
#   --port P [9001]   --out DIR [target/bench-results/profile-DATE]
set -euo pipefail
cd "$(dirname "$0")/.."

SERVERS="wsloop tokio"
SIZE=20; N=100; K=1
COUNTS="20000 60000"
WSLOOP_ARGS="--idle-timeout 0"
CALLGRIND=1; STRACE=1
MODE=echo; DURATIONS="3 9"
TLS=0
PORT=9001
OUT=""
UWS_PKG="@trufflesuite/uws-js-unofficial@20.30.0-unofficial.0"

while [ $# -gt 0 ]; do
    case "$1" in
        --servers) SERVERS=$2; shift 2 ;;
        --size) SIZE=$2; shift 2 ;;
        --n) N=$2; shift 2 ;;
        --k) K=$2; shift 2 ;;
        --counts) COUNTS=$2; shift 2 ;;
        --wsloop-args) WSLOOP_ARGS=$2; shift 2 ;;
        --handshake) MODE=handshake; shift ;;
        --durations) DURATIONS=$2; shift 2 ;;
        --no-callgrind) CALLGRIND=0; shift ;;
        --no-strace) STRACE=0; shift ;;
        --tls) TLS=1; shift ;;
        --port) PORT=$2; shift 2 ;;
        --out) OUT=$2; shift 2 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "profile.sh: unknown option $1 (try --help)" >&2; exit 2 ;;
    esac
done
read -r C1 C2 <<< "$COUNTS"
ADDR="127.0.0.1:$PORT"
OUT=${OUT:-target/bench-results/profile-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
SUMMARY="$OUT/summary.md"
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

if [ "$STRACE" = 1 ] && ! command -v strace > /dev/null; then
    echo "profile.sh: strace is missing (apt-get install strace)" >&2; exit 1
fi
if [ "$CALLGRIND" = 1 ] && ! command -v valgrind > /dev/null; then
    echo "profile.sh: valgrind is missing (apt-get install valgrind)" >&2; exit 1
fi

SERVER_PID=""
TMP=$(mktemp -d)
cleanup() {
    if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
        for child in $(pgrep -P "$SERVER_PID" || true); do kill -KILL "$child" 2>/dev/null || true; done
        kill -KILL "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
    fi
    rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

SERVER_TLS=""; LOADGEN_TLS=()
if [ "$TLS" = 1 ]; then
    case " $SERVERS " in *" uws "*) echo "profile.sh: --tls is for wsloop and tokio" >&2; exit 2 ;; esac
    . benches/pki.sh
    make_test_pki "$TMP/pki"
    SERVER_TLS="--tls-cert $TMP/pki/cert.pem --tls-key $TMP/pki/key.pem"
    LOADGEN_TLS=(--tls-ca "$TMP/pki/ca.pem")
fi

echo "== building (release)" >&2
cargo build --release --bin wsloop --message-format=json > "$TMP/build.json"
cargo bench --no-run --bench loadgen --bench tokio_echo --message-format=json >> "$TMP/build.json"
exe() {
    grep '"reason":"compiler-artifact"' "$TMP/build.json" |
        grep "\"name\":\"$1\",\"src_path\"" | grep "\"kind\":\[\"$2\"\]" |
        sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -1
}
WSLOOP=$(exe wsloop bin); LOADGEN=$(exe loadgen bench); TOKIO=$(exe tokio_echo bench)
case " $SERVERS " in
    *" uws "*)
        mkdir -p "$TMP/uws"
        (cd "$TMP/uws" && npm init -y > /dev/null &&
            npm install --no-audit --no-fund --loglevel=error "$UWS_PKG" > /dev/null) ;;
esac

server_cmd() { # the command line of server $1
    case "$1" in
        wsloop) echo "$WSLOOP --listen $ADDR --shutdown-timeout 1 --max-message-size 65536 $WSLOOP_ARGS $SERVER_TLS" ;;
        tokio) echo "$TOKIO --listen $ADDR --max-message-size 65536 $SERVER_TLS" ;;
        uws) echo "node benches/uws_echo.js --listen $ADDR --max-message-size 65536" ;;
    esac
}

# Run server $1 under the wrapper $2 (a command prefix), send $3 messages (or, with --handshake,
# run $3 seconds of handshakes), stop it. The number of echoes or cycles goes to $TMP/units.
run_once() {
    local name=$1 wrapper=$2 count=$3
    # shellcheck disable=SC2086
    NODE_PATH="$TMP/uws/node_modules" $wrapper $(server_cmd "$name") >> "$OUT/server-$name.log" 2>&1 &
    SERVER_PID=$!
    local i
    for i in $(seq 600); do # valgrind + node can take a while to start
        (exec 3<> "/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break
        kill -0 "$SERVER_PID" 2>/dev/null || { echo "profile.sh: $name died" >&2; exit 1; }
        sleep 0.2
    done
    sleep 0.5
    local load=(echo -n "$N" -s "$SIZE" -k "$K" --count "$count" --setup-timeout 300)
    [ "$MODE" = handshake ] && load=(handshake -c 50 --warmup 0 --duration "$count")
    "$LOADGEN" "${load[@]}" "${LOADGEN_TLS[@]}" --addr "$ADDR" --label "$name" 2>> "$OUT/loadgen.log" |
        tee -a "$OUT/results.txt" > "$TMP/result"
    cut -c1-160 "$TMP/result" >&2
    sed -n 's/.* \(echoes\|cycles\)=\([0-9]*\) .*/\2/p' "$TMP/result" > "$TMP/units"
    # Stop the server itself (not the tracer), so that strace/callgrind write their summaries.
    local target
    target=$(pgrep -P "$SERVER_PID" | head -1 || true)
    kill -TERM "${target:-$SERVER_PID}" 2>/dev/null || true
    for i in $(seq 300); do
        kill -0 "$SERVER_PID" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
    SERVER_PID=""
    sleep 0.3
}

# Calls per unit of each syscall: (calls in run 2 - calls in run 1) / $3.
strace_diff() {
    # strace -c rows: % time, seconds, usecs/call, calls, [errors,] syscall.
    awk -v d="$3" '
        FNR == 1 { f++ }
        /^ *[0-9.]+ +[0-9.]+ +[0-9]+ +[0-9]+ / && $NF != "total" { c[$NF, f] = $4; names[$NF] = 1 }
        END {
            for (n in names) {
                x = (c[n, 2] - c[n, 1]) / d
                if (x > 0.0005 || x < -0.0005) printf "%-16s %.3f\n", n, x
            }
        }' "$1" "$2" | sort -k2 -nr
}

UNIT=echo
[ "$MODE" = handshake ] && { UNIT=handshake; COUNTS=$DURATIONS; read -r C1 C2 <<< "$COUNTS"; }
{
    if [ "$MODE" = handshake ]; then
        echo "# Profile: handshakes (50 concurrent), runs of $C1 and $C2 seconds ($(date -Is))"
    else
        echo "# Profile: echo size=$SIZE n=$N k=$K, runs of $C1 and $C2 messages ($(date -Is))"
    fi
    echo
    echo "load: $(uptime)"
    echo "wsloop flags: $WSLOOP_ARGS"
    echo "transport: $([ "$TLS" = 1 ] && echo 'wss:// (TLS 1.3, ECDSA P-256 certificate, full handshakes)' || echo 'ws://')"
} > "$SUMMARY"

for s in $SERVERS; do
    c1=$C1; c2=$C2
    if [ "$s" != wsloop ] && [ "$MODE" = echo ]; then c1=$((C1 / 10)); c2=$((C2 / 10)); fi
    if [ "$STRACE" = 1 ]; then
        echo "== strace $s" >&2
        run_once "$s" "strace -c -f -o $OUT/strace-$s-$C1.txt" "$C1"
        u1=$(cat "$TMP/units")
        run_once "$s" "strace -c -f -o $OUT/strace-$s-$C2.txt" "$C2"
        u2=$(cat "$TMP/units")
        {
            echo
            echo "## $s: syscalls per $UNIT (strace -c -f, difference of runs with $u1 and $u2)"
            echo
            echo '```'
            strace_diff "$OUT/strace-$s-$C1.txt" "$OUT/strace-$s-$C2.txt" "$((u2 - u1))"
            echo '```'
        } >> "$SUMMARY"
    fi
    if [ "$CALLGRIND" = 1 ]; then
        echo "== callgrind $s" >&2
        extra=""
        [ "$s" = uws ] && extra="--smc-check=all"
        run_once "$s" "valgrind --tool=callgrind $extra --trace-children=no --callgrind-out-file=$OUT/callgrind-$s-$c1.out" "$c1"
        u1=$(cat "$TMP/units")
        run_once "$s" "valgrind --tool=callgrind $extra --trace-children=no --callgrind-out-file=$OUT/callgrind-$s-$c2.out" "$c2"
        u2=$(cat "$TMP/units")
        ir1=$(sed -n 's/^summary: //p' "$OUT/callgrind-$s-$c1.out")
        ir2=$(sed -n 's/^summary: //p' "$OUT/callgrind-$s-$c2.out")
        {
            echo
            echo "## $s: user-space instructions per $UNIT (callgrind, difference of runs with $u1 and $u2)"
            echo
            echo "instructions per $UNIT: $(( (ir2 - ir1) / (u2 - u1) ))"
            echo
            echo "heap calls per $UNIT (calls to malloc, calloc, realloc, free):"
            echo
            echo '```'
            python3 - "$OUT/callgrind-$s-$c1.out" "$OUT/callgrind-$s-$c2.out" "$((u2 - u1))" <<'EOF'
import re, sys
def calls(path):
    names, counts, cur = {}, {}, None
    for line in open(path, errors="replace"):
        m = re.match(r'^(c?fn)=\((\d+)\)(?: (.*))?$', line.rstrip('\n'))
        if m:
            kind, i, name = m.groups()
            if name:
                names[i] = name
            cur = names.get(i) if kind == 'cfn' else None
            continue
        if line.startswith('calls=') and cur is not None:
            if cur in ('malloc', 'calloc', 'realloc', 'free'):
                counts[cur] = counts.get(cur, 0) + int(line[6:].split()[0])
            cur = None
    return counts
a, b, d = calls(sys.argv[1]), calls(sys.argv[2]), int(sys.argv[3])
for f in ('malloc', 'calloc', 'realloc', 'free'):
    print(f"{f}: {(b.get(f, 0) - a.get(f, 0)) / d:.3f}")
EOF
            echo '```'
            echo
            echo "top functions by instructions (self) in the second run:"
            echo
            echo '```'
            callgrind_annotate --auto=no "$OUT/callgrind-$s-$c2.out" 2>/dev/null |
                awk '/^-+$/ {n++} n >= 4 && /[0-9]/' | head -25 | cut -c1-160 || true
            echo '```'
        } >> "$SUMMARY"
    fi
done
cat "$SUMMARY"
echo "profile: $SUMMARY" >&2
