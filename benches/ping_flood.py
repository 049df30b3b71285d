#!/usr/bin/env python3
"""Memory under a ping flood from clients that never read, side by side with uWebSockets.js.

For each server, in one run: start it on 127.0.0.1, then N clients (receive buffer 4 KiB) each
upgrade and send P masked pings of 125 bytes (the frame `89 FD 00 00 00 00` + 125 x `50`, in
writes of 64 pings) without reading a byte. The server's resident memory (VmRSS) is sampled
every 20 ms from before the flood until each client has sent its last ping and then one text
message, and has read everything up to that message's echo (so the server has parsed the whole
flood); the report gives the baseline, the peak and the pongs each client got. A client whose
write blocks for 60 s, or that the server drops, is reported as such.

    cargo build --release
    python3 benches/ping_flood.py                      # wsloop only
    python3 benches/ping_flood.py --uws DIR            # and uWebSockets.js, installed in DIR
                                                       # (npm install into DIR, as compare.sh does)
    python3 benches/ping_flood.py --wsloop OTHER_BINARY --label before

Runs: 1 x 1,000,000 pings and 8 x 300,000 pings (--runs "1x1000000 8x300000").
"""
import argparse
import os
import socket
import subprocess
import sys
import threading
import time

PING = bytes([0x89, 0xFD, 0, 0, 0, 0]) + b"\x50" * 125
BATCH = PING * 64
END = bytes([0x81, 0x83, 0, 0, 0, 0]) + b"end"
UPGRADE = (
    "GET / HTTP/1.1\r\nHost: bench\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
).encode()


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def start(kind, path, port):
    if kind == "wsloop":
        cmd = [path, "--listen", f"127.0.0.1:{port}", "--idle-timeout", "0"]
        env = dict(os.environ, RUST_LOG="warn")
    else:
        here = os.path.dirname(os.path.abspath(__file__))
        cmd = ["node", os.path.join(here, "uws_echo.js"), "--listen", f"127.0.0.1:{port}"]
        env = dict(os.environ, NODE_PATH=os.path.join(path, "node_modules"))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 20
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"{kind} exited at start: {proc.stderr.read().decode()[-2000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    sys.exit(f"{kind} did not listen on {port}")


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def read_exact(s, n):
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        if not chunk:
            raise EOFError("server closed the connection")
        data += chunk
    return data


def client(port, pings, out, i):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.settimeout(60)
    try:
        s.connect(("127.0.0.1", port))
        s.sendall(UPGRADE)
        head = b""
        while b"\r\n\r\n" not in head:
            head += s.recv(1)
        for _ in range(pings // 64):
            s.sendall(BATCH)
        s.sendall(END)
        pongs = 0
        while True:
            h = read_exact(s, 2)
            n = h[1] & 127
            if n == 126:
                n = int.from_bytes(read_exact(s, 2), "big")
            read_exact(s, n)
            if h[0] == 0x8A:
                pongs += 1
            elif h[0] == 0x81:
                break
        out[i] = f"{pongs} pongs"
    except Exception as e:  # noqa: BLE001 - reported, not hidden
        out[i] = f"failed: {e}"
    finally:
        s.close()


def run(kind, path, label, conns, pings):
    port = free_port()
    proc = start(kind, path, port)
    try:
        time.sleep(0.3)
        base = rss_kib(proc.pid)
        peak = [base]
        done = threading.Event()

        def sample():
            while not done.is_set():
                peak[0] = max(peak[0], rss_kib(proc.pid))
                time.sleep(0.02)

        sampler = threading.Thread(target=sample)
        sampler.start()
        out = [None] * conns
        t0 = time.time()
        threads = [threading.Thread(target=client, args=(port, pings, out, i)) for i in range(conns)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        took = time.time() - t0
        done.set()
        sampler.join()
        end = rss_kib(proc.pid)
        results = sorted(set(out))
        print(
            f"| {label} | {conns} x {pings:,} | {base:,} | {peak[0]:,} | {peak[0] - base:,} "
            f"| {end:,} | {took:.1f} s | {', '.join(results)} |",
            flush=True,
        )
    finally:
        proc.kill()
        proc.wait()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--wsloop", default="target/release/wsloop")
    ap.add_argument("--label", default="wsloop")
    ap.add_argument("--uws", help="folder where @trufflesuite/uws-js-unofficial is installed")
    ap.add_argument("--runs", default="1x1000000 8x300000")
    a = ap.parse_args()
    runs = [tuple(int(x) for x in r.split("x")) for r in a.runs.split()]
    print("| server | clients x pings | RSS before (KiB) | peak | growth | after | flood took | each client got |")
    print("|---|---|---|---|---|---|---|---|")
    for conns, pings in runs:
        run("wsloop", a.wsloop, a.label, conns, pings)
        if a.uws:
            run("uws", a.uws, "uWebSockets.js", conns, pings)


if __name__ == "__main__":
    main()
