#!/usr/bin/env python3
"""Bytes per idle TLS connection: the resident memory of N idle wss:// connections minus that of
N idle ws:// ones, each measured on a fresh wsloop started by this script (release binary).
Each connection completes its handshake and upgrade and one 100-byte echo, then idles.
The test certificates (a CA and a server certificate for localhost, P-256) are made with the
openssl CLI in a temporary folder. Everything on 127.0.0.1.

Usage: python3 benches/idle_tls.py [WSLOOP_BINARY] [N]
(default target/release/wsloop and 2000; the script raises its own descriptor limit)
"""
import os
import resource
import socket
import ssl
import subprocess
import sys
import tempfile
import time

binary = sys.argv[1] if len(sys.argv) > 1 else "target/release/wsloop"
n = int(sys.argv[2]) if len(sys.argv) > 2 else 2000
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, n + 256)), hard))


def openssl(cwd, *args):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_certs(d):
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    openssl(d, "req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
            "-subj", "/CN=bench CA")
    openssl(d, "req", "-new", *ec, "-keyout", "key.pem", "-out", "s.csr", "-subj", "/CN=localhost")
    with open(os.path.join(d, "s.ext"), "w") as f:
        f.write("subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\n")
    openssl(d, "x509", "-req", "-in", "s.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", "cert.pem", "-days", "2", "-extfile", "s.ext")


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        return int(next(line for line in f if line.startswith("VmRSS")).split()[1])


def start(extra):
    p = subprocess.Popen(
        [binary, "--listen", "127.0.0.1:0", "--idle-timeout", "0", *extra],
        stderr=subprocess.PIPE, text=True)
    for line in p.stderr:
        if "listening on " in line:
            port = int(line.rsplit(":", 1)[1])
            break
    else:
        raise SystemExit("wsloop did not start")
    # Keep draining its log so that it never blocks on a full pipe.
    import threading
    threading.Thread(target=lambda: [None for _ in p.stderr], daemon=True).start()
    return p, port


REQUEST = (b"GET / HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
# A masked 100-byte text frame (mask 0: the payload is as written).
FRAME = bytes([0x81, 0x80 | 100, 0, 0, 0, 0]) + b"x" * 100


def measure(label, extra, ctx):
    p, port = start(extra)
    time.sleep(0.3)
    before = rss_kib(p.pid)
    conns = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        if ctx:
            s = ctx.wrap_socket(s, server_hostname="localhost")
        s.sendall(REQUEST)
        head = b""
        while not head.endswith(b"\r\n\r\n"):
            head += s.recv(1)
        assert head.startswith(b"HTTP/1.1 101"), head
        s.sendall(FRAME)
        echo = b""
        while len(echo) < 102:
            echo += s.recv(102 - len(echo))
        conns.append(s)
    time.sleep(1.0)
    after = rss_kib(p.pid)
    per = (after - before) * 1024 / n
    print(f"{label}: {n} idle connections, RSS {before} -> {after} KiB, {per:.0f} bytes each")
    for s in conns:
        s.close()
    p.terminate()
    p.wait(timeout=15)
    return per


with tempfile.TemporaryDirectory() as d:
    make_certs(d)
    ctx = ssl.create_default_context(cafile=os.path.join(d, "ca.pem"))
    plain = measure("ws://", [], None)
    tls = measure("wss://", ["--tls-cert", os.path.join(d, "cert.pem"),
                             "--tls-key", os.path.join(d, "key.pem")], ctx)
    print(f"TLS costs {tls - plain:.0f} bytes per idle connection")
