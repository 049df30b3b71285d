// permessage-deflate with Node's `ws` (perMessageDeflate: true), run by tests/interop.rs
// against wsloop on the shared profile (which puts the folder holding ws on NODE_PATH).
//
// Usage: node node_deflate.js URL
//
// The same cases as python_deflate.py; ws compresses messages of 1024 bytes or more (its
// threshold), the fragmented one too. One JSON line per case; exit code 0 when all passed.
'use strict';

const WebSocket = require('ws');

const URL = process.argv[2];
const STEP = 10000;
// The shared profile's answer by default; the dedicated profile's (context takeover) if given.
const ANSWER = process.argv[3] ||
  'permessage-deflate; server_no_context_takeover; client_no_context_takeover';
let failures = 0;
function report(c, ok, fields = {}) {
  if (!ok) failures += 1;
  process.stdout.write(JSON.stringify({ case: c, ok: !!ok, ...fields }) + '\n');
}

function doc(n) {
  const items = [];
  for (let i = 0; i < n; i++) items.push({ id: i, user: `user${i % 9}`, online: i % 2 === 0 });
  return JSON.stringify({ type: 'presence', items });
}

async function main() {
  const ws = new WebSocket(URL, { perMessageDeflate: true, maxPayload: 1 << 22 });
  const inbox = [];
  const waiters = [];
  ws.on('message', (data, isBinary) => {
    const m = isBinary ? data : data.toString('utf8');
    const w = waiters.shift();
    if (w) w(m);
    else inbox.push(m);
  });
  const recv = () => {
    if (inbox.length) return Promise.resolve(inbox.shift());
    return new Promise((resolve, reject) => {
      const t = setTimeout(() => reject(new Error('timed out')), STEP);
      waiters.push((m) => {
        clearTimeout(t);
        resolve(m);
      });
    });
  };
  let answered = null;
  ws.on('upgrade', (res) => {
    answered = res.headers['sec-websocket-extensions'];
  });
  await new Promise((resolve, reject) => {
    ws.on('open', resolve);
    ws.on('error', reject);
  });
  // The 101's header as sent, and what ws made of it (the names of the extensions in use).
  const ok = answered === ANSWER && ws.extensions === 'permessage-deflate';
  report('negotiated', ok, { extension: answered, in_use: ws.extensions });
  const same = (a, b) => (typeof a === 'string' ? a === b : Buffer.isBuffer(b) && a.equals(b));
  const echo = async (c, msg) => {
    ws.send(msg);
    report(c, same(msg, await recv()), { len: msg.length });
  };
  await echo('echo_json', doc(60));
  const bin = Buffer.alloc(4096);
  for (let i = 0; i < bin.length; i++) bin[i] = i % 256;
  await echo('echo_binary', bin);
  await echo('echo_small', 'hi');
  await echo('echo_large', doc(6000));
  const text = doc(80);
  ws.send(text.slice(0, 1500), { fin: false });
  ws.send(text.slice(1500), { fin: true });
  report('fragmented', (await recv()) === text, { len: text.length });
  ws.close(1000);
  await new Promise((resolve) => ws.on('close', resolve));
}

main().then(
  () => process.exit(failures ? 1 : 0),
  (e) => {
    report('main', false, { error: String(e && e.stack ? e.stack : e) });
    process.exit(1);
  },
);
