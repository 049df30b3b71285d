#!/usr/bin/env python3
"""Writes the synthetic seeds: frames of every opcode and length class (frame, connection) and
operation sequences (timer_wheel). The captured handshakes come from capture_handshakes.py.

Run from the repository root: python3 fuzz/tools/make_seeds.py
"""
import os
import struct

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "seeds")
KEY = bytes([0x37, 0xFA, 0x21, 0x3D])


def write(target, name, data):
    d = os.path.join(ROOT, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def frame(op, payload, fin=True, mask=KEY, rsv=0, force_len=None):
    b0 = (0x80 if fin else 0) | (rsv << 4) | op
    n = len(payload) if force_len is None else force_len
    m = 0x80 if mask else 0
    if n < 126:
        head = bytes([b0, m | n])
    elif n < 0x10000:
        head = bytes([b0, m | 126]) + struct.pack(">H", n)
    else:
        head = bytes([b0, m | 127]) + struct.pack(">Q", n)
    if mask:
        payload = bytes(c ^ mask[i % 4] for i, c in enumerate(payload))
        head += mask
    return head + payload


# frame: one frame per file, every opcode and length class, masked and not, plus the errors.
frames = {
    "text_hello_masked": frame(1, b"Hello"),
    "text_hello_unmasked": frame(1, b"Hello", mask=None),
    "binary_empty": frame(2, b""),
    "binary_125": frame(2, bytes(range(125))),
    "binary_126_len16": frame(2, bytes(126)),
    "binary_300_len16": frame(2, bytes(i % 251 for i in range(300))),
    "binary_65535_header": frame(2, b"", force_len=65535),
    "binary_65536_len64_header": frame(2, b"", force_len=65536),
    "continuation_not_fin": frame(0, b"lo", fin=False),
    "text_fragment_first": frame(1, b"Hel", fin=False),
    "close_1000_bye": frame(8, struct.pack(">H", 1000) + b"bye"),
    "close_empty": frame(8, b""),
    "ping_hello": frame(9, b"Hello"),
    "pong_125": frame(10, bytes(125)),
    "err_reserved_opcode_3": frame(3, b"x"),
    "err_control_not_fin": frame(9, b"", fin=False),
    "err_control_126": bytes([0x89, 0xFE, 0x00, 0x7E]),
    "err_nonminimal_16": bytes([0x82, 0xFE, 0x00, 0x05]) + KEY + b"abcde",
    "err_nonminimal_64": bytes([0x82, 0xFF]) + struct.pack(">Q", 200) + KEY,
    "err_len64_msb": bytes([0x82, 0xFF]) + struct.pack(">Q", 1 << 63) + KEY,
    "rsv1_set": frame(1, b"x", rsv=4),
}
for name, data in frames.items():
    write("frame", name, data)

# connection: [flags, max_message index, max_header, n_ops] + ops (4 bytes each) + stream.
# flags bit 0 = the canned upgrade request (202 bytes) goes first.
def conn(stream, ops=(), flags=1, mm=13, mh=255):
    head = bytes([flags, mm, mh, len(ops)])
    return head + b"".join(bytes(o) for o in ops) + stream


def data(n):
    return (0, n & 0xFF, n >> 8, 0)


TIMER, SHUTDOWN = (3, 0, 0, 0), (4, 0, 0, 0)
def close(code, reason=1):
    return (5, reason, code & 0xFF, code >> 8)


def send(text, n):
    return (6, 1 if text else 0, n & 0xFF, n >> 8)


def ping(n):
    return (7, n, 0, 0)


RECLAIM = (9, 0, 0, 0)
hello = frame(1, b"Hello")
conn_seeds = {
    "echo_text": conn(hello + frame(8, struct.pack(">H", 1000))),
    "fragmented_text_with_ping": conn(
        frame(1, b"Hel", fin=False) + frame(9, b"p") + frame(0, b"lo") + frame(8, b"")
    ),
    # A 300-byte message, then the start of a 70000-byte one (over the 64 KiB limit: 1009).
    "binary_len16_len64": conn(frame(2, bytes(300)) + frame(2, bytes(70000))[:1000], mm=15),
    "too_big": conn(frame(2, bytes(200)), mm=4),
    "trickle": conn(hello * 3, ops=[data(1)] * 40 + [RECLAIM]),
    "idle_ping_then_timeout": conn(hello, ops=[data(205), TIMER, (0, 5, 0, 0), TIMER, TIMER]),
    "server_close_then_peer_reply": conn(
        hello + frame(8, struct.pack(">H", 1000)), ops=[data(220), close(1000), send(True, 10)]
    ),
    "app_close_unsendable_code": conn(b"", ops=[data(500), close(1005, 3), ping(200)]),
    "shutdown_mid_message": conn(frame(1, "é€😀".encode() * 20, fin=False), ops=[data(260), SHUTDOWN]),
    "sends_every_size": conn(b"", ops=[data(300), send(True, 0), send(False, 125), send(True, 126), send(False, 65536 - 1)]),
    "invalid_utf8": conn(frame(1, b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xed\xa0\x80edited")),
    "unmasked_frame": conn(frame(1, b"x", mask=None)),
    "close_invalid_code": conn(frame(8, struct.pack(">H", 1005))),
    "handshake_timeout": conn(b"GET / HTTP/1.1\r\nHost: a\r\n", flags=0, ops=[data(10), TIMER]),
    "not_upgrade": conn(b"GET /index.html HTTP/1.1\r\nHost: a\r\n\r\n", flags=0),
    "refused_by_app": conn(hello, flags=3),
    "subprotocol_picked": conn(hello, flags=5),
    "pipelined_after_head": conn(hello, ops=[data(100), data(100)]),
    "head_too_large": conn(b"GET / HTTP/1.1\r\nX: " + b"a" * 200, flags=0, mh=1),
}
for name, d in conn_seeds.items():
    write("connection", name, d)

# timer_wheel: [start mode, ...] then ops: 0/1 insert(tick), 2 cancel, 3 extend, 4 jump, 5 step,
# 6 poll one, 7 step by u16. A tick: [kind] + bytes (0 past u16, 1 +u8, 2 +u16, 3 +u32,
# 4 level boundary, 5 +u64, 6 absolute u64, 7 near max u16).
def tick_u16(kind, v):
    return bytes([kind]) + struct.pack("<H", v)


def ins8(v):
    return bytes([0, 1, v])


def ins16(v):
    return bytes([0]) + tick_u16(2, v)


wheel = {
    "insert_step": ins8(10) + ins8(20) + ins16(5000) + bytes([7]) + struct.pack("<H", 6000),
    "cancel_extend": ins8(10) + ins8(11) + bytes([2, 0]) + bytes([3, 1, 1, 200]) + bytes([4, 1, 255]) + bytes([4, 2, 0xFF, 0xFF]),
    "level_boundaries": b"".join(bytes([0, 4, b]) for b in range(0, 48)) + bytes([5, 3, 0, 0, 0, 1]),
    "near_max_start": bytes([3, 5, 0]) + ins8(3) + bytes([0, 7, 0, 0]) + bytes([5, 7, 0, 0]),
    "far_future": bytes([2]) + struct.pack("<Q", 123456789) + bytes([0, 5]) + struct.pack("<Q", 1 << 40) + bytes([4, 5]) + struct.pack("<Q", 1 << 41),
    "poll_one_then_insert": ins8(1) + ins8(1) + ins8(2) + bytes([6, 1, 5]) + ins8(0) + bytes([6, 0, 0, 0]) + bytes([4, 1, 9]),
    "past_deadlines": bytes([1, 0x10, 0x27]) + tick_u16(0, 100).join([b"\x00", b""]) + bytes([5, 1, 0]),
}
for name, d in wheel.items():
    write("timer_wheel", name, d)

# handshake: [flags, p1, p2, n] + n chunk sizes + request. Refusals of each rule, odd forms.
BASE = [
    ("Host", "example.com"),
    ("Upgrade", "websocket"),
    ("Connection", "Upgrade"),
    ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
    ("Sec-WebSocket-Version", "13"),
]


def req(line="GET /chat HTTP/1.1", drop=(), extra=(), base=BASE):
    hs = [(n, v) for n, v in base if n not in drop] + list(extra)
    return (line + "\r\n" + "".join(f"{n}: {v}\r\n" for n, v in hs) + "\r\n").encode()


hs = {
    "rfc_example": req(),
    "post_405": req("POST /chat HTTP/1.1"),
    "http10": req("GET /chat HTTP/1.0"),
    "no_host": req(drop=["Host"]),
    "two_hosts": req(extra=[("host", "other")]),
    "host_ipv6": req(drop=["Host"], extra=[("Host", "[::1]:9001")]),
    "upgrade_list": req(drop=["Upgrade"], extra=[("Upgrade", "h2c, WebSocket")]),
    "connection_keep_alive": req(drop=["Connection"], extra=[("Connection", "keep-alive, Upgrade")]),
    "connection_split": req(drop=["Connection"], extra=[("Connection", "keep-alive"), ("Connection", "upgrade")]),
    "version_8": req(drop=["Sec-WebSocket-Version"], extra=[("Sec-WebSocket-Version", "8")]),
    "no_version": req(drop=["Sec-WebSocket-Version"]),
    "key_unpadded": req(drop=["Sec-WebSocket-Key"], extra=[("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ")]),
    "two_keys": req(extra=[("Sec-WebSocket-Key", "AAAAAAAAAAAAAAAAAAAAAA==")]),
    "two_origins": req(extra=[("Origin", "https://a.example.com"), ("Origin", "https://evil.test")]),
    "content_length": req(extra=[("Content-Length", "5")]),
    "chunked": req(extra=[("Transfer-Encoding", "chunked")]),
    "absolute_uri": req("GET ws://example.com/chat?x=1 HTTP/1.1"),
    "quoted_extension": req(extra=[("Sec-WebSocket-Extensions", 'x-q; a="1,2", permessage-deflate'),
                                   ("Sec-WebSocket-Protocol", "v2.json,, v1.json ,")]),
    "plain_get": b"GET /index.html HTTP/1.1\r\nHost: example.com\r\nAccept: */*\r\n\r\n",
    "lf_only": req().replace(b"\r\n", b"\n"),
    "pipelined_frame": req() + bytes([0x81, 0x85, 0, 0, 0, 0]) + b"hello",
    "tls_client_hello": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
}
for name, r in hs.items():
    write("handshake", name, b"\x00\x00\x00\x00" + r)
# Small limits (flags bit 0: max_header_bytes = 64 + p1 * 16, max_headers = 1 + p2 % 140).
write("handshake", "limits_too_small", b"\x01\x02\x03\x00" + req())
write("handshake", "limits_just_enough", b"\x01\x06\x05\x00" + req())
# Trickled in 1-byte reads, then the rest.
write("handshake", "trickle", b"\x00\x00\x00\x0f" + bytes(15) + req())
# The application picks the first (flags 2), last (4) or a hostile (6) subprotocol, refuses (8).
sub = req(extra=[("Sec-WebSocket-Protocol", "chat, superchat")])
for flags, name in [(2, "pick_first"), (4, "pick_last"), (6, "pick_hostile")]:
    write("handshake", name, bytes([flags, 0, 0, 0]) + sub)
write("handshake", "app_refuses_403", b"\x08\x93\x01\x00" + req())
write("handshake", "app_refuses_200", b"\x08\xc8\x00\x00" + req())

# forwarded: [flags, n], n bytes the client wrote, then the hops the proxies appended, each
# [selector, 4 or 16 address bytes, 2 port bytes if the form has a port] (see
# fuzz/checks/forwarded.rs). flags bit 0: Forwarded; bits 1-2: how the client's part ends.
V4, V4_PORT, V6, V6_PORT, MAPPED, TRUSTED, OWN_LINE, QUOTED, SPACES, PARAMS = 0, 1, 2, 3, 4, 8, 16, 32, 64, 128


def fwd(flags, client, *hops):
    return bytes([flags, len(client)]) + client + b"".join(hops)


def hop(sel, addr, port=None):
    return bytes([sel]) + bytes(addr) + (struct.pack("<H", port) if port is not None else b"")


NGINX = hop(V4 | TRUSTED, [10, 0, 0, 2])
CLIENT = hop(V4, [203, 0, 113, 7])
fwd_seeds = {
    "xff_one_client": fwd(0, b"", CLIENT),
    "xff_client_then_proxy": fwd(0, b"", CLIENT, NGINX),
    "xff_spoof_non_utf8": fwd(2, b"\xff", CLIENT),
    "xff_haproxy_own_line": fwd(0, b"198.51.100.1, \xff", hop(V4 | OWN_LINE, [192, 0, 2, 1])),
    "xff_mapped": fwd(0, b"1.1.1.1", hop(V6 | MAPPED, [192, 0, 2, 9]), hop(V6 | MAPPED | TRUSTED, [0, 0, 0, 1])),
    "xff_v6_port": fwd(4, b"", hop(V6_PORT, list(range(0x20, 0x30)), 4711)),
    "xff_all_trusted": fwd(6, b"garbage", NGINX, hop(V4_PORT | TRUSTED, [10, 9, 9, 9], 80)),
    "xff_nothing_appended": fwd(0, b"192.0.2.1, 192.0.2.2"),
    "forwarded_quoted_v6": fwd(1, b"for=\"\xff\"", hop(V6_PORT | QUOTED, list(range(0x20, 0x30)), 4711)),
    "forwarded_params_spaces": fwd(3, b"for=192.0.2.3;proto=http", hop(V4 | PARAMS | SPACES, [198, 51, 100, 4]), NGINX),
    "forwarded_mapped_own_line": fwd(5, b"", hop(V6_PORT | MAPPED | QUOTED | OWN_LINE, [198, 51, 100, 5], 443)),
    "forwarded_obfuscated": fwd(7, b"for=_gazonk", hop(V4 | TRUSTED | PARAMS, [10, 1, 1, 1])),
}
for name, d in fwd_seeds.items():
    write("forwarded", name, d)

# topics: ops of [op % 8, slot] (+ topic for subscribe 1/2, unsubscribe 3, publish 4):
# 0 open, 5 deliver, 6 close, 7 end of turn.
def op(code, slot, *rest):
    return bytes([code, slot, *rest])


OPEN, SUB, UNSUB, PUB, DELIVER, CLOSE, END = 0, 1, 3, 4, 5, 6, 7
room = op(OPEN, 0) + op(OPEN, 1) + op(OPEN, 2) + op(SUB, 0, 0) + op(SUB, 1, 0) + op(SUB, 2, 1)
topic_seeds = {
    "room_publish_end": room + op(PUB, 0, 0) + op(PUB, 7, 0) + op(PUB, 1, 1) + op(END, 0),
    "deliver_between": room + op(PUB, 7, 0) + op(DELIVER, 1) + op(PUB, 7, 0) + op(END, 0),
    "close_then_reuse_slot": room + op(PUB, 7, 0) + op(CLOSE, 1) + op(OPEN, 1) + op(SUB, 1, 0)
    + op(PUB, 7, 0) + op(END, 0),
    "unsubscribe_midturn": room + op(PUB, 7, 0) + op(UNSUB, 0, 0) + op(PUB, 7, 0) + op(END, 0),
    "too_many_topics": op(OPEN, 3) + b"".join(op(SUB, 3, t) for t in range(6)) + op(PUB, 7, 5) + op(END, 0),
    "close_everyone": room + op(PUB, 2, 0) + op(CLOSE, 0) + op(CLOSE, 1) + op(CLOSE, 2) + op(END, 0),
}
for name, d in topic_seeds.items():
    write("topics", name, d)
