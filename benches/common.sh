# What benches/compare.sh, benches/pubsub.sh, benches/compression.sh and benches/redis.sh share;
# sourced from the repository's root after they read their options, with OUT, RESULTS, PORT,
# ADDR, CLIENT_CPU and LOADGEN set by then (LOADGEN and CLIENT_CPU before the first
# run_loadgen). It sets the descriptor limit, a temporary folder TMP and a cleanup on exit (the
# server started last, and every process listed in EXTRA_PIDS, are killed), and defines: log,
# build (cargo, then `exe NAME KIND` names an executable), install_npm and install_uws,
# free_port, await_port, await_server, stop_pid, stop_server, run_loadgen, describe_machine and
# report_runs.

BENCH=$(basename "$0")

# 10,000 connections need 10,000 descriptors in the server and as many in the load generator:
# each process gets its own soft limit of 20000 (or the hard limit, if lower).
HARD=$(ulimit -Hn)
if [ "$HARD" = unlimited ] || [ "$HARD" -ge 20000 ]; then ulimit -n 20000; else ulimit -n "$HARD"; fi

SERVER_PID=""
# Further processes a script started and keeps (benches/redis.sh: redis-server, the second
# instance): killed on exit too.
EXTRA_PIDS=()
TMP=$(mktemp -d)
cleanup() {
    local p
    for p in "$SERVER_PID" "${EXTRA_PIDS[@]}"; do
        if [ -n "$p" ] && kill -0 "$p" 2>/dev/null; then
            kill -KILL "$p" 2>/dev/null || true
            wait "$p" 2>/dev/null || true
        fi
    done
    rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

log() { echo "== $*" >&2; }

build() { # the release wsloop binary, and the bench targets named in $@
    local benches=() b
    for b in "$@"; do benches+=(--bench "$b"); done
    log "building (release)"
    cargo build --release --bin wsloop --message-format=json > "$TMP/build.json"
    cargo bench --no-run "${benches[@]}" --message-format=json >> "$TMP/build.json"
}

exe() { # the executable cargo built for target $1 (kind $2)
    grep '"reason":"compiler-artifact"' "$TMP/build.json" |
        grep "\"name\":\"$1\",\"src_path\"" | grep "\"kind\":\[\"$2\"\]" |
        sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -1
}

install_npm() { # $1: an npm package@version, $2: a folder; installs it (NODE_PATH=$2/node_modules)
    log "installing $1 into $2"
    mkdir -p "$2"
    (cd "$2" && npm init -y > /dev/null &&
        npm install --no-audit --no-fund --loglevel=error "$1" > /dev/null)
}

install_uws() { # the uWebSockets.js package UWS_PKG into $TMP/uws (NODE_PATH=$TMP/uws/node_modules)
    install_npm "$UWS_PKG" "$TMP/uws"
}

free_port() { # a TCP port free on 127.0.0.1 now (bound, then released)
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

await_port() { # $1: pid, $2: port on 127.0.0.1, $3: its name, $4: its log
    local pid=$1 port=$2 name=$3 logf=$4 i
    # Ready when the port accepts a connection (at most 10 s).
    for i in $(seq 100); do
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "$BENCH: $name exited at startup; its log ($logf):" >&2
            tail -5 "$logf" >&2
            exit 1
        fi
        if (exec 3<> "/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            sleep 0.2
            return 0
        fi
        sleep 0.1
    done
    echo "$BENCH: $name did not listen on 127.0.0.1:$port within 10 s" >&2
    exit 1
}

await_server() { # $1: its name, $2: its log; SERVER_PID was just started on PORT
    await_port "$SERVER_PID" "$PORT" "$1" "$2"
}

stop_pid() { # $1: a process this script started: SIGTERM, then SIGKILL after 5 s
    [ -n "$1" ] || return 0
    kill -TERM "$1" 2>/dev/null || true
    local i
    for i in $(seq 50); do
        kill -0 "$1" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
}

stop_server() { # [seconds to let the port's sockets settle, 0.3]
    [ -n "$SERVER_PID" ] || return 0
    stop_pid "$SERVER_PID"
    SERVER_PID=""
    # Let the port's sockets settle before the next server binds it.
    sleep "${1:-0.3}"
}

run_loadgen() { # label, then loadgen arguments; appends its RESULT line
    local label=$1; shift
    local line
    if ! line=$(timeout 300 $CLIENT_CPU "$LOADGEN" "$@" --addr "$ADDR" --server-pid "$SERVER_PID" \
        --label "$label" 2>> "$OUT/loadgen.log"); then
        echo "$BENCH: loadgen failed against $label ($*); see $OUT/loadgen.log" >&2
        tail -3 "$OUT/loadgen.log" >&2
        line="RESULT failed=1 server=$label $*"
    fi
    echo "$line" | grep '^RESULT' >> "$RESULTS" || true
    echo "$line" | sed 's/^RESULT /   /' >&2
}

describe_machine() { # the lines of machine.txt before the load
    echo "date: $(date -Is)"
    echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo none)$(git diff --quiet HEAD -- src 2>/dev/null || echo ' (src modified)')"
    echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(nproc) cores"
    echo "memory: $(free -g | awk '/Mem:/ {print $2}') GiB"
    echo "kernel: $(uname -r)"
    echo "rustc: $(rustc --version)"
    echo "node: $(node --version 2>/dev/null || echo none)"
    echo "fd limit: soft $(ulimit -n), hard $(ulimit -Hn)"
}

report_runs() { # $1: what a failed run means; then `loadgen report` options. Returns 1 if one failed
    local what=$1; shift
    echo "load at end: $(uptime)" >> "$OUT/machine.txt"
    "$LOADGEN" report "$RESULTS" "$@" | tee "$OUT/report.md"
    echo "results: $RESULTS, report: $OUT/report.md, machine: $OUT/machine.txt" >&2
    if grep -q 'failed=1\| errors=[1-9]' "$RESULTS"; then
        echo "$BENCH: some runs failed ($what):" >&2
        grep 'failed=1\| errors=[1-9]' "$RESULTS" >&2
        return 1
    fi
}
