#!/usr/bin/env python3
"""Records the upgrade requests that real clients send, as `handshake` seeds (and a few as
`connection` seeds): a socket listening on 127.0.0.1 reads each request head and closes.

Clients: the Python `websockets` library (pip install websockets) and tungstenite's client
(tungstenite_client.rs, built in a throwaway crate; needs cargo and crates.io). The Chrome request
is written by hand from the format Chrome 120+ sends (no browser can be run here).

Run from the repository root: python3 fuzz/tools/capture_handshakes.py
"""
import asyncio
import os
import shutil
import socket
import struct
import subprocess
import tempfile
import threading

TOOLS = os.path.dirname(os.path.abspath(__file__))
SEEDS = os.path.join(TOOLS, "..", "seeds")

# The handshake target's input prefix: [flags, p1, p2, n_chunks] (defaults, one chunk).
PREFIX = b"\x00\x00\x00\x00"


def capture(run_client):
    """Starts a one-shot listener, runs `run_client(port)`, returns the request head it sent."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]
    got = {}

    def serve():
        conn, _ = srv.accept()
        data = b""
        while b"\r\n\r\n" not in data:
            more = conn.recv(4096)
            if not more:
                break
            data += more
        got["head"] = data
        conn.close()

    t = threading.Thread(target=serve)
    t.start()
    try:
        run_client(port)
    except Exception:
        pass  # the listener never answers with a 101
    t.join(timeout=30)
    srv.close()
    return got["head"]


def python_websockets(path, **kwargs):
    def run(port):
        from websockets.sync.client import connect

        with connect(f"ws://127.0.0.1:{port}{path}", open_timeout=5, **kwargs):
            pass

    return run


def tungstenite(path, protocols=None):
    crate = tempfile.mkdtemp(prefix="tungstenite-capture-")
    os.makedirs(os.path.join(crate, "src"))
    with open(os.path.join(crate, "Cargo.toml"), "w") as f:
        f.write('[package]\nname = "capture"\nversion = "0.0.0"\nedition = "2021"\n\n'
                '[dependencies]\ntungstenite = "0.30"\n\n[workspace]\n')
    shutil.copy(os.path.join(TOOLS, "tungstenite_client.rs"), os.path.join(crate, "src", "main.rs"))
    subprocess.run(["cargo", "build", "-q"], cwd=crate, check=True)
    exe = os.path.join(crate, "target", "debug", "capture")

    def run(port):
        args = [exe, f"ws://127.0.0.1:{port}{path}"] + ([protocols] if protocols else [])
        subprocess.run(args, timeout=30)

    return run


def chrome(port=9001):
    """The request as Chrome 120+ sends it (header order and values from Chrome's network log)."""
    return (
        "GET /ws?room=lobby HTTP/1.1\r\n"
        f"Host: localhost:{port}\r\n"
        "Connection: Upgrade\r\n"
        "Pragma: no-cache\r\n"
        "Cache-Control: no-cache\r\n"
        "User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/126.0.0.0 Safari/537.36\r\n"
        "Upgrade: websocket\r\n"
        "Origin: http://localhost:8080\r\n"
        "Sec-WebSocket-Version: 13\r\n"
        "Accept-Encoding: gzip, deflate, br, zstd\r\n"
        "Accept-Language: en-US,en;q=0.9\r\n"
        "Sec-WebSocket-Key: x3JJHMbDL1EzLkh9GBhXDw==\r\n"
        "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"
        "\r\n"
    ).encode()


def chrome_with_protocols():
    head = chrome()
    extra = b"Sec-WebSocket-Protocol: graphql-ws, graphql-transport-ws\r\n\r\n"
    return head[:-2] + extra


def write(target, name, data):
    d = os.path.join(SEEDS, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def masked(op, payload, key=b"\x11\x22\x33\x44"):
    assert len(payload) < 126
    body = bytes(c ^ key[i % 4] for i, c in enumerate(payload))
    return bytes([0x80 | op, 0x80 | len(payload)]) + key + body


def main():
    heads = {
        "python_websockets": capture(python_websockets("/")),
        "python_websockets_subprotocols": capture(
            python_websockets("/chat?v=2", subprotocols=["chat", "superchat"],
                              origin="https://example.com")
        ),
        "python_websockets_no_compression": capture(python_websockets("/", compression=None)),
        "tungstenite": capture(tungstenite("/")),
        "tungstenite_subprotocols": capture(tungstenite("/chat", "chat, superchat")),
        "chrome_126": chrome(),
        "chrome_126_subprotocols": chrome_with_protocols(),
    }
    for name, head in heads.items():
        print(name, len(head))
        write("handshake", name, PREFIX + head)
        # In 7-byte-ish chunks: [flags, p1, p2, n] + n sizes (each + 1).
        write("handshake", name + "_split", b"\x00\x00\x00\x0f" + bytes([6] * 15) + head)
    # connection: the client's request, a text message and a close, in reads of 100 bytes
    # ([flags, max_message index 13 = 16 KiB, max_header, 3 ops] + 3 data ops + stream).
    ops = b"\x00\x64\x00\x00" * 3
    for name in ("python_websockets", "tungstenite", "chrome_126_subprotocols"):
        stream = heads[name] + masked(1, b"Hello") + masked(8, struct.pack(">H", 1000) + b"bye")
        write("connection", "client_" + name, bytes([4, 13, 255, 3]) + ops + stream)


if __name__ == "__main__":
    main()
