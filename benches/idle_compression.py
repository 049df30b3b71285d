#!/usr/bin/env python3
"""Resident memory per idle connection of a running wsloop, with or without permessage-deflate
negotiated: opens N raw connections (each upgraded, offering the extension or not), waits,
and prints the server's RSS growth per connection. Everything on 127.0.0.1.

Usage: python3 benches/idle_compression.py PORT N OFFER(0|1) SERVER_PID
(raise the shell's descriptor limit first for large N: ulimit -n 10000)
"""
import socket
import sys
import time

port, n, offer, pid = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1", int(sys.argv[4])


def rss_kib():
    with open(f"/proc/{pid}/status") as f:
        return int(next(line for line in f if line.startswith("VmRSS")).split()[1])


request = (
    b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
    + (b"Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n" if offer else b"")
    + b"\r\n"
)
before = rss_kib()
conns, negotiated = [], 0
for _ in range(n):
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(request)
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        head += s.recv(1)
    negotiated += b"permessage-deflate" in head
    conns.append(s)
time.sleep(0.5)
after = rss_kib()
print(
    f"{n} idle connections, offered={offer}, negotiated={negotiated}: "
    f"RSS {before} -> {after} KiB, {(after - before) * 1024 / n:.0f} bytes per connection"
)
