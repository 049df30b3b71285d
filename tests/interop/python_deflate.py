#!/usr/bin/env python3
"""permessage-deflate with Python's `websockets` (which offers it by default), run by
tests/interop.rs against wsloop on the shared profile.

Usage: python_deflate.py URL [ANSWER]

One connection: the 101 must name ANSWER (by default the shared profile's, permessage-deflate
with both no_context_takeover parameters; the dedicated profile answers plain
permessage-deflate, context takeover both ways); then a JSON text message, a binary message, a short text, a large JSON text and a
fragmented compressed text are echoed back intact (the test checks on the server's side that
they arrived compressed and that the echoes at or above the threshold went out compressed).
Prints one JSON line per case; exit code 0 when every case passed.
"""

import asyncio
import json
import sys

from websockets.asyncio.client import connect

URL = sys.argv[1]
STEP = 10.0
ANSWER = sys.argv[2] if len(sys.argv) > 2 else (
    "permessage-deflate; server_no_context_takeover; client_no_context_takeover")
failures = 0


def report(case, ok, **fields):
    global failures
    failures += 0 if ok else 1
    print(json.dumps({"case": case, "ok": ok, **fields}), flush=True)


def doc(n):
    return json.dumps({"type": "presence", "items": [
        {"id": i, "user": f"user{i % 9}", "online": i % 2 == 0} for i in range(n)]})


async def echo(ws, case, msg):
    await ws.send(msg)
    got = await asyncio.wait_for(ws.recv(), STEP)
    report(case, got == msg, len=len(msg))


async def main():
    async with connect(URL, max_size=1 << 22) as ws:
        ext = ws.response.headers.get("Sec-WebSocket-Extensions")
        report("negotiated", ext == ANSWER, extension=ext)
        await echo(ws, "echo_json", doc(60))
        await echo(ws, "echo_binary", bytes(range(256)) * 16)
        await echo(ws, "echo_small", "hi")
        await echo(ws, "echo_large", doc(6000))
        text = doc(80)
        parts = [text[:100], text[100:1000], text[1000:]]
        await ws.send(parts)  # one message, three frames: RSV1 on the first
        got = await asyncio.wait_for(ws.recv(), STEP)
        report("fragmented", got == text, len=len(text))


asyncio.run(main())
sys.exit(1 if failures else 0)
