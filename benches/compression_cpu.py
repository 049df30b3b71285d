#!/usr/bin/env python3
"""CPU per compressed byte: K clients each send ROUNDS bursts of 256 KiB of compressed frames
(16 KiB of random 'a'/'b' text each: hard to compress, about 2.7 KB on the wire), which the echo
server inflates and echoes compressed, while a legitimate client's upgrade and echo are timed
after each burst. Prints those times, the server's CPU, and its turn histogram and stalls.

    target/release/wsloop --listen 127.0.0.1:19801 --metrics-listen 127.0.0.1:19802 \
        --compression shared &
    benches/compression_cpu.py 19801 19802 32 5

Bounded: K connections, ROUNDS bursts, then it waits for the server to finish and exits.
Targets 127.0.0.1 only.
"""
import base64
import os
import random
import socket
import struct
import sys
import threading
import time
import urllib.request
import zlib


def upgrade(port, timeout=5):
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    key = base64.b64encode(os.urandom(16)).decode()
    s.sendall(
        (
            f"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            f"Sec-WebSocket-Extensions: permessage-deflate\r\n\r\n"
        ).encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = s.recv(4096)
        if not chunk:
            raise EOFError("closed during the upgrade")
        head += chunk
    if not head.startswith(b"HTTP/1.1 101"):
        raise RuntimeError(head.split(b"\r\n")[0].decode())
    return s


def frame(opcode, payload, rsv1):
    first = 0x80 | (0x40 if rsv1 else 0) | opcode
    n = len(payload)
    if n < 126:
        head = bytes([first, 0x80 | n])
    elif n < 65536:
        head = bytes([first, 0x80 | 126]) + struct.pack(">H", n)
    else:
        head = bytes([first, 0x80 | 127]) + struct.pack(">Q", n)
    # A zero mask: the payload goes as it is.
    return head + b"\0\0\0\0" + payload


def deflate(data):
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    out = c.compress(data) + c.flush(zlib.Z_SYNC_FLUSH)
    return out[:-4]


def legit(port):
    t = time.time()
    try:
        s = upgrade(port, timeout=2)
        s.sendall(frame(1, b"hello-legit", False))
        got = s.recv(64)
        s.close()
        if not got:
            return "legit FAIL: closed"
        return f"legit ok {1000 * (time.time() - t):.1f} ms"
    except Exception as e:  # a timeout is the finding
        return f"legit FAIL {e!r} after {time.time() - t:.2f} s"


def metrics(port, words):
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
    return [
        line
        for line in text.decode().splitlines()
        if not line.startswith("#") and any(w in line for w in words)
    ]


def main():
    port, mport, k, rounds = (int(a) for a in sys.argv[1:5])
    random.seed(1)
    text = bytes(random.choice(b"ab") for _ in range(16384))
    z = deflate(text)
    per_burst = (256 * 1024) // len(frame(2, z, True))
    burst = frame(2, z, True) * per_burst
    socks = [upgrade(port) for _ in range(k)]
    stop = threading.Event()

    def drain(s):
        s.settimeout(0.5)
        while not stop.is_set():
            try:
                if not s.recv(1 << 20):
                    return
            except socket.timeout:
                continue
            except OSError:
                return

    threads = [threading.Thread(target=drain, args=(s,), daemon=True) for s in socks]
    for t in threads:
        t.start()
    t0 = time.time()
    for r in range(rounds):
        for s in socks:
            s.sendall(burst)
        print(r, legit(port), flush=True)
    sent = k * rounds * per_burst
    # Wait (bounded) until every message was echoed.
    deadline = time.time() + 120
    while time.time() < deadline:
        lines = metrics(mport, ["wsloop_compressed_messages_total{direction=\"sent\"}"])
        if lines and float(lines[0].split()[-1]) >= sent:
            break
        time.sleep(0.5)
    print(f"{k} clients x {rounds} bursts x {len(burst)} B: {sent} messages, "
          f"all echoed after {time.time() - t0:.1f} s")
    stop.set()
    for line in metrics(mport, ["turn_duration_seconds_bucket", "loop_stalls_total",
                                "longest_stall", "read_yields_total"]):
        print(line)
    for s in socks:
        s.close()


if __name__ == "__main__":
    main()
