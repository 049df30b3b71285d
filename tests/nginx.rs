//! wsloop behind a real nginx. Each test starts the `wsloop` binary as children (the helpers of
//! `tests/attack_support`) and its own nginx as a child process: a configuration generated into
//! a temporary folder (`nginx -e stderr -p DIR/ -c DIR/nginx.conf -g 'daemon off;'`, pid file,
//! temp paths and access log in that folder, `error_log stderr`), one worker, listening on
//! 127.0.0.1 ports picked free (bind port 0, close, retry when nginx finds one taken). nginx is
//! stopped with SIGTERM (`kill`), and a guard kills it and its workers if a test fails. Clients
//! connect from chosen loopback addresses (127.0.0.2, 127.0.0.3, ...) so that nginx, whose
//! address 127.0.0.1 is the trusted proxy, reports a client that is not itself.
//!
//! - `http_proxy_echoes_and_balances_over_two_instances`: the usual WebSocket reverse proxy in
//!   front of two wsloop instances: echo of text, binary and 64 KiB messages; both instances
//!   take connections; close codes pass both ways (the client's 4001, the server's 1009 and
//!   the 1001 of a graceful shutdown).
//! - `http_proxy_per_ip_limit_applies_to_the_forwarded_client`: with `--trusted-proxy
//!   127.0.0.1 --max-connections-per-ip 1`, the limit applies to the client nginx appends to
//!   X-Forwarded-For, whatever the client itself claimed in that header (or in a `Forwarded`
//!   header, which the configuration drops).
//! - `http_proxy_client_forwarded_header_does_not_evade_the_per_ip_limit`: without
//!   `proxy_set_header Forwarded "";`, a client's own `Forwarded` header reaches wsloop, which
//!   reads only the header `--forwarded-header` names (X-Forwarded-For by default): the claim
//!   changes nothing, the per-address limit holds.
//! - `http_proxy_metrics_stay_off_the_public_port`: nginx proxies every path, so with
//!   `--metrics-listen 127.0.0.1:0` (and no `--metrics-on-ws`) a GET of /metrics or /healthz
//!   through nginx gets 426 while the private listener serves them.
//! - `http_proxy_read_timeout_and_wsloop_pings`: nginx cuts a silent upgraded connection after
//!   `proxy_read_timeout`; wsloop's idle pings keep a silent client's connection open past it.
//! - `stream_proxy_protocol_names_the_client`: nginx's stream proxy with `proxy_protocol on`
//!   in front of `wsloop --proxy-protocol --trusted-proxy 127.0.0.1`: echo, the per-address
//!   limit on the client the PROXY header names, and 400 for clients that bypass nginx
//!   without a PROXY header (from the proxy's address) or forge one (from elsewhere).
//! - `stream_proxy_protocol_in_front_of_tls`: the same stream proxy in front of a wsloop that
//!   serves TLS itself (`--tls-cert --tls-key --proxy-protocol`): the PROXY header comes in
//!   cleartext before the client's ClientHello; a wss client (rustls) echoes end to end, and
//!   the per-address limit applies to the client nginx names, closed before any TLS work.
//! - `http_proxy_round_robin_over_two_instances_sharing_rooms_through_redis`: the README's
//!   deployment with several instances (two `wsloop --pubsub --redis` behind round robin, one
//!   `redis-server`, see `tests/redis_support`): clients spread over both instances all
//!   receive every message of their room, each sender's in order.
//!
//! Without nginx (or, for the last test, without its stream module) a test prints a note and
//! is skipped, unless `CI` is set: then it fails. On Debian: `apt-get install -y nginx
//! libnginx-mod-stream` (Debian builds the stream module as a dynamic module, in its own
//! package). Overrides: `WSLOOP_NGINX` (the nginx binary), `WSLOOP_NGINX_STREAM_MODULE` (the
//! `ngx_stream_module.so` to load).
// Test code (see Cargo.toml's [lints]): it fails by panicking, and opens descriptors on purpose.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]
#![allow(clippy::unreachable)] // `unreachable!()` marks what a check has ruled out

#[allow(dead_code)]
mod attack_support;
mod child_support;
mod redis_support;
#[allow(dead_code)]
mod tls_support;

use redis_support::next_text;

use attack_support::{
    connect, localhost, metrics_at, read_answer, read_head, upgrade_request, Metrics, Opts, Wsloop,
};
use child_support::{Proc, Run, TempDir};
use std::io::{ErrorKind, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};
use tungstenite::client::IntoClientRequest;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::CloseFrame;
use tungstenite::{Error, HandshakeError, Message, WebSocket};

const NGINX_INSTALL: &str = "apt-get install -y nginx";
const STREAM_INSTALL: &str = "apt-get install -y libnginx-mod-stream";
/// Bound on `nginx -V`.
const PROBE_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on nginx writing its pid file (it has bound its listeners by then).
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// Bound on nginx exiting after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);
/// Bound on a condition that settles asynchronously (a slot freed after a close).
const SETTLE: Duration = Duration::from_secs(10);
/// Tries at starting nginx when a port picked free was taken in between.
const PORT_TRIES: usize = 5;
/// The WebSocket instances' message limit: 64 KiB messages fit, one byte over 128 KiB does not.
const MAX_MESSAGE: usize = 128 * 1024;

/// The series counting connections refused by `--max-connections-per-ip`.
const PER_IP_REFUSALS: &str = "wsloop_admission_rejections_total{limit=\"max_connections_per_ip\"}";

type Ws = WebSocket<TcpStream>;

// ---------------------------------------------------------------------------------------------
// The tests

#[test]
fn http_proxy_echoes_and_balances_over_two_instances() {
    let Some(bin) = nginx() else { return };
    let started = Instant::now();
    let max = MAX_MESSAGE.to_string();
    let a = Wsloop::spawn("wsloop-a", &["--max-message-size", &max]);
    let b = Wsloop::spawn("wsloop-b", &["--max-message-size", &max]);
    let before = [a.metrics(), b.metrics()];
    let nginx = Nginx::start(&bin, "http-pair", 1, |dir, ports| {
        let upstreams = [("wsloop_pair", &[a.addr, b.addr][..])];
        http_conf(
            dir,
            &upstreams,
            &[Site::new(ports[0], "wsloop_pair", "3600s")],
        )
    });
    let front = nginx.addr(0);
    let src = localhost(2);

    // One connection: text, binary, 64 KiB of each, then the client closes with 4001.
    let mut ws = open(front, src, "/echo", None).expect("upgrade through nginx");
    echo(&mut ws, Message::text("hello through nginx"));
    echo(&mut ws, Message::binary(vec![0u8, 1, 2, 0x80, 0xff]));
    echo(&mut ws, Message::binary(pattern(64 * 1024)));
    let big_text: String = (0..64 * 1024)
        .map(|i| (b'a' + (i % 26) as u8) as char)
        .collect();
    echo(&mut ws, Message::text(big_text));
    // wsloop answers a close with the client's code (without its reason).
    let reply = client_close(&mut ws, 4001, "bye");
    assert_eq!(
        close_of(&reply).map(|c| c.0),
        Some(4001),
        "the server's answer to the client's close, through nginx"
    );

    // More connections, one echo each, closed normally: round robin spreads them.
    let more = 7;
    for i in 0..more {
        let mut ws = open(front, src, &format!("/echo/{i}"), None).expect("upgrade");
        echo(&mut ws, Message::text(format!("connection {i}")));
        close_echoed(&mut ws, 1000, "");
    }

    // Too big: wsloop closes with 1009, and nginx passes the close frame on.
    let mut ws = open(front, src, "/too-big", None).expect("upgrade");
    ws.send(Message::binary(pattern(MAX_MESSAGE + 1)))
        .expect("send the oversized message");
    let (code, reason) = server_close(&mut ws);
    assert_eq!(
        code, 1009,
        "close for a message over the limit ({reason:?})"
    );
    let total = 1 + more + 1;

    // Every upstream connection nginx opened has ended: both instances are back at their
    // baseline descriptors, and between them they closed exactly the WebSocket connections
    // made (by why: the metrics requests, `http_answered`, left out).
    let after = [a.wait_quiet(), b.wait_quiet()];
    let mut per_instance = Vec::new();
    let mut reasons = std::collections::BTreeMap::new();
    for (i, (before, after)) in before.iter().zip(&after).enumerate() {
        let closed = after.closed_since(before);
        let connections: u64 = closed.values().sum();
        let messages = delta(before, after, "wsloop_messages_received_total");
        eprintln!("instance {i}: {connections} connections {closed:?}, {messages} messages");
        assert!(
            connections >= 1 && messages >= 1,
            "instance {i} got no traffic: {closed:?}, {messages} messages"
        );
        for (reason, n) in closed {
            *reasons.entry(reason).or_insert(0) += n;
        }
        per_instance.push(connections);
    }
    assert_eq!(
        per_instance.iter().sum::<u64>(),
        total as u64,
        "the connections through nginx, over both instances: {per_instance:?}"
    );
    assert_eq!(
        reasons,
        attack_support::deltas(&[("peer_closed", 1 + more as u64), ("protocol_error", 1)]),
        "why they closed, over both instances"
    );
    // Messages echoed: 4 + 7 on the open ones; the oversized one is never received.
    let received: u64 = before
        .iter()
        .zip(&after)
        .map(|(b, a)| delta(b, a, "wsloop_messages_received_total"))
        .sum();
    assert_eq!(received, 4 + more as u64);

    // A graceful shutdown of both instances: every client behind nginx gets 1001.
    let mut clients: Vec<Ws> = (0..4)
        .map(|i| {
            let mut ws = open(front, src, &format!("/shutdown/{i}"), None).expect("upgrade");
            echo(&mut ws, Message::text(format!("before shutdown {i}")));
            ws
        })
        .collect();
    let stoppers: Vec<JoinHandle<()>> = [a, b]
        .into_iter()
        .map(|w| thread::spawn(move || w.stop()))
        .collect();
    for (i, ws) in clients.iter_mut().enumerate() {
        let (code, reason) = server_close(ws);
        assert_eq!(code, 1001, "client {i} at shutdown ({reason:?})");
    }
    for s in stoppers {
        s.join().expect("wsloop stopped cleanly");
    }
    let log = nginx.stop();
    assert_no_nginx_errors(&log);
    took("http_proxy_echoes_and_balances_over_two_instances", started);
}

#[test]
fn http_proxy_per_ip_limit_applies_to_the_forwarded_client() {
    let Some(bin) = nginx() else { return };
    let started = Instant::now();
    let w = behind_proxy_one_per_ip("wsloop-xff");
    let before = w.metrics();
    let nginx = proxy_one(&bin, "http-xff", w.addr, true);
    let front = nginx.addr(0);

    // nginx connects from 127.0.0.1 (trusted) and sends `X-Forwarded-For: <what the client
    // sent>, <client address>`. wsloop takes the last address that is not a trusted proxy:
    // the one nginx appended, never the client's own claim.
    let mut first = open(front, localhost(2), "/a", Some("203.0.113.7")).expect("first client");
    echo(&mut first, Message::text("first from 127.0.0.2"));

    // The same client claiming to be someone else: still 127.0.0.2, over its limit of 1.
    match open(front, localhost(2), "/b", Some("198.51.100.8")) {
        Err(Refused::Status(503, retry_after)) => assert_eq!(
            retry_after.as_deref(),
            Some("1"),
            "nginx passes wsloop's Retry-After on"
        ),
        other => panic!("second connection from 127.0.0.2: expected 503, got {other:?}"),
    }
    // Without a claim, too.
    match open(front, localhost(2), "/c", None) {
        Err(Refused::Status(503, _)) => {}
        other => panic!("third connection from 127.0.0.2: expected 503, got {other:?}"),
    }
    // Nor with a `Forwarded` header of its own: this configuration drops it.
    match open_with(
        front,
        localhost(2),
        "/c",
        &[("Forwarded", "for=198.51.100.9")],
    ) {
        Err(Refused::Status(503, _)) => {}
        other => panic!("127.0.0.2 claiming Forwarded: expected 503, got {other:?}"),
    }

    // Another client through the same proxy address is admitted: the limit is not the proxy's.
    let mut other = open(front, localhost(3), "/d", Some("203.0.113.7")).expect("127.0.0.3");
    echo(&mut other, Message::text("from 127.0.0.3"));
    echo(&mut first, Message::text("the first is still open"));

    let mid = w.metrics();
    assert_eq!(
        delta(&before, &mid, PER_IP_REFUSALS),
        3,
        "the three refusals of 127.0.0.2"
    );
    assert_eq!(
        delta(&before, &mid, "wsloop_connections{state=\"open\"}"),
        2
    );

    // Once the first connection has ended, 127.0.0.2 is admitted again.
    readmitted_after_close(front, first, other, "/e", (1000, ""));

    let after = w.wait_quiet();
    assert_eq!(
        delta(&before, &after, "wsloop_messages_received_total"),
        4,
        "the echoes"
    );
    stop_clean(w, nginx);
    took(
        "http_proxy_per_ip_limit_applies_to_the_forwarded_client",
        started,
    );
}

/// nginx's usual WebSocket configuration maintains only X-Forwarded-For and passes a client's
/// own `Forwarded` header on untouched. wsloop reads only the header the proxy sets
/// (`--forwarded-header`, X-Forwarded-For by default), so a client cannot name itself with
/// `Forwarded: for=<anything>`: here three concurrent connections from 127.0.0.2 claiming three
/// addresses meet `--max-connections-per-ip 1`, and the second and third are refused. (wsloop
/// used to prefer `Forwarded` whenever a request had one, and admitted all three.)
#[test]
fn http_proxy_client_forwarded_header_does_not_evade_the_per_ip_limit() {
    let Some(bin) = nginx() else { return };
    let w = behind_proxy_one_per_ip("wsloop-forwarded");
    // Without `proxy_set_header Forwarded "";`.
    let nginx = proxy_one(&bin, "http-forwarded", w.addr, false);
    let front = nginx.addr(0);
    let mut held = Vec::new();
    for (i, claim) in ["for=198.51.100.1", "for=198.51.100.2", "for=198.51.100.3"]
        .iter()
        .enumerate()
    {
        match open_with(front, localhost(2), "/f", &[("Forwarded", claim)]) {
            Ok(ws) if i == 0 => held.push(ws),
            Err(Refused::Status(503, _)) if i > 0 => {}
            other => panic!(
                "connection {i} from 127.0.0.2 claiming `Forwarded: {claim}`: {}",
                match other {
                    Ok(_) => "admitted: the claim replaced the address nginx reported".to_string(),
                    Err(e) => format!("{e:?}"),
                }
            ),
        }
    }
    drop(held);
    w.wait_quiet();
    w.stop();
    // nginx logs the refusals it passed on; the connections themselves went as they should.
    nginx.stop();
}

#[test]
fn http_proxy_metrics_stay_off_the_public_port() {
    let Some(bin) = nginx() else { return };
    let started = Instant::now();
    // nginx proxies every path of its WebSocket location, so wsloop's /metrics and /healthz on
    // the WebSocket port would be public. By default they are served only on a port of their
    // own that only operators reach.
    let w = Wsloop::spawn(
        "wsloop-private-metrics",
        &["--metrics-listen", "127.0.0.1:0"],
    );
    let private = w.metrics_listener();
    let nginx = proxy_one(&bin, "http-metrics", w.addr, true);
    let front = nginx.addr(0);
    for path in ["/metrics", "/healthz"] {
        assert_eq!(
            http_status(front, localhost(2), path),
            Some(426),
            "GET {path} through nginx"
        );
    }
    let mut ws = open(front, localhost(2), "/ws", None).expect("upgrade through nginx");
    echo(&mut ws, Message::text("metrics elsewhere"));
    assert_eq!(http_status(private, localhost(1), "/healthz"), Some(200));
    let m = metrics_at(private, localhost(1)).expect("metrics on the private listener");
    assert_eq!(m.get("wsloop_connections{state=\"open\"}"), 1.0);
    assert_eq!(
        m.get("wsloop_handshakes_rejected_total{status=\"426\"}"),
        2.0,
        "the two GETs through nginx"
    );
    close_echoed(&mut ws, 1000, "");
    drop(ws);
    stop_clean(w, nginx);
    took("http_proxy_metrics_stay_off_the_public_port", started);
}

#[test]
fn http_proxy_read_timeout_and_wsloop_pings() {
    let Some(bin) = nginx() else { return };
    let started = Instant::now();
    // nginx closes an upgraded connection when the upstream has sent nothing for
    // `proxy_read_timeout` (3 s here). One instance pings a silent client after 1 s of silence
    // (idle timeout 2 s); the other never pings.
    let pinging = Wsloop::spawn("wsloop-pinging", &["--idle-timeout", "2"]);
    let silent = Wsloop::spawn("wsloop-silent", &["--idle-timeout", "0"]);
    let nginx = Nginx::start(&bin, "http-timeouts", 2, |dir, ports| {
        let upstreams = [
            ("wsloop_pinging", &[pinging.addr][..]),
            ("wsloop_silent", &[silent.addr][..]),
        ];
        let servers = [
            Site::new(ports[0], "wsloop_pinging", "3s"),
            Site::new(ports[1], "wsloop_silent", "3s"),
        ];
        http_conf(dir, &upstreams, &servers)
    });
    let hold = Duration::from_secs(5);

    let via_pinging = nginx.addr(0);
    let kept = thread::spawn(move || {
        let mut ws = open(via_pinging, localhost(2), "/idle", None).expect("upgrade");
        // Say nothing for `hold`; tungstenite answers each ping with a pong while reading.
        let start = Instant::now();
        let mut pings = 0;
        while let Some(left) = hold.checked_sub(start.elapsed()) {
            ws.get_mut()
                .set_read_timeout(Some(left.max(Duration::from_millis(1))))
                .unwrap();
            match ws.read() {
                Ok(Message::Ping(_)) => pings += 1,
                Err(Error::Io(e))
                    if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                other => panic!(
                    "idle connection with pings, after {:.1} s: {other:?}",
                    start.elapsed().as_secs_f64()
                ),
            }
        }
        ws.get_mut()
            .set_read_timeout(Some(attack_support::IO_TIMEOUT))
            .unwrap();
        echo(&mut ws, Message::text("still here"));
        close_echoed(&mut ws, 1000, "");
        pings
    });

    let via_silent = nginx.addr(1);
    let cut = thread::spawn(move || {
        let mut ws = open(via_silent, localhost(3), "/idle", None).expect("upgrade");
        ws.get_mut()
            .set_read_timeout(Some(Duration::from_secs(15)))
            .unwrap();
        let start = Instant::now();
        let ended = ws.read();
        (start.elapsed(), format!("{ended:?}"))
    });

    let pings = kept.join().expect("the pinged connection stayed open");
    let (after, how) = cut.join().expect("the silent connection");
    eprintln!(
        "pinged connection: {pings} pings in {hold:?}; silent connection ended after {:.2} s: {how}",
        after.as_secs_f64()
    );
    // A ping after each second of silence (the pong answering it ends the silence): at most
    // one a second, and on a loaded machine at least three in five seconds.
    assert!(
        (3..=5).contains(&pings),
        "wsloop pings every second of silence: {pings} in {hold:?}"
    );
    // nginx's 3 s timer starts when it read the upstream's 101, a moment before our client
    // did (and nginx's clock may lag its events by as much): 3 s less that moment, at least;
    // generous above.
    assert!(
        after >= Duration::from_millis(2900) && after < Duration::from_secs(10),
        "nginx cuts the silent connection at its 3 s proxy_read_timeout, not after {after:?} ({how})"
    );
    assert!(
        !how.starts_with("Ok("),
        "the silent connection got a message: {how}"
    );
    let log = nginx.stop();
    assert!(
        log.contains("upstream timed out"),
        "nginx logs the cut as an upstream timeout:\n{log}"
    );
    for w in [pinging, silent] {
        w.wait_quiet();
        w.stop();
    }
    took("http_proxy_read_timeout_and_wsloop_pings", started);
}

#[test]
fn stream_proxy_protocol_names_the_client() {
    let Some(bin) = nginx() else { return };
    let Some(module) = bin.stream_module() else {
        return;
    };
    let started = Instant::now();
    let mut w = Wsloop::spawn(
        "wsloop-pp",
        &[
            "--proxy-protocol",
            "--trusted-proxy",
            "127.0.0.1",
            "--max-connections-per-ip",
            "1",
        ],
    );
    // From 127.0.0.1 a request must start with a PROXY header: scrape from elsewhere.
    w.metrics_src = localhost(9);
    let before = w.metrics();
    let nginx = Nginx::start(&bin, "stream-pp", 1, |dir, ports| {
        stream_conf(dir, &module, ports[0], w.addr)
    });
    let front = nginx.addr(0);

    // Through nginx: it sends `PROXY TCP4 127.0.0.2 127.0.0.1 <port> <port>` first.
    let mut first = open(front, localhost(2), "/a", None).expect("through the stream proxy");
    echo(&mut first, Message::text("through the PROXY protocol"));
    echo(&mut first, Message::binary(pattern(4096)));
    // The per-address limit (1) applies to 127.0.0.2, not to nginx's 127.0.0.1.
    match open(front, localhost(2), "/b", None) {
        Err(Refused::Status(503, retry_after)) => assert_eq!(retry_after.as_deref(), Some("1")),
        other => panic!("second connection from 127.0.0.2: expected 503, got {other:?}"),
    }
    let mut other = open(front, localhost(3), "/c", None).expect("127.0.0.3 is admitted");
    echo(&mut other, Message::text("from 127.0.0.3"));

    // Bypassing nginx, from the proxy's own address but without a PROXY header: 400.
    assert_eq!(
        raw_status(w.addr, localhost(1), b""),
        Some(400),
        "a direct client at the trusted address without a PROXY header"
    );
    // From an untrusted address with a forged PROXY header: not a PROXY header to wsloop but
    // a malformed request, 400.
    let forged = format!(
        "PROXY TCP4 203.0.113.7 127.0.0.1 40001 {}\r\n",
        w.addr.port()
    );
    assert_eq!(
        raw_status(w.addr, localhost(5), forged.as_bytes()),
        Some(400),
        "a direct client forging a PROXY header"
    );
    // An untrusted client without a header is an ordinary client, served as itself.
    assert_eq!(raw_status(w.addr, localhost(6), b""), Some(101));

    let mid = w.metrics();
    assert_eq!(delta(&before, &mid, PER_IP_REFUSALS), 1);
    assert_eq!(
        delta(
            &before,
            &mid,
            "wsloop_handshakes_rejected_total{status=\"400\"}"
        ),
        2
    );

    // When 127.0.0.2's connection ends, its slot is free again.
    readmitted_after_close(front, first, other, "/d", (4002, "done"));

    w.wait_quiet();
    stop_clean(w, nginx);
    took("stream_proxy_protocol_names_the_client", started);
}

/// nginx's stream proxy with `proxy_protocol on` in front of a wsloop serving TLS itself
/// (`--tls-cert --tls-key --proxy-protocol`): nginx passes the client's TLS bytes through after
/// its PROXY header, so a wss client talks TLS with wsloop end to end, and the per-address
/// limit applies to the client nginx names (a second one from that address is closed before
/// any TLS work: nothing comes back).
#[test]
fn stream_proxy_protocol_in_front_of_tls() {
    let Some(bin) = nginx() else { return };
    let Some(module) = bin.stream_module() else {
        return;
    };
    let Some(certs) = tls_support::certs() else {
        return;
    };
    let started = Instant::now();
    let w = tls_support::tls_child(
        &certs,
        "wsloop-pp-tls",
        &[
            "--proxy-protocol",
            "--trusted-proxy",
            "127.0.0.1",
            "--max-connections-per-ip",
            "1",
        ],
    );
    let before = w.metrics();
    let nginx = Nginx::start(&bin, "stream-pp-tls", 1, |dir, ports| {
        stream_conf(dir, &module, ports[0], w.addr)
    });
    let front = nginx.addr(0);
    let wss_from = |src: IpAddr| {
        let tcp = connect(front, &Opts::from(src)).expect("connect to nginx");
        let s = tls_support::tls_over(tcp, &certs, rustls::DEFAULT_VERSIONS);
        tls_support::ws_over(s, front)
    };
    let mut first = wss_from(localhost(2));
    for msg in [
        Message::text("wss through nginx's PROXY protocol"),
        Message::binary(pattern(8 * 1024)),
    ] {
        first.send(msg.clone()).unwrap();
        let got = first.read().unwrap();
        assert!(got == msg, "the echo of {} bytes differs", msg.len());
    }
    // 127.0.0.2 again: refused by the per-address limit before any TLS work.
    let mut second = connect(front, &Opts::from(localhost(2))).expect("connect to nginx");
    let hello = tls_support::hello_after(
        second.try_clone().unwrap(),
        &certs,
        rustls::DEFAULT_VERSIONS,
        b"",
    );
    let (got, _) = tls_support::until_closed(&mut second, Instant::now());
    assert!(got.is_empty(), "the refused client got {got:?}");
    drop((hello, second));
    let mut other = wss_from(localhost(3));
    other.send(Message::text("from 127.0.0.3")).unwrap();
    assert_eq!(other.read().unwrap(), Message::text("from 127.0.0.3"));
    let mid = w.wait_until("the refused connection's end", |m| {
        tls_support::handshakes(m, "refused") > tls_support::handshakes(&before, "refused")
    });
    assert_eq!(delta(&before, &mid, PER_IP_REFUSALS), 1);
    for mut ws in [first, other] {
        ws.close(None).unwrap();
        while ws.read().is_ok() {}
    }
    let after = w.wait_quiet();
    assert_eq!(
        tls_support::handshakes(&after, "ok") - tls_support::handshakes(&before, "ok"),
        2
    );
    assert_eq!(
        after.closed_since(&before),
        attack_support::deltas(&[("peer_closed", 2), ("refused", 1)])
    );
    stop_clean(w, nginx);
    took("stream_proxy_protocol_in_front_of_tls", started);
}

#[test]
fn http_proxy_round_robin_over_two_instances_sharing_rooms_through_redis() {
    let Some(bin) = nginx() else { return };
    let Some(redis_bin) = redis_support::redis_server() else {
        return;
    };
    let started = Instant::now();
    let redis = redis_support::Redis::start(&redis_bin, redis_support::free_port());
    let url = redis.url();
    let args = ["--pubsub", "--redis", &url, "--trusted-proxy", "127.0.0.1"];
    let a = Wsloop::spawn("wsloop-a", &args);
    let b = Wsloop::spawn("wsloop-b", &args);
    let nginx = Nginx::start(&bin, "http-rooms", 1, |dir, ports| {
        let upstreams = [("wsloop_rooms", &[a.addr, b.addr][..])];
        http_conf(
            dir,
            &upstreams,
            &[Site::new(ports[0], "wsloop_rooms", "3600s")],
        )
    });
    let front = nginx.addr(0);
    // Six members of one room, and one of another, through round robin.
    let n = 6;
    let mut members: Vec<Ws> = (0..n)
        .map(|i| {
            let ws = open(front, localhost(2), "/room", None)
                .unwrap_or_else(|e| panic!("member {i}: {e:?}"));
            ws.get_ref()
                .set_read_timeout(Some(Duration::from_millis(50)))
                .unwrap();
            ws
        })
        .collect();
    let mut other = open(front, localhost(2), "/other", None).expect("the other room");
    other
        .get_ref()
        .set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let on = |w: &Wsloop| w.metrics().get("wsloop_connections{state=\"open\"}");
    let (on_a, on_b) = (on(&a), on(&b));
    assert_eq!(on_a + on_b, (n + 1) as f64);
    assert!(on_a >= 1.0 && on_b >= 1.0, "round robin: {on_a} and {on_b}");

    // Member 0 sends probes until every member has one: both instances have subscribed.
    let deadline = Instant::now() + PROBE_TIMEOUT;
    let mut reached = vec![false; n];
    let mut i = 0;
    while reached.iter().any(|r| !r) {
        members[0]
            .send(Message::text(format!("probe {i}")))
            .unwrap();
        i += 1;
        for (k, m) in members.iter_mut().enumerate() {
            while let Some(t) = next_text(m, Duration::from_millis(50)) {
                assert!(t.starts_with("probe "), "member {k}: {t:?}");
                reached[k] = true;
            }
        }
        assert!(Instant::now() < deadline, "probes reached {reached:?}");
    }
    for m in members.iter_mut() {
        while next_text(m, Duration::from_millis(300)).is_some() {}
    }

    // Each member says 20 things; everyone hears all of them, each sender's in order.
    let per = 20;
    for (k, m) in members.iter_mut().enumerate() {
        for j in 0..per {
            m.send(Message::text(format!("{k} {j}"))).unwrap();
        }
    }
    for (k, m) in members.iter_mut().enumerate() {
        let mut next = vec![0; n];
        let mut got = 0;
        while got < n * per {
            let t = next_text(m, PROBE_TIMEOUT)
                .unwrap_or_else(|| panic!("member {k}: {got} of {} ({next:?})", n * per));
            let (from, j) = t.split_once(' ').expect("sender and number");
            let (from, j): (usize, usize) = (from.parse().unwrap(), j.parse().unwrap());
            assert_eq!(
                j, next[from],
                "member {k}: sender {from}'s messages in order"
            );
            next[from] += 1;
            got += 1;
        }
        assert_eq!(
            next_text(m, Duration::from_millis(300)),
            None,
            "member {k}: no more"
        );
    }
    assert_eq!(
        next_text(&mut other, Duration::from_millis(300)),
        None,
        "another room"
    );
    for w in [&a, &b] {
        let m = w.metrics();
        assert_eq!(m.get("wsloop_broker_up"), 1.0);
        assert_eq!(m.get("wsloop_broker_gaps_total"), 0.0);
        assert!(
            m.get("wsloop_broker_received_total") > 0.0,
            "each hears the other"
        );
    }
    drop(members);
    drop(other);
    a.stop();
    b.stop();
    let log = nginx.stop();
    assert_no_nginx_errors(&log);
    drop(redis);
    took(
        "http_proxy_round_robin_over_two_instances_sharing_rooms_through_redis",
        started,
    );
}

// ---------------------------------------------------------------------------------------------
// nginx configurations

/// The main context every configuration starts with: one worker, the pid file in `dir`, the
/// error log to stderr (the test's pipe), at `info` (where nginx logs connection-level events
/// such as a proxied connection's timeout).
fn main_context(dir: &Path, load: Option<&Path>) -> String {
    let load = load
        .map(|m| format!("load_module {};\n", m.display()))
        .unwrap_or_default();
    format!(
        "{load}worker_processes 1;\n\
         pid {dir}/nginx.pid;\n\
         error_log stderr info;\n\
         events {{ worker_connections 256; }}\n",
        dir = dir.display()
    )
}

/// One `server` of the HTTP proxy: a port, its upstream, its `proxy_read_timeout`.
struct Site {
    port: u16,
    upstream: &'static str,
    read_timeout: &'static str,
    /// `proxy_set_header Forwarded "";`: drop a `Forwarded` header sent by the client (nginx
    /// passes it on untouched, and wsloop prefers it to X-Forwarded-For). The configuration the
    /// README recommends has it.
    clear_forwarded: bool,
}

impl Site {
    fn new(port: u16, upstream: &'static str, read_timeout: &'static str) -> Site {
        Site {
            port,
            upstream,
            read_timeout,
            clear_forwarded: true,
        }
    }
}

/// An HTTP reverse proxy for WebSockets, as the README shows it: `upstreams` are (name,
/// servers); each site listens on its port and proxies every path to its upstream.
fn http_conf(dir: &Path, upstreams: &[(&str, &[SocketAddr])], sites: &[Site]) -> String {
    let d = dir.display();
    let mut conf = main_context(dir, None);
    conf.push_str(&format!(
        "http {{\n\
         \x20   log_format ws '$remote_addr \"$request\" $status upstream=$upstream_addr \
         xff=\"$http_x_forwarded_for\" ${{request_time}}s';\n\
         \x20   access_log {d}/access.log ws;\n\
         \x20   client_body_temp_path {d}/client_body;\n\
         \x20   proxy_temp_path {d}/proxy;\n\
         \x20   fastcgi_temp_path {d}/fastcgi;\n\
         \x20   uwsgi_temp_path {d}/uwsgi;\n\
         \x20   scgi_temp_path {d}/scgi;\n"
    ));
    for (name, addrs) in upstreams {
        conf.push_str(&format!("    upstream {name} {{\n"));
        for a in *addrs {
            conf.push_str(&format!("        server {a};\n"));
        }
        conf.push_str("    }\n");
    }
    for site in sites {
        let Site {
            port,
            upstream,
            read_timeout,
            clear_forwarded,
        } = site;
        let forwarded = match clear_forwarded {
            true => "            proxy_set_header Forwarded \"\";\n",
            false => "",
        };
        conf.push_str(&format!(
            "    server {{\n\
             \x20       listen 127.0.0.1:{port};\n\
             \x20       location / {{\n\
             \x20           proxy_pass http://{upstream};\n\
             \x20           proxy_http_version 1.1;\n\
             \x20           proxy_set_header Upgrade $http_upgrade;\n\
             \x20           proxy_set_header Connection \"upgrade\";\n\
             \x20           proxy_set_header Host $host;\n\
             \x20           proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;\n\
             {forwarded}\
             \x20           proxy_connect_timeout 5s;\n\
             \x20           proxy_send_timeout {read_timeout};\n\
             \x20           proxy_read_timeout {read_timeout};\n\
             \x20       }}\n\
             \x20   }}\n"
        ));
    }
    conf.push_str("}\n");
    conf
}

/// nginx as the usual HTTP reverse proxy (one site, `proxy_read_timeout 3600s`) in front of
/// the one wsloop instance at `upstream`; `clear_forwarded` as in [`Site`].
fn proxy_one(bin: &NginxBin, name: &str, upstream: SocketAddr, clear_forwarded: bool) -> Nginx {
    Nginx::start(bin, name, 1, |dir, ports| {
        let upstreams = [("wsloop_one", &[upstream][..])];
        let site = Site {
            clear_forwarded,
            ..Site::new(ports[0], "wsloop_one", "3600s")
        };
        http_conf(dir, &upstreams, &[site])
    })
}

/// A TCP (stream) proxy to `upstream` that starts each connection with a PROXY header.
fn stream_conf(dir: &Path, module: &StreamModule, port: u16, upstream: SocketAddr) -> String {
    let load = match module {
        StreamModule::Static => None,
        StreamModule::Dynamic(path) => Some(path.as_path()),
    };
    let mut conf = main_context(dir, load);
    conf.push_str(&format!(
        "stream {{\n\
         \x20   server {{\n\
         \x20       listen 127.0.0.1:{port};\n\
         \x20       proxy_pass {upstream};\n\
         \x20       proxy_protocol on;\n\
         \x20       proxy_connect_timeout 5s;\n\
         \x20       proxy_timeout 3600s;\n\
         \x20   }}\n\
         }}\n"
    ));
    conf
}

// ---------------------------------------------------------------------------------------------
// Clients

/// Why an upgrade through nginx did not open a WebSocket.
#[derive(Debug)]
enum Refused {
    /// An HTTP answer: its status and its `Retry-After`.
    Status(u16, Option<String>),
    /// Anything else (shown through `Debug` in the panics).
    #[allow(dead_code)]
    Failed(String),
}

/// A tungstenite client from `src` to `front`, optionally sending its own X-Forwarded-For.
fn open(front: SocketAddr, src: IpAddr, path: &str, xff: Option<&str>) -> Result<Ws, Refused> {
    let headers: Vec<(&str, &str)> = xff.map(|v| ("X-Forwarded-For", v)).into_iter().collect();
    open_with(front, src, path, &headers)
}

/// A tungstenite client from `src` to `front`, once the client's earlier connection has ended:
/// while wsloop has not seen that end yet it answers 503, so try again (bounded by [`SETTLE`]).
fn open_once_free(front: SocketAddr, src: IpAddr, path: &str) -> Ws {
    let deadline = Instant::now() + SETTLE;
    loop {
        match open(front, src, path, None) {
            Ok(ws) => return ws,
            // wsloop has not seen the end of the first connection yet.
            Err(Refused::Status(503, _)) if Instant::now() < deadline => {
                thread::sleep(Duration::from_millis(50))
            }
            Err(e) => panic!("{src} after its first connection closed: {e:?}"),
        }
    }
}

/// 127.0.0.2 closes its `first` connection (1000); once wsloop has seen that, 127.0.0.2 is
/// admitted again (at `path`) and echoes; then that connection and `other` close with `close`.
fn readmitted_after_close(
    front: SocketAddr,
    mut first: Ws,
    mut other: Ws,
    path: &str,
    (code, reason): (u16, &str),
) {
    close_echoed(&mut first, 1000, "");
    drop(first);
    let mut again = open_once_free(front, localhost(2), path);
    echo(&mut again, Message::text("127.0.0.2 again"));
    for ws in [&mut again, &mut other] {
        close_echoed(ws, code, reason);
    }
}

/// A tungstenite client from `src` to `front` sending extra `headers`.
fn open_with(
    front: SocketAddr,
    src: IpAddr,
    path: &str,
    headers: &[(&'static str, &str)],
) -> Result<Ws, Refused> {
    let stream = connect(front, &Opts::from(src))
        .map_err(|e| Refused::Failed(format!("connect from {src}: {e}")))?;
    let mut req = format!("ws://{front}{path}")
        .into_client_request()
        .expect("request");
    for (name, value) in headers {
        req.headers_mut()
            .insert(*name, value.parse().expect("header value"));
    }
    match tungstenite::client(req, stream) {
        Ok((ws, _)) => Ok(ws),
        Err(HandshakeError::Failure(Error::Http(resp))) => {
            let retry = resp
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            Err(Refused::Status(resp.status().as_u16(), retry))
        }
        Err(e) => Err(Refused::Failed(format!("handshake: {e}"))),
    }
}

/// Send `msg` and expect it back (pings in between are answered and skipped).
fn echo(ws: &mut Ws, msg: Message) {
    ws.send(msg.clone()).expect("send");
    loop {
        match ws.read() {
            Ok(Message::Ping(_)) | Ok(Message::Pong(_)) => {}
            Ok(got) => {
                assert!(got == msg, "echo: sent {} bytes, got {got:?}", msg.len());
                return;
            }
            Err(e) => panic!("echo of {} bytes: {e}", msg.len()),
        }
    }
}

/// Close with `code` and `reason`; return the close frame the server answered with, after the
/// connection has ended.
fn client_close(ws: &mut Ws, code: u16, reason: &str) -> Option<CloseFrame> {
    let frame = CloseFrame {
        code: CloseCode::from(code),
        reason: reason.to_string().into(),
    };
    ws.close(Some(frame)).expect("send the close");
    let mut answer = None;
    loop {
        match ws.read() {
            Ok(Message::Close(f)) => answer = Some(f),
            Ok(_) => {}
            Err(Error::ConnectionClosed) => return answer.flatten(),
            Err(e) => panic!("closing with {code}: {e}"),
        }
    }
}

/// Close with `code` and `reason`; the server must answer with the same code.
fn close_echoed(ws: &mut Ws, code: u16, reason: &str) {
    let reply = client_close(ws, code, reason);
    assert_eq!(close_of(&reply).map(|c| c.0), Some(code));
}

/// Wait for the server's close; answer it (tungstenite does) and wait for the end.
fn server_close(ws: &mut Ws) -> (u16, String) {
    let mut got = None;
    loop {
        match ws.read() {
            Ok(Message::Close(f)) => {
                got = Some(close_of(&f).unwrap_or((1005, String::new())));
            }
            Ok(_) => {}
            Err(Error::ConnectionClosed) => {
                return got.expect("the connection ended after a close frame")
            }
            Err(e) => panic!("waiting for the server's close (got {got:?}): {e}"),
        }
    }
}

fn close_of(f: &Option<CloseFrame>) -> Option<(u16, String)> {
    f.as_ref()
        .map(|f| (u16::from(f.code), f.reason.as_str().to_string()))
}

/// A raw client from `src` directly to wsloop: `preamble`, then an upgrade request; the status
/// of the answer.
fn raw_status(addr: SocketAddr, src: IpAddr, preamble: &[u8]) -> Option<u16> {
    let mut s = connect(addr, &Opts::from(src)).expect("connect directly");
    let mut bytes = preamble.to_vec();
    bytes.extend_from_slice(&upgrade_request(addr));
    s.write_all(&bytes).expect("send the request");
    // An accepted upgrade stays open: read the head only.
    let head = read_head(&mut s).ok()?;
    head.get(9..12)?.parse().ok()
}

/// A plain `GET path` from `src`; the status of the answer.
fn http_status(addr: SocketAddr, src: IpAddr, path: &str) -> Option<u16> {
    let mut s = connect(addr, &Opts::from(src)).expect("connect");
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).expect("send the request");
    read_answer(&mut s, attack_support::IO_TIMEOUT).0.status()
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 % 251) as u8).collect()
}

fn delta(before: &Metrics, after: &Metrics, key: &str) -> u64 {
    (after.get(key) - before.get(key)) as u64
}

/// A wsloop instance that trusts the proxy at 127.0.0.1 and admits one connection per client.
fn behind_proxy_one_per_ip(name: &str) -> Wsloop {
    Wsloop::spawn(
        name,
        &[
            "--trusted-proxy",
            "127.0.0.1",
            "--max-connections-per-ip",
            "1",
        ],
    )
}

/// Stop the instance, then nginx; both must exit cleanly, and nginx log no error.
fn stop_clean(w: Wsloop, nginx: Nginx) {
    w.wait_quiet();
    w.stop();
    assert_no_nginx_errors(&nginx.stop());
}

/// How long test `name` took, for `--nocapture` runs.
fn took(name: &str, started: Instant) {
    eprintln!("{name}: {:.1} s", started.elapsed().as_secs_f64());
}

/// nginx's log has no error about the proxied connections (notices are expected).
fn assert_no_nginx_errors(log: &str) {
    let bad: Vec<&str> = log
        .lines()
        .filter(|l| {
            ["[error]", "[crit]", "[alert]", "[emerg]"]
                .iter()
                .any(|s| l.contains(s))
        })
        .collect();
    assert!(bad.is_empty(), "nginx logged errors:\n{}", bad.join("\n"));
}

// ---------------------------------------------------------------------------------------------
// Finding nginx

struct NginxBin {
    path: PathBuf,
    /// `nginx -V`: version and configure arguments.
    info: String,
}

enum StreamModule {
    /// Built in: nothing to load.
    Static,
    /// `load_module` this file.
    Dynamic(PathBuf),
}

/// The nginx binary, or `None` after a note (a panic with `CI` set).
fn nginx() -> Option<NginxBin> {
    let path = match std::env::var_os("WSLOOP_NGINX") {
        Some(p) => PathBuf::from(p),
        None => {
            // /usr/sbin is not on every user's PATH.
            let path = std::env::var_os("PATH").unwrap_or_default();
            let dirs = std::env::split_paths(&path).chain(
                ["/usr/sbin", "/usr/local/sbin", "/usr/local/nginx/sbin"].map(PathBuf::from),
            );
            let Some(found) = dirs.map(|d| d.join("nginx")).find(|p| p.is_file()) else {
                missing("nginx", "not on PATH nor in /usr/sbin", NGINX_INSTALL);
                return None;
            };
            found
        }
    };
    let probe = child_support::run_bounded(
        Command::new(&path).arg("-V").stdin(Stdio::null()),
        PROBE_TIMEOUT,
    );
    match probe {
        // Its stdout and stderr together (`nginx -V` writes to stderr).
        Ok(Run {
            status: Some(status),
            stdout,
            stderr,
        }) => {
            let out = stdout + &stderr;
            if status.success() {
                eprintln!("{}", out.lines().next().unwrap_or("nginx"));
                return Some(NginxBin { path, info: out });
            }
            missing(
                "nginx",
                &format!("`nginx -V` exited with {status}: {out}"),
                NGINX_INSTALL,
            );
            None
        }
        Ok(Run { status: None, .. }) => {
            let why = format!("{}: not done in {PROBE_TIMEOUT:?}", path.display());
            missing("nginx", &why, NGINX_INSTALL);
            None
        }
        Err(e) => {
            missing("nginx", &format!("{}: {e}", path.display()), NGINX_INSTALL);
            None
        }
    }
}

impl NginxBin {
    /// How to get the stream module, from `nginx -V`; `None` after a note if it is missing.
    fn stream_module(&self) -> Option<StreamModule> {
        if let Some(p) = std::env::var_os("WSLOOP_NGINX_STREAM_MODULE") {
            let module = PathBuf::from(p);
            if !module.is_file() {
                let why = format!("WSLOOP_NGINX_STREAM_MODULE: no {}", module.display());
                missing("the nginx stream module", &why, STREAM_INSTALL);
                return None;
            }
            return Some(StreamModule::Dynamic(module));
        }
        let args: Vec<&str> = self.info.split_whitespace().collect();
        if args.contains(&"--with-stream") {
            return Some(StreamModule::Static);
        }
        if !args.contains(&"--with-stream=dynamic") {
            missing(
                "the nginx stream module",
                "nginx was built without it",
                STREAM_INSTALL,
            );
            return None;
        }
        let modules = args
            .iter()
            .find_map(|a| a.strip_prefix("--modules-path="))
            .map(PathBuf::from)
            .or_else(|| {
                let prefix = args.iter().find_map(|a| a.strip_prefix("--prefix="))?;
                Some(Path::new(prefix).join("modules"))
            })
            .unwrap_or_else(|| PathBuf::from("/usr/lib/nginx/modules"));
        let module = modules.join("ngx_stream_module.so");
        if !module.is_file() {
            missing(
                "the nginx stream module",
                &format!("no {}", module.display()),
                STREAM_INSTALL,
            );
            return None;
        }
        Some(StreamModule::Dynamic(module))
    }
}

/// A tool is missing: with `CI` set the test fails, otherwise it prints a note and is skipped.
fn missing(what: &str, why: &str, install: &str) {
    child_support::missing("nginx", what, why, install);
}

// ---------------------------------------------------------------------------------------------
// nginx as a child process

/// nginx running in the foreground as a child (master and one worker, in their own process
/// group). Dropped while running (a failing test), it is stopped and, if it does not exit in
/// time, killed with its workers.
struct Nginx {
    proc: Proc,
    ports: Vec<u16>,
    dir: TempDir,
}

impl Nginx {
    /// Pick `n_ports` free ports, write `conf(dir, ports)` to `dir/nginx.conf`, start nginx and
    /// wait until it has written its pid file (its listeners are bound by then). A port taken
    /// in between makes nginx exit with EADDRINUSE: then start over with other ports.
    fn start(
        bin: &NginxBin,
        name: &str,
        n_ports: usize,
        conf: impl Fn(&Path, &[u16]) -> String,
    ) -> Nginx {
        for attempt in 1..=PORT_TRIES {
            let ports = free_ports(n_ports);
            let dir = TempDir::new(&format!("nginx-{name}"));
            let conf_path = dir.path().join("nginx.conf");
            std::fs::write(&conf_path, conf(dir.path(), &ports)).expect("write nginx.conf");
            let mut proc = Proc::spawn(
                name,
                Command::new(&bin.path)
                    .arg("-e")
                    .arg("stderr")
                    .arg("-p")
                    .arg(format!("{}/", dir.path().display()))
                    .arg("-c")
                    .arg(&conf_path)
                    .args(["-g", "daemon off;"]),
            )
            .expect("spawn nginx");
            let pid = proc.pid().to_string();
            let pid_file = dir.path().join("nginx.pid");
            let started = proc.wait_for("nginx start (its pid file)", START_TIMEOUT, |_| {
                let written = std::fs::read_to_string(&pid_file);
                written.is_ok_and(|p| p.trim() == pid).then_some(())
            });
            let Err(status) = started else {
                return Nginx { proc, ports, dir };
            };
            let log = proc.log();
            if log.contains("Address already in use") && attempt < PORT_TRIES {
                eprintln!("{name}: a port was taken, trying others");
                continue;
            }
            panic!(
                "{name}: nginx exited at startup with {status:?}:\n{log}\n--- nginx.conf:\n{}",
                std::fs::read_to_string(&conf_path).unwrap_or_default()
            );
        }
        unreachable!("the last try panics")
    }

    fn addr(&self, i: usize) -> SocketAddr {
        SocketAddr::new(localhost(1), self.ports[i])
    }

    /// SIGTERM (a fast shutdown: open connections are closed), a bounded wait; nginx must exit
    /// with 0. Returns everything it logged.
    fn stop(mut self) -> String {
        let status = self.proc.terminate(STOP_TIMEOUT);
        let log = self.proc.log();
        assert!(
            status.as_ref().is_some_and(ExitStatus::success),
            "{}: nginx did not exit 0 after SIGTERM: {status:?}\n{log}",
            self.proc.name
        );
        log
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        if self.proc.running() {
            let status = self.proc.terminate(STOP_TIMEOUT);
            let access =
                std::fs::read_to_string(self.dir.path().join("access.log")).unwrap_or_default();
            eprintln!(
                "--- {} (pid {}) stopped with {status:?}; log:\n{}\n--- access log:\n{access}",
                self.proc.name,
                self.proc.pid(),
                self.proc.log()
            );
        }
    }
}

/// `n` distinct ports that were free on 127.0.0.1 a moment ago (bound with port 0, closed).
fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind port 0"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}
