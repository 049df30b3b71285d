"""wss:// with Python's websockets, verifying the server against the test CA (tests/tls.rs).

Usage: python_wss.py URL CAFILE. Prints one JSON line: what came back, the TLS version and the
ALPN protocol negotiated, and the close code; exits 1 on any failure (the line says why).
"""

import asyncio
import json
import ssl
import sys

from websockets.asyncio.client import connect


async def main(url, cafile):
    ctx = ssl.create_default_context(cafile=cafile)
    ctx.set_alpn_protocols(["http/1.1"])
    report = {}
    async with asyncio.timeout(20):
        async with connect(url, ssl=ctx, max_size=None, compression=None) as ws:
            tls = ws.transport.get_extra_info("ssl_object")
            report["version"] = tls.version()
            report["alpn"] = tls.selected_alpn_protocol()
            await ws.send("héllo over wss")
            report["text"] = await ws.recv()
            # Larger than one TLS record and than the server's 16 KiB chunk.
            data = bytes(range(256)) * 400
            await ws.send(data)
            got = await ws.recv()
            report["binary_len"] = len(got)
            report["binary_ok"] = got == data
            await ws.close(1000, "done")
            report["close"] = ws.close_code
    print(json.dumps(report), flush=True)


try:
    asyncio.run(main(sys.argv[1], sys.argv[2]))
except Exception as e:  # the report says what failed
    print(json.dumps({"error": repr(e)}), flush=True)
    sys.exit(1)
