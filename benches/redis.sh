#!/usr/bin/env bash
# Topics across two instances through Redis (issue 17; BENCHMARKS.md, "Several instances
# through Redis"): one publisher on instance A and subscribers split over A and B, two
# `wsloop --pubsub --redis` processes sharing a redis-server this script starts on a free
# loopback port (no persistence) and stops at the end; against the same load on one
# `wsloop --pubsub` without Redis, in the same run, setups alternating (one two one two ...);
# then redis-benchmark's PUBLISH on the same redis-server, for Redis's own ceiling here. Prints
# the medians, the ratio of deliveries per second (two/one) and the latency p99 the bridge adds.
# Everything stays on 127.0.0.1, is bounded in time, and every process started here is killed
# on exit.
#
#   benches/redis.sh                 # full run (about 12 minutes with the defaults)
#   benches/redis.sh --pin           # the same, servers and Redis on CPU 0, the load generator on CPU 1
#   benches/redis.sh --smoke         # CI smoke: one round of two small rows, 2 s each, and a
#                                    # short redis-benchmark; fails on errors (a message missing,
#                                    # reordered or dropped), never on timings
#
# The rows (benches/loadgen.rs fanout, 20-byte messages; every subscriber must receive every
# message, in order, and wsloop_deliveries_dropped_total must stay 0 on every instance):
#   N:W     N subscribers and one publisher (a subscriber too) in one topic, at most W messages
#           not yet received by all: deliveries per second as fast as the subscribers keep up.
#   N:W@R   the same, publishing R messages per second: latency at a given load.
# Latency is per delivery, from the publisher's write to the subscriber's read.
# The setups:
#   one     every client on one `wsloop --pubsub` (no Redis);
#   two     the publisher and the even-numbered subscribers on A, the odd-numbered ones on B
#           (loadgen --addr-b), A and B with `--redis` on the script's redis-server.
#
# Options (defaults in brackets):
#   --rounds R      rounds of one + two [5]
#   --duration S    measured seconds per run [5]
#   --warmup S      seconds of load before measuring [2]
#   --rows LIST     rows, as above
#                   ["10000:1000 100:1000 100:100 100:100@1000 100:100@10000 1000:100@100"]
#   --out DIR       where results go [target/bench-results/redis-DATE]
#   --pin           servers and redis-server on CPU 0, the load generator on CPU 1 (taskset)
#
# WSLOOP_BIN=PATH runs that wsloop binary instead of the one built (another version's, to
# compare two in the same session; the load generator is still built from this tree).
#
# The servers: `wsloop --pubsub --idle-timeout 0 --backpressure-policy drop` (otherwise its
# defaults: 64 KiB backpressure, 16 KiB messages), as benches/pubsub.sh runs it; redis-server
# with --save '' --appendonly no, otherwise its defaults.
#
# Needs: cargo, python3, redis-server and redis-benchmark (Debian redis-server, redis-tools).
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=5
DURATION=5
WARMUP=2
# Latency rows at loads the load generator keeps up with: it reads every subscriber's socket
# once per batch of messages, so 1,000 subscribers at 1,000 messages a second already cost it
# a core (a p99 of 34 ms on one instance in a trial run: its own queueing, not the server's).
ROWS="10000:1000 100:1000 100:100 100:100@1000 100:100@10000 1000:100@100"
OUT=""
PIN=0
SMOKE=0
BENCH_N=1000000

while [ $# -gt 0 ]; do
    case "$1" in
        --rounds) ROUNDS=$2; shift 2 ;;
        --duration) DURATION=$2; shift 2 ;;
        --warmup) WARMUP=$2; shift 2 ;;
        --rows) ROWS=$2; shift 2 ;;
        --out) OUT=$2; shift 2 ;;
        --pin) PIN=1; shift ;;
        --smoke)
            SMOKE=1; ROUNDS=1; DURATION=2; WARMUP=0.5; ROWS="200:100 200:100@2000"
            BENCH_N=20000; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "redis.sh: unknown option $1 (try --help)" >&2; exit 2 ;;
    esac
done

for tool in redis-server redis-benchmark redis-cli python3; do
    command -v "$tool" > /dev/null || {
        echo "redis.sh: $tool not found (Debian: apt-get install redis-server redis-tools python3)" >&2
        exit 1
    }
done

OUT=${OUT:-target/bench-results/redis-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
RESULTS="$OUT/results.txt"
: > "$RESULTS"

. benches/common.sh

PORT=$(free_port); ADDR="127.0.0.1:$PORT"
METRICS_A="127.0.0.1:$(free_port)"
PORT_B=$(free_port); ADDR_B="127.0.0.1:$PORT_B"
METRICS_B="127.0.0.1:$(free_port)"
REDIS_PORT=$(free_port)
REDIS_URL="redis://127.0.0.1:$REDIS_PORT/"

build loadgen
WSLOOP=${WSLOOP_BIN:-$(exe wsloop bin)}
LOADGEN=$(exe loadgen bench)
for x in "$WSLOOP" "$LOADGEN"; do
    [ -x "$x" ] || { echo "redis.sh: build output not found ($x)" >&2; exit 1; }
done

SERVER_CPU=""; CLIENT_CPU=""
if [ "$PIN" = 1 ]; then SERVER_CPU="taskset -c 0"; CLIENT_CPU="taskset -c 1"; fi

# --- processes -------------------------------------------------------------------------------
REDIS_PID=""; B_PID=""
extra() { EXTRA_PIDS=(); for p in "$REDIS_PID" "$B_PID" "$@"; do [ -z "$p" ] || EXTRA_PIDS+=("$p"); done; }

start_redis() {
    $SERVER_CPU redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no \
        --logfile "$PWD/$OUT/redis.log" &
    REDIS_PID=$!
    extra
    await_port "$REDIS_PID" "$REDIS_PORT" redis-server "$OUT/redis.log"
}

wsloop_args() { # $1: listen address, $2: metrics address
    echo --pubsub --listen "$1" --metrics-listen "$2" --idle-timeout 0 --shutdown-timeout 1 \
        --backpressure-policy drop
}

start_setup() { # one | two; sets SERVER_PID (A) and, for two, B_PID
    case "$1" in
        one)
            $SERVER_CPU "$WSLOOP" $(wsloop_args "$ADDR" "$METRICS_A") >> "$OUT/server-one.log" 2>&1 &
            SERVER_PID=$!
            await_server one "$OUT/server-one.log"
            ;;
        two)
            $SERVER_CPU "$WSLOOP" $(wsloop_args "$ADDR" "$METRICS_A") --redis "$REDIS_URL" \
                >> "$OUT/server-two-a.log" 2>&1 &
            SERVER_PID=$!
            await_server two-a "$OUT/server-two-a.log"
            $SERVER_CPU "$WSLOOP" $(wsloop_args "$ADDR_B" "$METRICS_B") --redis "$REDIS_URL" \
                >> "$OUT/server-two-b.log" 2>&1 &
            B_PID=$!
            extra
            await_port "$B_PID" "$PORT_B" two-b "$OUT/server-two-b.log"
            ;;
    esac
}

metrics() { # $1: metrics address; its wsloop_broker_* lines that are not 0, on one line
    local host=${1%:*} port=${1##*:}
    exec 3<> "/dev/tcp/$host/$port"
    printf 'GET /metrics HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n' "$1" >&3
    grep '^wsloop_broker_' <&3 | grep -v ' 0$' | tr '\n' ' '
    exec 3<&-
}

stop_setup() {
    if [ -n "$B_PID" ]; then
        { echo "$1 A: $(metrics "$METRICS_A")"; echo "$1 B: $(metrics "$METRICS_B")"; } \
            >> "$OUT/broker-metrics.txt"
        stop_pid "$B_PID"
        B_PID=""
        extra
    fi
    stop_server 0.5
}

# --- the machine -----------------------------------------------------------------------------
{
    describe_machine
    echo "redis: $(redis-server --version)"
    echo "pinned: $([ "$PIN" = 1 ] && echo 'servers and redis-server CPU 0, load generator CPU 1' || echo no)"
    echo "load at start: $(uptime)"
} > "$OUT/machine.txt"
cat "$OUT/machine.txt" >&2

start_redis

# --- the rows --------------------------------------------------------------------------------
for row in $ROWS; do
    rate=0
    case "$row" in *@*) rate=${row#*@}; row=${row%@*} ;; esac
    IFS=: read -r n w <<< "$row"
    for r in $(seq "$ROUNDS"); do
        for setup in one two; do
            log "fanout n=$n window=$w rate=$rate round $r/$ROUNDS: $setup"
            start_setup "$setup"
            args=(fanout -n "$n" --window "$w" --rate "$rate" --warmup "$WARMUP"
                --duration "$DURATION" --metrics-addr "$METRICS_A")
            [ "$setup" = two ] && args+=(--addr-b "$ADDR_B" --metrics-addr "$METRICS_B")
            run_loadgen "$setup" "${args[@]}"
            stop_setup "$setup n=$n window=$w rate=$rate round $r"
        done
    done
done

# --- Redis's own ceiling: PUBLISH of a 40-byte message (the bridge's 20-byte header and a
# 20-byte payload, as in the rows) to a channel with two subscribers (as the two instances'
# bridges), one connection pipelining 256 (as the bridge's publisher) and 50 connections
# without pipelining (redis-benchmark's default). The subscribers read raw bytes (cat), fast
# enough that Redis never closes them for their output buffer (redis-cli's SUBSCRIBE was not:
# Redis dropped it after a second, and PUBLISH got cheaper); that they are still subscribed
# after each row is checked and recorded.
log "redis-benchmark: PUBLISH, $BENCH_N requests per row"
SUBS=()
for i in 1 2; do
    $SERVER_CPU bash -c 'exec 3<> "/dev/tcp/127.0.0.1/$1"; printf "SUBSCRIBE wsloop:/bench\r\n" >&3
        exec cat <&3 > /dev/null' subscriber "$REDIS_PORT" &
    SUBS+=($!)
done
extra "${SUBS[@]}"
sleep 0.3
numsub() { redis-cli -p "$REDIS_PORT" PUBSUB NUMSUB wsloop:/bench | tail -1; }
payload=$(printf 'x%.0s' $(seq 40))
: > "$OUT/redis-benchmark.csv"
for cp in "1 256" "50 1"; do
    read -r c pl <<< "$cp"
    echo "clients=$c pipeline=$pl subscribers before=$(numsub)" >> "$OUT/redis-benchmark.csv"
    timeout 120 $CLIENT_CPU redis-benchmark -h 127.0.0.1 -p "$REDIS_PORT" -c "$c" -P "$pl" \
        -n "$BENCH_N" --csv PUBLISH wsloop:/bench "$payload" >> "$OUT/redis-benchmark.csv"
    echo "subscribers after=$(numsub)" >> "$OUT/redis-benchmark.csv"
done
for p in "${SUBS[@]}"; do stop_pid "$p"; done
extra
stop_pid "$REDIS_PID"; REDIS_PID=""; extra

echo "load at end: $(uptime)" >> "$OUT/machine.txt"

# --- the report ------------------------------------------------------------------------------
"$LOADGEN" report --base two "$RESULTS" > "$OUT/report.md"
python3 - "$RESULTS" "$OUT/redis-benchmark.csv" <<'EOF' | tee -a "$OUT/report.md"
import statistics, sys
rows = {}
for line in open(sys.argv[1]):
    if not line.startswith("RESULT ") or "failed=1" in line:
        continue
    kv = dict(f.split("=", 1) for f in line.split()[1:] if "=" in f)
    key = (int(kv["n"]), int(kv["window"]), int(kv["rate"]))
    rows.setdefault(key, {}).setdefault(kv["server"], []).append(kv)
def med(runs, field):
    return statistics.median(float(r[field]) for r in runs)
print("\n### One instance against two through Redis (medians; two/one; p99 added by the bridge)\n")
print("| row | runs | deliveries/s one | two | two/one | p50 ms one | two | p99 ms one | two | p99 added, ms |")
print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
for (n, w, rate), by in sorted(rows.items()):
    one, two = by.get("one", []), by.get("two", [])
    if not one or not two:
        continue
    name = f"{n:,}:{w}" + (f" @ {rate:,}/s" if rate else "")
    d1, d2 = med(one, "deliveries_per_s"), med(two, "deliveries_per_s")
    p50 = [med(x, "p50_us") / 1e3 for x in (one, two)]
    p99 = [med(x, "p99_us") / 1e3 for x in (one, two)]
    print(f"| {name} | {len(one)}/{len(two)} | {d1:,.0f} | {d2:,.0f} | {d2 / d1:.2f} | "
          f"{p50[0]:.3f} | {p50[1]:.3f} | {p99[0]:.3f} | {p99[1]:.3f} | {p99[1] - p99[0]:+.3f} |")
print("\nredis-benchmark PUBLISH (40 bytes, 2 subscribers):\n")
setting = ""
for line in open(sys.argv[2]):
    line = line.strip()
    if line.startswith("clients="):
        setting = line
    elif line.startswith("subscribers after="):
        print(f"  ({line})")
    elif line.startswith('"PUBLISH'):
        f = [x.strip('"') for x in line.split('","')]
        print(f"- {setting}: {float(f[1]):,.0f} requests/s, latency p50 {f[4]} ms, p99 {f[6]} ms")
EOF
echo "results: $RESULTS, report: $OUT/report.md, machine: $OUT/machine.txt, broker metrics: $OUT/broker-metrics.txt" >&2

fail=0
if grep -q 'failed=1\| errors=[1-9]' "$RESULTS"; then
    echo "redis.sh: some runs failed (a message missing, dropped, out of order, or a stall):" >&2
    grep 'failed=1\| errors=[1-9]' "$RESULTS" >&2
    fail=1
fi
if [ "$SMOKE" = 1 ]; then
    # The smoke checks that the tooling works end to end, never how fast: every run produced a
    # RESULT with verified deliveries and nothing dropped, on one instance and on two.
    for setup in one two; do
        for rate in 0 2000; do
            grep -q "mode=fanout server=$setup .* rate=$rate .*deliveries=[1-9].* server_dropped=0" "$RESULTS" ||
                { echo "smoke: no verified fan-out on $setup at rate $rate" >&2; fail=1; }
        done
    done
    [ "$(grep -c '^"PUBLISH' "$OUT/redis-benchmark.csv")" = 2 ] ||
        { echo "smoke: redis-benchmark gave no result" >&2; fail=1; }
    [ "$(grep -c '^subscribers after=2$' "$OUT/redis-benchmark.csv")" = 2 ] ||
        { echo "smoke: redis-benchmark's subscribers did not stay subscribed" >&2; fail=1; }
    [ "$fail" = 0 ] && echo "smoke: ok" >&2
fi
exit "$fail"
