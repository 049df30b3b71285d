// wss:// with Node's `ws`, run by tests/interop.rs (which puts the folder holding ws on
// NODE_PATH): the client verifies the server against the test CA (the `ca` option), negotiates
// ALPN http/1.1, echoes a text and a binary message larger than a TLS record, and closes with
// 1000; then, without the test CA, it must refuse the server's certificate.
//
// Usage: node node_wss.js URL CAFILE. Prints one JSON line: what came back, the TLS version and
// the ALPN protocol, the close code, and the untrusted attempt's error code; exits 1 on any
// failure (the line says why).
'use strict';

const WebSocket = require('ws');
const fs = require('fs');

const [URL, CAFILE] = process.argv.slice(2, 4);
const STEP = 10000; // bound on every single wait, in ms

function bounded(promise, what) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out: ${what}`)), STEP);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

function open(options) {
  const ws = new WebSocket(URL, { perMessageDeflate: false, ALPNProtocols: ['http/1.1'], ...options });
  ws.binaryType = 'nodebuffer';
  const inbox = [];
  const waiters = [];
  ws.on('message', (data, isBinary) => {
    const m = isBinary ? data : data.toString();
    const w = waiters.shift();
    if (w) w(m);
    else inbox.push(m);
  });
  const recv = () =>
    bounded(
      inbox.length ? Promise.resolve(inbox.shift()) : new Promise((resolve) => waiters.push(resolve)),
      'a message'
    );
  const opened = bounded(
    new Promise((resolve, reject) => {
      ws.once('open', resolve);
      ws.once('error', reject);
    }),
    'the open'
  );
  return { ws, recv, opened };
}

async function main() {
  const report = {};
  const ca = fs.readFileSync(CAFILE);
  const { ws, recv, opened } = open({ ca });
  await opened;
  report.version = ws._socket.getProtocol();
  report.alpn = ws._socket.alpnProtocol;
  report.authorized = ws._socket.authorized;
  ws.send('héllo over wss');
  report.text = await recv();
  // Larger than one TLS record and than the server's 16 KiB chunk.
  const data = Buffer.alloc(256 * 400);
  for (let i = 0; i < data.length; i++) data[i] = i % 256;
  ws.send(data);
  const got = await recv();
  report.binary_len = got.length;
  report.binary_ok = Buffer.isBuffer(got) && got.equals(data);
  const closed = bounded(new Promise((resolve) => ws.once('close', resolve)), 'the close');
  ws.close(1000, 'done');
  report.close = await closed;
  // The same server without the test CA: the certificate is refused.
  const untrusted = open({});
  try {
    await untrusted.opened;
    report.untrusted = 'opened';
    untrusted.ws.terminate();
  } catch (e) {
    report.untrusted = e.code || String(e);
  }
  process.stdout.write(JSON.stringify(report) + '\n');
}

main().catch((e) => {
  process.stdout.write(JSON.stringify({ error: String(e && e.stack ? e.stack : e) }) + '\n');
  process.exit(1);
});
