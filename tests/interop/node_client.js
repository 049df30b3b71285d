// Interop client for wsloop using Node's `ws` package, run by tests/interop.rs (which puts the
// folder holding ws on NODE_PATH).
//
// Usage: node node_client.js MAIN_URL PROTO_URL MAX_MESSAGE_SIZE
//
// The same cases, connections and order as python_client.py (see there); every case prints one
// JSON line {"case": ..., "ok": bool, ...} on stdout and the exit code is 0 when all passed.
'use strict';

const WebSocket = require('ws');
const crypto = require('crypto');

const [MAIN, PROTO] = process.argv.slice(2, 4);
const LIMIT = Number(process.argv[4]);
const STEP = 10000; // bound on every single wait, in ms

let failures = 0;
function report(c, ok, fields = {}) {
  if (!ok) failures += 1;
  process.stdout.write(JSON.stringify({ case: c, ok: !!ok, ...fields }) + '\n');
}

function bounded(promise, what) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out: ${what}`)), STEP);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// A connection whose messages, pongs and close are read through promises.
class Client {
  constructor(url, protocols) {
    // ws offers permessage-deflate by default; wsloop negotiates no extension. maxPayload: no
    // client-side limit below the server's.
    this.ws = new WebSocket(url, protocols, { maxPayload: 4 * LIMIT });
    this.inbox = [];
    this.waiters = [];
    this.pongs = [];
    this.pings = [];
    this.ws.on('message', (data, isBinary) => this.push({ data, isBinary }));
    this.ws.on('pong', (data) => this.pongs.push(data));
    this.ws.on('ping', (data) => this.pings.push(data)); // ws answers by itself
    this.closed = new Promise((resolve) => {
      this.ws.on('close', (code, reason) => {
        this.push(null);
        resolve({ code, reason: reason.toString() });
      });
    });
    this.ws.on('error', (e) => {
      this.error = e;
    });
  }
  push(m) {
    const w = this.waiters.shift();
    if (w) w(m);
    else this.inbox.push(m);
  }
  open() {
    return bounded(
      new Promise((resolve, reject) => {
        this.ws.once('open', resolve);
        this.ws.once('error', reject);
      }),
      'open',
    );
  }
  recv() {
    if (this.inbox.length) return Promise.resolve(this.inbox.shift());
    return bounded(new Promise((resolve) => this.waiters.push(resolve)), 'message');
  }
  send(data, opts = {}) {
    return bounded(
      new Promise((resolve, reject) => this.ws.send(data, opts, (e) => (e ? reject(e) : resolve()))),
      'send',
    );
  }
  async echo(c, msg, fragments) {
    const binary = typeof msg !== 'string';
    if (fragments) {
      for (let i = 0; i < fragments.length; i++) {
        await this.send(fragments[i], { binary, fin: i === fragments.length - 1 });
      }
    } else {
      await this.send(msg, { binary });
    }
    const got = await this.recv();
    if (got === null) return report(c, false, { error: 'closed before the echo' });
    const same = binary
      ? got.isBinary && Buffer.compare(got.data, msg) === 0
      : !got.isBinary && got.data.toString('utf8') === msg;
    report(c, same, { len: got.data.length, binary: got.isBinary });
  }
  close(code, reason) {
    this.ws.close(code, reason);
    return bounded(this.closed, 'close');
  }
}

async function waitFor(cond, what) {
  const start = Date.now();
  while (!cond()) {
    if (Date.now() - start > STEP) throw new Error(`timed out: ${what}`);
    await sleep(5);
  }
  return (Date.now() - start) / 1000;
}

async function caseIdle(c) {
  const after = await waitFor(() => c.pings.length > 0, "the server's ping");
  report('server_ping', c.pings[0].length === 0, { after, payload: c.pings[0].toString('hex') });
  await c.echo('idle_echo', 'still here');
  const { code } = await c.close(1000);
  report('idle_close', code === 1000, { code });
}

async function caseEcho() {
  const c = new Client(MAIN);
  await c.open();
  const ext = c.ws.extensions;
  report('no_extension', ext === '', { extensions: ext });
  await c.echo('echo_text', 'hello wsloop \u2713 \u{1f600}');
  await c.echo('echo_binary', Buffer.from([...Array(256).keys()]));
  await c.echo('echo_empty_text', '');
  await c.echo('echo_empty_binary', Buffer.alloc(0));
  await c.echo('fragmented_text', 'frag-ment-ed \u2713', ['frag-', 'ment-', 'ed \u2713']);
  // A text message whose fragments split a character: U+2713 is e2 9c 93 in UTF-8.
  const check = Buffer.from('\u2713\u2713');
  await c.echo('fragmented_text_split_utf8', '\u2713\u2713', [
    check.subarray(0, 2),
    check.subarray(2, 4),
    check.subarray(4),
  ]);
  const pieces = [0, 1, 2, 3].map((i) => Buffer.alloc(1000, i));
  await c.echo('fragmented_binary', Buffer.concat(pieces), pieces);
  const payload = Buffer.from('are you there');
  c.ws.ping(payload);
  await waitFor(() => c.pongs.length > 0, 'the pong');
  const pong = c.pongs[0];
  report('ping', pong !== undefined && Buffer.compare(pong, payload) === 0, {
    pong: pong === undefined ? null : pong.toString(),
  });
  // The server answers with the same code (RFC 6455 section 5.5.1); the reason is its own.
  const { code, reason } = await c.close(4001, 'x');
  report('client_close', code === 4001, { code, reason });
}

async function caseLarge() {
  const c = new Client(MAIN);
  await c.open();
  await c.echo('large_binary', crypto.randomBytes(LIMIT));
  let text = '';
  for (let i = 0; i < 26; i++) text += String.fromCharCode(0x61 + i);
  await c.echo('large_text', text.repeat(Math.ceil(LIMIT / 26)).slice(0, LIMIT));
  const { code } = await c.close(1000);
  report('large_close', code === 1000, { code });
}

async function closedByServer(c) {
  const m = await c.recv();
  if (m !== null) return { code: 'unexpected message', reason: String(m.data).slice(0, 100) };
  return bounded(c.closed, 'close');
}

async function caseTooBig() {
  const c = new Client(MAIN);
  await c.open();
  c.ws.send(Buffer.alloc(LIMIT + 1), () => {}); // may fail once the server has closed
  const { code, reason } = await closedByServer(c);
  report('too_big', code === 1009, { code, reason });
}

async function caseServerClose() {
  const c = new Client(MAIN);
  await c.open();
  await c.send('close-me');
  const { code, reason } = await closedByServer(c);
  report('server_close', code === 4000 && reason === 'bye', { code, reason });
}

async function caseSubprotocol() {
  const c = new Client(PROTO, ['chat.v2', 'chat.v1']);
  await c.open();
  report('subprotocol', c.ws.protocol === 'chat.v1', { subprotocol: c.ws.protocol });
  await c.echo('subprotocol_echo', 'hi');
  const { code } = await c.close(1000);
  report('subprotocol_close', code === 1000, { code });
}

async function guarded(name, f) {
  try {
    await f();
  } catch (e) {
    report(name, false, { error: String(e && e.stack ? e.stack : e) });
  }
}

async function main() {
  // The idle connection opens first and stays silent (until the server pings it) while the
  // others run one after another.
  const idle = new Client(MAIN);
  await idle.open();
  await Promise.all([
    guarded('idle', () => caseIdle(idle)),
    (async () => {
      await guarded('echo', caseEcho);
      await guarded('large', caseLarge);
      await guarded('too_big', caseTooBig);
      await guarded('server_close', caseServerClose);
    })(),
  ]);
  await guarded('subprotocol', caseSubprotocol);
}

main().then(
  () => process.exit(failures ? 1 : 0),
  (e) => {
    report('main', false, { error: String(e && e.stack ? e.stack : e) });
    process.exit(1);
  },
);
