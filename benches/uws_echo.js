// The uWebSockets.js peer of benches/compare.sh: an echo server on µWebSockets' native loop
// (npm @trufflesuite/uws-js-unofficial, installed by compare.sh into a temporary folder); with
// --pubsub, the peer of `wsloop --pubsub` for benches/pubsub.sh: a topic server where a
// client's request path is its topic, and every message it sends is published with
// `app.publish` to every subscriber of that topic, the sender included.
//
// That package silently falls back to a pure-JS implementation on the `ws` module when its
// native binary does not load; a benchmark against that would be meaningless, so this script
// loads the native binary itself first and refuses to run (exit 3) unless the package's export
// is that very native module.
//
//   node benches/uws_echo.js [--listen 127.0.0.1:9001] [--max-message-size BYTES] [--workers N]
//                            [--pubsub]
//
// Limits as wsloop's defaults: maxBackpressure 64 KiB (wsloop's --max-backpressure); beyond it
// µWebSockets skips the message for that subscriber (closeOnBackpressureLimit off), as
// `wsloop --backpressure-policy drop` does. Compression and the idle timeout are off.
//
// With --workers N (the peer of `wsloop --threads N`), N worker threads each run their own App
// listening on the same port; µSockets sets SO_REUSEPORT on Linux, so the kernel spreads the
// connections over them, as it does over wsloop's loops.
"use strict";

const path = require("path");
const { Worker, isMainThread, workerData } = require("worker_threads");

function refuse(why) {
  console.error(`uws_echo: REFUSING TO RUN: ${why}`);
  process.exit(3);
}

let listen = "127.0.0.1:9001";
let maxMessage = 64 * 1024;
let workers = 1;
let pubsub = false;
const argv = isMainThread ? process.argv.slice(2) : workerData.argv;
for (let i = 0; i < argv.length; i++) {
  const value = argv[i + 1];
  if (argv[i] === "--pubsub") pubsub = true;
  else if (argv[i] === "--listen" && value) listen = argv[++i];
  else if (argv[i] === "--max-message-size" && value) maxMessage = Number(argv[++i]);
  else if (argv[i] === "--workers" && Number(value) >= 1) workers = Number(argv[++i]);
  else {
    console.error(
      "usage: node uws_echo.js [--listen HOST:PORT] [--max-message-size BYTES] [--workers N] [--pubsub]"
    );
    process.exit(2);
  }
}
const colon = listen.lastIndexOf(":");
const host = listen.slice(0, colon);
const port = Number(listen.slice(colon + 1));

const PKG = "@trufflesuite/uws-js-unofficial";
if (process.env.UWS_USE_FALLBACK) refuse("UWS_USE_FALLBACK is set");
let pkgDir;
try {
  pkgDir = path.dirname(require.resolve(`${PKG}/package.json`));
} catch (e) {
  refuse(`${PKG} is not installed (set NODE_PATH): ${e.message}`);
}
const binary = path.join(
  pkgDir,
  "binaries",
  `uws_${process.platform}_${process.arch}_${process.versions.modules}.node`
);
let native;
try {
  native = require(binary);
} catch (e) {
  refuse(`the native µWS binary does not load on Node ${process.version}: ${e.message}`);
}
const uWS = require(PKG);
if (uWS !== native || typeof native.App !== "function") {
  refuse(`${PKG} did not export its native binary ${binary} (pure-JS fallback)`);
}

if (isMainThread && workers > 1) {
  // Each worker checks the native binary again and serves on its own thread; this thread only
  // waits. A worker that fails takes the whole peer down, so a benchmark never runs short.
  for (let i = 0; i < workers; i++) {
    const args = ["--listen", listen, "--max-message-size", String(maxMessage)];
    if (pubsub) args.push("--pubsub");
    const w = new Worker(__filename, { workerData: { argv: args, index: i } });
    w.on("error", (e) => refuse(`worker ${i}: ${e.message}`));
    w.on("exit", (code) => {
      console.error(`uws_echo: worker ${i} exited with ${code}`);
      process.exit(code || 1);
    });
  }
  return;
}
const who = isMainThread ? "" : ` (worker ${workerData.index})`;

const limits = {
  compression: uWS.DISABLED,
  maxPayloadLength: maxMessage,
  maxBackpressure: 64 * 1024, // wsloop's default --max-backpressure
  closeOnBackpressureLimit: false, // skip the message, as wsloop's `drop` policy
  idleTimeout: 0, // off, as wsloop's --idle-timeout 0
  sendPingsAutomatically: false,
};
const app = uWS.App();
const behaviour = pubsub
  ? {
      ...limits,
      // The request path is the topic; the upgrade keeps it in the socket's user data.
      upgrade: (res, req, context) => {
        res.upgrade(
          { topic: req.getUrl() },
          req.getHeader("sec-websocket-key"),
          req.getHeader("sec-websocket-protocol"),
          req.getHeader("sec-websocket-extensions"),
          context
        );
      },
      open: (ws) => {
        ws.subscribe(ws.getUserData().topic);
      },
      // app.publish (not ws.publish): every subscriber, the sender included.
      message: (ws, message, isBinary) => {
        app.publish(ws.getUserData().topic, message, isBinary);
      },
    }
  : {
      ...limits,
      message: (ws, message, isBinary) => {
        ws.send(message, isBinary);
      },
    };
app
  .ws("/*", behaviour)
  .listen(host, port, (token) => {
    if (!token) {
      console.error(`uws_echo: cannot listen on ${listen}`);
      process.exit(1);
    }
    const version = require(`${PKG}/package.json`).version;
    console.error(
      `uws_echo: native µWebSockets (${PKG} ${version}, ${path.basename(binary)}) on Node ` +
        `${process.version} listening on ws://${listen}${who}${pubsub ? " (pubsub)" : ""}`
    );
  });
