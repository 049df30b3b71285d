#!/usr/bin/env python3
"""Interop client for wsloop using Python's `websockets` (asyncio API), run by tests/interop.rs.

Usage: python_client.py MAIN_URL PROTO_URL MAX_MESSAGE_SIZE

MAIN_URL is the recording echo server (max_message_size = MAX_MESSAGE_SIZE, with an idle
timeout: it pings a connection after a silence); PROTO_URL is the same kind of server
configured to accept the subprotocol "chat.v1". Every case prints one JSON line
{"case": ..., "ok": bool, ...} on stdout; the exit code is 0 when every case passed. Every
connection offers permessage-deflate (the default), which wsloop declines. Connections, in the
order the server sees them (the test matches its records by that order):

  MAIN  1  idle:          opened first, silent until the server's idle ping arrives (the pong
                          is automatic), then one echo; closes with 1000
  MAIN  2  echo:          text, binary, empty text, empty binary, fragmented text (also split
                          inside a character) and binary messages, a ping; closes with 4001 "x"
  MAIN  3  large:         MAX_MESSAGE_SIZE bytes of binary, then of text; closes with 1000
  MAIN  4  too_big:       MAX_MESSAGE_SIZE + 1 bytes: the server closes with 1009
  MAIN  5  server_close:  "close-me": the server closes with 4000 "bye"
  PROTO 1  subprotocol:   offers ["chat.v2", "chat.v1"], the server picks "chat.v1"
"""

import asyncio
import json
import os
import sys

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed
from websockets.frames import Frame, Opcode

MAIN, PROTO = sys.argv[1], sys.argv[2]
LIMIT = int(sys.argv[3])
STEP = 10.0  # bound on every single await, in seconds

failures = 0


def report(case, ok, **fields):
    global failures
    if not ok:
        failures += 1
    print(json.dumps({"case": case, "ok": bool(ok), **fields}), flush=True)


class Watched(ClientConnection):
    """A connection that notes the pings it receives (websockets answers them by itself)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.pings = []
        self.pinged = asyncio.Event()

    def process_event(self, event):
        if isinstance(event, Frame) and event.opcode is Opcode.PING:
            self.pings.append(bytes(event.data))
            self.pinged.set()
        super().process_event(event)


def opts(**extra):
    # No keepalive pings of the client's own (the server counts the pings it gets), and no
    # client-side size limit below the server's.
    return dict(
        ping_interval=None,
        open_timeout=STEP,
        close_timeout=STEP,
        max_size=4 * LIMIT,
        create_connection=Watched,
        **extra,
    )


async def bounded(aw):
    return await asyncio.wait_for(aw, STEP)


async def echo(ws, case, msg, send=None, text=None):
    """Send `msg` (or `send`, e.g. fragments, which must reassemble to `msg`) and check the echo."""
    await bounded(ws.send(msg if send is None else send, text=text))
    got = await bounded(ws.recv())
    same_type = isinstance(got, type(msg))
    report(case, same_type and got == msg, len=len(got), type=type(got).__name__)


async def closed_by_server(ws):
    """Wait for the server's close; return the close frame received (code, reason) or (None, None)."""
    try:
        msg = await bounded(ws.recv())
        return ("unexpected message", repr(msg)[:100])
    except ConnectionClosed as e:
        if e.rcvd is None:
            return (None, None)
        return (e.rcvd.code, e.rcvd.reason)


async def case_idle(ws):
    loop = asyncio.get_running_loop()
    start = loop.time()
    await bounded(ws.pinged.wait())
    report("server_ping", ws.pings[0] == b"", after=round(loop.time() - start, 3), payload=ws.pings[0].hex())
    await echo(ws, "idle_echo", "still here")
    await bounded(ws.close())
    report("idle_close", ws.close_code == 1000, code=ws.close_code)


async def case_echo():
    async with connect(MAIN, **opts()) as ws:
        # The client offers permessage-deflate; wsloop negotiates no extension.
        ext = ws.response.headers.get("Sec-WebSocket-Extensions")
        report("no_extension", ext is None, extensions=ext)
        await echo(ws, "echo_text", "hello wsloop \u2713 \U0001f600")
        await echo(ws, "echo_binary", bytes(range(256)))
        await echo(ws, "echo_empty_text", "")
        await echo(ws, "echo_empty_binary", b"")
        await echo(ws, "fragmented_text", "frag-ment-ed \u2713", send=["frag-", "ment-", "ed \u2713"])
        # A text message whose fragments split a character: U+2713 is e2 9c 93 in UTF-8.
        split = [b"\xe2\x9c", b"\x93\xe2", b"\x9c\x93"]
        await echo(ws, "fragmented_text_split_utf8", "\u2713\u2713", send=split, text=True)

        async def pieces():
            for i in range(4):
                yield bytes([i]) * 1000

        want = b"".join(bytes([i]) * 1000 for i in range(4))
        await echo(ws, "fragmented_binary", want, send=pieces())
        pong = await bounded(ws.ping(b"are you there"))
        latency = await bounded(pong)
        report("ping", latency >= 0, latency=latency)
        await bounded(ws.close(4001, "x"))
        rcvd = ws.protocol.close_rcvd
        # The server answers with the same code (RFC 6455 section 5.5.1); the reason is its own.
        report(
            "client_close",
            rcvd is not None and rcvd.code == 4001,
            code=rcvd and rcvd.code,
            reason=rcvd and rcvd.reason,
        )


async def case_large():
    async with connect(MAIN, **opts()) as ws:
        await echo(ws, "large_binary", os.urandom(LIMIT))
        await echo(ws, "large_text", "".join(chr(0x61 + i % 26) for i in range(LIMIT)))
    report("large_close", ws.close_code == 1000, code=ws.close_code)


async def case_too_big():
    async with connect(MAIN, **opts()) as ws:
        try:
            await bounded(ws.send(b"\x00" * (LIMIT + 1)))
        except ConnectionClosed:
            pass
        code, reason = await closed_by_server(ws)
    report("too_big", code == 1009, code=code, reason=reason)


async def case_server_close():
    async with connect(MAIN, **opts()) as ws:
        await bounded(ws.send("close-me"))
        code, reason = await closed_by_server(ws)
    report("server_close", (code, reason) == (4000, "bye"), code=code, reason=reason)


async def case_subprotocol():
    async with connect(PROTO, **opts(subprotocols=["chat.v2", "chat.v1"])) as ws:
        report("subprotocol", ws.subprotocol == "chat.v1", subprotocol=ws.subprotocol)
        await echo(ws, "subprotocol_echo", "hi")
    report("subprotocol_close", ws.close_code == 1000, code=ws.close_code)


async def guarded(name, coro):
    try:
        await coro
    except Exception as e:  # report, and go on with the next case
        report(name, False, error=f"{type(e).__name__}: {e}")


async def sequential():
    await guarded("echo", case_echo())
    await guarded("large", case_large())
    await guarded("too_big", case_too_big())
    await guarded("server_close", case_server_close())


async def main():
    # The idle connection opens first and stays silent (until the server pings it) while the
    # others run one after another.
    idle = await connect(MAIN, **opts())
    await asyncio.gather(guarded("idle", case_idle(idle)), sequential())
    await guarded("subprotocol", case_subprotocol())


asyncio.run(main())
sys.exit(1 if failures else 0)
