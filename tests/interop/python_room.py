#!/usr/bin/env python3
"""A room through `wsloop --pubsub`, with Python's `websockets`, run by tests/interop.rs.

Usage: python_room.py BASE_URL   (e.g. ws://127.0.0.1:PORT)

Three members join /lobby, one client joins /elsewhere. The members send 5 messages each, all
at once; every member must receive all 15, its own included, each sender's in the order it sent
them, and every member the 15 in the same order (one conversation). The client in /elsewhere
must receive nothing of it: its first message back is its own. A path longer than 256 bytes
gets 414. Prints one JSON line per case; exit code 0 when every case passed.
"""

import asyncio
import json
import sys

from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

BASE = sys.argv[1]
STEP = 10.0
failures = 0


def report(case, ok, **fields):
    global failures
    failures += 0 if ok else 1
    print(json.dumps({"case": case, "ok": ok, **fields}), flush=True)


async def receive(ws, n):
    return [await asyncio.wait_for(ws.recv(), STEP) for _ in range(n)]


async def room():
    members = [await connect(f"{BASE}/lobby") for _ in range(3)]
    outsider = await connect(f"{BASE}/elsewhere")

    async def talk(i, ws):
        for k in range(5):
            await ws.send(f"m{i}.{k}")

    # Everyone starts reading before anyone talks, so that no one's buffers fill.
    readers = [asyncio.create_task(receive(ws, 15)) for ws in members]
    await asyncio.gather(*(talk(i, ws) for i, ws in enumerate(members)))
    seen = [await r for r in readers]
    complete = all(sorted(s) == sorted(f"m{i}.{k}" for i in range(3) for k in range(5)) for s in seen)
    in_order = all(
        [m for m in s if m.startswith(f"m{i}.")] == [f"m{i}.{k}" for k in range(5)]
        for s in seen
        for i in range(3)
    )
    one_order = all(s == seen[0] for s in seen)
    report("room", complete and in_order and one_order, complete=complete, in_order=in_order,
           one_order=one_order)

    await outsider.send("alone")
    first = await asyncio.wait_for(outsider.recv(), STEP)
    report("elsewhere", first == "alone", first=first)

    for ws in members + [outsider]:
        await ws.close()


async def too_long():
    try:
        async with connect(f"{BASE}/{'x' * 300}"):
            report("too_long", False, status=101)
    except InvalidStatus as e:
        report("too_long", e.response.status_code == 414, status=e.response.status_code)


async def main():
    await room()
    await too_long()


asyncio.run(main())
sys.exit(1 if failures else 0)
