//! Observability: `GET /metrics` (Prometheus text format, checked by `promtool` and by a parser
//! here), exact counter deltas as connections open, are rejected and close, the metrics-only
//! listener, `serve_metrics: false`, `LoopHandle::metrics` from other threads, `/healthz` and the
//! fd audit of the real binary (run as a child process, so that this test process's own sockets
//! are not in its descriptor count), and the operator docs (the README's "Operating wsloop",
//! `docs/alerts.yml`) against the metrics actually served.
//!
//! The fd-leak alarm has its own test binary (`tests/fd_audit.rs`): the audit counts every
//! descriptor of the process, and the tests here run in parallel threads that open sockets.
// Test code (see Cargo.toml's [lints]): it fails by panicking, and opens descriptors on purpose.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

mod child_support;
mod common;

use child_support::Proc;
use common::*;
use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};
use wsloop::{CloseReason, Config};

const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

// ---------------------------------------------------------------------------------------------
// Raw HTTP exchanges that know their exact size on the wire

/// A response read up to the server's EOF, with the number of bytes it took on the wire.
struct Raw {
    status: u16,
    head: String,
    body: String,
    /// Bytes of the request we sent.
    sent: u64,
    /// Bytes of the response (head and body).
    received: u64,
}

/// Send `request` on `s` and read the response head and body up to the server's EOF.
fn exchange_on(s: &mut TcpStream, request: &str) -> Raw {
    s.write_all(request.as_bytes()).expect("send request");
    let head = read_head(s);
    let body = expect_eof(s);
    let status = head
        .get(9..12)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("bad status line in {head:?}"));
    let body = String::from_utf8(body).expect("UTF-8 body");
    let len = head_value(&head, "content-length").map(|v| v.parse::<usize>().unwrap());
    assert_eq!(len, Some(body.len()), "Content-Length of {head:?}");
    Raw {
        status,
        received: (head.len() + body.len()) as u64,
        sent: request.len() as u64,
        head,
        body,
    }
}

fn exchange(addr: SocketAddr, request: &str) -> Raw {
    exchange_on(&mut tcp(addr), request)
}

fn head_value<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.split("\r\n").skip(1).find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// One `GET /metrics` over HTTP, parsed and checked for format.
struct Scrape {
    m: Exposition,
    raw: Raw,
}

fn scrape_on(s: &mut TcpStream, addr: SocketAddr) -> Scrape {
    let raw = exchange_on(s, &get_request(addr, "/metrics"));
    assert_eq!(raw.status, 200, "GET /metrics: {}{}", raw.head, raw.body);
    assert_eq!(head_value(&raw.head, "content-type"), Some(CONTENT_TYPE));
    let m = parse_metrics(&raw.body);
    check_exposition(&m);
    Scrape { m, raw }
}

fn scrape_at(addr: SocketAddr) -> Scrape {
    scrape_on(&mut tcp(addr), addr)
}

/// Scrape the server's WebSocket listener once exactly `conns` connections are held (so that
/// earlier scrapes and clients have finished closing and the numbers are exact).
fn scrape(server: &TestServer, conns: usize) -> Scrape {
    server.wait_stats(&format!("{conns} connections held"), |s| {
        s.connections == conns
    });
    scrape_at(server.addr)
}

// ---------------------------------------------------------------------------------------------
// Format checks

/// What the text format and Prometheus's naming rules require of every exposition: each family
/// has one HELP and then one TYPE before its samples, and its samples are together; counters
/// end in `_total` (and nothing else does); no sample twice; histograms have cumulative
/// `_bucket`s in increasing `le` ending with `+Inf`, which equals `_count`.
fn check_exposition(m: &Exposition) {
    let mut helped = BTreeSet::new();
    let mut kinds: BTreeMap<String, String> = BTreeMap::new();
    let mut done = BTreeSet::new();
    let mut current: Option<String> = None;
    let mut seen = BTreeSet::new();
    let mut enter = |family: &str, current: &mut Option<String>| {
        if current.as_deref() != Some(family) {
            if let Some(prev) = current.take() {
                done.insert(prev);
            }
            assert!(!done.contains(family), "lines of {family} are not together");
            *current = Some(family.to_string());
        }
    };
    for line in &m.lines {
        match line {
            PromLine::Help { name, text } => {
                assert!(helped.insert(name.clone()), "second HELP for {name}");
                assert!(!text.trim().is_empty(), "empty HELP for {name}");
                assert!(!kinds.contains_key(name), "HELP after TYPE for {name}");
                enter(name, &mut current);
            }
            PromLine::Type { name, kind } => {
                assert!(helped.contains(name), "TYPE without HELP first: {name}");
                assert!(
                    kinds.insert(name.clone(), kind.clone()).is_none(),
                    "second TYPE for {name}"
                );
                enter(name, &mut current);
                assert!(name.starts_with("wsloop_"), "unprefixed family {name}");
                match kind.as_str() {
                    "counter" => assert!(name.ends_with("_total"), "counter {name}"),
                    "gauge" | "histogram" => {
                        assert!(!name.ends_with("_total"), "{kind} {name} ends in _total")
                    }
                    other => panic!("unexpected type {other} of {name}"),
                }
            }
            PromLine::Sample(s) => {
                let family = if kinds.contains_key(&s.name) {
                    s.name.clone()
                } else {
                    let base = ["_bucket", "_sum", "_count"]
                        .iter()
                        .find_map(|suffix| s.name.strip_suffix(suffix))
                        .unwrap_or_else(|| panic!("sample {} before its TYPE", s.name));
                    assert_eq!(
                        kinds.get(base).map(String::as_str),
                        Some("histogram"),
                        "sample {} of no declared family",
                        s.name
                    );
                    base.to_string()
                };
                enter(&family, &mut current);
                let mut key: Vec<_> = s.labels.clone();
                key.sort();
                assert!(seen.insert((s.name.clone(), key)), "duplicate sample {s:?}");
                assert!(s.value.is_finite(), "{s:?}");
                if kinds[&family] != "gauge" {
                    assert!(s.value >= 0.0, "negative {s:?}");
                }
            }
        }
    }
    assert!(!kinds.is_empty(), "no metrics at all");
    for (family, kind) in &kinds {
        let samples: Vec<&Sample> = m
            .samples()
            .filter(|s| {
                s.name == *family
                    || s.name
                        .strip_prefix(family.as_str())
                        .is_some_and(|r| ["_bucket", "_sum", "_count"].contains(&r))
            })
            .collect();
        assert!(!samples.is_empty(), "family {family} without samples");
        if kind == "histogram" {
            check_histogram(m, family);
        }
    }
}

fn check_histogram(m: &Exposition, family: &str) {
    let bucket = format!("{family}_bucket");
    let buckets: Vec<(f64, f64)> = m
        .samples()
        .filter(|s| s.name == bucket)
        .map(|s| {
            assert_eq!(s.labels.len(), 1, "{s:?}");
            assert_eq!(s.labels[0].0, "le", "{s:?}");
            let le: f64 = s.labels[0].1.parse().expect("numeric le");
            (le, s.value)
        })
        .collect();
    assert!(buckets.len() >= 2, "{family}: {buckets:?}");
    for w in buckets.windows(2) {
        assert!(w[0].0 < w[1].0, "{family}: le not increasing: {buckets:?}");
        assert!(
            w[0].1 <= w[1].1,
            "{family}: buckets not cumulative: {buckets:?}"
        );
    }
    let (last_le, inf) = *buckets.last().unwrap();
    assert_eq!(last_le, f64::INFINITY, "{family}: last bucket is not +Inf");
    assert_eq!(m.get(&bucket, &[("le", "+Inf")]), Some(inf));
    assert_eq!(inf, m.value(&format!("{family}_count"), &[]), "{family}");
    assert!(m.value(&format!("{family}_sum"), &[]) >= 0.0);
}

#[test]
fn the_format_checks_reject_broken_expositions() {
    // The checks above must fail where they should, or their passing means nothing.
    let good = "# HELP wsloop_x_total X.\n# TYPE wsloop_x_total counter\nwsloop_x_total 1\n\
                # HELP wsloop_h H.\n# TYPE wsloop_h histogram\n\
                wsloop_h_bucket{le=\"0.1\"} 1\nwsloop_h_bucket{le=\"+Inf\"} 2\n\
                wsloop_h_sum 0.3\nwsloop_h_count 2\n";
    check_exposition(&parse_metrics(good));
    let broken = [
        (
            "counter without _total",
            good.replace("wsloop_x_total", "wsloop_x"),
        ),
        ("no HELP", good.replace("# HELP wsloop_x_total X.\n", "")),
        ("no TYPE", good.replace("# TYPE wsloop_h histogram\n", "")),
        (
            "buckets not cumulative",
            good.replace("le=\"0.1\"} 1", "le=\"0.1\"} 3"),
        ),
        (
            "+Inf is not _count",
            good.replace("wsloop_h_count 2", "wsloop_h_count 5"),
        ),
        (
            "family split",
            format!("{good}wsloop_x_total{{a=\"b\"}} 1\n"),
        ),
        ("duplicate", format!("{good}wsloop_h_sum 0.3\n")),
        (
            "bad value",
            good.replace("wsloop_x_total 1", "wsloop_x_total one"),
        ),
        (
            "timestamp",
            good.replace("wsloop_x_total 1", "wsloop_x_total 1 1700000000"),
        ),
    ];
    for (what, text) in broken {
        let caught = std::panic::catch_unwind(|| check_exposition(&parse_metrics(&text)));
        assert!(
            caught.is_err(),
            "the checks accepted an exposition with {what}:\n{text}"
        );
    }
}

/// Every counter (and histogram series) of `a` is still there in `b` and did not go down.
fn check_monotonic(a: &Exposition, b: &Exposition) {
    for s in a.samples() {
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|x| s.name.strip_suffix(x))
            .filter(|base| a.kind(base) == Some("histogram"))
            .unwrap_or(&s.name);
        if matches!(a.kind(family), Some("counter" | "histogram")) {
            let labels: Vec<(&str, &str)> = s
                .labels
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            let later = b.value(&s.name, &labels);
            assert!(later >= s.value, "{s:?} went down to {later}");
        }
    }
}

fn delta(a: &Scrape, b: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    b.m.value(name, labels) - a.m.value(name, labels)
}

/// The non-zero changes of a labelled family between two scrapes, sorted by label value.
fn family_deltas(a: &Scrape, b: &Scrape, name: &str) -> Vec<(String, f64)> {
    let mut d: Vec<(String, f64)> =
        b.m.samples()
            .filter(|s| s.name == name)
            .filter_map(|s| {
                assert_eq!(s.labels.len(), 1, "{s:?}");
                let (k, v) = (&s.labels[0].0, &s.labels[0].1);
                let d = s.value - a.m.value(name, &[(k, v)]);
                (d != 0.0).then(|| (v.clone(), d))
            })
            .collect();
    d.sort_by(|x, y| x.0.cmp(&y.0));
    d
}

/// Expected deltas, sorted as [`family_deltas`] sorts them.
fn owned(pairs: &[(&str, f64)]) -> Vec<(String, f64)> {
    let mut v: Vec<(String, f64)> = pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect();
    v.sort_by(|x, y| x.0.cmp(&y.0));
    v
}

/// Connections by state in one scrape: (handshake, open, closing, refusing).
fn states(s: &Scrape) -> (f64, f64, f64, f64) {
    let v = |state| s.m.value("wsloop_connections", &[("state", state)]);
    (v("handshake"), v("open"), v("closing"), v("refusing"))
}

// ---------------------------------------------------------------------------------------------
// Clients that know their bytes on the wire

/// A raw WebSocket client and the bytes its handshake took each way.
fn upgrade(addr: SocketAddr) -> (TcpStream, u64, u64) {
    let mut s = tcp(addr);
    let req = upgrade_request(addr);
    s.write_all(req.as_bytes()).unwrap();
    let head = read_head(&mut s);
    assert!(head.starts_with("HTTP/1.1 101 "), "upgrade refused: {head}");
    (s, req.len() as u64, head.len() as u64)
}

/// Send `payload` as one masked frame and read the echo; returns (client bytes, server bytes).
fn echo(s: &mut TcpStream, opcode: u8, payload: &[u8]) -> (u64, u64) {
    assert!(payload.len() < 126, "keep the arithmetic simple");
    let f = frame(true, opcode, payload);
    s.write_all(&f).unwrap();
    assert_eq!(expect_frame(s, opcode), payload);
    (f.len() as u64, 2 + payload.len() as u64)
}

/// Close from the client's side; returns (client bytes, server bytes).
fn close(mut s: TcpStream) -> (u64, u64) {
    let f = close_frame(1000, "done");
    s.write_all(&f).unwrap();
    let reply = read_frame(&mut s);
    assert_eq!(reply.opcode, OP_CLOSE, "{reply:?}");
    assert_eq!(reply.close().map(|c| c.0), Some(1000));
    assert!(expect_eof(&mut s).is_empty());
    (f.len() as u64, 2 + reply.payload.len() as u64)
}

fn bad_upgrade(addr: SocketAddr) -> String {
    // No Sec-WebSocket-Key: 400.
    format!(
        "GET /chat HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\n\r\n"
    )
}

/// Echo, a rejected upgrade, a plain GET and a close: what the promtool test scrapes after.
fn some_traffic(addr: SocketAddr) {
    let (mut a, _, _) = upgrade(addr);
    let (mut b, _, _) = upgrade(addr);
    for i in 0..3u8 {
        echo(&mut a, OP_TEXT, format!("hello {i}").as_bytes());
        echo(&mut b, OP_BINARY, &[i; 50]);
    }
    assert_eq!(exchange(addr, &bad_upgrade(addr)).status, 400);
    assert_eq!(exchange(addr, &get_request(addr, "/")).status, 426);
    close(a);
    drop(b); // without a close frame: counted as abnormal
}

// ---------------------------------------------------------------------------------------------
// promtool

fn find_on_path(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(tool))
        .find(|p| p.is_file())
}

/// `promtool`, or `None` (with a note) when it is missing outside CI. With `CI` set a missing
/// promtool fails the test: CI installs it (Debian package `prometheus`).
fn promtool() -> Option<PathBuf> {
    let found = find_on_path("promtool");
    if found.is_none() {
        child_support::missing(
            "promtool",
            "promtool",
            "not on PATH",
            "apt-get install prometheus",
        );
    }
    found
}

/// Run `promtool args...` with `stdin`, bounded; returns (success, stdout + stderr).
fn run_promtool(tool: &Path, args: &[&str], stdin: &str) -> (bool, String) {
    let mut child = Command::new(tool)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool");
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.as_bytes()).unwrap();
    drop(input);
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = rx
        .recv_timeout(Duration::from_secs(60))
        .unwrap_or_else(|_| {
            // The child we spawned and have not reaped yet.
            if let Some(pid) = rustix::process::Pid::from_raw(pid as i32) {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
            }
            panic!("promtool {args:?} did not finish within 60 s")
        })
        .expect("promtool output");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn promtool_accepts_metrics_after_traffic() {
    let Some(tool) = promtool() else { return };
    // The checker must reject what it should, or its approval means nothing.
    let bad = "# HELP x_requests Requests.\n# TYPE x_requests counter\nx_requests 1\n";
    let (ok, out) = run_promtool(&tool, &["check", "metrics"], bad);
    assert!(
        !ok,
        "promtool accepted a counter without _total; its output: {out}"
    );

    let server = TestServer::start(config());
    some_traffic(server.addr);
    let stats = server.wait_quiet();
    assert_eq!(stats.messages_received, 6);
    assert_eq!(stats.rejected_status.iter().sum::<u64>(), 2);
    let s = scrape_at(server.addr);
    let closed = |reason| {
        s.m.value("wsloop_connections_closed_total", &[("reason", reason)])
    };
    assert_eq!((closed("peer_closed"), closed("abnormal")), (1.0, 1.0));
    let (ok, out) = run_promtool(&tool, &["check", "metrics"], &s.raw.body);
    assert!(
        ok,
        "promtool check metrics failed:\n{out}\n--- metrics:\n{}",
        s.raw.body
    );
    // Lint findings fail the check and are printed; a clean pass prints nothing.
    assert!(out.trim().is_empty(), "promtool said: {out}");
    server.finish();
}

#[test]
fn alert_rules_in_docs_pass_promtool() {
    let rules = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/alerts.yml");
    let text = std::fs::read_to_string(&rules).expect("docs/alerts.yml");
    // Every metric the rules use exists.
    let server = TestServer::start(config());
    let m = parse_metrics(&server.handle.metrics().expect("metrics"));
    let families = m.families();
    for word in text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
        if word.starts_with("wsloop_") {
            assert!(
                families.iter().any(|f| f == word),
                "docs/alerts.yml uses {word}, which /metrics does not serve"
            );
        }
    }
    server.finish();
    let Some(tool) = promtool() else { return };
    let (ok, out) = run_promtool(&tool, &["check", "rules", rules.to_str().unwrap()], "");
    assert!(ok, "promtool check rules docs/alerts.yml failed:\n{out}");
    // The rules' unit tests: each alert fires on the series it is meant for, and only then.
    let tests = rules.with_file_name("alerts_test.yml");
    let (ok, out) = run_promtool(&tool, &["test", "rules", tests.to_str().unwrap()], "");
    assert!(
        ok,
        "promtool test rules docs/alerts_test.yml failed:\n{out}"
    );
}

#[test]
fn operating_docs_list_every_metric() {
    let doc = Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md");
    let text = std::fs::read_to_string(doc).expect("README.md");
    // The table's rows: "| `name` | type | labels | meaning |".
    let rows: BTreeMap<String, Vec<&str>> = text
        .lines()
        .filter(|l| l.starts_with("| `wsloop_"))
        .map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            (cells[1].trim_matches('`').to_string(), cells)
        })
        .collect();
    let server = TestServer::start(config());
    let m = parse_metrics(&server.handle.metrics().expect("metrics"));
    server.finish();
    let documented: BTreeSet<&String> = rows.keys().collect();
    let families = m.families();
    let served: BTreeSet<&String> = families.iter().collect();
    assert_eq!(
        documented, served,
        "the README metrics table and /metrics differ"
    );
    for family in &families {
        let row = &rows[family];
        assert_eq!(Some(row[2]), m.kind(family), "type of {family} in the docs");
        // Every label value served is listed in the row's labels cell, as `value`.
        let of_family = |name: &str| {
            name.strip_prefix(family.as_str())
                .is_some_and(|r| ["", "_bucket", "_sum", "_count"].contains(&r))
        };
        for s in m.samples().filter(|s| of_family(&s.name)) {
            for (k, v) in &s.labels {
                assert!(
                    row[3].contains(&format!("`{k}`")) && row[3].contains(&format!("`{v}`")),
                    "README.md: {family} does not list {k}={v:?}"
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Values

#[test]
fn values_move_as_connections_open_are_rejected_and_close() {
    let server = TestServer::start(config());
    let addr = server.addr;

    // A fresh server: only the scrape itself has happened (it is the one connection, still in
    // its handshake while the metrics are rendered).
    let s0 = scrape(&server, 0);
    assert_eq!(states(&s0), (1.0, 0.0, 0.0, 0.0));
    assert_eq!(s0.m.value("wsloop_connections_accepted_total", &[]), 1.0);
    assert_eq!(
        s0.m.value("wsloop_received_bytes_total", &[]),
        s0.raw.sent as f64
    );
    assert_eq!(s0.m.value("wsloop_sent_bytes_total", &[]), 0.0);
    for name in [
        "wsloop_messages_received_total",
        "wsloop_messages_sent_total",
        "wsloop_accept_paused",
        "wsloop_queued_bytes",
    ] {
        assert_eq!(s0.m.value(name, &[]), 0.0, "{name}");
    }
    for family in [
        "wsloop_connections_closed_total",
        "wsloop_handshakes_rejected_total",
        "wsloop_admission_rejections_total",
        "wsloop_accept_errors_total",
    ] {
        let nonzero: Vec<_> =
            s0.m.samples()
                .filter(|s| s.name == family && s.value != 0.0)
                .collect();
        assert!(nonzero.is_empty(), "{nonzero:?}");
    }
    assert!(s0.m.value("wsloop_loop_turns_total", &[]) >= 1.0);
    assert_eq!(
        s0.m.value("wsloop_connections_max", &[]),
        server.stats().max_connections as f64
    );

    // Two clients open.
    let (mut a, a_req, a_resp) = upgrade(addr);
    let (mut b, b_req, b_resp) = upgrade(addr);
    server.wait_open(2);
    let s1 = scrape(&server, 2);
    assert_eq!(states(&s1), (1.0, 2.0, 0.0, 0.0));
    // Accepted: the two clients and this scrape. Closed: the previous scrape.
    assert_eq!(
        delta(&s0, &s1, "wsloop_connections_accepted_total", &[]),
        3.0
    );
    assert_eq!(
        family_deltas(&s0, &s1, "wsloop_connections_closed_total"),
        owned(&[("http_answered", 1.0)])
    );
    // Bytes in: the upgrade requests and this scrape's request; out: the 101 responses and the
    // previous scrape's response (written after its metrics were rendered).
    assert_eq!(
        delta(&s0, &s1, "wsloop_received_bytes_total", &[]),
        (a_req + b_req + s1.raw.sent) as f64
    );
    assert_eq!(
        delta(&s0, &s1, "wsloop_sent_bytes_total", &[]),
        (a_resp + b_resp + s0.raw.received) as f64
    );
    // Timers: only the scrape's handshake deadline (idle timeouts are off in these tests).
    assert_eq!(s1.m.value("wsloop_timers", &[]), 1.0);

    // N echoes on each.
    const N: usize = 7;
    let (mut cin, mut cout) = (0, 0);
    for i in 0..N {
        let (i1, o1) = echo(&mut a, OP_TEXT, text(10 + i, i as u64).as_bytes());
        let (i2, o2) = echo(&mut b, OP_BINARY, &bytes(100 + i, i as u64));
        cin += i1 + i2;
        cout += o1 + o2;
    }
    let s2 = scrape(&server, 2);
    assert_eq!(states(&s2), (1.0, 2.0, 0.0, 0.0));
    assert_eq!(
        delta(&s1, &s2, "wsloop_messages_received_total", &[]),
        (2 * N) as f64
    );
    assert_eq!(
        delta(&s1, &s2, "wsloop_messages_sent_total", &[]),
        (2 * N) as f64
    );
    assert_eq!(
        delta(&s1, &s2, "wsloop_received_bytes_total", &[]),
        (cin + s2.raw.sent) as f64
    );
    assert_eq!(
        delta(&s1, &s2, "wsloop_sent_bytes_total", &[]),
        (cout + s1.raw.received) as f64
    );
    assert_eq!(
        delta(&s1, &s2, "wsloop_connections_accepted_total", &[]),
        1.0
    );
    assert!(family_deltas(&s1, &s2, "wsloop_handshakes_rejected_total").is_empty());

    // A malformed upgrade (400) and a plain GET (426).
    let bad = exchange(addr, &bad_upgrade(addr));
    assert_eq!(bad.status, 400, "{}{}", bad.head, bad.body);
    let plain = exchange(addr, &get_request(addr, "/"));
    assert_eq!(plain.status, 426, "{}{}", plain.head, plain.body);
    let s3 = scrape(&server, 2);
    assert_eq!(states(&s3), (1.0, 2.0, 0.0, 0.0));
    assert_eq!(
        family_deltas(&s2, &s3, "wsloop_handshakes_rejected_total"),
        owned(&[("400", 1.0), ("426", 1.0)])
    );
    assert_eq!(
        s3.m.value("wsloop_handshakes_rejected_total", &[("status", "400")]),
        1.0
    );
    assert_eq!(
        family_deltas(&s2, &s3, "wsloop_connections_closed_total"),
        owned(&[("rejected", 1.0), ("http_answered", 2.0)])
    );
    assert_eq!(
        delta(&s2, &s3, "wsloop_connections_accepted_total", &[]),
        3.0
    );
    assert_eq!(
        delta(&s2, &s3, "wsloop_received_bytes_total", &[]),
        (bad.sent + plain.sent + s3.raw.sent) as f64
    );
    assert_eq!(
        delta(&s2, &s3, "wsloop_sent_bytes_total", &[]),
        (bad.received + plain.received + s2.raw.received) as f64
    );
    assert!(family_deltas(&s2, &s3, "wsloop_admission_rejections_total").is_empty());
    assert_eq!(delta(&s2, &s3, "wsloop_messages_received_total", &[]), 0.0);

    // Both clients close.
    let (ci_a, co_a) = close(a);
    let (ci_b, co_b) = close(b);
    let s4 = scrape(&server, 0);
    assert_eq!(states(&s4), (1.0, 0.0, 0.0, 0.0));
    assert_eq!(
        family_deltas(&s3, &s4, "wsloop_connections_closed_total"),
        owned(&[("peer_closed", 2.0), ("http_answered", 1.0)])
    );
    assert_eq!(
        s4.m.value(
            "wsloop_connections_closed_total",
            &[("reason", "peer_closed")]
        ),
        2.0
    );
    assert_eq!(
        delta(&s3, &s4, "wsloop_received_bytes_total", &[]),
        (ci_a + ci_b + s4.raw.sent) as f64
    );
    assert_eq!(
        delta(&s3, &s4, "wsloop_sent_bytes_total", &[]),
        (co_a + co_b + s3.raw.received) as f64
    );
    assert_eq!(delta(&s3, &s4, "wsloop_messages_sent_total", &[]), 0.0);
    assert_eq!(s4.m.value("wsloop_queued_bytes", &[]), 0.0);
    assert_eq!(s4.m.value("wsloop_queued_bytes_largest", &[]), 0.0);

    // Across all scrapes: counters never go down, the loop keeps turning, and the histogram
    // counts every turn.
    let all = [&s0, &s1, &s2, &s3, &s4];
    for w in all.windows(2) {
        check_monotonic(&w[0].m, &w[1].m);
        assert!(
            delta(w[0], w[1], "wsloop_loop_turns_total", &[]) > 0.0,
            "the loop did not turn between scrapes"
        );
    }
    for s in all {
        assert_eq!(
            s.m.value("wsloop_loop_turn_duration_seconds_count", &[]),
            s.m.value("wsloop_loop_turns_total", &[])
        );
    }

    // The loop's own Stats agree with the last scrape.
    let stats = server.finish();
    assert_closed(
        &stats,
        &[
            (CloseReason::PeerClosed, 2),
            (CloseReason::Rejected(400), 1),
            (CloseReason::HttpAnswered, 6), // five scrapes and the plain GET
        ],
    );
    assert_eq!(stats.accepted, 9);
    assert_eq!(stats.messages_received, (2 * N) as u64);
    assert_eq!(stats.messages_sent, (2 * N) as u64);
}

#[test]
fn connections_are_released_when_clients_leave_not_at_the_close_timeout() {
    // With a close timeout longer than every wait here, only the client's leaving can end
    // these connections in time: the metrics must then show nothing held, and the descriptors
    // must be closed, not kept until the timeout.
    let server = TestServer::start(Config {
        close_timeout: Duration::from_secs(120),
        ..config()
    });
    let addr = server.addr;
    // Answered over plain HTTP; the client reads to EOF and closes.
    assert_eq!(exchange(addr, &get_request(addr, "/")).status, 426);
    server.wait_stats(
        "the plain GET's connection to end on the client's EOF, not at the close timeout",
        |s| s.connections == 0,
    );
    assert_eq!(exchange(addr, &bad_upgrade(addr)).status, 400);
    server.wait_stats(
        "the rejected upgrade's connection to end on the client's EOF, not at the close timeout",
        |s| s.connections == 0,
    );
    scrape_at(addr);
    server.wait_stats(
        "the scrape's connection to end on the client's EOF, not at the close timeout",
        |s| s.connections == 0,
    );
    // A WebSocket client that vanishes without a close frame.
    let (c, _, _) = upgrade(addr);
    server.wait_open(1);
    drop(c);
    server.wait_closes(1);
    let m = parse_metrics(&server.handle.metrics().unwrap());
    assert_eq!(m.value("wsloop_connections", &[("state", "closing")]), 0.0);
    assert_eq!(
        m.value("wsloop_connections_closed_total", &[("reason", "abnormal")]),
        1.0
    );
    let stats = server.finish();
    assert_closed(
        &stats,
        &[
            (CloseReason::HttpAnswered, 2),
            (CloseReason::Rejected(400), 1),
            (CloseReason::Abnormal, 1),
        ],
    );
}

// ---------------------------------------------------------------------------------------------
// Listeners and routes

#[test]
fn metrics_listener_serves_only_metrics_and_health() {
    let (server, admin) = TestServer::start_setup(config(), Opts::default(), |s| {
        s.listen_metrics("127.0.0.1:0".parse().unwrap())
    });
    assert_ne!(admin, server.addr);

    // GET /metrics there: the full exposition. The scrape is the one connection.
    let s = scrape_at(admin);
    assert_eq!(states(&s), (1.0, 0.0, 0.0, 0.0));
    // GET /healthz there: answered (in this process the verdict may be 503, since the fd audit
    // counts this test's own client sockets; tests/fd_audit.rs and the binary test below check
    // the verdict itself).
    let h = http_get(admin, "/healthz");
    assert!(matches!(h.status, 200 | 503), "{h:?}");
    assert_eq!(h.body.matches('\n').count(), 1, "one line: {h:?}");

    // Anything else gets 404: a WebSocket upgrade, other paths, other methods.
    let up = http_request(admin, &upgrade_request(admin));
    assert_eq!(
        (up.status, up.body.as_str()),
        (404, "not found\n"),
        "{up:?}"
    );
    for path in ["/", "/metrics/", "/health", "/chat"] {
        let r = http_get(admin, path);
        assert_eq!(r.status, 404, "GET {path}: {r:?}");
    }
    let post = http_request(
        admin,
        &format!("POST /metrics HTTP/1.1\r\nHost: {admin}\r\nContent-Length: 0\r\n\r\n"),
    );
    assert_eq!(post.status, 404, "{post:?}");
    assert_eq!(
        server.rec().upgrades,
        0,
        "the upgrade hook saw an admin request"
    );

    // Meanwhile the WebSocket listener serves WebSockets (and metrics, by default).
    let (mut c, _, _) = upgrade(server.addr);
    echo(&mut c, OP_TEXT, b"still echoing");
    scrape_at(server.addr);
    close(c);

    let s2 = scrape(&server, 0);
    assert_eq!(
        s2.m.value("wsloop_handshakes_rejected_total", &[("status", "404")]),
        6.0
    );
    let stats = server.finish();
    assert_eq!(stats.rejected_status[wsloop::metrics::status_index(404)], 6);
}

#[test]
fn without_serve_metrics_the_websocket_listener_answers_426() {
    let cfg = Config {
        serve_metrics: false,
        ..config()
    };
    let (server, admin) = TestServer::start_setup(cfg, Opts::default(), |s| {
        s.listen_metrics("127.0.0.1:0".parse().unwrap())
    });
    for path in ["/metrics", "/healthz"] {
        let r = http_get(server.addr, path);
        assert_eq!(r.status, 426, "GET {path}: {r:?}");
        assert_eq!(r.header("upgrade"), Some("websocket"), "{r:?}");
        assert!(!r.body.contains("wsloop_"), "{r:?}");
    }
    // The metrics-only listener serves them either way.
    let s = scrape_at(admin);
    assert_eq!(
        s.m.value("wsloop_handshakes_rejected_total", &[("status", "426")]),
        2.0
    );
    let h = http_get(admin, "/healthz");
    assert!(matches!(h.status, 200 | 503), "{h:?}");
    // WebSockets still work.
    let (mut c, _, _) = upgrade(server.addr);
    echo(&mut c, OP_BINARY, b"\x00\x01");
    close(c);
    server.finish();
}

#[test]
fn loop_handle_metrics_from_other_threads() {
    let server = TestServer::start(config());
    let (mut c, _, _) = upgrade(server.addr);
    for i in 0..3 {
        echo(&mut c, OP_TEXT, format!("m{i}").as_bytes());
    }
    server.wait_open(1);

    let threads: Vec<_> = (0..4)
        .map(|_| {
            let h = server.handle.clone();
            thread::spawn(move || {
                (0..10)
                    .map(|_| h.metrics().expect("the loop is running"))
                    .collect::<Vec<String>>()
            })
        })
        .collect();
    let texts: Vec<String> = threads
        .into_iter()
        .flat_map(|t| t.join().expect("metrics thread"))
        .collect();
    assert_eq!(texts.len(), 40);
    for text in &texts {
        let m = parse_metrics(text);
        check_exposition(&m);
        assert_eq!(m.value("wsloop_messages_received_total", &[]), 3.0);
        assert_eq!(m.value("wsloop_messages_sent_total", &[]), 3.0);
        assert_eq!(m.value("wsloop_connections", &[("state", "open")]), 1.0);
        assert_eq!(m.value("wsloop_connections_accepted_total", &[]), 1.0);
    }

    // The same series as GET /metrics (whose scrape is one more connection in its handshake).
    let via_handle = parse_metrics(&server.handle.metrics().unwrap());
    let via_http = scrape_at(server.addr).m;
    let series = |m: &Exposition| -> BTreeSet<(String, Vec<(String, String)>)> {
        m.samples()
            .map(|s| (s.name.clone(), s.labels.clone()))
            .collect()
    };
    assert_eq!(series(&via_handle), series(&via_http));
    assert_eq!(via_handle.families(), via_http.families());
    assert_eq!(
        via_http.value("wsloop_connections", &[("state", "handshake")]),
        via_handle.value("wsloop_connections", &[("state", "handshake")]) + 1.0
    );
    // Ctx::metrics inside a posted closure is the same renderer.
    let from_ctx = server.handle.query(|_, ctx| ctx.metrics()).unwrap();
    assert_eq!(series(&parse_metrics(&from_ctx)), series(&via_handle));

    close(c);
    let h = server.handle.clone();
    server.finish();
    assert!(h.metrics().is_none(), "metrics from a loop that has ended");
}

// ---------------------------------------------------------------------------------------------
// The binary, as a child process: /healthz, the audit and /proc cross-checks in a process whose
// descriptors are all the server's.

/// The `wsloop` binary running as a child (see `tests/child_support`); killed on drop if still
/// running.
struct Child {
    proc: Proc,
    ws: SocketAddr,
    metrics: Option<SocketAddr>,
}

impl Child {
    fn spawn(args: &[&str]) -> Child {
        // Its log is drained for its whole life, so the child never blocks on stderr.
        let mut proc = Proc::spawn(
            "wsloop",
            Command::new(env!("CARGO_BIN_EXE_wsloop"))
                .args(["--listen", "127.0.0.1:0", "--audit-interval", "0.1"])
                .args(args)
                .env("RUST_LOG", "info"),
        )
        .expect("start the wsloop binary");
        // Started once it has logged its fd budget; the addresses come from the lines before.
        let started = proc.wait_for("wsloop start", Duration::from_secs(30), |log| {
            let before = &log[..log.find("fd budget")?];
            let mut ws = None;
            let mut metrics = Vec::new();
            for line in before.lines() {
                if let Some(rest) = line.split("echo server listening on ws://").nth(1) {
                    ws = Some(rest.trim().parse::<SocketAddr>().unwrap());
                }
                if let Some(rest) = line.split("metrics on http://").nth(1) {
                    let addr = rest.split('/').next().unwrap();
                    metrics.push(addr.parse::<SocketAddr>().unwrap());
                }
            }
            Some((ws, metrics))
        });
        let (ws, metrics) = started.unwrap_or_else(|status| {
            panic!(
                "wsloop did not start ({status:?}); its log:\n{}",
                proc.log()
            )
        });
        let ws = ws.expect("the WebSocket address in the log");
        Child {
            proc,
            ws,
            metrics: metrics.into_iter().find(|a| *a != ws),
        }
    }

    fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// Wait (bounded) until a scrape finds nothing held but itself: one connection (in its
    /// handshake) and its one timer.
    fn wait_quiet(&self) {
        let addr = self.metrics.unwrap_or(self.ws);
        let deadline = Instant::now() + WAIT;
        loop {
            let m = scrape_at(addr).m;
            let held: f64 = ["handshake", "open", "closing", "refusing"]
                .iter()
                .map(|s| m.value("wsloop_connections", &[("state", s)]))
                .sum();
            let timers = m.value("wsloop_timers", &[]);
            if held == 1.0 && timers == 1.0 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "not quiet: {held} connections, {timers} timers"
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// The end of every test: quiet (see [`Child::wait_quiet`]), then SIGTERM, and a bounded
    /// wait for a successful exit.
    fn stop(mut self) {
        self.wait_quiet();
        let status = self.proc.terminate(Duration::from_secs(15));
        let status = status.expect("wsloop did not exit after SIGTERM");
        assert!(status.success(), "wsloop exited with {status}");
    }
}

/// Scrape `addr` of process `pid` and count `/proc/PID/fd` from outside while the scrape's
/// connection is still open, until the two agree (an earlier connection may close in between);
/// bounded. Returns the scrape and the count.
fn scrape_and_count(addr: SocketAddr, pid: u32) -> (Scrape, usize) {
    let deadline = Instant::now() + WAIT;
    loop {
        let mut s = tcp(addr);
        let sc = scrape_on(&mut s, addr);
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .count();
        let counted = sc.m.value("wsloop_process_open_fds", &[]);
        if counted == fds as f64 {
            return (sc, fds);
        }
        assert!(
            Instant::now() < deadline,
            "/proc/{pid}/fd lists {fds}, the process counted {counted}"
        );
        drop(s);
        thread::sleep(Duration::from_millis(20));
    }
}

fn soft_nofile(pid: u32) -> f64 {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let soft = line.split_whitespace().nth(3).unwrap();
    soft.parse().unwrap_or(f64::MAX)
}

#[test]
fn binary_serves_health_and_metrics_and_its_audit_balances() {
    let child = Child::spawn(&["--metrics-listen", "127.0.0.1:0", "--metrics-on-ws"]);
    let admin = child.metrics.expect("the metrics address in the log");

    for addr in [child.ws, admin] {
        let h = http_get(addr, "/healthz");
        assert_eq!((h.status, h.body.as_str()), (200, "ok\n"), "{addr}: {h:?}");
    }

    // Traffic, then the audit: nothing unaccounted.
    let mut ws = common::ws(child.ws);
    for i in 0..5 {
        let msg = tungstenite::Message::text(format!("hello {i}"));
        ws.send(msg.clone()).unwrap();
        assert_eq!(ws.read().unwrap(), msg);
    }
    assert_eq!(http_get(child.ws, "/").status, 426);
    close_client(&mut ws);
    drop(ws);

    // Counted from outside while the scrape's connection is still held, /proc/PID/fd agrees
    // with what the process counted for itself while rendering, and all is accounted for.
    let (s, fds) = scrape_and_count(admin, child.pid());
    assert_eq!(s.m.value("wsloop_fd_audit_difference", &[]), 0.0);
    assert_eq!(s.m.value("wsloop_fd_limit", &[]), soft_nofile(child.pid()));
    assert!(s.m.value("wsloop_fds_accounted", &[]) < fds as f64);
    assert_eq!(s.m.value("wsloop_messages_received_total", &[]), 5.0);
    assert_eq!(
        s.m.value(
            "wsloop_connections_closed_total",
            &[("reason", "peer_closed")]
        ),
        1.0
    );

    // The periodic audit (every 100 ms here) has run and found nothing: /healthz stays ok.
    thread::sleep(Duration::from_millis(300));
    for addr in [child.ws, admin] {
        let h = http_get(addr, "/healthz");
        assert_eq!((h.status, h.body.as_str()), (200, "ok\n"), "{addr}: {h:?}");
    }
    let up = http_request(admin, &upgrade_request(admin));
    assert_eq!(up.status, 404, "{up:?}");
    assert_eq!(http_get(admin, "/nope").status, 404);
    // With CI set, promtool must be there (see `promtool`).
    if let Some(tool) = promtool() {
        let (ok, out) = run_promtool(&tool, &["check", "metrics"], &scrape_at(admin).raw.body);
        assert!(ok, "{out}");
    }
    child.stop();
}

#[test]
fn binary_answers_426_for_metrics_on_the_websocket_port_by_default() {
    assert!(
        !Config::default().serve_metrics,
        "off by default in the library too"
    );
    let child = Child::spawn(&["--metrics-listen", "127.0.0.1:0"]);
    let admin = child.metrics.expect("the metrics address in the log");
    for path in ["/metrics", "/healthz"] {
        let r = http_get(child.ws, path);
        assert_eq!(r.status, 426, "GET {path} on the WebSocket port: {r:?}");
    }
    let h = http_get(admin, "/healthz");
    assert_eq!((h.status, h.body.as_str()), (200, "ok\n"), "{h:?}");
    let s = scrape_at(admin);
    assert_eq!(
        s.m.value("wsloop_handshakes_rejected_total", &[("status", "426")]),
        2.0
    );
    child.stop();
}

/// The metrics-only listener skips the client limits (README, Endpoints): a full server still
/// answers its operators' scrapes and health checks, when they need them most (it used to
/// answer them `503 server at capacity`).
#[test]
fn metrics_listener_answers_when_the_server_is_full() {
    let cfg = Config {
        max_connections: 1,
        ..config()
    };
    let (server, admin) = TestServer::start_setup(cfg, Opts::default(), |s| {
        s.listen_metrics("127.0.0.1:0".parse().unwrap())
    });
    let (c, _, _) = upgrade(server.addr);
    server.wait_open(1);
    let s = scrape_at(admin);
    assert_eq!(s.m.value("wsloop_connections", &[("state", "open")]), 1.0);
    let h = http_get(admin, "/healthz");
    assert_ne!(h.body, "server at capacity", "{h:?}");
    close(c);
    server.finish();
}

/// Reading more than the head from a raw client must see nothing after a refused upgrade on the
/// metrics listener (it answers and closes; no 101, no frames).
#[test]
fn metrics_listener_upgrade_gets_no_websocket() {
    let (server, admin) = TestServer::start_setup(config(), Opts::default(), |s| {
        s.listen_metrics("127.0.0.1:0".parse().unwrap())
    });
    let mut s = tcp(admin);
    s.write_all(upgrade_request(admin).as_bytes()).unwrap();
    s.write_all(&frame(true, OP_TEXT, b"hi")).unwrap();
    let head = read_head(&mut s);
    assert!(head.starts_with("HTTP/1.1 404 "), "{head}");
    assert_eq!(expect_eof(&mut s), b"not found\n");
    assert!(server.rec().opens.is_empty());
    drop(s);
    server.finish();
}
