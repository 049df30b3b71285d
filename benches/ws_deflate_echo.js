// The Node `ws` peer of benches/compression.sh: an echo server with permessage-deflate
// (`perMessageDeflate: true`), npm `ws` as compression.sh installs it (the version the interop
// tests pin, on NODE_PATH).
//
//   node benches/ws_deflate_echo.js [--listen 127.0.0.1:9001] [--max-message-size BYTES]
//
// `perMessageDeflate: true` takes ws's defaults: messages of at least 1024 bytes are compressed
// (threshold 1024), zlib's default level and memory level, a 32 KiB window, and the server keeps
// its compression context from message to message unless the client's offer asks it not to
// (serverNoContextTakeover false: an offer of server_no_context_takeover is accepted);
// compression and decompression run on libuv's thread pool, at most 10 at a time
// (concurrencyLimit). No idle timeout, no pings. Each message is sent back as it came (text as
// text, binary as binary), compressed when it is over the threshold.
//
// Before it listens on the benchmark's address it checks itself: a ws client offering
// permessage-deflate connects to a server of the same configuration on an ephemeral loopback
// port, and unless the extension was negotiated and a 2 KiB message came back compressed, it
// refuses to run (exit 3): a benchmark of a peer without compression would be meaningless.
"use strict";

const net = require("net");
const zlib = require("zlib");

function refuse(why) {
  console.error(`ws_deflate_echo: REFUSING TO RUN: ${why}`);
  process.exit(3);
}

let listen = "127.0.0.1:9001";
let maxMessage = 64 * 1024;
const argv = process.argv.slice(2);
for (let i = 0; i < argv.length; i++) {
  const value = argv[i + 1];
  if (argv[i] === "--listen" && value) listen = argv[++i];
  else if (argv[i] === "--max-message-size" && Number(value) > 0) maxMessage = Number(argv[++i]);
  else {
    console.error("usage: node ws_deflate_echo.js [--listen HOST:PORT] [--max-message-size BYTES]");
    process.exit(2);
  }
}
const colon = listen.lastIndexOf(":");
const host = listen.slice(0, colon);
const port = Number(listen.slice(colon + 1));

let ws;
try {
  ws = require("ws");
} catch (e) {
  refuse(`npm ws is not installed (set NODE_PATH): ${e.message}`);
}
const version = require("ws/package.json").version;
if (typeof ws.WebSocketServer !== "function" || typeof ws.PerMessageDeflate !== "function") {
  refuse(`ws ${version} has no WebSocketServer or PerMessageDeflate`);
}

function serve(options, onListening) {
  const server = new ws.WebSocketServer({
    ...options,
    perMessageDeflate: true,
    maxPayload: maxMessage,
  });
  if (!server.options.perMessageDeflate) refuse("perMessageDeflate did not stay enabled");
  server.on("connection", (socket) => {
    socket.on("message", (data, isBinary) => socket.send(data, { binary: isBinary }));
    socket.on("error", () => socket.terminate());
  });
  server.on("listening", () => onListening(server));
  server.on("error", (e) => refuse(`cannot listen: ${e.message}`));
  return server;
}

// The self-check on an ephemeral port, with a raw socket so that the frames themselves are
// seen: the 101 must accept the offer, and a compressed message (RSV1) must come back
// compressed and inflate to itself.
serve({ host: "127.0.0.1", port: 0 }, (probe) => {
  const message = Buffer.from("permessage-deflate self-check ".repeat(70)); // 2,100 bytes
  const compressed = zlib.deflateRawSync(message, { finishFlush: zlib.constants.Z_SYNC_FLUSH });
  if (!compressed.subarray(-4).equals(Buffer.from([0, 0, 0xff, 0xff]))) {
    refuse("zlib's sync flush did not end with 00 00 ff ff");
  }
  const payload = compressed.subarray(0, compressed.length - 4); // RFC 7692: the tail stripped
  if (payload.length > 125) refuse("the self-check's message compressed to more than 125 bytes");
  const mask = Buffer.from([0x37, 0xfa, 0x21, 0x3d]);
  const frame = Buffer.concat([
    Buffer.from([0xc1, 0x80 | Math.min(payload.length, 125)]), // a few dozen bytes (checked below)
    mask,
    Buffer.from(payload.map((b, i) => b ^ mask[i % 4])),
  ]);
  const timer = setTimeout(() => refuse("the self-check timed out"), 5000);
  const sock = net.connect(probe.address().port, "127.0.0.1", () => {
    sock.write(
      "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" +
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n" +
        "Sec-WebSocket-Extensions: permessage-deflate; client_no_context_takeover; " +
        "server_no_context_takeover\r\n\r\n"
    );
  });
  let input = Buffer.alloc(0);
  let upgraded = false;
  sock.on("data", (chunk) => {
    input = Buffer.concat([input, chunk]);
    if (!upgraded) {
      const end = input.indexOf("\r\n\r\n");
      if (end < 0) return;
      const head = input.subarray(0, end).toString();
      if (!/^HTTP\/1\.1 101/.test(head)) refuse(`the upgrade was refused: ${head.split("\r\n")[0]}`);
      if (!/\r\nsec-websocket-extensions: *permessage-deflate/i.test(head)) {
        refuse("the 101 does not accept permessage-deflate");
      }
      upgraded = true;
      input = input.subarray(end + 4);
      sock.write(frame);
    }
    if (input.length < 2) return;
    const len = input[1] & 0x7f;
    const hlen = len === 126 ? 4 : 2;
    const plen = len === 126 ? input.readUInt16BE(2) : len;
    if (len === 127 || input.length < hlen + plen) return;
    clearTimeout(timer);
    if (input[0] !== 0xc1) refuse(`the echo's first byte is ${input[0].toString(16)}, not c1 (compressed text)`);
    const echoed = zlib.inflateRawSync(
      Buffer.concat([input.subarray(hlen, hlen + plen), Buffer.from([0, 0, 0xff, 0xff])]),
      { finishFlush: zlib.constants.Z_SYNC_FLUSH }
    );
    if (!echoed.equals(message)) refuse(`the self-check's echo inflates to ${echoed.length} other bytes: ${echoed.subarray(0, 40)}`);
    sock.destroy();
    probe.close(() => {
      serve({ host, port }, () =>
        console.log(
          `ws_deflate_echo: ws ${version} on ${host}:${port}, perMessageDeflate on (self-check: ` +
            `${message.length} bytes echoed compressed to ${plen})`
        )
      );
    });
  });
  sock.on("error", (e) => refuse(`the self-check failed: ${e.message}`));
});
