#!/usr/bin/env python3
"""The loop-thread cost of one /healthz and one /metrics request while many descriptors are open.

Starts the wsloop binary (--binary, default target/release/wsloop) with a metrics listener,
opens --conns idle WebSocket connections to it (upgraded, then silent), then sends --requests
sequential requests of each kind to the metrics listener, one connection each: GET /nope (404,
the control: accept, read, answer, close), GET /healthz and GET /metrics. The loop thread's CPU
time comes from /proc/PID/task/TID/schedstat (nanoseconds on CPU) of the thread named
wsloop-0; per request it is the delta over the batch divided by its size, and "net" subtracts
the control's per-request cost: what the endpoint itself costs on top of any HTTP answer.

Extra arguments after -- go to wsloop (e.g. -- --endpoint-rate 0 to measure served requests
only, with the rate limit off). Run from the repository root after cargo build --release:

    python3 benches/endpoint_cost.py --conns 15000 --requests 200

The process needs --conns + a few descriptors of its own: the script raises its soft
RLIMIT_NOFILE to the hard limit, and gives wsloop --fd-limit of the hard limit too.
"""
import argparse
import os
import re
import resource
import socket
import subprocess
import sys
import threading
import time

REQUEST = (
    "GET / HTTP/1.1\r\nHost: bench\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
).encode()


def start(binary, fd_limit, extra):
    args = [binary, "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0",
            "--fd-limit", str(fd_limit), "--idle-timeout", "0", "--handshake-timeout", "60"]
    proc = subprocess.Popen(args + extra, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, RUST_LOG="info"))
    log = []
    ws = metrics = None
    deadline = time.time() + 30
    while time.time() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        log.append(line)
        m = re.search(r"listening on ws://([\d.]+):(\d+)", line)
        if m:
            ws = (m.group(1), int(m.group(2)))
        m = re.search(r"metrics on http://([\d.]+):(\d+)/", line)
        if m and (m.group(1), int(m.group(2))) != ws:
            metrics = (m.group(1), int(m.group(2)))
        if "fd budget" in line and ws and metrics:
            break
    if not (ws and metrics):
        proc.kill()
        sys.exit("wsloop did not start:\n" + "".join(log))
    # Keep draining its log so that it never blocks on a full pipe.
    threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
    return proc, ws, metrics


def loop_thread(pid):
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/comm") as f:
            if f.read().strip() == "wsloop-0":
                return tid
    sys.exit("no thread named wsloop-0")


def cpu_ns(pid, tid):
    with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
        return int(f.read().split()[0])


def open_idle(addr, n):
    conns = []
    for i in range(n):
        s = socket.create_connection(addr)
        s.sendall(REQUEST)
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = s.recv(4096)
            if not chunk:
                sys.exit(f"connection {i}: closed during the upgrade")
            head += chunk
        if not head.startswith(b"HTTP/1.1 101"):
            sys.exit(f"connection {i}: {head[:60]!r}")
        conns.append(s)
    return conns


def get(addr, path):
    s = socket.create_connection(addr)
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode())
    data = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    s.close()
    return int(data[9:12])


def batch(pid, tid, addr, path, n):
    statuses = {}
    before = cpu_ns(pid, tid)
    for _ in range(n):
        st = get(addr, path)
        statuses[st] = statuses.get(st, 0) + 1
    # Let the loop finish closing the last connection before reading its clock.
    time.sleep(0.05)
    return (cpu_ns(pid, tid) - before) / n, statuses


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--binary", default="target/release/wsloop")
    ap.add_argument("--conns", type=int, default=15000)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("extra", nargs="*", help="arguments for wsloop (after --)")
    a = ap.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    proc, ws, metrics = start(a.binary, hard, a.extra)
    try:
        t0 = time.time()
        conns = open_idle(ws, a.conns)
        fds = len(os.listdir(f"/proc/{proc.pid}/fd"))
        print(f"{a.conns} idle connections in {time.time() - t0:.1f} s; wsloop holds {fds} fds")
        tid = loop_thread(proc.pid)
        time.sleep(0.5)
        control, st0 = batch(proc.pid, tid, metrics, "/nope", a.requests)
        print(f"control GET /nope: {control / 1000:8.1f} us per request {st0}")
        for path in ["/healthz", "/metrics"]:
            cost, st = batch(proc.pid, tid, metrics, path, a.requests)
            print(f"GET {path:9} {cost / 1000:8.1f} us per request, "
                  f"net of the control {(cost - control) / 1000:8.1f} us {st}")
        for s in conns:
            s.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)


if __name__ == "__main__":
    main()
