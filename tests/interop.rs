//! Interop with third-party clients: Python's `websockets`, Node's `ws` and headless Chromium
//! talk to an in-process wsloop (the recording echo server of `tests/common`) on 127.0.0.1.
//! Each client runs as a subprocess from a script in `tests/interop/` and prints one JSON line
//! per case (`{"case": ..., "ok": bool, ...}`); the page run by Chromium POSTs the same lines to
//! a small HTTP server in the test. Each test checks the client's report (every expected case
//! present and passed, with the close codes, reasons and subprotocol it saw) and the server's
//! side: upgrades and opens, each connection's close code and reason, messages received and
//! sent, pings and pongs, close reasons counted, and zero connections and timers at the end.
//!
//! The cases, on separate connections in this order (the server's records are matched by it):
//! an idle connection, opened first and silent while the others run until the server's idle
//! ping has come and the client's automatic pong has been counted, then one echo; echo of text,
//! binary, empty and fragmented messages (a text split inside a character too) and a ping,
//! closed by the client with 4001 "x"; a message of exactly `max_message_size` (1 MiB) of
//! binary and of text; one byte more, closed by the server with 1009; the `close-me` command,
//! closed by the server with 4000 "bye"; and, on a second server, the subprotocol the server
//! picks from the client's offer `["chat.v2", "chat.v1"]`. Every client offers
//! permessage-deflate, which those servers (compression off) decline. The `*_compression` tests
//! run each client against a server on the shared profile instead (`tests/interop/*deflate*`):
//! the 101 names the extension as RFC 7692 asks, JSON, binary, short, large and (but for the
//! page) fragmented messages round-trip, and the server's counters show which arrived and left
//! compressed. Browsers cannot send pings, see the server's, or
//! choose fragmentation: the page skips those cases, learns of the pong from the test's HTTP
//! server (`GET /pongs`), and checks that every close was clean; its servers allow only the
//! page's origin and refuse requests without one.
//!
//! Over wss:// (the server serving TLS itself, with `tests/tls_support`'s test CA): Node's `ws`
//! verifies the server against the CA (the `ca` option; without it the certificate is refused),
//! negotiates TLS 1.3 and ALPN `http/1.1`, echoes a text and a binary message larger than a TLS
//! record and closes cleanly (`tests/interop/node_wss.js`); headless Chromium, trusting exactly
//! the server's key (`--ignore-certificate-errors-spki-list`), runs the deflate page over
//! wss:// against a server with TLS and compression.
//!
//! A missing client (python3 with `websockets`, node with `ws`, chromium) skips its test with a
//! note, unless `CI` is set: then the test fails. How CI installs them: see [`PYTHON_INSTALL`],
//! [`NODE_INSTALL`] and [`CHROMIUM_INSTALL`]. Overrides: `WSLOOP_PYTHON` (interpreter),
//! `WSLOOP_NODE` (node binary), `WSLOOP_INTEROP_NODE_DIR` (the `npm install --prefix` folder
//! holding `node_modules/ws`; default `target/interop-node`), `WSLOOP_CHROMIUM` (browser binary).
// Test code (see Cargo.toml's [lints]): it fails by panicking, and opens descriptors on purpose.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

#[allow(dead_code)]
mod attack_support;
mod child_support;
mod common;
#[allow(dead_code)]
mod tls_support;

use child_support::{Group, TempDir};
use common::*;
use std::collections::BTreeMap;
use std::io::{self, ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};
use wsloop::protocol::deflate::{Deflater, Inflater};
use wsloop::{CloseCode, CloseReason, Compression, Config, Stats};

/// The main servers' `max_message_size`: the large case sends exactly this much, the too-big
/// case one byte more.
const LIMIT: usize = 1 << 20;
/// The main servers' idle timeout: a ping after 2 s of silence, close 2 s later if no answer.
const IDLE_TIMEOUT: Duration = Duration::from_secs(4);
/// Bound on one client run (each of its waits is bounded by 10 s on its own).
const CLIENT_BOUND: Duration = Duration::from_secs(90);
/// Bound on a tool's version probe.
const PROBE_BOUND: Duration = Duration::from_secs(30);

const PYTHON_INSTALL: &str = "python3 -m pip install websockets==17.4";
const NODE_INSTALL: &str = "npm install --prefix target/interop-node ws@8.23.0";
const CHROMIUM_INSTALL: &str = "apt-get install -y chromium";

// ---------------------------------------------------------------------------------------------
// The tests

#[test]
fn python_websockets_client() {
    let python = std::env::var_os("WSLOOP_PYTHON").unwrap_or_else(|| "python3".into());
    let mut probe = Command::new(&python);
    probe
        .args(["-c", "import websockets; print(websockets.__version__)"])
        .env("PYTHONDONTWRITEBYTECODE", "1");
    let Some(version) = probe_tool("python3 with websockets", &mut probe, PYTHON_INSTALL) else {
        return;
    };
    eprintln!("python websockets {version}");
    let mut client = Command::new(&python);
    client
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("PYTHONUNBUFFERED", "1");
    let (main, proto, report) = run_script("python websockets client", client, "python_client.py");
    check_servers(main, proto, &FULL_EXPECT, &report);
}

/// `wsloop --pubsub`: a room of Python `websockets` clients (see `tests/interop/python_room.py`)
/// sees one conversation; the binary's metrics count what it published and delivered.
#[test]
fn python_websockets_room_through_the_binary() {
    let Some(python) = python_with_websockets() else {
        return;
    };
    let w = attack_support::Wsloop::spawn("pubsub", &["--pubsub"]);
    let mut client = Command::new(&python);
    client
        .arg(interop_dir().join("python_room.py"))
        .arg(format!("ws://{}", w.addr))
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("PYTHONUNBUFFERED", "1");
    let report = run_client("python room", &mut client).report();
    report.check_cases(&["room", "elsewhere", "too_long"]);
    let m = w.wait_quiet();
    // 15 messages in the room, each published to the 2 other members (the sender gets its
    // own directly), and one in a room of one.
    assert_eq!(m.get("wsloop_published_total"), 16.0);
    assert_eq!(m.get("wsloop_deliveries_total"), 30.0);
    assert_eq!(m.get("wsloop_subscriptions"), 0.0);
    assert_eq!(m.get("wsloop_topics"), 0.0);
    assert_eq!(m.rejected_status("414"), 1);
    w.stop();
}

#[test]
fn node_ws_client() {
    let node = std::env::var_os("WSLOOP_NODE").unwrap_or_else(|| "node".into());
    let modules = node_dir().join("node_modules");
    let mut probe = Command::new(&node);
    probe
        .args([
            "-e",
            "process.stdout.write(require('ws/package.json').version)",
        ])
        .env("NODE_PATH", &modules);
    let Some(version) = probe_tool("node with ws", &mut probe, NODE_INSTALL) else {
        return;
    };
    eprintln!("node ws {version}");
    let mut client = Command::new(&node);
    client.env("NODE_PATH", &modules);
    let (main, proto, report) = run_script("node ws client", client, "node_client.js");
    assert_eq!(report.str("ping", "pong"), "are you there", "{report}");
    check_servers(main, proto, &FULL_EXPECT, &report);
}

#[test]
fn headless_chromium_page() {
    let Some(chromium) = chromium() else { return };
    let http = TcpListener::bind("127.0.0.1:0").expect("bind the page's HTTP server");
    let origin = format!("http://{}", http.local_addr().unwrap());
    let (main, proto) = servers(Some(origin.clone()));
    let args = client_args(&main, &proto);
    let page = include_str!("interop/browser.html")
        .replace("%%MAIN%%", &args[0])
        .replace("%%PROTO%%", &args[1])
        .replace("%%LIMIT%%", &args[2]);
    let pages = PageServer::start(http, page, main.rec.clone());
    let result = chromium_result(&chromium, &origin, &pages, &[]);
    let report = Report::parse("chromium page", &result, "", None);
    report.check_cases(&BASE_CASES);
    report.check_common();
    for case in [
        "idle_close",
        "client_close",
        "large_close",
        "too_big",
        "server_close",
        "subprotocol_close",
    ] {
        assert_eq!(
            report.field(case, "clean"),
            &Json::Bool(true),
            "{case}: not clean\n{report}"
        );
    }
    drop(pages);
    check_servers(
        main,
        proto,
        &Expect {
            // Idle 1, echo 4 (text, binary, empty text, empty binary), large 2, close-me 1.
            messages: 8,
            pings: 0,
        },
        &report,
    );
}

/// Open `{origin}/page.html` (served by `pages`) in headless Chromium (with the `extra`
/// switches) and wait, bounded by [`CLIENT_BOUND`], for the result the page POSTs; the browser
/// is killed after.
fn chromium_result(chromium: &Path, origin: &str, pages: &PageServer, extra: &[String]) -> String {
    let started = Instant::now();
    let profile = TempDir::new("interop-chromium");
    let log = std::fs::File::create(profile.0.join("chromium.log")).unwrap();
    let mut cmd = Command::new(chromium);
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-extensions",
    ])
    .arg(format!(
        "--user-data-dir={}",
        profile.0.join("profile").display()
    ))
    .args(extra)
    .arg(format!("{origin}/page.html"))
    // Keep the browser's files (crash reports, caches) in the temporary folder too.
    .env("HOME", &profile.0)
    .env("XDG_CONFIG_HOME", profile.0.join("config"))
    .env("XDG_CACHE_HOME", profile.0.join("cache"))
    .stdin(Stdio::null())
    .stdout(log.try_clone().unwrap())
    .stderr(log);
    let mut browser = Group::spawn(&mut cmd).expect("start chromium");
    let log_tail = || {
        let text = std::fs::read_to_string(profile.0.join("chromium.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    };
    // The page POSTs its result; the browser stays up until it is killed.
    let result = loop {
        match pages.results.recv_timeout(Duration::from_millis(100)) {
            Ok(body) => break body,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(e) => panic!("page server: {e}"),
        }
        if browser.exited() {
            browser.kill();
            panic!(
                "chromium exited before the page reported: {:?}\n{}",
                browser.status,
                log_tail()
            );
        }
        if started.elapsed() > CLIENT_BOUND {
            browser.kill();
            panic!(
                "the page did not report within {CLIENT_BOUND:?}\n{}",
                log_tail()
            );
        }
    };
    browser.kill();
    eprintln!(
        "chromium page reported after {:.1} s",
        started.elapsed().as_secs_f64()
    );
    result
}

// ---------------------------------------------------------------------------------------------
// wss:// (TLS in the loop, tests/tls_support's test CA): Node's ws verifying the CA, headless
// Chromium trusting the server's key for the test

/// The test server with TLS on.
fn wss_server(certs: &tls_support::Certs) -> TestServer {
    TestServer::start(Config {
        tls: Some(certs.tls()),
        max_message_size: LIMIT,
        ..config()
    })
}

/// The server's end after one wss client: one handshake completed (over TLS 1.3), two
/// messages echoed, and the connection closed by the client's close; `failed`: the closes of
/// connections whose handshake failed, by reason.
fn check_wss_server(server: TestServer, failed: &[(CloseReason, u64)]) {
    let more: u64 = failed.iter().map(|f| f.1).sum();
    let stats = server.wait_stats("the closes", |s| s.closed_total() == 1 + more);
    assert_eq!(stats.tls_handshakes_ok, 1, "{stats:?}");
    for (reason, n) in failed {
        assert_eq!(stats.tls_handshakes_failed[reason.index()], *n, "{stats:?}");
    }
    assert_eq!(stats.messages_received, 2);
    assert_eq!(stats.tls_connections, [0, 0]);
    assert_eq!(server.rec().closes[0].code, 1000);
    let closed: Vec<_> = [(CloseReason::PeerClosed, 1)]
        .into_iter()
        .chain(failed.iter().copied())
        .collect();
    server.finish_closed(&closed);
}

#[test]
fn node_ws_over_wss_verifies_the_test_ca() {
    let Some((node, modules)) = node_with_ws() else {
        return;
    };
    let Some(certs) = tls_support::certs() else {
        return;
    };
    let server = wss_server(&certs);
    let url = format!("wss://localhost:{}/", server.addr.port());
    let mut client = Command::new(&node);
    client
        .arg(interop_dir().join("node_wss.js"))
        .arg(&url)
        .arg(&certs.ca)
        .env("NODE_PATH", &modules)
        // The CA comes from the `ca` option alone: the untrusted attempt must fail.
        .env_remove("NODE_EXTRA_CA_CERTS");
    let out = run_bounded("node wss", client.stdin(Stdio::null()), CLIENT_BOUND).unwrap();
    let report = out.stdout.trim();
    assert!(
        out.status.success(),
        "node client failed: {report}\n{}",
        out.stderr
    );
    for want in [
        r#""version":"TLSv1.3""#,
        r#""alpn":"http/1.1""#,
        r#""authorized":true"#,
        r#""text":"héllo over wss""#,
        r#""binary_len":102400"#,
        r#""binary_ok":true"#,
        r#""close":1000"#,
        // Without the test CA, Node refuses the certificate.
        r#""untrusted":"UNABLE_TO_VERIFY_LEAF_SIGNATURE""#,
    ] {
        assert!(report.contains(want), "{want} not in {report}");
    }
    // The untrusted attempt's handshake failed on the server too: Node closes without an alert.
    check_wss_server(server, &[(CloseReason::Abnormal, 1)]);
    println!("node ws over wss: {report}");
}

/// The deflate page over wss:// (TLS and the shared compression profile together): JSON,
/// binary, short and large (about 300 KB, many TLS records) messages round-trip compressed.
#[test]
fn headless_chromium_over_wss() {
    let Some(chromium) = chromium() else { return };
    let Some(certs) = tls_support::certs() else {
        return;
    };
    let server = TestServer::start(Config {
        tls: Some(certs.tls()),
        compression: Compression::Shared,
        max_message_size: LIMIT,
        ..config()
    });
    // The browser trusts exactly the server's key (its SubjectPublicKeyInfo's SHA-256), not
    // any certificate: `--ignore-certificate-errors-spki-list`.
    let trust = format!(
        "--ignore-certificate-errors-spki-list={}",
        spki_sha256(&certs.cert)
    );
    let url = format!("wss://localhost:{}/", server.addr.port());
    chromium_deflate_page(&chromium, &server, &url, &[trust]);
    let stats = server.wait_quiet();
    assert_eq!(stats.tls_handshakes_ok, 1, "{stats:?}");
    assert_eq!(
        stats.tls_handshakes_failed.iter().sum::<u64>(),
        0,
        "{stats:?}"
    );
    check_deflate_server(server, 4, 3, 3);
}

/// The base64 SHA-256 of the certificate's SubjectPublicKeyInfo, as Chromium's
/// `--ignore-certificate-errors-spki-list` takes it (openssl CLI).
fn spki_sha256(cert: &Path) -> String {
    let script = "openssl x509 -in \"$0\" -pubkey -noout | openssl pkey -pubin -outform der \
                  | openssl dgst -sha256 -binary | base64";
    let out = run_bounded(
        "spki hash",
        Command::new("sh")
            .args(["-c", script])
            .arg(cert)
            .stdin(Stdio::null()),
        PROBE_BOUND,
    )
    .unwrap();
    assert!(out.status.success(), "{}", out.stderr);
    out.stdout.trim().to_string()
}

// ---------------------------------------------------------------------------------------------
// permessage-deflate: each client against a server on the shared profile

/// The cases every client reports on a compressed connection (see `tests/interop/*deflate*`).
const DEFLATE_CASES: [&str; 5] = [
    "negotiated",
    "echo_json",
    "echo_binary",
    "echo_small",
    "echo_large",
];

/// A server on the shared profile (default threshold, 1024 bytes).
fn deflate_server() -> TestServer {
    TestServer::start(Config {
        compression: Compression::Shared,
        max_message_size: LIMIT,
        ..config()
    })
}

/// The server's side of a compressed run: the 101 answered the shared profile (the client
/// checked the header), `received` messages arrived compressed at least (every message the
/// client compresses: those of 1024 bytes or more for ws, all for the others) and at most
/// `messages`, and exactly `sent` echoes went out compressed (those at or above the threshold).
fn check_deflate_server(server: TestServer, messages: usize, received: u64, sent: u64) {
    let stats = server.wait_quiet();
    assert_eq!(stats.messages_received, messages as u64, "{stats:?}");
    let [inflated, compressed] = stats.compressed_messages;
    assert!(
        (received..=messages as u64).contains(&inflated),
        "{inflated} messages arrived compressed, expected {received} to {messages}"
    );
    assert_eq!(compressed, sent, "echoes sent compressed");
    // The loop holds its compression state (a 15-bit compressor, the decompressor, the buffer
    // of the largest message compressed) and nothing else is left.
    assert!(stats.memory_bytes[3] >= Inflater::HEAP_BYTES + Deflater::heap_bytes(15));
    assert_eq!(stats.memory_bytes[..3], [0, 0, 0], "{stats:?}");
    server.finish();
}

/// Run a client script that fragments too (every case and `fragmented`), then check the
/// server: five messages, `received` of them compressed, four echoes sent compressed.
fn run_deflate_client(who: &str, mut client: Command, server: TestServer, received: u64) {
    let report = run_client(who, &mut client).report();
    let mut cases = DEFLATE_CASES.to_vec();
    cases.push("fragmented");
    report.check_cases(&cases);
    check_deflate_server(server, 5, received, 4);
}

#[test]
fn python_websockets_compression() {
    let Some(python) = python_with_websockets() else {
        return;
    };
    let server = deflate_server();
    let mut client = Command::new(&python);
    client
        .arg(interop_dir().join("python_deflate.py"))
        .arg(format!("ws://{}/", server.addr))
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("PYTHONUNBUFFERED", "1");
    // websockets compresses every message; json, binary, large and fragmented come back
    // compressed, "hi" does not.
    run_deflate_client("python deflate", client, server, 5);
}

/// The dedicated profile with Python `websockets` (which offers `client_max_window_bits`):
/// context takeover both ways, answered as plain `permessage-deflate`; the same messages
/// round-trip, each side referring back to the ones before.
#[test]
fn python_websockets_dedicated_compression() {
    let Some(python) = python_with_websockets() else {
        return;
    };
    let server = dedicated_server();
    let mut client = Command::new(&python);
    client
        .arg(interop_dir().join("python_deflate.py"))
        .arg(format!("ws://{}/", server.addr))
        .arg("permessage-deflate")
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("PYTHONUNBUFFERED", "1");
    run_dedicated_client("python dedicated", client, server, 5);
}

/// The dedicated profile with Node `ws` (context takeover both ways).
#[test]
fn node_ws_dedicated_compression() {
    let Some((node, modules)) = node_with_ws() else {
        return;
    };
    let server = dedicated_server();
    let mut client = Command::new(&node);
    client
        .arg(interop_dir().join("node_deflate.js"))
        .arg(format!("ws://{}/", server.addr))
        .arg("permessage-deflate")
        .env("NODE_PATH", &modules);
    run_dedicated_client("node dedicated", client, server, 4);
}

/// A server on the dedicated profile (default window, memory level and budget).
fn dedicated_server() -> TestServer {
    TestServer::start(Config {
        compression: Compression::Dedicated,
        max_message_size: LIMIT,
        ..config()
    })
}

/// [`run_deflate_client`] for the dedicated profile: the connection had its own state (one
/// dedicated connection while it was open, its bytes reserved from the budget), given back
/// when it ended.
fn run_dedicated_client(who: &str, mut client: Command, server: TestServer, received: u64) {
    let report = run_client(who, &mut client).report();
    let mut cases = DEFLATE_CASES.to_vec();
    cases.push("fragmented");
    report.check_cases(&cases);
    let stats = server.wait_quiet();
    assert_eq!(stats.messages_received, 5, "{stats:?}");
    let [inflated, compressed] = stats.compressed_messages;
    assert!((received..=5).contains(&inflated), "{inflated} inflated");
    assert_eq!(compressed, 4, "echoes sent compressed");
    assert_eq!(stats.compression_downgrades, 0);
    assert_eq!(stats.compression_connections, [0, 0], "ended");
    assert_eq!(
        stats.compression_budget[1], 0,
        "its state's bytes given back"
    );
    server.finish();
}

#[test]
fn node_ws_compression() {
    let Some((node, modules)) = node_with_ws() else {
        return;
    };
    let server = deflate_server();
    let mut client = Command::new(&node);
    client
        .arg(interop_dir().join("node_deflate.js"))
        .arg(format!("ws://{}/", server.addr))
        .env("NODE_PATH", &modules);
    // ws compresses what is 1024 bytes or more: json, binary, large, fragmented.
    run_deflate_client("node deflate", client, server, 4);
}

#[test]
fn headless_chromium_compression() {
    let Some(chromium) = chromium() else { return };
    let server = deflate_server();
    let url = format!("ws://{}/", server.addr);
    chromium_deflate_page(&chromium, &server, &url, &[]);
    // Chromium compresses every message (at least those over the threshold); json, binary and
    // large come back compressed.
    check_deflate_server(server, 4, 3, 3);
}

/// Run `tests/interop/deflate.html` against `url` (served by `server`) in headless Chromium
/// with the `extra` switches; every case must pass.
fn chromium_deflate_page(chromium: &Path, server: &TestServer, url: &str, extra: &[String]) {
    let http = TcpListener::bind("127.0.0.1:0").expect("bind the page's HTTP server");
    let origin = format!("http://{}", http.local_addr().unwrap());
    let page = include_str!("interop/deflate.html").replace("%%URL%%", url);
    let pages = PageServer::start(http, page, server.rec.clone());
    let result = chromium_result(chromium, &origin, &pages, extra);
    drop(pages);
    let report = Report::parse("chromium deflate page", &result, "", None);
    report.check_cases(&DEFLATE_CASES);
}

/// Python with `websockets` (`WSLOOP_PYTHON` or `python3`), if installed (see [`probe_tool`]).
fn python_with_websockets() -> Option<std::ffi::OsString> {
    let python = std::env::var_os("WSLOOP_PYTHON").unwrap_or_else(|| "python3".into());
    let mut probe = Command::new(&python);
    probe
        .args(["-c", "import websockets; print(websockets.__version__)"])
        .env("PYTHONDONTWRITEBYTECODE", "1");
    probe_tool("python3 with websockets", &mut probe, PYTHON_INSTALL)?;
    Some(python)
}

/// Node (`WSLOOP_NODE` or `node`) and the `node_modules` folder holding `ws`, if installed.
fn node_with_ws() -> Option<(std::ffi::OsString, PathBuf)> {
    let node = std::env::var_os("WSLOOP_NODE").unwrap_or_else(|| "node".into());
    let modules = node_dir().join("node_modules");
    let mut probe = Command::new(&node);
    probe
        .args([
            "-e",
            "process.stdout.write(require('ws/package.json').version)",
        ])
        .env("NODE_PATH", &modules);
    probe_tool("node with ws", &mut probe, NODE_INSTALL)?;
    Some((node, modules))
}

// ---------------------------------------------------------------------------------------------
// Cases and expectations

/// The cases every client reports.
const BASE_CASES: [&str; 17] = [
    "server_ping",
    "idle_echo",
    "idle_close",
    "no_extension",
    "echo_text",
    "echo_binary",
    "echo_empty_text",
    "echo_empty_binary",
    "client_close",
    "large_binary",
    "large_text",
    "large_close",
    "too_big",
    "server_close",
    "subprotocol",
    "subprotocol_echo",
    "subprotocol_close",
];

/// The cases of clients that can fragment messages and send pings.
fn with_fragments_and_ping() -> Vec<&'static str> {
    let mut cases = BASE_CASES.to_vec();
    cases.extend([
        "fragmented_text",
        "fragmented_text_split_utf8",
        "fragmented_binary",
        "ping",
    ]);
    cases
}

/// What the main server must have seen.
struct Expect {
    /// Messages received (all but `close-me` are echoed).
    messages: usize,
    /// Pings received by the main server.
    pings: usize,
}

/// Python and node: idle 1, echo 7 (text, binary, empty text, empty binary, two fragmented texts,
/// fragmented binary), large 2, close-me 1; one ping.
const FULL_EXPECT: Expect = Expect {
    messages: 11,
    pings: 1,
};

/// The main server (1 MiB messages, 4 s idle timeout) and the subprotocol server (also accepts
/// with "chat.v1"). With `origin`, both allow only that origin and refuse requests without one.
fn servers(origin: Option<String>) -> (TestServer, TestServer) {
    let mut cfg = Config {
        max_message_size: LIMIT,
        idle_timeout: IDLE_TIMEOUT,
        ..config()
    };
    if let Some(origin) = origin {
        cfg.allowed_origins = vec![origin];
        cfg.allow_missing_origin = false;
    }
    let main = TestServer::start(cfg.clone());
    let proto = TestServer::start_with(
        cfg,
        Opts {
            subprotocol: Some("chat.v1".into()),
            ..Opts::default()
        },
    );
    (main, proto)
}

/// Run the client `script` of `tests/interop` with `interpreter` (its environment set) against
/// fresh [`servers`]; its report, checked for every case of a client that fragments and pings
/// and for what every client must see.
fn run_script(
    who: &str,
    mut interpreter: Command,
    script: &str,
) -> (TestServer, TestServer, Report) {
    let (main, proto) = servers(None);
    let out = run_client(
        who,
        interpreter
            .arg(interop_dir().join(script))
            .args(client_args(&main, &proto)),
    );
    let report = out.report();
    report.check_cases(&with_fragments_and_ping());
    report.check_common();
    (main, proto, report)
}

/// The scripts' arguments: MAIN_URL PROTO_URL MAX_MESSAGE_SIZE.
fn client_args(main: &TestServer, proto: &TestServer) -> [String; 3] {
    [
        format!("ws://{}/", main.addr),
        format!("ws://{}/", proto.addr),
        LIMIT.to_string(),
    ]
}

/// The server side of every client's run.
fn check_servers(main: TestServer, proto: TestServer, want: &Expect, report: &Report) {
    // Shown with a failure below (the test harness prints what a failing test wrote).
    eprintln!("{report}");
    // In the order the connections opened (the per-connection data counts upgrades).
    let main_closes: [(u16, Option<&str>); 5] = [
        (1000, Some("")),  // idle
        (4001, Some("x")), // echo: the client's code and reason
        (1000, Some("")),  // large
        (1009, None),      // too big: our code
        (4000, Some("bye")),
    ];
    let echoed = want.messages - 1; // all but close-me
    let stats = check_server(
        "main server",
        &main,
        &main_closes,
        (want.messages, echoed),
        want.pings,
    );
    assert_closed(
        &stats,
        &[
            (CloseReason::PeerClosed, 3),
            (CloseReason::ClosedByServer, 1),
            (CloseReason::Protocol(CloseCode(1009)), 1),
        ],
    );
    assert!(
        main.rec().pongs >= 1,
        "the idle client answered no ping: {:?}",
        *main.rec()
    );
    let stats = check_server("subprotocol server", &proto, &[(1000, Some(""))], (1, 1), 0);
    assert_closed(&stats, &[(CloseReason::PeerClosed, 1)]);
    main.finish();
    proto.finish();
}

/// Wait for every close, then check the record: one upgrade and one open per connection, each
/// connection's close code and reason (`None`: any reason), the messages received and sent,
/// and the pings received. Returns the stats once the server is quiet (no connection, no
/// timer).
fn check_server(
    name: &str,
    server: &TestServer,
    closes: &[(u16, Option<&str>)],
    (messages, sent): (usize, usize),
    pings: usize,
) -> Stats {
    server.wait_closes(closes.len());
    let stats = server.wait_quiet();
    let r = server.rec();
    check_open_close_pairs(&r);
    assert_eq!(r.upgrades, closes.len(), "{name}: upgrades {r:?}");
    assert_eq!(r.opens.len(), closes.len(), "{name}: opens {r:?}");
    let mut got = r.closes.clone();
    got.sort_by_key(|c| c.data);
    for (i, (c, (code, reason))) in got.iter().zip(closes).enumerate() {
        assert_eq!(c.data, i as u64 + 1, "{name}: {got:?}");
        assert_eq!(c.code, *code, "{name}: connection {}: {got:?}", i + 1);
        if let Some(reason) = reason {
            assert_eq!(c.reason, *reason, "{name}: connection {}: {got:?}", i + 1);
        }
    }
    assert_eq!(r.messages, messages, "{name}: messages {r:?}");
    assert_eq!(r.pings, pings, "{name}: pings {r:?}");
    assert_eq!(
        stats.messages_received, messages as u64,
        "{name}: {stats:?}"
    );
    assert_eq!(stats.messages_sent, sent as u64, "{name}: {stats:?}");
    assert_eq!(stats.connections, 0, "{name}: {stats:?}");
    stats
}

// ---------------------------------------------------------------------------------------------
// Client reports: one flat JSON object per line

/// A JSON value of the flat objects the clients print.
#[derive(Clone, Debug, PartialEq)]
enum Json {
    Null,
    Bool(bool),
    Num(f64),
    Str(String),
}

/// What one client run reported.
struct Report {
    who: String,
    cases: Vec<BTreeMap<String, Json>>,
    /// The raw output, for failure messages.
    raw: String,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "--- {} reported:\n{}", self.who, self.raw)
    }
}

impl Report {
    fn parse(who: &str, stdout: &str, stderr: &str, status: Option<ExitStatus>) -> Report {
        let raw = format!("{stdout}--- stderr:\n{stderr}--- exit status: {status:?}\n");
        let cases = stdout
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                parse_json_object(l)
                    .unwrap_or_else(|e| panic!("{who}: bad report line {l:?}: {e}\n{raw}"))
            })
            .collect();
        let report = Report {
            who: who.to_string(),
            cases,
            raw,
        };
        if let Some(status) = status {
            assert!(status.success(), "{who} failed\n{report}");
        }
        report
    }

    /// Exactly the `expected` cases were reported, once each, and all passed.
    fn check_cases(&self, expected: &[&str]) {
        let mut names: Vec<&str> = self
            .cases
            .iter()
            .map(|c| match c.get("case") {
                Some(Json::Str(s)) => s.as_str(),
                _ => panic!("a line without \"case\"\n{self}"),
            })
            .collect();
        for c in &self.cases {
            assert_eq!(
                c.get("ok"),
                Some(&Json::Bool(true)),
                "failed: {c:?}\n{self}"
            );
        }
        names.sort_unstable();
        let mut want = expected.to_vec();
        want.sort_unstable();
        assert_eq!(names, want, "cases reported\n{self}");
    }

    /// The values every client reports alike.
    fn check_common(&self) {
        // The server echoes the client's close code (the server's on_close sees its reason).
        assert_eq!(self.num("client_close", "code"), 4001.0, "{self}");
        assert_eq!(self.num("server_close", "code"), 4000.0, "{self}");
        assert_eq!(self.str("server_close", "reason"), "bye", "{self}");
        assert_eq!(self.num("too_big", "code"), 1009.0, "{self}");
        assert_eq!(self.str("subprotocol", "subprotocol"), "chat.v1", "{self}");
        assert_eq!(self.num("large_binary", "len"), LIMIT as f64, "{self}");
        assert_eq!(self.num("large_text", "len"), LIMIT as f64, "{self}");
    }

    fn field(&self, case: &str, key: &str) -> &Json {
        let c = self
            .cases
            .iter()
            .find(|c| c.get("case") == Some(&Json::Str(case.into())))
            .unwrap_or_else(|| panic!("no case {case}\n{self}"));
        c.get(key)
            .unwrap_or_else(|| panic!("case {case} has no {key}\n{self}"))
    }

    fn num(&self, case: &str, key: &str) -> f64 {
        match self.field(case, key) {
            Json::Num(n) => *n,
            other => panic!("{case}.{key} is {other:?}, not a number\n{self}"),
        }
    }

    fn str(&self, case: &str, key: &str) -> &str {
        match self.field(case, key) {
            Json::Str(s) => s,
            other => panic!("{case}.{key} is {other:?}, not a string\n{self}"),
        }
    }
}

/// Parse one flat JSON object: string keys; string, number, boolean or null values.
fn parse_json_object(line: &str) -> Result<BTreeMap<String, Json>, String> {
    struct P<'a> {
        s: &'a [u8],
        i: usize,
    }
    impl P<'_> {
        fn ws(&mut self) {
            while self.i < self.s.len() && self.s[self.i].is_ascii_whitespace() {
                self.i += 1;
            }
        }
        fn next(&mut self) -> Result<u8, String> {
            let b = *self.s.get(self.i).ok_or("unexpected end")?;
            self.i += 1;
            Ok(b)
        }
        fn eat(&mut self, want: u8) -> Result<(), String> {
            self.ws();
            match self.next()? {
                b if b == want => Ok(()),
                b => Err(format!(
                    "expected {:?} at {}, got {:?}",
                    want as char, self.i, b as char
                )),
            }
        }
        fn hex4(&mut self) -> Result<u32, String> {
            let h = self.s.get(self.i..self.i + 4).ok_or("short \\u escape")?;
            self.i += 4;
            u32::from_str_radix(std::str::from_utf8(h).map_err(|e| e.to_string())?, 16)
                .map_err(|e| e.to_string())
        }
        fn string(&mut self) -> Result<String, String> {
            self.eat(b'"')?;
            let mut out = Vec::new();
            loop {
                match self.next()? {
                    b'"' => return String::from_utf8(out).map_err(|e| e.to_string()),
                    b'\\' => {
                        let c = match self.next()? {
                            b'"' => '"',
                            b'\\' => '\\',
                            b'/' => '/',
                            b'b' => '\u{8}',
                            b'f' => '\u{c}',
                            b'n' => '\n',
                            b'r' => '\r',
                            b't' => '\t',
                            b'u' => {
                                let hi = self.hex4()?;
                                let cp = if (0xd800..0xdc00).contains(&hi) {
                                    if self.next()? != b'\\' || self.next()? != b'u' {
                                        return Err("lone surrogate".into());
                                    }
                                    let lo = self.hex4()?;
                                    if !(0xdc00..0xe000).contains(&lo) {
                                        return Err("bad low surrogate".into());
                                    }
                                    0x10000 + ((hi - 0xd800) << 10) + (lo - 0xdc00)
                                } else {
                                    hi
                                };
                                char::from_u32(cp).ok_or("bad \\u escape")?
                            }
                            b => return Err(format!("bad escape \\{}", b as char)),
                        };
                        out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes());
                    }
                    b => out.push(b),
                }
            }
        }
        fn value(&mut self) -> Result<Json, String> {
            self.ws();
            let rest = &self.s[self.i..];
            for (word, v) in [
                (&b"true"[..], Json::Bool(true)),
                (b"false", Json::Bool(false)),
                (b"null", Json::Null),
            ] {
                if rest.starts_with(word) {
                    self.i += word.len();
                    return Ok(v);
                }
            }
            if rest.first() == Some(&b'"') {
                return self.string().map(Json::Str);
            }
            let len = rest
                .iter()
                .position(|b| !matches!(b, b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E'))
                .unwrap_or(rest.len());
            let n = std::str::from_utf8(&rest[..len]).unwrap();
            self.i += len;
            n.parse()
                .map(Json::Num)
                .map_err(|_| format!("unsupported value at {}", self.i - len))
        }
    }
    let mut p = P {
        s: line.as_bytes(),
        i: 0,
    };
    let mut map = BTreeMap::new();
    p.eat(b'{')?;
    p.ws();
    if p.s.get(p.i) == Some(&b'}') {
        p.i += 1;
    } else {
        loop {
            p.ws();
            let key = p.string()?;
            p.eat(b':')?;
            let value = p.value()?;
            map.insert(key, value);
            p.ws();
            match p.next()? {
                b',' => {}
                b'}' => break,
                b => return Err(format!("expected , or }} at {}, got {:?}", p.i, b as char)),
            }
        }
    }
    p.ws();
    if p.i != p.s.len() {
        return Err(format!("trailing bytes at {}", p.i));
    }
    Ok(map)
}

// ---------------------------------------------------------------------------------------------
// Subprocesses: each in its own process group, killed with it, every wait bounded (see
// `tests/child_support`)

/// A client's exit status and output.
struct Output {
    who: String,
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl Output {
    /// The report on stdout; the client must have exited with 0.
    fn report(&self) -> Report {
        Report::parse(&self.who, &self.stdout, &self.stderr, Some(self.status))
    }
}

/// Run `cmd` with piped output, bounded by [`CLIENT_BOUND`]: on timeout its group is killed
/// and the test fails with what it printed.
fn run_client(who: &str, cmd: &mut Command) -> Output {
    run_bounded(who, cmd.stdin(Stdio::null()), CLIENT_BOUND).unwrap_or_else(|e| {
        panic!("cannot run {who}: {e}");
    })
}

fn run_bounded(who: &str, cmd: &mut Command, bound: Duration) -> io::Result<Output> {
    let started = Instant::now();
    let run = child_support::run_bounded(cmd, bound)?;
    let Some(status) = run.status else {
        panic!(
            "{who} did not finish within {bound:?}\n{}--- stderr:\n{}",
            run.stdout, run.stderr
        );
    };
    eprintln!("{who} finished in {:.1} s", started.elapsed().as_secs_f64());
    Ok(Output {
        who: who.to_string(),
        status,
        stdout: run.stdout,
        stderr: run.stderr,
    })
}

// ---------------------------------------------------------------------------------------------
// Finding the tools

fn interop_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop")
}

/// The `npm install --prefix` folder holding `node_modules/ws`.
fn node_dir() -> PathBuf {
    std::env::var_os("WSLOOP_INTEROP_NODE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/interop-node"))
}

/// A tool is missing: with `CI` set the test fails, otherwise it prints a note and is skipped.
fn missing(what: &str, why: &str, install: &str) {
    child_support::missing("interop", what, why, install);
}

/// Run a version probe; its trimmed stdout, or `None` after [`missing`].
fn probe_tool(what: &str, cmd: &mut Command, install: &str) -> Option<String> {
    match run_bounded(
        &format!("{what} probe"),
        cmd.stdin(Stdio::null()),
        PROBE_BOUND,
    ) {
        Ok(out) if out.status.success() => Some(out.stdout.trim().to_string()),
        Ok(out) => {
            // The error's line (a stack trace may follow it), else the last line.
            let err = out.stderr.trim();
            let line = err
                .lines()
                .find(|l| l.contains("Error") || l.contains("error"))
                .or(err.lines().last())
                .unwrap_or("probe failed");
            missing(what, line.trim(), install);
            None
        }
        Err(e) => {
            missing(what, &e.to_string(), install);
            None
        }
    }
}

/// `WSLOOP_CHROMIUM`, or the first of chromium, chromium-browser, google-chrome on `PATH`.
fn chromium() -> Option<PathBuf> {
    let (found, why) = match std::env::var_os("WSLOOP_CHROMIUM") {
        Some(path) => (Some(PathBuf::from(path)), "WSLOOP_CHROMIUM names no file"),
        None => {
            let path = std::env::var_os("PATH").unwrap_or_default();
            let found = ["chromium", "chromium-browser", "google-chrome"]
                .iter()
                .flat_map(|name| std::env::split_paths(&path).map(move |dir| dir.join(name)))
                .find(|p| p.is_file());
            (found, "not on PATH")
        }
    };
    let found = found.filter(|p| p.is_file());
    if found.is_none() {
        missing("chromium", why, CHROMIUM_INSTALL);
    }
    found
}

// ---------------------------------------------------------------------------------------------
// The page's HTTP server: GET /page.html, GET /pongs, POST /result

struct PageServer {
    results: mpsc::Receiver<String>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl PageServer {
    /// Serve `page` on `listener` (one request per connection, each in its own thread with
    /// bounded reads) until dropped; GET /pongs answers the pongs in `rec`; each POST /result
    /// body arrives on `results`.
    fn start(listener: TcpListener, page: String, rec: Arc<Mutex<Rec>>) -> PageServer {
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, results) = mpsc::channel();
        let page = Arc::new(page);
        let thread = {
            let stop = stop.clone();
            thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((s, _)) => {
                            let (tx, page, rec) = (tx.clone(), page.clone(), rec.clone());
                            thread::spawn(move || {
                                // The browser's requests: one that fails is reported (the
                                // page then reports no result, and the test fails on that).
                                if let Err(e) = serve_one(s, &page, &rec, &tx) {
                                    eprintln!("interop page server: {e}");
                                }
                            });
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => {
                            thread::sleep(Duration::from_millis(10))
                        }
                        Err(_) => thread::sleep(Duration::from_millis(10)),
                    }
                }
            })
        };
        PageServer {
            results,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for PageServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve_one(
    mut s: TcpStream,
    page: &str,
    rec: &Mutex<Rec>,
    results: &mpsc::Sender<String>,
) -> io::Result<()> {
    s.set_nonblocking(false)?;
    s.set_read_timeout(Some(READ_TIMEOUT))?;
    s.set_write_timeout(Some(READ_TIMEOUT))?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > 64 * 1024 {
            return Ok(());
        }
        let n = s.read(&mut chunk)?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut request_line = head.lines().next().unwrap_or("").split(' ');
    let (method, path) = (request_line.next(), request_line.next());
    let length: usize = head
        .lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(n, _)| n.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0);
    let mut body = buf[head_end..].to_vec();
    while body.len() < length {
        let n = s.read(&mut chunk)?;
        if n == 0 {
            break;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    let pongs;
    let (status, kind, content) = match (method, path) {
        (Some("GET"), Some("/page.html")) => ("200 OK", "text/html; charset=utf-8", page),
        (Some("GET"), Some("/pongs")) => {
            pongs = rec
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .pongs
                .to_string();
            ("200 OK", "text/plain", pongs.as_str())
        }
        (Some("POST"), Some("/result")) => {
            let _ = results.send(String::from_utf8_lossy(&body).into_owned());
            ("200 OK", "text/plain", "thanks")
        }
        _ => ("404 Not Found", "text/plain", "not found"),
    };
    write!(
        s,
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\n\
         Cache-Control: no-store\r\nConnection: close\r\n\r\n{content}",
        content.len()
    )?;
    s.flush()
}

#[test]
fn report_lines_parse() {
    let line = r#"{"case": "x\u2713\ud83d\ude00", "ok": true, "code": 4001, "n": null, "f": -1.5e1, "s": "a\"b\\c\n"}"#;
    let m = parse_json_object(line).unwrap();
    assert_eq!(m["case"], Json::Str("x\u{2713}\u{1f600}".into()));
    assert_eq!(m["ok"], Json::Bool(true));
    assert_eq!(m["code"], Json::Num(4001.0));
    assert_eq!(m["n"], Json::Null);
    assert_eq!(m["f"], Json::Num(-15.0));
    assert_eq!(m["s"], Json::Str("a\"b\\c\n".into()));
    assert!(parse_json_object("{}").unwrap().is_empty());
    for bad in [
        "",
        "{",
        r#"{"a": [1]}"#,
        r#"{"a": 1} x"#,
        r#"{"a" 1}"#,
        r#"{"a": "\ud83d\u0041"}"#,
    ] {
        assert!(parse_json_object(bad).is_err(), "{bad:?} parsed");
    }
}
