#!/usr/bin/env python3
"""The soak (issue 18): wsloop for a set time under legitimate load while attacks rotate.

Not a test (it is in neither `cargo test` nor `.ci/run`): a run takes an hour by default.

What it does, all on 127.0.0.1, every process it starts killed when it ends or is interrupted
(SIGINT, SIGTERM; and, through PR_SET_PDEATHSIG, even when it is killed with SIGKILL):

- builds target/release/wsloop (`cargo build --release`, unless --no-build or --bin) and runs
  three instances as children, each with `--fd-limit` (4096), `--memory-budget` (64 MiB) and
  `--metrics-listen`: an echo server ("echo"), a topic server ("pubsub", `--pubsub`) and an
  echo server over TLS with permessage-deflate ("wss", `--tls-cert`, `--compression shared`;
  its certificate made with the openssl CLI);
- legitimate load on all three, throughout, from a process of its own: 32 echo clients each
  sending a 64-byte message every 200 ms and timing its echo; a room of 12 members on the topic
  server, each publishing every 500 ms and checking that every member gets every publication,
  in order; 16 wss clients each sending a compressed 2 KiB JSON message every 200 ms and
  checking its compressed echo; and a fresh client every second (on each server in turn) that
  connects, upgrades, echoes one message and closes;
- attacks that rotate every few minutes, each wave against every server at once (one attacker
  process per server; against the wss server over TLS): slowloris, an idle flood, connect/reset churn, EMFILE (more connections
  than the descriptor limit allows), slow readers, oversized frames and heads, bomb frames
  (lengths of 2^63-1 and 2^64-1 announced), and the memory attacks (thousands parking partial
  messages; hundreds not reading their echoes; both at once);
- every 10 s, for each server: its descriptors (/proc/PID/fd), RSS, `wsloop_memory_bytes` (by
  kind), connections, shedding, and its counters of closes by reason, refused upgrades by
  status, refused admissions by limit and failed accepts (so that each wave's effect on each
  server is measured: a wave that does not make its defence act fails the verdict, see
  EXPECT); and the legitimate clients' latency p50/p99 over the interval and their errors. It writes soak.csv, soak.png (matplotlib) and soak.json
  into --out, and the report (--report, by default OUT/SOAK.md) with the verdict computed from
  the data (the criteria and their bounds are in the report and in `verdict()` below).

Usage:

    python3 benches/soak.py                               # one hour, into target/soak/
    python3 benches/soak.py --minutes 3                   # a short run
    python3 benches/soak.py --out docs/soak --report SOAK.md    # the committed run
    python3 benches/soak.py --report-only --out docs/soak --report SOAK.md   # redo the report

Needs Python 3.9+ and matplotlib (`pip install matplotlib`, or `apt-get install
python3-matplotlib`), a Rust toolchain unless --bin is given, and a hard RLIMIT_NOFILE of at
least 16384 (the attackers hold more connections than the servers' limit).
"""

import argparse
import asyncio
import base64
import collections
import errno
import csv
import hashlib
import json
import os
import random
import re
import resource
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

# ---------------------------------------------------------------------------------------------
# Settings

SAMPLE_SECONDS = 10
# The legitimate load.
ECHO_CLIENTS = 32
ECHO_INTERVAL = 0.2
ECHO_SIZE = 64
ROOM_MEMBERS = 12
ROOM_INTERVAL = 0.5
FRESH_INTERVAL = 1.0
# On the third server, TLS and permessage-deflate (the shared profile): long-lived clients
# sending a compressible JSON text message (over the compression threshold of 1,024 bytes) every
# WSS_INTERVAL, compressed, and checking the compressed echo.
WSS_CLIENTS = 16
WSS_INTERVAL = 0.2
WSS_SIZE = 2048
# A legitimate client waits this long for any answer before it counts an error.
ANSWER_TIMEOUT = 5.0
# After a wave, a 503 to a fresh client still counts as an answer for this long.
REFUSAL_GRACE = 15.0
# The verdict's bounds (see verdict()).
P99_BOUND_MS = 250.0
# What the `publications` kind may hold at a sample: a turn's fan-out arena (src/topics.rs,
# `Fanout`) is kept for the next turn after its publications are delivered (`Fanout::clear`) and
# given back on the first turn that publishes nothing (`Fanout::release`,
# src/server/deliver.rs), so with the legitimate room publishing it is usually 0 at a quiet
# point but a scrape may land right after a publishing turn. What `clear` keeps is bounded by the
# early delivery thresholds (`Fanout::is_large`): the frames, at most MAX_FRAMED (1 MiB; an
# arena that grew past it is dropped); the publications, MAX_PUBS (65,536) `Range<usize>` of 16
# bytes (1 MiB); the runs owed, MAX_OWED (65,536) runs of 12 bytes (768 KiB); and the list of
# slots owed, 16 bytes per connection (4,096 here: 64 KiB). In all at most 2.81 MiB: 3 MiB.
FANOUT_BOUND = 3 << 20
# RSS after a wave of one kind may grow by at most this much from that kind's second rotation
# to its last, per rotation (see verdict()).
RSS_KIND_BOUND_MIB = 2.0

# The rotation, in order. Each wave runs one kind against every server at once.
KINDS = [
    "slowloris",
    "idle_flood",
    "churn",
    "emfile",
    "slow_readers",
    "oversized",
    "bombs",
    "parkers",
    "non_readers",
    "memory_both",
]

# What shows that a wave attacked: for each kind and server, counters (CSV column suffixes, see
# COUNTERS) whose sum must have risen by at least the number given from the sample before the
# wave to the quiet point after it (the end of its quiet window). The legitimate clients add
# only `closed_peer_closed` and, during memory and emfile waves, 503 refusals; the minimums are
# far below what a wave of 20 s does (see the short runs) and far above what happens without
# one. An idle flood is closed at the idle timeout (60 s): it needs waves of 70 s or more.
EXPECT = {
    "slowloris": [(["closed_handshake_timeout"], 300)],
    "idle_flood": [(["closed_idle_timeout"], 500)],
    "churn": [(["closed_abnormal", "closed_io_error"], 1000)],
    "emfile": [(["refused_max_connections"], 1000), (["closed_handshake_timeout"], 100)],
    "slow_readers": [(["closed_backpressure", "closed_write_stall", "closed_memory"], 20)],
    "oversized": [(["closed_protocol_error"], 50), (["status_431"], 20)],
    "bombs": [(["closed_protocol_error"], 200)],
    "parkers": [(["closed_memory"], 100)],
    "non_readers": [(["closed_memory", "closed_backpressure", "closed_write_stall"], 20)],
    "memory_both": [(["closed_memory"], 100)],
}

# The wss server meets the same attacks over TLS: as the echo server, except that a churned
# connection may end in its handshake (tls_error), and that the emfile wave's surplus may also
# be refused for TLS's share of the memory budget or the cap on handshakes in progress.
EXPECT_WSS = {
    "churn": [(["closed_abnormal", "closed_io_error", "closed_tls_error"], 1000)],
    "emfile": [(["refused_max_connections", "refused_memory_budget", "tls_capped"], 1000),
               (["closed_handshake_timeout"], 100)],
}


def expected(kind, server):
    return EXPECT_WSS.get(kind, EXPECT[kind]) if server == "wss" else EXPECT[kind]


def names_of(meta):
    """The servers of a run (a run recorded before the wss server was added had two)."""
    return meta.get("servers", ["echo", "pubsub"])


def latency_keys(meta):
    """The long-lived clients whose p99 is judged."""
    return ["echo", "room"] + (["wss"] if "wss" in names_of(meta) else [])


# A short run (under 20 minutes) has room for a few waves of 20 s: these, unless --kinds.
SHORT_KINDS = ["memory_both", "emfile", "slowloris", "bombs"]

# Server options besides --fd-limit and --memory-budget. Messages up to 64 KiB (as in
# tests/memory.rs: a parker then holds 60 KB); a send buffer of 64 KiB per socket, as the README
# advises for rooms; an idle timeout of 60 s, so that an idle flood is pinged and closed within
# a wave; a receive buffer of 64 KiB per socket, so that a client the server stops reading holds
# about 128 KiB in the kernel (Linux doubles it), not the 590 KB the first hour-long run found.
SERVER_ARGS = [
    "--max-message-size", "65536",
    "--socket-send-buffer", "65536",
    "--idle-timeout", "60",
    "--socket-receive-buffer", "65536",
]

# The echo server drops an echo over --max-backpressure instead of closing the reader (as in
# tests/memory.rs): non-readers then stay, holding their queues, until the memory budget or the
# write-stall timeout ends them. The topic server keeps the default (close, 1008).
ECHO_ARGS = ["--backpressure-policy", "drop"]

# The third server ("wss"): an echo server as "echo", with TLS (a certificate the script makes
# with the openssl CLI) and permessage-deflate's shared profile; every attack reaches it over
# TLS (the attackers complete a real handshake, then do what they do over plain TCP).
WSS_ARGS = ["--compression", "shared"] + ECHO_ARGS
# The servers, in the order of the report's columns (a run recorded before the third server
# was added has only the first two: see `names_of`).
SERVERS = ["echo", "pubsub", "wss"]

IP_BIND_ADDRESS_NO_PORT = 24  # linux/in.h: pick the source port at connect, per 4-tuple


def log(msg):
    print(f"[soak {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def raise_nofile():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


# ---------------------------------------------------------------------------------------------
# A minimal WebSocket client on raw non-blocking sockets (asyncio's sock_* calls), so that an
# attacker that does not read really does not read.

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def upgrade_request(path, key=None, extra=""):
    key = key or base64.b64encode(os.urandom(16)).decode()
    return key, (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    ).encode()


# How a refusal over TLS shows: the connection closed in the handshake.
TLS_REFUSED = "closed in the TLS handshake"

# What the legitimate wss clients offer: permessage-deflate without context takeover either way
# (each message compressed on its own, as the shared profile answers).
DEFLATE_OFFER = ("Sec-WebSocket-Extensions: permessage-deflate; client_no_context_takeover; "
                 "server_no_context_takeover\r\n")


def accept_of(key):
    return base64.b64encode(hashlib.sha1(key.encode() + GUID).digest()).decode()


def masked(payload, key):
    n = len(payload)
    if n == 0:
        return b""
    k = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(k, "big")).to_bytes(n, "big")


def frame(opcode, payload=b"", fin=True, key=None, length=None, rsv1=False):
    """A client frame: masked with `key` (random if None; b"\\0\\0\\0\\0" leaves the payload as
    is); `length` announces another length than the payload's; `rsv1`: compressed
    (permessage-deflate)."""
    n = len(payload) if length is None else length
    b0 = (0x80 if fin else 0) | (0x40 if rsv1 else 0) | opcode
    if n < 126:
        head = struct.pack("!BB", b0, 0x80 | n)
    elif n < 65536:
        head = struct.pack("!BBH", b0, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", b0, 0x80 | 127, n)
    key = os.urandom(4) if key is None else key
    body = payload if key == b"\0\0\0\0" else masked(payload, key)
    return head + key + body


def close_frame(code=1000):
    return frame(0x8, struct.pack("!H", code))


def parse_frame(buf):
    """(fin, opcode, payload) of the server frame at the front of `buf` (removed), or None."""
    f = parse_frame_rsv1(buf)
    return None if f is None else f[:3]


def parse_frame_rsv1(buf):
    """(fin, opcode, payload, rsv1) of the server frame at the front of `buf` (removed), or
    None."""
    if len(buf) < 2:
        return None
    n = buf[1] & 0x7F
    off = 2
    if n == 126:
        if len(buf) < 4:
            return None
        n = int.from_bytes(buf[2:4], "big")
        off = 4
    elif n == 127:
        if len(buf) < 10:
            return None
        n = int.from_bytes(buf[2:10], "big")
        off = 10
    if buf[1] & 0x80:
        raise ValueError("a masked frame from the server")
    if len(buf) < off + n:
        return None
    fin, op, payload = bool(buf[0] & 0x80), buf[0] & 0x0F, bytes(buf[off:off + n])
    rsv1 = bool(buf[0] & 0x40)
    del buf[:off + n]
    return fin, op, payload, rsv1


def deflate(msg):
    """One message compressed as permessage-deflate without context takeover: raw deflate,
    flushed, without the flush's last four bytes (RFC 7692, 7.2.1)."""
    c = zlib.compressobj(wbits=-15)
    out = c.compress(msg) + c.flush(zlib.Z_SYNC_FLUSH)
    if not out.endswith(b"\x00\x00\xff\xff"):
        raise ValueError("no sync flush tail")
    return out[:-4]


def inflate(payload, limit=1 << 20):
    d = zlib.decompressobj(wbits=-15)
    out = d.decompress(payload + b"\x00\x00\xff\xff", limit)
    if d.unconsumed_tail:
        raise ValueError("a compressed message inflating past 1 MiB")
    return out


class Peer:
    """One connection: a raw non-blocking socket and what has been read from it."""

    __slots__ = ("sock", "buf", "loop")

    def __init__(self, sock):
        self.sock = sock
        self.buf = bytearray()
        self.loop = asyncio.get_running_loop()

    async def more(self, n=65536):
        data = await self.loop.sock_recv(self.sock, n)
        if not data:
            raise EOFError("end of stream")
        self.buf += data

    async def head(self, limit=65536):
        """The HTTP head of the answer: (status, head text)."""
        while True:
            i = self.buf.find(b"\r\n\r\n")
            if i >= 0:
                head = bytes(self.buf[:i + 4]).decode("latin-1")
                del self.buf[:i + 4]
                try:
                    status = int(head.split(" ", 2)[1])
                except (IndexError, ValueError):
                    status = -1
                return status, head
            if len(self.buf) > limit:
                raise ValueError("answer head too long")
            await self.more()

    async def body(self, head):
        m = re.search(r"(?im)^content-length:\s*(\d+)", head)
        n = int(m.group(1)) if m else 0
        while len(self.buf) < n:
            await self.more()
        b = bytes(self.buf[:n])
        del self.buf[:n]
        return b.decode("latin-1")

    async def frame(self):
        while True:
            f = parse_frame(self.buf)
            if f is not None:
                return f
            await self.more()

    async def frame_rsv1(self):
        while True:
            f = parse_frame_rsv1(self.buf)
            if f is not None:
                return f
            await self.more()

    async def send(self, data):
        await self.loop.sock_sendall(self.sock, data)

    def close(self, reset=False):
        try:
            if reset:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.sock.close()
        except OSError:
            pass


class TlsPeer(Peer):
    """A connection over TLS: Python's ssl on memory buffers over the same raw socket, so that
    what is not read stays unread in the kernel (`sock` is still the TCP socket: its state and
    raw reads are the transport's, as for a plain peer)."""

    __slots__ = ("obj", "inc", "out")

    def __init__(self, sock, ctx):
        super().__init__(sock)
        self.inc, self.out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.inc, self.out, server_hostname="localhost")

    async def flush(self):
        data = self.out.read()
        if data:
            await self.loop.sock_sendall(self.sock, data)

    async def fill(self, n=65536):
        data = await self.loop.sock_recv(self.sock, n)
        if not data:
            self.inc.write_eof()
            raise EOFError("end of stream (TCP)")
        self.inc.write(data)

    async def handshake(self):
        while True:
            try:
                self.obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                await self.flush()
                await self.fill()
        await self.flush()

    async def more(self, n=65536):
        while True:
            try:
                data = self.obj.read(n)
            except ssl.SSLWantReadError:
                await self.flush()
                await self.fill(n)
                continue
            except ssl.SSLZeroReturnError:
                raise EOFError("end of stream (close_notify)")
            if not data:
                raise EOFError("end of stream (close_notify)")
            self.buf += data
            return

    async def send(self, data):
        self.obj.write(data)
        await self.flush()


def tls_context(ca):
    """A client context trusting the certificate file `ca` (None: no TLS)."""
    if not ca:
        return None
    ctx = ssl.create_default_context(cafile=ca)
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def make_certificate(folder):
    """A test CA and a certificate for localhost and 127.0.0.1 it signs, made with the openssl
    CLI in `folder`: the CA's path (for the clients) and the certificate's and key's (for the
    server)."""
    def openssl(*a):
        subprocess.run(["openssl", *a], cwd=folder, check=True, capture_output=True)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
            "-subj", "/CN=wsloop soak CA")
    openssl("req", "-new", *ec, "-keyout", "key.pem", "-out", "server.csr", "-subj", "/CN=localhost")
    with open(os.path.join(folder, "server.ext"), "w") as f:
        f.write("subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n"
                "keyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", "cert.pem", "-days", "2", "-extfile", "server.ext")
    return tuple(os.path.join(folder, f) for f in ("ca.pem", "cert.pem", "key.pem"))


async def open_peer(port, src, rcvbuf=None, timeout=ANSWER_TIMEOUT, tls=None):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.setblocking(False)
        if rcvbuf:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        s.bind((src, 0))
        await asyncio.wait_for(asyncio.get_running_loop().sock_connect(s, ("127.0.0.1", port)), timeout)
    except BaseException:
        s.close()
        raise
    if tls is None:
        return Peer(s)
    peer = TlsPeer(s, tls)
    try:
        await asyncio.wait_for(peer.handshake(), timeout)
    except BaseException:
        peer.close()
        raise
    return peer


TCP_CLOSE, TCP_CLOSE_WAIT = 7, 8  # linux/tcp_states.h


def ended_how(sock):
    """How the server ended a connection we do not read, or None if it is still open."""
    state = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]
    if state == TCP_CLOSE:
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        return "reset" if err == errno.ECONNRESET else f"closed ({os.strerror(err) if err else 'no error'})"
    if state == TCP_CLOSE_WAIT:
        return "FIN"
    return None


def close_code(payload):
    return struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005


def status_key(status, head):
    """A refused upgrade: its status, with the reason phrase for a 503 (which one it was)."""
    if status == 503:
        m = re.match(r"HTTP/1\.1 503 ([^\r]*)", head)
        return f"503 {m.group(1) if m else ''}".strip()
    return str(status)


# ---------------------------------------------------------------------------------------------
# The legitimate clients (a process of their own: `soak.py legit`). Commands on stdin, one a
# line: `sample` (stop starting fresh clients, wait for those under way, answer with the stats
# of the interval as one JSON line), `resume`, `stop` (close everything cleanly, answer the
# last stats, exit).


class Legit:
    def __init__(self, echo_port, pubsub_port, wss_port=None, tls=None):
        self.echo_port = echo_port
        self.pubsub_port = pubsub_port
        self.wss_port = wss_port
        self.tls = tls
        self.reset_interval()
        self.errors_total = 0
        self.paused = False
        self.in_flight = 0
        self.stopping = False
        self.tasks = []
        self.peers = set()

    def reset_interval(self):
        self.echo_lat = []
        self.wss_lat = []
        self.room_lat = []
        self.fresh_lat = []
        self.refused = []
        self.errors = []

    def error(self, who, detail):
        self.errors_total += 1
        self.errors.append({"t": time.monotonic(), "who": who, "detail": str(detail)[:200]})

    def stats(self):
        def pct(xs):
            if not xs:
                return {"n": 0, "p50": None, "p99": None, "max": None}
            xs = sorted(xs)
            return {
                "n": len(xs),
                "p50": xs[len(xs) // 2],
                "p99": xs[min(len(xs) - 1, int(len(xs) * 0.99))],
                "max": xs[-1],
            }

        out = {
            "echo": pct(self.echo_lat),
            "wss": pct(self.wss_lat),
            "room": pct(self.room_lat),
            "fresh": pct(self.fresh_lat),
            "refused": self.refused,
            "errors": self.errors,
        }
        self.reset_interval()
        return out

    async def upgrade(self, port, path, src, tls=None, extra=""):
        """Connect (over TLS with the context `tls`) and upgrade, with the `extra` header lines;
        the open peer, or the refusal's status key (a 503 must carry Retry-After; over TLS, a
        connection closed before its handshake completed is how the server refuses, since a
        client without keys could not read a 503)."""
        try:
            peer = await open_peer(port, src, tls=tls)
        except (EOFError, ConnectionResetError, ssl.SSLError) as e:
            if tls is None:
                raise
            return None, (TLS_REFUSED, f"{type(e).__name__}: {e}")
        try:
            key, req = upgrade_request(path, extra=extra)
            await peer.send(req)
            status, head = await asyncio.wait_for(peer.head(), ANSWER_TIMEOUT)
            if status == 101:
                if accept_of(key) not in head:
                    raise ValueError("wrong Sec-WebSocket-Accept")
                if extra and "permessage-deflate" not in head:
                    raise ValueError(f"permessage-deflate not agreed: {head!r}")
                return peer, None
            body = await asyncio.wait_for(peer.body(head), ANSWER_TIMEOUT)
            if status == 503 and "retry-after" not in head.lower():
                raise ValueError(f"503 without Retry-After: {head!r}")
            peer.close()
            return None, (status_key(status, head), body.strip())
        except BaseException:
            peer.close()
            raise

    async def next_data(self, peer, who):
        """The next text or binary frame; pings answered; anything else is an error."""
        while True:
            fin, op, payload = await peer.frame()
            if op == 0x9:
                await peer.send(frame(0xA, payload))
            elif op == 0xA:
                continue
            elif op == 0x8:
                raise ConnectionError(f"closed by the server with {close_code(payload)}")
            elif not fin or op not in (0x1, 0x2):
                raise ValueError(f"unexpected frame op={op} fin={fin}")
            else:
                return payload

    async def echo_client(self, i):
        """A long-lived echo client: one message every ECHO_INTERVAL, its echo timed."""
        seq = 0
        await asyncio.sleep(i * ECHO_INTERVAL / ECHO_CLIENTS)
        while not self.stopping:
            peer = None
            try:
                peer, refused = await self.upgrade(self.echo_port, f"/legit-echo-{i}", "127.0.0.2")
                if refused:
                    raise ConnectionError(f"long-lived client refused: {refused}")
                self.peers.add(peer)
                nxt = time.monotonic()
                while not self.stopping:
                    seq += 1
                    msg = f"echo {i} {seq} ".encode().ljust(ECHO_SIZE, b".")
                    t = time.monotonic()
                    await peer.send(frame(0x1, msg))
                    got = await asyncio.wait_for(self.next_data(peer, "echo"), ANSWER_TIMEOUT)
                    if got != msg:
                        raise ValueError(f"echo mismatch: sent {msg[:20]!r}, got {got[:20]!r}")
                    self.echo_lat.append((time.monotonic() - t) * 1000)
                    nxt += ECHO_INTERVAL
                    await asyncio.sleep(max(0, nxt - time.monotonic()))
            except asyncio.CancelledError:
                raise
            except BaseException as e:
                if not self.stopping:
                    self.error(f"echo-{i}", f"{type(e).__name__}: {e}")
                    await asyncio.sleep(1)
            finally:
                if peer:
                    self.peers.discard(peer)
                    peer.close()

    async def wss_client(self, i):
        """A long-lived client over TLS with permessage-deflate: a compressible JSON message of
        WSS_SIZE bytes every WSS_INTERVAL, compressed; its echo must come back compressed and
        inflate to the message. Timed as the echo clients are."""
        seq = 0
        rng = random.Random(i)
        words = ["price", "volume", "symbol", "bid", "ask", "time", "venue", "side"]
        await asyncio.sleep(i * WSS_INTERVAL / WSS_CLIENTS)
        while not self.stopping:
            peer = None
            try:
                peer, refused = await self.upgrade(self.wss_port, f"/legit-wss-{i}", "127.0.0.2",
                                                   tls=self.tls, extra=DEFLATE_OFFER)
                if refused:
                    raise ConnectionError(f"long-lived wss client refused: {refused}")
                self.peers.add(peer)
                nxt = time.monotonic()
                while not self.stopping:
                    seq += 1
                    body = ",".join(f'"{rng.choice(words)}":{rng.randrange(1000)}' for _ in range(400))
                    msg = f'{{"client":{i},"seq":{seq},{body}}}'.encode()[:WSS_SIZE - 1] + b"}"
                    t = time.monotonic()
                    await peer.send(frame(0x1, deflate(msg), rsv1=True))
                    while True:
                        fin, op, payload, rsv1 = await asyncio.wait_for(peer.frame_rsv1(), ANSWER_TIMEOUT)
                        if op == 0x9:
                            await peer.send(frame(0xA, payload))
                            continue
                        if op == 0xA:
                            continue
                        break
                    if op == 0x8:
                        raise ConnectionError(f"closed by the server with {close_code(payload)}")
                    if not fin or op != 0x1 or not rsv1:
                        raise ValueError(f"unexpected echo: op={op} fin={fin} rsv1={rsv1}")
                    if inflate(payload) != msg:
                        raise ValueError("the compressed echo inflates to another message")
                    self.wss_lat.append((time.monotonic() - t) * 1000)
                    nxt += WSS_INTERVAL
                    await asyncio.sleep(max(0, nxt - time.monotonic()))
            except asyncio.CancelledError:
                raise
            except BaseException as e:
                if not self.stopping:
                    self.error(f"wss-{i}", f"{type(e).__name__}: {e}")
                    await asyncio.sleep(1)
            finally:
                if peer:
                    self.peers.discard(peer)
                    peer.close()

    async def room_member(self, i):
        """A member of /room: publishes every ROOM_INTERVAL, checks that it gets every member's
        publications (its own included) in order, and times them."""
        await asyncio.sleep(i * ROOM_INTERVAL / ROOM_MEMBERS)
        seq = 0
        while not self.stopping:
            peer = None
            pub = None
            try:
                peer, refused = await self.upgrade(self.pubsub_port, "/room", "127.0.0.2")
                if refused:
                    raise ConnectionError(f"room member refused: {refused}")
                self.peers.add(peer)
                last = {}  # sender -> last sequence number seen
                own = collections.deque()  # (seq, sent at) of own publications not seen back

                async def publish():
                    nonlocal seq
                    nxt = time.monotonic()
                    while True:
                        seq += 1
                        t = time.monotonic()
                        own.append((seq, t))
                        await peer.send(frame(0x1, f"room {i} {seq} {t:.6f}".encode()))
                        nxt += ROOM_INTERVAL
                        await asyncio.sleep(max(0, nxt - time.monotonic()))

                pub = asyncio.ensure_future(publish())
                while not self.stopping:
                    wait = ANSWER_TIMEOUT
                    if own:
                        wait = max(0.01, own[0][1] + ANSWER_TIMEOUT - time.monotonic())
                    try:
                        got = await asyncio.wait_for(self.next_data(peer, "room"), wait)
                    except asyncio.TimeoutError:
                        if own and time.monotonic() - own[0][1] >= ANSWER_TIMEOUT:
                            raise TimeoutError(f"own publication {own[0][0]} not back in {ANSWER_TIMEOUT} s")
                        continue
                    if pub.done():
                        pub.result()
                    _, sender, n, t = got.decode().split(" ")
                    sender, n, t = int(sender), int(n), float(t)
                    self.room_lat.append((time.monotonic() - t) * 1000)
                    if sender in last and n != last[sender] + 1:
                        raise ValueError(f"from member {sender}: {n} after {last[sender]}")
                    last[sender] = n
                    if sender == i:
                        while own and own[0][0] <= n:
                            own.popleft()
            except asyncio.CancelledError:
                raise
            except BaseException as e:
                if not self.stopping:
                    self.error(f"room-{i}", f"{type(e).__name__}: {e}")
                    await asyncio.sleep(1)
            finally:
                if pub:
                    pub.cancel()
                if peer:
                    self.peers.discard(peer)
                    peer.close()

    async def fresh_one(self, port, label, tls=None):
        t = time.monotonic()
        extra = DEFLATE_OFFER if tls else ""
        peer, refused = await self.upgrade(port, "/legit-fresh", "127.0.0.3", tls=tls, extra=extra)
        if refused:
            status, body = refused
            if not status.startswith("503") and status != TLS_REFUSED:
                raise ValueError(f"refused with {status}: {body}")
            self.refused.append({"t": time.monotonic(), "target": label, "status": status, "body": body})
            return
        try:
            msg = f"fresh {t}".encode()
            await peer.send(frame(0x1, msg))
            got = await asyncio.wait_for(self.next_data(peer, "fresh"), ANSWER_TIMEOUT)
            if got != msg:
                raise ValueError("echo mismatch")
            await peer.send(close_frame(1000))
            # The server's close, then the end of the stream.
            async def closing():
                while True:
                    fin, op, payload = await peer.frame()
                    if op == 0x8:
                        break
                while True:
                    try:
                        await peer.more()
                    except EOFError:
                        return close_code(payload)
            code = await asyncio.wait_for(closing(), ANSWER_TIMEOUT)
            if code != 1000:
                raise ValueError(f"close answered with {code}")
            self.fresh_lat.append((time.monotonic() - t) * 1000)
        finally:
            peer.close()

    async def fresh_clients(self):
        """A fresh client every FRESH_INTERVAL, on each server in turn (over TLS, offering
        permessage-deflate, on the third; its short message goes uncompressed both ways)."""
        k = 0
        nxt = time.monotonic()
        while not self.stopping:
            nxt += FRESH_INTERVAL
            await asyncio.sleep(max(0, nxt - time.monotonic()))
            while self.paused and not self.stopping:
                await asyncio.sleep(0.01)
            if self.stopping:
                return
            k += 1
            targets = [(self.echo_port, "echo", None), (self.pubsub_port, "pubsub", None)]
            if self.wss_port:
                targets.append((self.wss_port, "wss", self.tls))
            port, label, tls = targets[k % len(targets)]
            self.in_flight += 1
            try:
                await self.fresh_one(port, label, tls)
            except asyncio.CancelledError:
                raise
            except BaseException as e:
                self.error(f"fresh-{label}", f"{type(e).__name__}: {e}")
            finally:
                self.in_flight -= 1

    async def command(self, line):
        cmd = line.strip()
        if cmd == "sample":
            self.paused = True
            deadline = time.monotonic() + 3 * ANSWER_TIMEOUT
            while self.in_flight and time.monotonic() < deadline:
                await asyncio.sleep(0.005)
            # The server closes its end of a fresh client's connection once the client has
            # gone: let it.
            await asyncio.sleep(0.05)
            print(json.dumps(self.stats()), flush=True)
        elif cmd == "resume":
            self.paused = False
        elif cmd in ("stop", ""):
            self.stopping = True
            for peer in list(self.peers):
                try:
                    peer.sock.send(close_frame(1001))
                except OSError:
                    pass
            await asyncio.sleep(0.2)
            for t in self.tasks:
                t.cancel()
            print(json.dumps(self.stats()), flush=True)
            return True
        return False

    async def run(self):
        self.tasks = [asyncio.ensure_future(self.echo_client(i)) for i in range(ECHO_CLIENTS)]
        self.tasks += [asyncio.ensure_future(self.room_member(i)) for i in range(ROOM_MEMBERS)]
        if self.wss_port:
            self.tasks += [asyncio.ensure_future(self.wss_client(i)) for i in range(WSS_CLIENTS)]
        self.tasks.append(asyncio.ensure_future(self.fresh_clients()))
        loop = asyncio.get_running_loop()
        lines = asyncio.Queue()

        def reader():
            for line in sys.stdin:
                loop.call_soon_threadsafe(lines.put_nowait, line)
            loop.call_soon_threadsafe(lines.put_nowait, "")

        threading.Thread(target=reader, daemon=True).start()
        while True:
            if await self.command(await lines.get()):
                break
        await asyncio.gather(*self.tasks, return_exceptions=True)


# ---------------------------------------------------------------------------------------------
# The attacks (a process each: `soak.py attack KIND --port P --seconds S --target NAME`). Each
# runs for S seconds with a bounded number of connections, counts how each attacker's
# connection ended (`outcomes`), closes everything and prints its summary as one JSON line.


class Attack:
    def __init__(self, port, seconds, target, fd_limit, max_message, tls=None):
        self.port = port
        self.tls = tls
        self.deadline = time.monotonic() + seconds
        self.target = target
        self.fd_limit = fd_limit
        self.max_message = max_message
        self.outcomes = collections.Counter()
        self.opened = 0
        self.peers = set()
        self.net = random.randrange(1, 200)

    def src(self):
        return f"127.{self.net}.{random.randrange(0, 250)}.{random.randrange(1, 250)}"

    def left(self):
        return self.deadline - time.monotonic()

    async def open(self, rcvbuf=None):
        peer = await open_peer(self.port, self.src(), rcvbuf=rcvbuf, timeout=3, tls=self.tls)
        self.opened += 1
        self.peers.add(peer)
        return peer

    def drop(self, peer, reset=False):
        self.peers.discard(peer)
        peer.close(reset)

    async def upgraded(self, path="/attack", rcvbuf=None):
        """An upgraded connection, or None (the refusal counted) after waiting its Retry-After."""
        peer = await self.open(rcvbuf)
        try:
            _, req = upgrade_request(path)
            await peer.send(req)
            status, head = await asyncio.wait_for(peer.head(), 10)
        except BaseException:
            self.drop(peer)
            raise
        if status == 101:
            return peer
        self.outcomes[f"upgrade answered {status_key(status, head)}"] += 1
        self.drop(peer)
        await asyncio.sleep(1)
        return None

    async def ending(self, peer, what):
        """Read until the server ends the connection; count how: close code, reset or EOF."""
        try:
            while True:
                fin, op, payload = await peer.frame()
                if op == 0x8:
                    self.outcomes[f"{what}: close {close_code(payload)}"] += 1
                    return
        except EOFError:
            self.outcomes[f"{what}: EOF without close"] += 1
        except ConnectionResetError:
            self.outcomes[f"{what}: reset"] += 1

    async def slots(self, n, ramp, body):
        """n concurrent attackers, started over `ramp` seconds, each running `body` again and
        again until the deadline."""

        async def slot(i):
            await asyncio.sleep(ramp * i / n)
            while self.left() > 0:
                try:
                    await body(i)
                except asyncio.CancelledError:
                    raise
                except asyncio.TimeoutError:
                    self.outcomes["timeout (no answer in time)"] += 1
                    await asyncio.sleep(0.5)
                except Exception as e:  # noqa: BLE001 (counted: how the server ended it)
                    self.outcomes[f"{type(e).__name__}"] += 1
                    await asyncio.sleep(0.5)

        tasks = [asyncio.ensure_future(slot(i)) for i in range(n)]
        try:
            await asyncio.wait_for(asyncio.gather(*tasks), max(0.1, self.left()))
        except asyncio.TimeoutError:
            pass
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # --- the kinds ---

    async def slowloris(self):
        """800 partial request heads, a header line every 2 s: the handshake timeout (10 s,
        absolute) ends each with 408."""

        async def body(i):
            peer = await self.open()
            try:
                await peer.send(b"GET /slow HTTP/1.1\r\nHost: 127.0.0.1\r\n")
                k = 0
                while self.left() > 0:
                    try:
                        status, head = await asyncio.wait_for(peer.head(), 2)
                        self.outcomes[f"answered {status_key(status, head)}"] += 1
                        return
                    except asyncio.TimeoutError:
                        k += 1
                        await peer.send(f"X-Slow-{k}: {'a' * 10}\r\n".encode())
            finally:
                self.drop(peer)

        await self.slots(800, 10, body)

    async def idle_flood(self):
        """1500 upgraded connections that never send and never answer a ping: pinged at 30 s,
        closed with 1001 at 60 s (--idle-timeout 60), then again."""

        async def body(i):
            peer = await self.upgraded()
            if peer:
                try:
                    await self.ending(peer, "idle")
                finally:
                    self.drop(peer)

        await self.slots(1500, 10, body)

    async def churn(self):
        """Connect and reset, 200 a second: right after connecting, after the request, in the
        middle of a frame after the upgrade; and connect then close without a word."""
        n = 0
        running = set()

        async def one(variant):
            peer = await self.open()
            try:
                if variant == 1:
                    _, req = upgrade_request("/churn")
                    await peer.send(req)
                elif variant == 2:
                    _, req = upgrade_request("/churn")
                    await peer.send(req)
                    status, head = await asyncio.wait_for(peer.head(), 5)
                    if status == 101:
                        await peer.send(frame(0x2, b"x" * 100, key=b"\0\0\0\0")[:50])
                    else:
                        self.outcomes[f"upgrade answered {status_key(status, head)}"] += 1
                self.outcomes[["reset after connect", "reset after request", "reset mid-frame", "FIN after connect"][variant]] += 1
            finally:
                self.drop(peer, reset=variant != 3)

        async def guarded(variant):
            try:
                await one(variant)
            except asyncio.CancelledError:
                raise
            except BaseException as e:
                self.outcomes[f"{type(e).__name__}"] += 1

        start = time.monotonic()
        while self.left() > 0:
            due = start + n / 200
            await asyncio.sleep(max(0, due - time.monotonic()))
            if len(running) < 400:
                t = asyncio.ensure_future(guarded(n % 4))
                running.add(t)
                t.add_done_callback(running.discard)
            n += 1
        for t in list(running):
            t.cancel()
        await asyncio.gather(*running, return_exceptions=True)

    async def emfile(self):
        """fd_limit + 600 connections at once (more than the server's descriptor limit): half
        upgrade and hold (a 503 is retried after its Retry-After), half connect and send
        nothing (408 at the handshake timeout, then again)."""

        async def body(i):
            if i % 2:
                peer = await self.open()
                try:
                    status, head = await asyncio.wait_for(peer.head(), 30)
                    self.outcomes[f"silent: answered {status_key(status, head)}"] += 1
                finally:
                    self.drop(peer)
                await asyncio.sleep(1)
            else:
                peer = await self.upgraded("/emfile")
                if peer:
                    try:
                        await self.ending(peer, "held")
                    finally:
                        self.drop(peer)

        await self.slots(self.fd_limit + 600, 5, body)

    async def slow_readers(self):
        """Echo server: 200 clients (receive buffer 4 KiB) sending a 16 KiB message every 50 ms
        and reading 512 bytes a second. Topic server: 150 subscribers of /flood that never read,
        fed by a publisher of 4 KiB messages (20 a second), and 50 that never read in the
        legitimate clients' /room."""
        msg = frame(0x2, b"s" * 16384, key=b"\0\0\0\0")

        async def reader_slot(i):
            peer = await self.upgraded("/slow", rcvbuf=4096)
            if not peer:
                return

            async def sender():
                while True:
                    await peer.send(msg)
                    await asyncio.sleep(0.05)

            sending = asyncio.ensure_future(sender())
            try:
                while self.left() > 0 and not sending.done():
                    await asyncio.sleep(1)
                    try:
                        if peer.sock.recv(512, socket.MSG_DONTWAIT) == b"":
                            raise EOFError("end of stream")
                    except BlockingIOError:
                        pass
                    ended = ended_how(peer.sock)
                    if ended:
                        self.outcomes[f"slow reader: {ended}"] += 1
                        await asyncio.sleep(1)
                        return
                if sending.done():
                    sending.result()
            except (EOFError, ConnectionResetError, BrokenPipeError) as e:
                self.outcomes[f"slow reader: {type(e).__name__}"] += 1
                await asyncio.sleep(1)
            finally:
                sending.cancel()
                self.drop(peer)

        async def subscriber_slot(i):
            path = "/room" if i < 50 else "/flood"
            peer = await self.upgraded(path, rcvbuf=4096)
            if not peer:
                return
            try:
                await self.held_until_dropped(peer, f"non-reading subscriber of {path}")
            finally:
                self.drop(peer)

        async def publisher():
            payload = b"p" * 4096
            while self.left() > 0:
                peer = None
                try:
                    peer = await self.upgraded("/flood")
                    if not peer:
                        continue
                    drain = asyncio.ensure_future(self._drain(peer))
                    while self.left() > 0 and not drain.done():
                        await peer.send(frame(0x2, payload, key=b"\0\0\0\0"))
                        await asyncio.sleep(0.05)
                    drain.cancel()
                    self.outcomes["publisher reconnected"] += 1
                except (OSError, EOFError, asyncio.TimeoutError):
                    await asyncio.sleep(1)
                finally:
                    if peer:
                        self.drop(peer)

        if self.target != "pubsub":
            await self.slots(200, 10, reader_slot)
        else:
            pub = asyncio.ensure_future(publisher())
            await self.slots(200, 10, subscriber_slot)
            pub.cancel()
            await asyncio.gather(pub, return_exceptions=True)

    async def _drain(self, peer):
        try:
            while True:
                await peer.more()
                peer.buf.clear()
        except (OSError, EOFError):
            return

    async def held_until_dropped(self, peer, what):
        """Hold a connection without reading a byte; every 2 s, ask the kernel whether the
        server has ended it (TCP_INFO's state: a reset closes it, a FIN leaves it in CLOSE_WAIT;
        reading would be the ordinary way to find out, and a non-reader does not read)."""
        while self.left() > 0:
            await asyncio.sleep(min(2, max(0.01, self.left())))
            ended = ended_how(peer.sock)
            if ended:
                self.outcomes[f"{what}: {ended}"] += 1
                await asyncio.sleep(1)
                return

    async def oversized(self):
        """20 attackers, each 10 a second at most, in turn: a frame announcing max + 1 bytes
        (1009); a fragmented message whose fragments together pass max (1009); a 9 KiB request
        head (431); 70 header lines (431); a ping announcing 126 bytes (1002)."""
        big = self.max_message + 1

        async def body(i):
            variant = random.randrange(5)
            if variant in (2, 3):
                peer = await self.open()
                try:
                    if variant == 2:
                        req = b"GET /big HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: " + b"a" * 9000 + b"\r\n\r\n"
                    else:
                        req = b"GET /many HTTP/1.1\r\nHost: 127.0.0.1\r\n" + b"".join(
                            f"X-H{k}: v\r\n".encode() for k in range(70)) + b"\r\n"
                    await peer.send(req)
                    status, head = await asyncio.wait_for(peer.head(), 10)
                    self.outcomes[f"{['', '', 'big head', 'many headers'][variant]}: answered {status_key(status, head)}"] += 1
                finally:
                    self.drop(peer)
            else:
                peer = await self.upgraded("/oversized")
                if not peer:
                    return
                try:
                    if variant == 0:
                        await peer.send(frame(0x2, b"o" * 1000, key=b"\0\0\0\0", length=big)[:1014])
                        what = "frame over max"
                    elif variant == 1:
                        half = self.max_message // 2 + 1000
                        await peer.send(frame(0x2, b"f" * half, fin=False, key=b"\0\0\0\0"))
                        await peer.send(frame(0x0, b"f" * half, fin=True, key=b"\0\0\0\0"))
                        what = "fragments over max"
                    else:
                        await peer.send(frame(0x9, b"p" * 126, key=b"\0\0\0\0"))
                        what = "ping of 126 bytes"
                    await asyncio.wait_for(self.ending(peer, what), 10)
                finally:
                    self.drop(peer)
            await asyncio.sleep(0.1)

        await self.slots(20, 2, body)

    async def bombs(self):
        """20 attackers, in turn: frame headers announcing 2^63-1 and 2^64-1 bytes (then a
        trickle of payload), a continuation announcing 2^62 after a first fragment, a text
        frame of 2^63-1 after a complete message; each must end at its header."""

        async def body(i):
            peer = await self.upgraded("/bomb")
            if not peer:
                return
            variant = random.randrange(4)
            z = b"\0\0\0\0"
            try:
                if variant == 0:
                    await peer.send(struct.pack("!BBQ", 0x82, 0xFF, 2**63 - 1) + z + b"b" * 100)
                    what = "length 2^63-1"
                elif variant == 1:
                    await peer.send(struct.pack("!BBQ", 0x82, 0xFF, 2**64 - 1) + z + b"b" * 100)
                    what = "length 2^64-1"
                elif variant == 2:
                    await peer.send(frame(0x2, b"c" * 1000, fin=False, key=z))
                    await peer.send(struct.pack("!BBQ", 0x80, 0xFF, 2**62) + z + b"c" * 100)
                    what = "continuation of 2^62"
                else:
                    await peer.send(frame(0x1, b"hello", key=z))
                    await peer.send(struct.pack("!BBQ", 0x81, 0xFF, 2**63 - 1) + z)
                    what = "text of 2^63-1 after a message"
                ended = asyncio.ensure_future(self.ending(peer, what))
                # Trickle more payload while waiting for the answer.
                for _ in range(20):
                    if ended.done():
                        break
                    try:
                        await peer.send(b"t" * 10)
                    except OSError:
                        break
                    await asyncio.sleep(0.05)
                await asyncio.wait_for(ended, 10)
            finally:
                self.drop(peer)
            await asyncio.sleep(0.1)

        await self.slots(20, 2, body)

    def park_body(self, path):
        """An attacker parking most of a (max - 4 KiB)-byte frame of a message it never ends;
        it reads, to see the 1013 (or the 1001 of the idle timeout)."""
        size = self.max_message - 4096
        parked = frame(0x2, b"k" * (size - 1000), key=b"\0\0\0\0", length=size)

        async def body(i):
            peer = await self.upgraded(path)
            if not peer:
                return
            try:
                await peer.send(parked)
                await self.ending(peer, "parker")
                await asyncio.sleep(1)
            finally:
                self.drop(peer)

        return body

    def non_reader_body(self, path):
        """An attacker (receive buffer 4 KiB) sending up to 64 messages of 16 KiB, as fast as
        its writes go (they block once the server stops reading it), never reading a byte."""
        msg = frame(0x2, b"n" * 16384, key=b"\0\0\0\0")

        async def body(i):
            peer = await self.upgraded(f"{path}-{i}", rcvbuf=4096)
            if not peer:
                return

            async def sender():
                for _ in range(64):
                    await peer.send(msg)

            sending = asyncio.ensure_future(sender())
            try:
                await self.held_until_dropped(peer, "non-reader")
            finally:
                sending.cancel()
                self.drop(peer)

        return body

    async def parkers(self):
        """1500 connections each parking 55 KB of a message (82 MB in all, the budget 64 MiB);
        a shed one comes back a second later."""
        await self.slots(1500, 5, self.park_body("/park"))

    async def non_readers(self):
        """800 connections not reading their echoes (each holds up to the backpressure limit,
        64 KiB, plus a message: 64 MB, besides what the kernel holds)."""
        await self.slots(800, 5, self.non_reader_body("/nr"))

    async def memory_both(self):
        """800 parkers and 400 non-readers at once."""
        await asyncio.gather(
            self.slots(800, 5, self.park_body("/park")),
            self.slots(400, 5, self.non_reader_body("/nr")),
        )

    async def run(self, kind):
        try:
            await getattr(self, kind)()
        finally:
            if self.peers:
                self.outcomes["(still open at the wave's end)"] += len(self.peers)
            for peer in list(self.peers):
                peer.close(reset=True)
        return {"kind": kind, "target": self.target, "opened": self.opened,
                "outcomes": dict(self.outcomes)}


# ---------------------------------------------------------------------------------------------
# The orchestrator: servers, legitimate clients, waves, samples.

CHILDREN = []  # every process started, killed (as a process group) on exit


def _die_with_parent():
    """In the child, before exec: SIGKILL when the soak's process ends, however it ends (even
    killed with SIGKILL, when its `finally` cannot run); prctl(PR_SET_PDEATHSIG) survives exec."""
    import ctypes
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG = 1


def spawn(cmd, **kw):
    p = subprocess.Popen(cmd, start_new_session=True, preexec_fn=_die_with_parent, **kw)
    CHILDREN.append(p)
    return p


def kill_all():
    for p in CHILDREN:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except OSError:
                pass
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                pass


class Server:
    def __init__(self, name, binary, args, logdir):
        self.name = name
        self.logpath = os.path.join(logdir, f"{name}.log")
        self.logf = open(self.logpath, "w")
        self.proc = spawn([binary, "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"] + args,
                          stdin=subprocess.DEVNULL, stdout=self.logf, stderr=self.logf,
                          env=dict(os.environ, RUST_LOG="info"))
        self.pid = self.proc.pid
        deadline = time.monotonic() + 15
        text = ""
        while time.monotonic() < deadline:
            text = open(self.logpath).read()
            ws = re.search(r"listening on wss?://([\d.]+):(\d+)", text)
            mt = re.search(r"metrics on http://([\d.]+):(\d+)/metrics", text)
            if ws and mt and "fd budget" in text:
                self.port = int(ws.group(2))
                self.metrics_port = int(mt.group(2))
                self.start_line = next(line for line in text.splitlines() if "fd budget" in line)
                break
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        else:
            raise RuntimeError(f"{name} did not start:\n{text}")
        if self.proc.poll() is not None:
            raise RuntimeError(f"{name} exited at start:\n{text}")
        self.baseline_fds = None

    def fds(self):
        listing = f"/proc/{self.pid}/fd"
        names = os.listdir(listing)
        if self.baseline_fds is not None and len(names) != self.baseline_fds + 1:
            return len(names)
        # The fd audit's own listing of /proc/self/fd, held for a moment every 10 s, is not
        # the server's: leave it out (as tests/attack_support does).
        n = 0
        for e in names:
            try:
                if os.readlink(f"{listing}/{e}") == listing:
                    continue
            except OSError:
                pass
            n += 1
        return n

    def status(self):
        out = {}
        for line in open(f"/proc/{self.pid}/status"):
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM"):
                out[k] = int(v.split()[0]) * 1024
        return out

    def cpu(self):
        f = open(f"/proc/{self.pid}/stat").read().rsplit(")", 1)[1].split()
        return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")

    def metrics(self):
        s = socket.create_connection(("127.0.0.1", self.metrics_port), timeout=5)
        try:
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            data = b""
            while True:
                c = s.recv(65536)
                if not c:
                    break
                data += c
        finally:
            s.close()
        m = {}
        for line in data.decode(errors="replace").split("\r\n\r\n", 1)[-1].splitlines():
            if not line or line.startswith("#"):
                continue
            k, _, v = line.rpartition(" ")
            try:
                m[k] = float(v)
            except ValueError:
                pass
        return m

    def stop(self, timeout=15):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.pid, signal.SIGKILL)
                self.proc.wait()
        self.logf.close()
        return self.proc.returncode


MEM_KINDS = ["partial_messages", "send_queues", "publications"]
# Sampled too, but not in `mem` (state that stays while connections do: the loop's compression
# state, and 10 KiB per TLS connection).
STATE_KINDS = ["compression", "tls"]
# The counters sampled besides (CSV column suffix, metric), as src/reason.rs, src/metrics.rs and
# src/admission.rs label them.
CLOSE_REASONS = [
    "rejected", "http_answered", "handshake_timeout", "peer_closed", "closed_by_server",
    "protocol_error", "idle_timeout", "close_timeout", "abnormal", "io_error", "terminated",
    "shutdown", "refused", "backpressure", "write_stall", "max_lifetime", "handler_panic", "memory",
    "tls_error",
]
REJECT_STATUSES = [400, 403, 404, 405, 408, 414, 426, 429, 431, 500, 503]
COUNTERS = (
    [(f"closed_{r}", f'wsloop_connections_closed_total{{reason="{r}"}}') for r in CLOSE_REASONS]
    + [(f"status_{s}", f'wsloop_handshakes_rejected_total{{status="{s}"}}') for s in REJECT_STATUSES]
    + [(f"refused_{l}", f'wsloop_admission_rejections_total{{limit="{l}"}}')
       for l in ("max_connections", "max_connections_per_ip", "rate_per_ip", "memory_budget")]
    + [("tls_capped", "wsloop_tls_handshakes_capped_total")]
    + [(f"accept_{e}", f'wsloop_accept_errors_total{{errno="{e}"}}') for e in ("EMFILE", "ENFILE", "ENOBUFS", "ENOMEM", "ECONNABORTED")]
)
CONN_STATES = ["handshake", "open", "closing", "refusing"]


def sample_server(srv):
    row = {}
    p = srv.name
    row[f"{p}_fds"] = srv.fds()
    st = srv.status()
    row[f"{p}_rss"] = st.get("VmRSS", 0)
    row[f"{p}_hwm"] = st.get("VmHWM", 0)
    row[f"{p}_cpu"] = round(srv.cpu(), 2)
    try:
        m = srv.metrics()
        row[f"{p}_scrape_ok"] = 1
    except OSError:
        # Unanswered: recorded (the verdict requires every scrape answered), not fatal.
        m = {}
        row[f"{p}_scrape_ok"] = 0
    total = 0
    for k in MEM_KINDS:
        v = int(m.get(f'wsloop_memory_bytes{{kind="{k}"}}', 0))
        row[f"{p}_mem_{k}"] = v
        total += v
    row[f"{p}_mem"] = total
    for k in STATE_KINDS:
        row[f"{p}_mem_{k}"] = int(m.get(f'wsloop_memory_bytes{{kind="{k}"}}', 0))
    row[f"{p}_tls_handshaking"] = int(m.get("wsloop_tls_handshakes_in_progress", 0))
    row[f"{p}_largest"] = int(m.get("wsloop_memory_largest_holder_bytes", 0))
    row[f"{p}_shedding"] = int(m.get("wsloop_memory_shedding", 0))
    row[f"{p}_shed_episodes"] = int(m.get("wsloop_memory_shed_episodes_total", 0))
    row[f"{p}_conns"] = int(sum(m.get(f'wsloop_connections{{state="{s}"}}', 0) for s in CONN_STATES))
    row[f"{p}_accepted"] = int(m.get("wsloop_connections_accepted_total", 0))
    # Every counter of how connections ended, of refused upgrades and admissions and of failed
    # accepts: a wave's effect on each server is their difference across it (COUNTERS, below).
    for col, key in COUNTERS:
        row[f"{p}_{col}"] = int(m.get(key, 0))
    row[f"{p}_audit_diff"] = int(m.get("wsloop_fd_audit_difference", 0))
    row[f"{p}_stalls"] = int(m.get("wsloop_loop_stalls_total", 0))
    row[f"{p}_longest_stall_ms"] = round(m.get("wsloop_loop_longest_stall_seconds", 0) * 1000, 1)
    return row


def schedule(total, warmup, attack, quiet, kinds):
    """The waves: (index, kind, start, end) in seconds from the start."""
    waves = []
    t = warmup
    i = 0
    while t + attack + quiet <= total:
        waves.append({"i": i, "kind": kinds[i % len(kinds)], "start": t, "end": t + attack})
        t += attack + quiet
        i += 1
    return waves


def top_processes():
    """What else runs: the processes using the most CPU now (`ps`), the soak's own left out."""
    try:
        out = subprocess.run(["ps", "-eo", "pcpu,etimes,comm", "--sort=-pcpu"], capture_output=True,
                             text=True, timeout=10).stdout.splitlines()[1:9]
        return [" ".join(l.split()) for l in out]
    except (OSError, subprocess.SubprocessError):
        return []


def orchestrate(args):
    try:
        import matplotlib  # noqa: F401  (checked now, not after an hour)
    except ImportError:
        sys.exit("soak.py draws its plot with matplotlib: pip install matplotlib "
                 "(or apt-get install python3-matplotlib)")
    hard = raise_nofile()
    if hard < 16384:
        sys.exit(f"the attackers need a hard RLIMIT_NOFILE of at least 16384 (it is {hard})")
    binary = args.bin or os.path.join(REPO, "target", "release", "wsloop")
    if not args.bin and not args.no_build:
        log("cargo build --release")
        subprocess.run(["cargo", "build", "--release", "--bin", "wsloop"], cwd=REPO, check=True)
    os.makedirs(args.out, exist_ok=True)
    logdir = os.path.join(REPO, "target", "soak-logs")
    os.makedirs(logdir, exist_ok=True)

    total = int(args.minutes * 60)
    if args.minutes >= 20:
        warmup, attack, quiet = 90, 80, 50
    else:
        warmup, attack, quiet = 20, 20, 20
    warmup = args.warmup if args.warmup is not None else warmup
    attack = args.attack_seconds or attack
    quiet = args.quiet_seconds or quiet
    kinds = args.kinds.split(",") if args.kinds else (KINDS if args.minutes >= 20 else SHORT_KINDS)
    if any(x % SAMPLE_SECONDS for x in (warmup, attack, quiet)) or min(warmup, attack, quiet) <= 0:
        sys.exit(f"--warmup, --attack-seconds and --quiet-seconds: positive multiples of {SAMPLE_SECONDS}")
    for k in kinds:
        if k not in KINDS:
            sys.exit(f"unknown attack {k!r}: one of {', '.join(KINDS)}")
    waves = schedule(total, warmup, attack, quiet, kinds)
    server_args = ["--fd-limit", str(args.fd_limit), "--memory-budget", str(args.memory_budget)] + SERVER_ARGS

    def on_signal(sig, _frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    meta = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "minutes": args.minutes,
        "command": " ".join(["python3", "benches/soak.py"] + sys.argv[1:]),
        "warmup": warmup, "attack": attack, "quiet": quiet, "sample": SAMPLE_SECONDS,
        "fd_limit": args.fd_limit, "memory_budget": args.memory_budget,
        "server_args": server_args,
        "echo_args": ECHO_ARGS,
        "wss_args": WSS_ARGS,
        "servers": SERVERS,
        "git": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                              text=True).stdout.strip(),
        "cpus": os.cpu_count(),
        "kernel": os.uname().release,
        "top_start": top_processes(),
        "legit": {"echo_clients": ECHO_CLIENTS, "echo_interval": ECHO_INTERVAL,
                  "room_members": ROOM_MEMBERS, "room_interval": ROOM_INTERVAL,
                  "fresh_interval": FRESH_INTERVAL, "answer_timeout": ANSWER_TIMEOUT,
                  "wss_clients": WSS_CLIENTS, "wss_interval": WSS_INTERVAL, "wss_size": WSS_SIZE},
    }
    rows = []
    errors = []
    refusals = []
    servers = {}
    legit = None
    attackers = []
    try:
        servers["echo"] = Server("echo", binary, server_args + ECHO_ARGS, logdir)
        servers["pubsub"] = Server("pubsub", binary, server_args + ["--pubsub"], logdir)
        certs = os.path.join(logdir, "certs")
        os.makedirs(certs, exist_ok=True)
        ca, cert, key = make_certificate(certs)
        servers["wss"] = Server("wss", binary, server_args + WSS_ARGS + ["--tls-cert", cert, "--tls-key", key],
                                logdir)
        meta["server_start"] = {n: s.start_line.split("] ", 1)[-1] for n, s in servers.items()}
        log(", ".join(f"{n} on {srv.port}" for n, srv in servers.items())
            + f"; {len(waves)} waves over {args.minutes} min; data into {args.out}")
        legit_log = open(os.path.join(logdir, "legit.log"), "w")
        legit = spawn([sys.executable, os.path.abspath(__file__), "legit",
                       "--echo-port", str(servers["echo"].port), "--pubsub-port", str(servers["pubsub"].port),
                       "--wss-port", str(servers["wss"].port), "--tls-ca", ca],
                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=legit_log, text=True, bufsize=1)

        def legit_sample(cmd="sample"):
            legit.stdin.write(cmd + "\n")
            legit.stdin.flush()
            line = legit.stdout.readline()
            if not line:
                raise RuntimeError("the legitimate clients' process ended")
            return json.loads(line)

        t0 = time.monotonic()
        meta["t0"] = t0
        next_sample = t0 + SAMPLE_SECONDS
        pending = list(waves)
        finishing = []
        current = None
        wave_summaries = []
        while True:
            now = time.monotonic()
            if now >= next_sample - 0.001:
                # The interval (next_sample - 10 s, next_sample] is labelled with what ran in it.
                el = round(next_sample - t0)
                st = legit_sample("sample")
                row = {"t": el}
                if current:
                    row["phase"], row["wave"], row["kind"] = "attack", current["i"], current["kind"]
                else:
                    last = next((w for w in reversed(waves) if w["end"] <= el - SAMPLE_SECONDS + 0.5), None)
                    row["phase"] = "warmup" if last is None else "quiet"
                    row["wave"], row["kind"] = ("", "") if last is None else (last["i"], last["kind"])
                for srv in servers.values():
                    if srv.proc.poll() is not None:
                        raise RuntimeError(f"{srv.name} exited with {srv.proc.returncode}")
                    row.update(sample_server(srv))
                legit.stdin.write("resume\n")
                legit.stdin.flush()
                for k in ("echo", "wss", "room", "fresh"):
                    for q in ("n", "p50", "p99", "max"):
                        v = st[k][q]
                        row[f"{k}_{q}"] = "" if v is None else (v if q == "n" else round(v, 2))
                row["refused"] = len(st["refused"])
                row["errors"] = len(st["errors"])
                row["load1"] = os.getloadavg()[0]
                for e in st["errors"]:
                    e["t"] = round(e["t"] - t0, 1)
                    errors.append(e)
                for r in st["refused"]:
                    r["t"] = round(r["t"] - t0, 1)
                    refusals.append(r)
                rows.append(row)
                if row["phase"] == "warmup":
                    for srv in servers.values():
                        srv.baseline_fds = row[f"{srv.name}_fds"]
                log(f"t={el:5d}s {row['phase']:6s} {row['kind']:12s} "
                    + " ".join(f"{n}: fds {row[n + '_fds']} rss {row[n + '_rss'] >> 20}M mem {row[n + '_mem'] >> 10}K "
                               f"conns {row[n + '_conns']} shed {row[n + '_shedding']}" for n in servers)
                    + f" | echo p99 {row['echo_p99']} wss p99 {row['wss_p99']} room p99 {row['room_p99']}"
                      f" refused {row['refused']}"
                      f" errors {row['errors']}")
                next_sample += SAMPLE_SECONDS
                if el >= total:
                    break
                continue
            el = now - t0
            for p, target, wave, killed_at in list(finishing):
                if p.poll() is None and time.monotonic() < killed_at:
                    continue
                finishing.remove((p, target, wave, killed_at))
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()
                    summary = {"target": target, "outcomes": {"(attacker process killed: overran)": 1}}
                else:
                    out = p.stdout.read().strip()
                    try:
                        summary = json.loads(out.splitlines()[-1])
                    except (ValueError, IndexError):
                        summary = {"target": target, "outcomes": {f"(attacker process failed: {p.returncode})": 1}}
                summary["wave"] = wave
                wave_summaries.append(summary)
            if current and el >= current["end"]:
                # The attackers end by themselves at the wave's end (their --seconds); one still
                # there 15 s later is killed.
                finishing += [(p, target, current["i"], time.monotonic() + 15) for p, target in attackers]
                attackers = []
                current = None
                continue
            if not current and pending and el >= pending[0]["start"]:
                current = pending.pop(0)
                log(f"wave {current['i']}: {current['kind']}")
                for name, srv in servers.items():
                    cmd = [sys.executable, os.path.abspath(__file__), "attack", current["kind"],
                           "--port", str(srv.port), "--target", name,
                           "--seconds", str(current["end"] - el),
                           "--fd-limit", str(args.fd_limit), "--max-message", "65536"]
                    if name == "wss":
                        cmd += ["--tls-ca", ca]
                    attackers.append((spawn(["nice", "-n", "5"] + cmd, stdout=subprocess.PIPE,
                                            stderr=legit_log, stdin=subprocess.DEVNULL, text=True), name))
                continue
            wake = next_sample
            if finishing:
                wake = min(wake, time.monotonic() + 0.2)
            if current:
                wake = min(wake, t0 + current["end"])
            elif pending:
                wake = min(wake, t0 + pending[0]["start"])
            time.sleep(max(0.0, min(1.0, wake - time.monotonic())))
        meta["top_end"] = top_processes()
        final = legit_sample("stop")
        for e in final["errors"]:
            e["t"] = round(e["t"] - t0, 1)
            errors.append(e)
        legit.wait(10)
        meta["exit"] = {}
        meta["log"] = {}
        for name, srv in servers.items():
            meta["cpu_seconds_" + name] = round(srv.cpu(), 1)
            meta["exit"][name] = srv.stop()
            meta["log"][name] = summarize_log(srv.logpath)
        meta["waves"] = waves
        meta["wave_summaries"] = wave_summaries
        meta["errors"] = errors
        meta["refusals"] = refusals
        meta["duration"] = round(time.monotonic() - t0)
    except KeyboardInterrupt:
        log("interrupted: killing everything")
        raise
    finally:
        kill_all()
    write_outputs(args, rows, meta)


def summarize_log(path):
    """Warnings and errors the server logged, grouped by their text without the numbers; any
    panic."""
    counts = collections.Counter()
    panics = []
    for line in open(path, errors="replace"):
        if "panicked" in line:
            panics.append(line.strip()[:300])
        m = re.match(r"\[\S+ (WARN|ERROR)\s+\S+\] (.*)", line)
        if m:
            counts[f"{m.group(1)} " + re.sub(r"\d+(\.\d+)?", "N", m.group(2))[:160]] += 1
    return {"counts": dict(counts.most_common(20)), "panics": panics[:10]}


# ---------------------------------------------------------------------------------------------
# Outputs: CSV, plot, verdict, report.


def write_outputs(args, rows, meta):
    csv_path = os.path.join(args.out, "soak.csv")
    fields = list(rows[0].keys())
    for r in rows:
        for k in r:
            if k not in fields:
                fields.append(k)
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    with open(os.path.join(args.out, "soak.json"), "w") as f:
        json.dump(meta, f, indent=1)
    report(args)


def load(args):
    with open(os.path.join(args.out, "soak.csv")) as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for k, v in r.items():
            if k in ("phase", "kind"):
                continue
            try:
                r[k] = float(v) if v != "" else None
            except ValueError:
                pass
    with open(os.path.join(args.out, "soak.json")) as f:
        meta = json.load(f)
    return rows, meta


def quiet_points(rows, meta):
    """The samples that end each quiet window (taken just before the next wave starts, or at
    the end of the run), with the wave they follow; and the baseline (the last warm-up sample)."""
    base = [r for r in rows if r["phase"] == "warmup"][-1]
    points = []
    for w in meta["waves"]:
        nxt = next((x for x in meta["waves"] if x["i"] == w["i"] + 1), None)
        at = nxt["start"] if nxt else rows[-1]["t"]
        r = next((r for r in rows if r["t"] == at), None)
        if r is not None and r["phase"] == "quiet":
            points.append((w, r))
    return base, points


def linfit(xs, ys):
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
    return slope, my - slope * mx


def verdict(rows, meta):
    """Each criterion: (name, passed or None when it cannot be judged, what was measured)."""
    names = names_of(meta)
    base, points = quiet_points(rows, meta)
    out = []
    # 1. Descriptors back at the baseline after every wave.
    bad = [f"{n} {int(r[n + '_fds'])} (baseline {int(base[n + '_fds'])}) after wave {w['i']} {w['kind']}"
           for w, r in points for n in names if r[n + "_fds"] != base[n + "_fds"]]
    out.append(("descriptors back at the baseline after every wave", not bad and bool(points),
                "baseline " + ", ".join(f"{n} {int(base[n + '_fds'])}" for n in names) + "; "
                f"{len(points)} quiet points" + (": " + "; ".join(bad[:8]) if bad else ", all equal")))
    # 2. What connections hold (partial messages, send queues) back at zero after every wave.
    conn_kinds = ("partial_messages", "send_queues")
    held = lambda r, n: sum(r[f"{n}_mem_{k}"] for k in conn_kinds)
    bad = [f"{n} {int(held(r, n))} B after wave {w['i']} {w['kind']}"
           for w, r in points for n in names if held(r, n) != 0]
    peak = {n: max(r[n + "_mem"] for r in rows) for n in names}
    out.append(("accounted bytes of connections (partial messages, send queues) back at 0 after every wave",
                not bad and bool(points),
                "peak during waves: " + ", ".join(f"{n} {peak[n] / 2**20:.1f} MiB" for n in names)
                + f" (budget {meta['memory_budget'] / 2**20:.0f} MiB each); "
                + ("; ".join(bad[:8]) if bad else f"0 at all {len(points)} quiet points")))
    # 2b. The topic fan-out's arena, which a loop keeps between turns (see FANOUT_BOUND).
    pubs = [(r["t"], r["pubsub_mem_publications"]) for _, r in points]
    over = [f"{int(b)} B at t={int(t)} s" for t, b in pubs if b > FANOUT_BOUND]
    out.append((f"accounted publications (the fan-out arena kept between turns) within "
                f"{FANOUT_BOUND >> 20} MiB at every quiet point", not over and bool(points),
                f"baseline {int(base['pubsub_mem_publications'])} B; at the quiet points "
                f"{int(min(b for _, b in pubs)) if pubs else 0}-{int(max(b for _, b in pubs)) if pubs else 0} B; "
                f"echo server: {int(max(r['echo_mem_publications'] for r in rows))} B at most"
                + ("; over: " + "; ".join(over[:5]) if over else "")))
    # 2c. The TLS state (10 KiB per TLS connection) back at its baseline (the long-lived wss
    # clients') after every wave.
    if "wss" in names:
        bad = [f"{int(r['wss_mem_tls'])} B after wave {w['i']} {w['kind']}"
               for w, r in points if r["wss_mem_tls"] != base["wss_mem_tls"]]
        peak_tls = max(r["wss_mem_tls"] for r in rows)
        out.append(("accounted TLS state of the wss server back at its baseline after every wave",
                    not bad and bool(points),
                    f"baseline {int(base['wss_mem_tls'])} B, peak during waves {peak_tls / 2**20:.1f} MiB; "
                    + ("; ".join(bad[:8]) if bad else f"equal at all {len(points)} quiet points")))
    # 3. No RSS growth. Each kind leaves its own footprint (the first hour-long run's slope over
    # all quiet points was the order of the kinds, see SOAK.md), so a kind is compared with
    # itself: the quiet-point RSS after its wave in its last rotation against its second (the
    # first rotation fills the allocator), per rotation between them.
    per_rotation = len(set(w["kind"] for w in meta["waves"]))
    by_kind = {}
    for w, r in points:
        by_kind.setdefault(w["kind"], []).append((w["i"] // per_rotation, r))
    details = []
    judged = {k: v for k, v in by_kind.items() if len(v) >= 3}
    ok = None
    if judged and len(judged) == per_rotation:
        ok = True
        for n in names:
            growth = []
            for k, v in judged.items():
                (r2, second), (rl, last) = v[1], v[-1]
                per = (last[n + "_rss"] - second[n + "_rss"]) / 2**20 / (rl - r2)
                ok = ok and per <= RSS_KIND_BOUND_MIB
                growth.append(f"{k} {per:+.2f}")
            details.append(f"{n}: {', '.join(growth)} MiB per rotation")
    else:
        details.append(f"not judged: {len(judged)} of {per_rotation} kinds ran in three rotations "
                       f"(a run of three rotations is needed)")
    # Besides (not judged): the slope over all quiet points after the first rotation, and the
    # peak RSS (VmHWM) at the end of the first rotation and at the end.
    later = [(w, r) for w, r in points if w["i"] >= per_rotation - 1]
    by_i = {w["i"]: (w, r) for w, r in points}
    for n in names:
        if len(later) >= 2:
            xs = [r["t"] / 3600 for _, r in later]
            ys = [r[n + "_rss"] / 2**20 for _, r in later]
            slope, _ = linfit(xs, ys)
            details.append(f"{n} (not judged): slope {slope:+.2f} MiB/h over the {len(later)} quiet "
                           f"points after the first rotation ({min(ys):.1f}-{max(ys):.1f} MiB)")
        if per_rotation - 1 in by_i:
            details.append(f"{n}: peak RSS (VmHWM) {by_i[per_rotation - 1][1][n + '_hwm'] / 2**20:.1f} MiB "
                           f"at the end of the first rotation, {rows[-1][n + '_hwm'] / 2**20:.1f} MiB at the end")
    out.append((f"no RSS growth (each kind's quiet-point RSS, from its second rotation to its last, "
                f"grows by at most {RSS_KIND_BOUND_MIB:g} MiB per rotation)", ok, "; ".join(details)))
    # 4. Legitimate latency.
    worst = {}
    for k in latency_keys(meta):
        vals = [(r[k + "_p99"], r["t"], r["kind"]) for r in rows if r[k + "_p99"] is not None]
        worst[k] = max(vals) if vals else (None, None, None)
    ok = all(w[0] is not None and w[0] <= P99_BOUND_MS for w in worst.values())
    out.append((f"legitimate p99 <= {P99_BOUND_MS:g} ms in every 10 s interval", ok,
                "; ".join(f"{k} worst p99 {w[0]:.1f} ms (t={int(w[1])} s, {w[2] or 'warmup'})"
                          for k, w in worst.items() if w[0] is not None)))
    # 5. Zero errors for legitimate clients.
    errs = meta["errors"]
    late = unexplained_refusals(meta)
    out.append(("zero errors for legitimate clients", not errs and not late,
                f"{len(errs)} errors, {len(meta['refusals'])} refusals (503, or over TLS a close in the handshake) "
                "of fresh clients during or right "
                f"after waves, {len(late)} outside them"
                + ("; first: " + "; ".join(f"t={e['t']} {e['who']}: {e['detail']}" for e in errs[:5]) if errs else "")))
    # 6. Every wave attacked: its server counters rose as EXPECT says.
    effects = wave_effects(rows, meta)
    weak = []
    judged_waves = 0
    for w in meta["waves"]:
        for n in names:
            if (w["i"], n) not in effects:
                continue
            judged_waves += 1
            d = effects[(w["i"], n)]
            for cols, least in expected(w["kind"], n):
                got = sum(d.get(c, 0) for c in cols)
                if got < least:
                    weak.append(f"wave {w['i']} {w['kind']} on {n}: {'+'.join(cols)} rose by {got} (< {least})")
    out.append(("every wave attacked: on each server, the counters of its defence rose (closes by reason, "
                "refusals; the minimums are in `EXPECT` in benches/soak.py and in the Waves table)",
                (not weak) if judged_waves else None,
                (f"{judged_waves} wave-server pairs, " + ("all as expected" if not weak else
                 f"{len(weak)} short: " + "; ".join(weak[:8])))))
    # 7. The servers: no panic, a clean exit, no unaccounted descriptor.
    audit = {n: max(r[n + "_audit_diff"] for r in rows) for n in names}
    panics = sum(len(meta["log"][n]["panics"]) for n in names)
    exits = meta["exit"]
    unanswered = {n: sum(1 for r in rows if r.get(n + "_scrape_ok") == 0) for n in names}
    ok = (panics == 0 and all(v == 0 for v in exits.values()) and all(v == 0 for v in audit.values())
          and not any(unanswered.values()))
    out.append(("the servers: no panic, exit 0 after SIGTERM, fd audit difference always 0, every "
                "scrape of /metrics answered", ok,
                f"panics {panics}; exit codes {exits}; largest audit difference {audit}; "
                f"unanswered scrapes {unanswered}"))
    return out


def wave_effects(rows, meta):
    """{(wave, server): {counter: rise}}: each counter's rise from the last sample at or before
    the wave's start to the quiet point after it (the last sample before the next wave, or the
    last of the run); only counters that rose."""
    out = {}
    for w in meta["waves"]:
        before = [r for r in rows if r["t"] <= w["start"]]
        nxt = next((x for x in meta["waves"] if x["i"] == w["i"] + 1), None)
        after = [r for r in rows if r["t"] <= (nxt["start"] if nxt else rows[-1]["t"])]
        if not before or not after or after[-1]["t"] <= w["end"]:
            continue
        for n in names_of(meta):
            d = {}
            for col, _ in COUNTERS:
                k = f"{n}_{col}"
                if k in after[-1] and after[-1][k] is not None and before[-1].get(k) is not None:
                    rise = int(after[-1][k] - before[-1][k])
                    if rise:
                        d[col] = rise
            out[(w["i"], n)] = d
    return out


def unexplained_refusals(meta):
    """503s to fresh clients outside every wave (and REFUSAL_GRACE after it): errors."""
    late = []
    for r in meta["refusals"]:
        if not any(w["start"] <= r["t"] <= w["end"] + REFUSAL_GRACE for w in meta["waves"]):
            late.append(r)
    return late


def plot(rows, meta, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [r["t"] / 60 for r in rows]
    fig, axes = plt.subplots(5, 1, figsize=(11, 13), sharex=True)
    colors = {"echo": "tab:blue", "pubsub": "tab:orange", "wss": "tab:purple"}
    panels = [
        ("descriptors (/proc/PID/fd)", lambda r, n: r[n + "_fds"], 1),
        ("RSS (MiB)", lambda r, n: r[n + "_rss"] / 2**20, 1),
        ("accounted bytes (MiB)", lambda r, n: r[n + "_mem"] / 2**20, 1),
        ("connections", lambda r, n: r[n + "_conns"], 1),
    ]
    for ax, (label, get, _) in zip(axes, panels):
        for n in names_of(meta):
            ax.plot(t, [get(r, n) for r in rows], color=colors[n], label=f"{n} server", lw=1.2)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    if "wss" in names_of(meta) and "wss_mem_tls" in rows[0]:
        axes[2].plot(t, [r["wss_mem_tls"] / 2**20 for r in rows], color=colors["wss"], ls="--", lw=1,
                     label="wss server's TLS state")
    axes[2].axhline(meta["memory_budget"] / 2**20, color="red", ls="--", lw=0.8, label="budget (each)")
    axes[2].axhline(meta["memory_budget"] * 15 / 16 / 2**20, color="red", ls=":", lw=0.8, label="shedding from 15/16")
    axes[0].axhline(meta["fd_limit"], color="red", ls="--", lw=0.8, label="--fd-limit")
    ax = axes[4]
    lat = [("echo", "tab:blue"), ("room", "tab:green"), ("wss", "tab:purple"), ("fresh", "tab:gray")]
    for k, c in [x for x in lat if x[0] in latency_keys(meta) + ["fresh"]]:
        p99 = [(r["t"] / 60, r[k + "_p99"]) for r in rows if r[k + "_p99"] is not None]
        p50 = [(r["t"] / 60, r[k + "_p50"]) for r in rows if r[k + "_p50"] is not None]
        if k != "fresh":
            ax.plot([x for x, _ in p50], [y for _, y in p50], color=c, lw=0.8, ls=":", label=f"{k} p50")
        ax.plot([x for x, _ in p99], [y for _, y in p99], color=c, lw=1.2,
                label=f"{k} p99" + (" (connect+upgrade+echo+close)" if k == "fresh" else ""))
    ax.axhline(P99_BOUND_MS, color="red", ls="--", lw=0.8, label="p99 bound")
    ax.set_yscale("log")
    ax.set_ylabel("legitimate latency (ms)")
    ax.set_xlabel("minutes")
    ax.grid(alpha=0.3, which="both")
    for ax in axes:
        for w in meta["waves"]:
            ax.axvspan(w["start"] / 60, w["end"] / 60, color="tab:red", alpha=0.08, lw=0)
        ax.legend(fontsize=7, loc="upper left", ncol=4)
    for w in meta["waves"]:
        axes[0].text((w["start"] + w["end"]) / 120, 1.02, w["kind"].replace("_", " "), rotation=60,
                     fontsize=7, ha="left", va="bottom", transform=axes[0].get_xaxis_transform())
    fig.suptitle(f"wsloop soak: {meta['minutes']:g} min, attacks shaded (each against every server)", y=0.995)
    fig.tight_layout()
    fig.savefig(path, dpi=72)
    plt.close(fig)


def report(args):
    rows, meta = load(args)
    png = os.path.join(args.out, "soak.png")
    plot(rows, meta, png)
    report_path = args.report or os.path.join(args.out, "SOAK.md")
    rel = lambda p: os.path.relpath(p, os.path.dirname(os.path.abspath(report_path)))
    v = verdict(rows, meta)
    judged = [ok for _, ok, _ in v if ok is not None]
    overall = "PASS" if all(judged) else "FAIL"
    L = []
    L.append("# Soak: wsloop under rotating attacks\n")
    L.append(f"**Verdict: {overall}** ({sum(1 for x in judged if x)} of {len(judged)} criteria met"
             + (f", {len(v) - len(judged)} not judged" if len(v) != len(judged) else "") + "). "
             f"Run of {meta['minutes']:g} minutes ({meta['duration']} s) at commit `{meta['git']}`, "
             f"started {meta['started']}.\n")
    L.append("Reproduce (from the repository root; it builds target/release/wsloop first, needs Python 3.9+, "
             "matplotlib and a hard RLIMIT_NOFILE of at least 16,384; the machine should be otherwise idle, "
             "since the latencies are measured on it):\n")
    L.append("```sh\npip install matplotlib   # or apt-get install python3-matplotlib\n"
             f"{meta['command']}\n"
             "# a short run: waves of 20 s (idle_flood and slow_readers on the echo server need 70 s or more)\n"
             "python3 benches/soak.py --minutes 5 --kinds slowloris,emfile,bombs,memory_both --out target/soak-short\n"
             "# chosen kinds, longer waves\n"
             "python3 benches/soak.py --minutes 7 --kinds idle_flood,slow_readers,churn,oversized "
             "--warmup 20 --attack-seconds 80 --quiet-seconds 20 --out target/soak-b\n"
             "# redo the plot and this report from the recorded data\n"
             "python3 benches/soak.py --report-only --out docs/soak --report SOAK.md --notes docs/soak/notes.md\n```\n")
    L.append("It is not part of `cargo test` or `.ci/run`. Every process it starts (the servers, the "
             "legitimate clients, the attackers) is killed when it ends or is interrupted (SIGINT, SIGTERM, "
             "and through `PR_SET_PDEATHSIG` even SIGKILL). The servers' logs go to target/soak-logs/.\n")
    L.append("| criterion | result | measured |\n|---|---|---|")
    for name, ok, detail in v:
        L.append(f"| {name} | {'pass' if ok else ('not judged' if ok is None else '**FAIL**')} | {detail} |")
    L.append("")
    L.append(f"![fds, RSS, accounted bytes, connections and legitimate latency over time]({rel(png)})\n")
    L.append(f"Data: [{rel(os.path.join(args.out, 'soak.csv'))}]({rel(os.path.join(args.out, 'soak.csv'))}) "
             f"(one row per 10 s sample), [{rel(os.path.join(args.out, 'soak.json'))}]({rel(os.path.join(args.out, 'soak.json'))}) "
             "(the schedule, each attacker's outcomes, every legitimate error and refusal, the servers' "
             "logged warnings).\n")
    L.append("## Setup\n")
    wss = "wss" in names_of(meta)
    L.append(f"{'Three' if wss else 'Two'} servers, each a child of the script on 127.0.0.1 (`target/release/wsloop --listen "
             f"127.0.0.1:0 --metrics-listen 127.0.0.1:0 {' '.join(meta['server_args'])}`): an echo "
             f"server (with `{' '.join(meta.get('echo_args', []))}`: an echo over the backpressure limit is "
             "dropped rather than the reader closed, so that non-readers hold their queues until the memory "
             "budget or the write-stall timeout ends them, as in tests/memory.rs)"
             + (", a topic server (with `--pubsub` and the default policy, close with 1008), and an echo "
                f"server over TLS with permessage-deflate (`{' '.join(meta.get('wss_args', []))} --tls-cert "
                "cert.pem --tls-key key.pem`, a P-256 certificate for localhost signed by a CA the script "
                "makes with the openssl CLI)" if wss else
                " and a topic server (with `--pubsub` and the default policy, close with 1008)")
             + ". They logged:\n")
    for n, line in meta["server_start"].items():
        L.append(f"- {n}: `{line}`")
    lg = meta["legit"]
    wss_line = wss_attack = ""
    if wss:
        wss_line = (f"- wss: {lg['wss_clients']} long-lived clients over TLS, each offering permessage-deflate "
                    f"without context takeover and sending a {lg['wss_size']}-byte JSON text message, compressed, "
                    f"every {lg['wss_interval'] * 1000:g} ms; the echo must come back compressed and inflate to "
                    "the message; the latency is the round trip;\n")
        wss_attack = (" (against the wss server every attacker connection first completes a TLS handshake, "
                      "then does over TLS what it does over plain TCP elsewhere)")
    L.append(f"""
Legitimate load, throughout, from a process of its own (normal priority):

- echo: {lg['echo_clients']} long-lived clients, each sending a 64-byte text message every
  {lg['echo_interval'] * 1000:g} ms and waiting for its echo ({lg['echo_clients'] / lg['echo_interval']:g}
  messages/s); the latency is the round trip;
- topics: a room (`/room`) of {lg['room_members']} members on the topic server, each publishing
  every {lg['room_interval'] * 1000:g} ms; every member checks that it gets every member's
  publications (its own included) in order; the latency is from publishing to receiving;
{wss_line}- fresh clients: one a second, on each server in turn: connect (over TLS on the wss server),
  upgrade, echo one message, close handshake (its p99 is drawn in grey; it is not under the
  bound, since it includes connection setup under an accept backlog).

Attacks: a wave of {meta['attack']} s, then {meta['quiet']} s of quiet, after {meta['warmup']} s of
warm-up; each wave runs one kind against every server at once, from one process per server{wss_attack}
(`nice -n 5`, so that the attackers' own CPU use disturbs the legitimate clients' timing less; the
servers run at normal priority). Sources are spread over 127.x.y.z. The kinds, in order (the
docstrings in `benches/soak.py` give the numbers):

| kind | what each attacker does | the defence it meets |
|---|---|---|
| slowloris | 800 partial request heads, a header line every 2 s | handshake timeout (10 s, absolute): 408 |
| idle_flood | 1,500 upgraded connections that never send nor answer pings | idle timeout (60 s here): ping, then 1001 |
| churn | 200 connections/s, reset after connect, after the request, mid-frame, or closed without a word | the one close path |
| emfile | fd limit + 600 connections (half upgraded and held, half silent) | the connection limit derived from the fd budget (503), the handshake timeout (the process never reaches EMFILE, so the spare descriptor is not exercised) |
| slow_readers | echo: 200 sending 16 KiB every 50 ms, reading 512 B/s; topics: 150 non-reading subscribers of a room fed 80 KB/s, 50 in the legitimate room | backpressure (1008), write-stall timeout, reset |
| oversized | frames over `--max-message-size`, fragments adding up past it, 9 KiB heads, 70 headers, a 126-byte ping | 1009, 431, 1002 |
| bombs | frame headers announcing 2^63-1 and 2^64-1 bytes, a continuation of 2^62, then a trickle | 1009 / 1002 at the header |
| parkers | 1,500 connections parking 55 KB of a message each (82 MB) | memory budget: 1013, 503 |
| non_readers | 800 connections sending 16 KiB messages and never reading (up to 64 MB queued) | memory budget (reset), backpressure |
| memory_both | 800 parkers and 400 non-readers at once | memory budget |

What counts, precisely:

- **Quiet point**: the sample taken at the end of a quiet window, just before the next wave (or at
  the end of the run). **Baseline**: the last sample of the warm-up (legitimate clients connected).
  Fresh clients are held back while a sample is taken (the one under way finishes first), so that
  the descriptor count is exact.
- **Descriptors**: entries of `/proc/PID/fd` (the fd audit's own listing of it left out), equal to
  the baseline at every quiet point.
- **Accounted bytes**: `wsloop_memory_bytes{{kind}}`: what connections hold (`partial_messages`,
  `send_queues`) exactly 0 at every quiet point; on the wss server, the TLS state (`tls`, 10 KiB
  per TLS connection) equal to its baseline (the long-lived wss clients') at every quiet point; `publications`, the topic fan-out's arena,
  which a loop keeps after a publishing turn until a turn publishes nothing, at most
  {FANOUT_BOUND >> 20} MiB (its bound from src/topics.rs, see `FANOUT_BOUND` in the script).
- **RSS trend**: VmRSS at the quiet point after each wave, compared kind with kind: after a
  wave of one kind in its last rotation against the same kind's in its second (the first
  rotation fills the allocator with what the memory waves make it map), divided by the
  rotations between them; at most {RSS_KIND_BOUND_MIB:g} MiB per rotation for every kind on both
  servers. A leak grows with every wave of the kind that causes it: a few dozen bytes per
  attacker connection exceed it (a churn or slowloris wave opens tens of thousands). Why per
  kind: the first hour-long run fitted one slope through all quiet points after the first
  rotation and failed on the order of the kinds (the memory waves came late in the second
  rotation), while each kind against itself a rotation apart moved by 0.1-0.7 MiB on the topic
  server; a run of three rotations is needed to judge it.
- **Latency**: p99 of the long-lived echo clients' round trips (plain, and over TLS with
  compression on the wss server), and of the room's publish-to-receive times, over each 10 s interval, attack waves included: at most {P99_BOUND_MS:g} ms. Measured by
  Python clients on the same two shared cores as the servers and the attackers, so it includes
  their scheduling. Why {P99_BOUND_MS:g} ms: without attacks the p99 is a few milliseconds here;
  the bound is far above that noise, yet a loop that stalls (a turn of 100 ms is what the
  servers' watchdog reports) or that is starved by an attacker for a quarter of a second in any
  interval fails it; it is the bound the soak was written with, not fitted to a run.
- **Errors** of legitimate clients: a long-lived client (echo, wss or room member) that is closed, reset
  or refused, gets a wrong echo, misses or reorders a publication, or waits more than
  {ANSWER_TIMEOUT:g} s for an answer; a fresh client whose connect, upgrade, echo or close handshake
  fails or takes more than {ANSWER_TIMEOUT:g} s, or that gets any status but 101 and 503. **Not an
  error**: a `503` with `Retry-After` to a fresh client during a wave or within {REFUSAL_GRACE:g} s
  after it (`server memory budget reached` while shedding, `server at capacity` at the connection
  limit): that is the server answering; counted as a refusal. Over TLS the server refuses by
  closing the connection before the handshake completes (a client without keys could not read a
  503): a fresh wss client closed in its TLS handshake in the same windows is a refusal too. A
  refusal outside those windows is an error.
""")
    L.append("## Waves\n")
    L.append("Per wave, for each server: the peak of accounted bytes, RSS and connections during the "
             "wave, shedding seen, and what happened to the attackers (the attacker's own count of how "
             "each connection ended; `reset` and `EOF` for attackers that do not read are the documented "
             "answer to them).\n")
    L.append("The server's counters (`server counted`) are the rise of `wsloop_connections_closed_total` by reason "
             "(`closed_*`), `wsloop_handshakes_rejected_total` by status (`status_*`), "
             "`wsloop_admission_rejections_total` by limit (`refused_*`) and `wsloop_accept_errors_total` "
             "(`accept_*`) from the sample before the wave to the end of its quiet window (legitimate fresh "
             "clients included: about 1 `closed_peer_closed` every 2 s per server); `expected` is what "
             "the wave must at least have caused (criterion 'every wave attacked').\n")
    L.append("| # | kind | server | peak accounted | peak RSS | peak conns | shed episodes | legit refused | server counted | expected | attackers' outcomes |")
    L.append("|---|---|---|---|---|---|---|---|---|---|---|")
    effects = wave_effects(rows, meta)
    summaries = {(s.get("wave"), s.get("target")): s for s in meta["wave_summaries"]}
    for w in meta["waves"]:
        wrows = [r for r in rows if r["phase"] == "attack" and r["wave"] == w["i"]]
        prev = [r for r in rows if r["t"] <= w["start"]]
        for n in names_of(meta):
            if not wrows:
                continue
            ep0 = prev[-1][n + "_shed_episodes"] if prev else 0
            ep1 = max(r[n + "_shed_episodes"] for r in wrows)
            ref = sum(1 for r in meta["refusals"] if r["target"] == n and w["start"] <= r["t"] <= w["end"] + REFUSAL_GRACE)
            s = summaries.get((w["i"], n), {})
            oc = ", ".join(f"{k}: {v}" for k, v in sorted(s.get("outcomes", {}).items(), key=lambda kv: -kv[1]))
            L.append(f"| {w['i']} | {w['kind']} | {n} | {max(r[n + '_mem'] for r in wrows) / 2**20:.1f} MiB | "
                     f"{max(r[n + '_rss'] for r in wrows) / 2**20:.1f} MiB | {int(max(r[n + '_conns'] for r in wrows))} | "
                     f"{int(ep1 - ep0)} | {ref} | "
                     + ", ".join(f"{k}: {v}" for k, v in sorted(effects.get((w["i"], n), {}).items(), key=lambda kv: -kv[1]))
                     + " | " + ", ".join(f"{'+'.join(c)} >= {m}" for c, m in expected(w["kind"], n))
                     + f" | {s.get('opened', 0)} opened; {oc} |")
    L.append("")
    L.append("## The servers' warnings\n")
    for n in names_of(meta):
        lg = meta["log"][n]
        L.append(f"{n}: {sum(lg['counts'].values())} warning lines (aggregated by the server), "
                 f"{len(lg['panics'])} panics. CPU used: {meta.get('cpu_seconds_' + n)} s.\n")
        for k, c in lg["counts"].items():
            L.append(f"- {c} x `{k}`")
        L.append("")
    L.append("## The machine\n")
    loads = [r["load1"] for r in rows]
    L.append(f"{meta['cpus']} cores (shared), Linux {meta['kernel']}. Load average (1 min) during the run: "
             f"{min(loads):.1f} to {max(loads):.1f}, median {sorted(loads)[len(loads) // 2]:.1f}. The busiest "
             "processes at the start and at the end (`ps -eo pcpu,etimes,comm`; %CPU is averaged over each "
             "process's life):\n")
    L.append("```text\n" + "\n".join(meta["top_start"]) + "\n...\n" + "\n".join(meta.get("top_end", [])) + "\n```\n")
    if getattr(args, "notes", None):
        L.append(open(args.notes).read())
    with open(report_path, "w") as f:
        f.write("\n".join(L))
    log(f"verdict {overall}: {report_path}")
    for name, ok, detail in v:
        log(f"  {'pass' if ok else ('n/a ' if ok is None else 'FAIL')} {name}: {detail}")


# ---------------------------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="role")
    lp = sub.add_parser("legit", help="(internal) the legitimate clients")
    lp.add_argument("--echo-port", type=int, required=True)
    lp.add_argument("--pubsub-port", type=int, required=True)
    lp.add_argument("--wss-port", type=int)
    lp.add_argument("--tls-ca")
    at = sub.add_parser("attack", help="(internal) one attacker process")
    at.add_argument("kind", choices=KINDS)
    at.add_argument("--port", type=int, required=True)
    at.add_argument("--target", required=True)
    at.add_argument("--seconds", type=float, required=True)
    at.add_argument("--fd-limit", type=int, default=4096)
    at.add_argument("--max-message", type=int, default=65536)
    at.add_argument("--tls-ca", help="attack over TLS, trusting this CA")
    ap.add_argument("--minutes", type=float, default=60)
    ap.add_argument("--out", default=os.path.join(REPO, "target", "soak"))
    ap.add_argument("--report", help="the report's path (default OUT/SOAK.md)")
    ap.add_argument("--notes", help="a file of prose appended to the report")
    ap.add_argument("--report-only", action="store_true", help="redo the plot and report from OUT's data")
    ap.add_argument("--bin", help="a wsloop binary (default: build target/release/wsloop)")
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--fd-limit", type=int, default=4096)
    ap.add_argument("--memory-budget", type=int, default=64 << 20)
    ap.add_argument("--kinds", help=f"comma-separated attacks, in order (default: all: {','.join(KINDS)})")
    ap.add_argument("--warmup", type=int)
    ap.add_argument("--attack-seconds", type=int)
    ap.add_argument("--quiet-seconds", type=int)
    args = ap.parse_args()
    if args.role == "legit":
        asyncio.run(Legit(args.echo_port, args.pubsub_port, args.wss_port, tls_context(args.tls_ca)).run())
    elif args.role == "attack":
        raise_nofile()
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        a = Attack(args.port, args.seconds, args.target, args.fd_limit, args.max_message,
                   tls_context(args.tls_ca))
        print(json.dumps(asyncio.run(a.run(args.kind))), flush=True)
    elif args.report_only:
        report(args)
    else:
        orchestrate(args)


if __name__ == "__main__":
    main()
