//! TLS at its edges: what comes before the ClientHello, and attacks on the binary with TLS on
//! (each a child process, each ending at the exact descriptor baseline with no handshake left
//! in progress and a clean fd audit). Real clients over wss:// (Node's `ws`, headless
//! Chromium) are in `tests/interop.rs`, nginx in front of TLS in `tests/nginx.rs`.
//!
//! - `--proxy-protocol` in front of TLS: a trusted proxy's PROXY header (v1 and v2) comes in
//!   cleartext before the ClientHello, in the same write or not, whole or split; the handshake
//!   and the upgrade follow over the same socket. The per-address limits apply to the client
//!   the header names (a refused one is closed before any TLS work, with nothing sent); a bad
//!   or missing header is answered 400 in cleartext, as without TLS; an untrusted peer's
//!   header is no header but a bad ClientHello (an alert).
//! - EMFILE under TLS: shed with a close, never a cleartext 503; served again after.
//! - A handshake flood from one address: refused by the per-address rate before any TLS work.
//! - Resets during handshakes (before any byte, mid-ClientHello, after the ServerHello), and
//!   half a ClientHello then FIN: each seen when it comes, not at the handshake deadline.
//! - Red team: a bad record after our `close_notify`, a ClientHello over the 16 KiB
//!   handshake-input limit, data after the client's `close_notify`, a key-update flood.
//!
//! Certificates come from `tests/tls_support` (the openssl CLI; no key is committed). A missing
//! tool skips its test with a note, unless `CI` is set: then the test fails.
// Test code (see Cargo.toml's [lints]): it fails by panicking, and opens descriptors on purpose.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

#[allow(dead_code)]
mod attack_support;
mod child_support;
#[allow(dead_code)]
mod tls_support;

use attack_support::{connect, localhost, Opts, Wsloop};
use std::io::Write;
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::thread;
use std::time::{Duration, Instant};
use tls_support::*;
use tungstenite::Message;

/// TLS 1.3 or 1.2, as the client prefers.
const ANY: &[&rustls::SupportedProtocolVersion] = rustls::DEFAULT_VERSIONS;

// ---------------------------------------------------------------------------------------------
// The PROXY protocol in front of TLS

/// A PROXY v2 header (TCP over IPv4) naming `client`.
fn v2_header(client: SocketAddr, server: SocketAddr) -> Vec<u8> {
    let (IpAddr::V4(c), IpAddr::V4(s)) = (client.ip(), server.ip()) else {
        panic!("IPv4 only")
    };
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.extend([0x21, 0x11]); // version 2, PROXY; TCP over IPv4
    h.extend(12u16.to_be_bytes());
    h.extend(c.octets());
    h.extend(s.octets());
    h.extend(client.port().to_be_bytes());
    h.extend(server.port().to_be_bytes());
    h
}

fn v1_header(client: &str, server: SocketAddr) -> Vec<u8> {
    format!("PROXY TCP4 {client} 127.0.0.1 40001 {}\r\n", server.port()).into_bytes()
}

/// A connection from the trusted proxy's address (127.0.0.1).
fn from_proxy(w: &Wsloop) -> TcpStream {
    connect(w.addr, &Opts::from(localhost(1))).expect("connect")
}

/// Complete the handshake, upgrade and echo `text` over the TLS stream.
fn handshake_upgrade_echo(mut s: Tls, addr: SocketAddr, text: &str) -> tungstenite::WebSocket<Tls> {
    finish_handshake(&mut s);
    let mut ws = ws_over(s, addr);
    ws.send(Message::text(text)).unwrap();
    assert_eq!(ws.read().unwrap().into_text().unwrap(), text);
    ws
}

#[test]
fn a_proxy_header_before_the_client_hello_names_the_client_and_tls_follows() {
    let Some(certs) = certs() else { return };
    let (w, m0) = tls_child_at_baseline(
        &certs,
        "tls-proxy-protocol",
        &[
            "--proxy-protocol",
            "--trusted-proxy",
            "127.0.0.1",
            "--max-connections-per-ip",
            "1",
        ],
    );
    let addr = w.addr;

    // v1, the header and the ClientHello in one write (one read gets both).
    let s = hello_after(from_proxy(&w), &certs, ANY, &v1_header("203.0.113.7", addr));
    let mut a = handshake_upgrade_echo(s, addr, "v1 in one write");
    // v2, likewise.
    let v2 = v2_header("198.51.100.9:40002".parse().unwrap(), addr);
    let s = hello_after(from_proxy(&w), &certs, ANY, &v2);
    let mut b = handshake_upgrade_echo(s, addr, "v2 in one write");
    // v1 alone, the ClientHello later (nothing follows the header in its read).
    let mut tcp = from_proxy(&w);
    tcp.write_all(&v1_header("192.0.2.1", addr)).unwrap();
    thread::sleep(Duration::from_millis(100));
    let s = tls_over(tcp, &certs, rustls::DEFAULT_VERSIONS);
    let mut c = handshake_upgrade_echo(s, addr, "header alone first");
    // A header split across writes, its end and the ClientHello together, over TLS 1.2.
    let mut tcp = from_proxy(&w);
    let header = v1_header("192.0.2.2", addr);
    tcp.write_all(&header[..10]).unwrap();
    thread::sleep(Duration::from_millis(100));
    let s = hello_after(tcp, &certs, &[&rustls::version::TLS12], &header[10..]);
    let mut d = handshake_upgrade_echo(s, addr, "split header");
    let m = w.metrics();
    assert_eq!(handshakes(&m, "ok") - handshakes(&m0, "ok"), 4);
    assert_eq!(m.get("wsloop_tls_connections{version=\"1.3\"}"), 3.0);
    assert_eq!(m.get("wsloop_tls_connections{version=\"1.2\"}"), 1.0);

    // The per-address limit (1) applies to the client the header names: a second connection
    // for 203.0.113.7 is closed before any TLS work (no ServerHello, no cleartext 503).
    let mut refused = hello_after(from_proxy(&w), &certs, ANY, &v1_header("203.0.113.7", addr));
    let (got, took) = until_closed(&mut refused.sock, Instant::now());
    assert!(got.is_empty(), "the refused client got {got:?}");
    assert!(took < Duration::from_millis(900), "closed after {took:?}");
    drop(refused);
    // Its end (after our FIN, the client's) is counted as a handshake that ended refused.
    let m = w.wait_until("the refused handshake counted", |m| {
        handshakes(m, "refused") - handshakes(&m0, "refused") == 1
    });
    assert_eq!(
        m.admission("max_connections_per_ip") - m0.admission("max_connections_per_ip"),
        1
    );

    // A bad header, or none (the ClientHello first), from the proxy's address: 400 in
    // cleartext, as without TLS, before any TLS work.
    for (what, before) in [
        ("a bad header", b"PROXY TCP9 garbage\r\n".to_vec()),
        ("no header", Vec::new()),
    ] {
        let mut s = hello_after(from_proxy(&w), &certs, ANY, &before);
        let (got, _) = until_closed(&mut s.sock, Instant::now());
        let got = String::from_utf8_lossy(&got);
        assert!(
            got.starts_with("HTTP/1.1 400 ") && got.contains("bad PROXY protocol header"),
            "{what}: {got:?}"
        );
    }
    // From an untrusted address a header is no header: the TLS stream starts with it, which
    // rustls refuses with an alert.
    let untrusted = connect(addr, &Opts::from(localhost(2))).unwrap();
    let mut s = hello_after(untrusted, &certs, ANY, &v1_header("203.0.113.8", addr));
    let (got, _) = until_closed(&mut s.sock, Instant::now());
    assert!(got.len() == 7 && got[0] == 0x15, "{got:?}");
    // A header followed, in the same write, by more handshake than the transport takes (20 KiB
    // of a message announcing 64 KiB): what follows the header is kept only up to that limit,
    // and the connection fails at once.
    let mut big = v1_header("203.0.113.9", addr);
    big.extend(huge_hello_records(20 * 1024));
    let mut s = from_proxy(&w);
    s.write_all(&big).unwrap();
    let (got, took) = until_closed(&mut s, Instant::now());
    assert!(got.is_empty(), "{got:?}");
    assert!(took < Duration::from_millis(800), "closed after {took:?}");
    // An untrusted client without a header is served as itself.
    let untrusted = connect(addr, &Opts::from(localhost(3))).unwrap();
    let s = hello_after(untrusted, &certs, ANY, b"");
    let mut e = handshake_upgrade_echo(s, addr, "untrusted, no header");

    for ws in [&mut a, &mut b, &mut c, &mut d, &mut e] {
        ws.send(Message::text("again")).unwrap();
        assert_eq!(ws.read().unwrap().into_text().unwrap(), "again");
        ws.close(None).unwrap();
        while ws.read().is_ok() {}
    }
    drop((a, b, c, d, e));
    let m1 = settled(&w);
    assert_eq!(m1.get("wsloop_tls_handshakes_in_progress"), 0.0);
    assert_eq!(handshakes(&m1, "ok") - handshakes(&m0, "ok"), 5);
    let since = m1.closed_since(&m0);
    assert_eq!(
        since,
        attack_support::deltas(&[
            ("peer_closed", 5),
            ("refused", 1),
            ("rejected", 2),
            ("tls_error", 2)
        ]),
    );
    w.stop();
}

// ---------------------------------------------------------------------------------------------
// Attacks under TLS, each ending at the exact descriptor baseline

/// The lowest descriptor number the child has free (the one its next accept would take).
fn lowest_free_fd(w: &Wsloop) -> u64 {
    let open: std::collections::BTreeSet<u64> = std::fs::read_dir(format!("/proc/{}/fd", w.pid))
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    (0..).find(|n| !open.contains(n)).unwrap()
}

/// Set the child's soft `RLIMIT_NOFILE` (its hard limit kept); the soft limit it had.
fn set_soft_limit(w: &Wsloop, soft: u64) -> u64 {
    use rustix::process::{prlimit, Pid, Resource, Rlimit};
    // "Max open files  <soft>  <hard>  files" (prlimit can only read by setting).
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", w.pid)).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let numbers: Vec<u64> = line
        .split_whitespace()
        .filter_map(|f| f.parse().ok())
        .collect();
    let pid = Pid::from_raw(w.pid as i32).unwrap();
    let new = Rlimit {
        current: Some(soft),
        maximum: Some(numbers[1]),
    };
    prlimit(Some(pid), Resource::Nofile, new).unwrap();
    numbers[0]
}

/// Echo `text` on an established wss client.
fn echo(ws: &mut tungstenite::WebSocket<Tls>, text: &str) {
    ws.send(Message::text(text)).unwrap();
    assert_eq!(ws.read().unwrap().into_text().unwrap(), text);
}

/// Close a wss client and read until the server's close and end.
fn close(mut ws: tungstenite::WebSocket<Tls>) {
    ws.close(None).unwrap();
    while ws.read().is_ok() {}
}

/// The process runs out of descriptors under TLS (its soft limit lowered under it, as when
/// something else in it took them all): accept fails with EMFILE, the spare descriptor sheds
/// the backlog (a TLS client gets a close, never a cleartext 503 it could not read), accepting
/// backs off; an established wss client is served meanwhile; with descriptors back the server
/// serves a new wss client, and every descriptor comes back.
#[test]
fn emfile_under_tls_sheds_with_a_close_and_recovers() {
    let Some(certs) = certs() else { return };
    let (w, m0) = tls_child_at_baseline(&certs, "tls-emfile", &[]);
    let mut established = wss(w.addr, &certs);
    echo(&mut established, "before");
    // The soft limit at the lowest free descriptor: the next accept fails with EMFILE. (No
    // metrics meanwhile: their listener is starved too.)
    let old = set_soft_limit(&w, lowest_free_fd(&w));
    let mut held = Vec::new();
    let mut shed = None;
    for _ in 0..64 {
        let mut s = hello_after(connect(w.addr, &Opts::default()).unwrap(), &certs, ANY, b"");
        let start = Instant::now();
        let (got, closed) = until_closed_or_quiet(&mut s.sock);
        match (got.first(), closed) {
            // Accepted after all (a descriptor freed meanwhile): a ServerHello came.
            (Some(0x16), _) => held.push(s),
            // Shed: closed with nothing sent (no ServerHello, no 503).
            (None, true) => {
                shed = Some((s, start.elapsed()));
                break;
            }
            other => panic!("neither served nor shed: {other:?} {got:?}"),
        }
    }
    let Some((shed, took)) = shed else {
        panic!("no EMFILE after {} connections", held.len())
    };
    assert!(took < Duration::from_secs(1), "shed after {took:?}");
    // The loop still serves what it holds.
    echo(&mut established, "during the shortage");
    // Descriptors come back: a new wss client is served (after the backoff, at most 1 s).
    set_soft_limit(&w, old);
    let mut after = wss(w.addr, &certs);
    echo(&mut after, "after");
    let m = w.metrics();
    assert!(
        m.accept_errors("EMFILE") > m0.accept_errors("EMFILE"),
        "no EMFILE counted"
    );
    close(established);
    close(after);
    drop((held, shed));
    let m1 = settled(&w);
    assert_eq!(m1.get("wsloop_accept_paused"), 0.0);
    assert_eq!(m1.get("wsloop_tls_handshakes_in_progress"), 0.0);
    let since = m1.closed_since(&m0);
    assert_eq!(since.get("refused"), Some(&1), "{since:?}");
    assert_eq!(since.get("peer_closed"), Some(&2), "{since:?}");
    assert_eq!(
        m1.admission("max_connections") - m0.admission("max_connections"),
        1
    );
    println!(
        "emfile under TLS: shed after {took:?} ({} accepted before); closed {since:?}",
        since.values().sum::<u64>() - 3
    );
    w.stop();
}

/// A handshake flood from one address with `--connection-rate-per-ip 5`: beyond the burst,
/// connections are refused at accept, before any TLS work (nothing comes back: no ServerHello,
/// no cleartext 429) and counted; an established wss client from another address is served
/// throughout, and another address is admitted during the flood.
/// One address may hold a sixteenth of the handshakes in progress (here 4 of 64): its
/// connections that never start a handshake take no more, a fifth from it is closed at once
/// with nothing sent (counted as capped), and another address still gets its handshake and
/// its echo; when the held ones go, the address may begin handshakes again.
#[test]
fn one_address_holds_at_most_a_sixteenth_of_the_handshakes_in_progress() {
    let Some(certs) = certs() else { return };
    let (w, m0) = tls_child_at_baseline(&certs, "tls-per-address", &["--tls-max-handshakes", "64"]);
    let from = |src: u8| connect(w.addr, &Opts::from(localhost(src))).unwrap();
    let held: Vec<TcpStream> = (0..4).map(|_| from(2)).collect();
    w.wait_until("4 handshakes in progress", |m| {
        m.get("wsloop_tls_handshakes_in_progress") == 4.0
    });
    let mut fifth = from(2);
    let (got, took) = until_closed(&mut fifth, Instant::now());
    assert!(got.is_empty(), "the fifth got {got:?}");
    assert!(took < Duration::from_millis(900), "closed after {took:?}");
    let mut other = ws_over(tls_over(from(3), &certs, ANY), w.addr);
    echo(&mut other, "from another address");
    let m = w.metrics();
    assert_eq!(
        m.get("wsloop_tls_handshakes_capped_total") - m0.get("wsloop_tls_handshakes_capped_total"),
        1.0
    );
    drop(held);
    w.wait_until("none in progress", |m| {
        m.get("wsloop_tls_handshakes_in_progress") == 0.0
    });
    let mut again = ws_over(tls_over(from(2), &certs, ANY), w.addr);
    echo(&mut again, "from the first address again");
    drop((again, other, fifth));
    w.wait_baseline();
    w.stop();
}

#[test]
fn a_handshake_flood_from_one_address_is_refused_before_any_tls_work() {
    const FLOOD: usize = 60;
    let Some(certs) = certs() else { return };
    let (w, m0) = tls_child_at_baseline(
        &certs,
        "tls-flood",
        &[
            "--connection-rate-per-ip",
            "5",
            "--connection-burst-per-ip",
            "5",
        ],
    );
    let tls_from = |src: u8| connect(w.addr, &Opts::from(localhost(src))).unwrap();
    let mut established = ws_over(tls_over(tls_from(3), &certs, ANY), w.addr);
    let cpu0 = w.cpu_seconds();
    // Every ClientHello sent first (faster than the bucket refills), then what came back.
    let mut flood: Vec<Tls> = (0..FLOOD)
        .map(|_| hello_after(tls_from(2), &certs, ANY, b""))
        .collect();
    let (mut answered, mut refused) = (0, 0);
    for (i, s) in flood.iter_mut().enumerate() {
        match until_closed_or_quiet(&mut s.sock) {
            // Closed with nothing sent.
            (got, true) if got.is_empty() => refused += 1,
            // A ServerHello (a handshake record): this one got TLS work (and, unfinished, is
            // closed at the 1 s handshake deadline).
            (got, _) if got.first() == Some(&0x16) => answered += 1,
            other => panic!("flood connection {i} got {other:?}"),
        }
        if i % 10 == 0 {
            echo(&mut established, &format!("during the flood {i}"));
        }
    }
    // The burst, plus the tokens refilled while the flood was sent (5 a second).
    let took = w.cpu_seconds() - cpu0;
    assert!((5..=10).contains(&answered), "{answered} answered");
    assert_eq!(answered + refused, FLOOD);
    let m = w.metrics();
    assert_eq!(
        m.admission("rate_per_ip") - m0.admission("rate_per_ip"),
        refused as u64
    );
    // Another address is not limited by the flood.
    let mut other = ws_over(tls_over(tls_from(4), &certs, ANY), w.addr);
    echo(&mut other, "another address during the flood");
    echo(&mut established, "after the flood");
    drop(flood);
    close(other);
    close(established);
    let m1 = settled(&w);
    assert_eq!(m1.get("wsloop_tls_handshakes_in_progress"), 0.0);
    // Only the admitted ones cost a handshake (completed or not).
    let handshakes_total: u64 = m1
        .matching("wsloop_tls_handshakes_total{")
        .iter()
        .map(|(_, v)| *v as u64)
        .sum::<u64>()
        - m0.matching("wsloop_tls_handshakes_total{")
            .iter()
            .map(|(_, v)| *v as u64)
            .sum::<u64>();
    assert_eq!(handshakes_total, answered as u64 + 2);
    let since = m1.closed_since(&m0);
    assert_eq!(since.get("refused"), Some(&(refused as u64)), "{since:?}");
    println!(
        "handshake flood: {FLOOD} from 127.0.0.2, {answered} got a handshake, {refused} refused \
         before TLS; {took:.3} s of server CPU during the flood; closed {since:?}"
    );
    w.stop();
}

/// Read what the server sends until it closes, or until 300 ms pass without a byte (a
/// ServerHello and then silence: the server waits for the client's next flight).
fn until_closed_or_quiet(s: &mut TcpStream) -> (Vec<u8>, bool) {
    use std::io::{ErrorKind, Read};
    s.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return (got, true),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return (got, true),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return (got, false)
            }
            Err(e) => panic!("{e}"),
        }
    }
}

/// Where a churning client resets its connection.
#[derive(Clone, Copy, Debug)]
enum Reset {
    /// Before sending anything.
    BeforeAnyByte,
    /// Half-way through its ClientHello.
    MidClientHello,
    /// Once the server's first handshake bytes (its ServerHello) arrived.
    AfterServerHello,
}

/// A real ClientHello (rustls's client), as bytes to replay.
fn client_hello(certs: &Certs) -> Vec<u8> {
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut c = rustls::ClientConnection::new(client_config(certs, ANY), name).expect("a client");
    let mut hello = Vec::new();
    while c.wants_write() {
        c.write_tls(&mut hello).unwrap();
    }
    hello
}

/// Connect/reset churn during TLS handshakes, from 6 threads: resets before any byte,
/// mid-ClientHello and right after the ServerHello, while wss clients keep connecting,
/// echoing and closing. Every reset connection ends on the close path as a failed handshake,
/// when its reset comes (not at the handshake deadline: half a ClientHello and the reset
/// behind it arrive in one edge); no handshake is left in progress and the descriptor count
/// is back at its exact baseline after each stage.
#[test]
fn resets_during_tls_handshakes_end_at_the_baseline() {
    const PER_STAGE: usize = 200;
    const THREADS: usize = 6;
    let Some(certs) = certs() else { return };
    let (w, _) = tls_child_at_baseline(&certs, "tls-churn", &[]);
    let fds = w.fd_sampler();
    let hello = std::sync::Arc::new(client_hello(&certs));
    let failed_total = |m: &attack_support::Metrics| -> u64 {
        m.matching("wsloop_tls_handshakes_total{")
            .iter()
            .filter(|(k, _)| !k.contains("result=\"ok\""))
            .map(|(_, v)| *v as u64)
            .sum()
    };
    let mut report = Vec::new();
    for stage in [
        Reset::BeforeAnyByte,
        Reset::MidClientHello,
        Reset::AfterServerHello,
    ] {
        let before = w.wait_quiet();
        let (addr, hello) = (w.addr, hello.clone());
        let churn = thread::spawn(move || {
            attack_support::parallel(THREADS, move |i| {
                for n in (i..PER_STAGE).step_by(THREADS) {
                    // From 50 addresses: one may hold a sixteenth of the handshakes.
                    let src = localhost(10 + (n % 50) as u8);
                    let mut s = connect(addr, &Opts::from(src)).unwrap();
                    match stage {
                        Reset::BeforeAnyByte => {}
                        Reset::MidClientHello => s.write_all(&hello[..hello.len() / 2]).unwrap(),
                        Reset::AfterServerHello => {
                            use std::io::Read;
                            s.write_all(&hello).unwrap();
                            let mut first = [0u8; 1];
                            s.read_exact(&mut first).unwrap();
                            assert_eq!(first[0], 0x16, "not a handshake record");
                        }
                    }
                    attack_support::reset(s);
                }
            })
        });
        // Legitimate wss clients meanwhile: each connects, echoes and closes.
        let mut legit = 0u64;
        while !churn.is_finished() {
            let mut ws = wss(w.addr, &certs);
            echo(&mut ws, &format!("during {stage:?}"));
            close(ws);
            legit += 1;
        }
        churn.join().unwrap();
        let after = settled(&w);
        assert_eq!(after.get("wsloop_tls_handshakes_in_progress"), 0.0);
        let mut closed = after.closed_since(&before);
        assert_eq!(closed.remove("peer_closed"), Some(legit), "{stage:?}");
        // Each reset is seen when it comes (the read that returns the bytes before it goes on
        // to the reset), not at the handshake deadline.
        assert_eq!(
            closed.get("handshake_timeout"),
            None,
            "{stage:?}: {closed:?}"
        );
        assert_eq!(
            closed.values().sum::<u64>(),
            PER_STAGE as u64,
            "{stage:?}: {closed:?}"
        );
        assert_eq!(
            failed_total(&after) - failed_total(&before),
            PER_STAGE as u64,
            "{stage:?}: failed handshakes"
        );
        assert_eq!(
            handshakes(&after, "ok") - handshakes(&before, "ok"),
            legit,
            "{stage:?}"
        );
        report.push(format!("{stage:?}: {closed:?}, {legit} legit wss clients"));
    }
    let peak = fds.stop();
    println!(
        "TLS handshake churn: {} resets; fd peak {peak} (baseline {}); {}",
        3 * PER_STAGE,
        w.baseline_fds,
        report.join("; ")
    );
    w.stop();
}

// ---------------------------------------------------------------------------------------------
// Red team: what an outsider can send over raw sockets, each found and fixed

/// After an answered request the server sends `close_notify` and its FIN, and lingers reading
/// until the client's EOF. A record that does not decrypt sent then (a bad MAC) used to reach
/// rustls, which answered with a second alert after its close_notify and, in a debug build,
/// panicked on its own assertion (the loop thread died with every connection). Now nothing
/// is decrypted after our close_notify: the bytes are discarded, the server goes on.
#[test]
fn a_bad_record_after_our_close_notify_is_discarded() {
    use std::io::Read;
    let Some(certs) = certs() else { return };
    let (w, m0) = tls_child_at_baseline(&certs, "tls-after-close-notify", &[]);
    let mut s = tls_connect(w.addr, &certs);
    s.write_all(b"GET /nothing HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .unwrap();
    s.flush().unwrap();
    let answer = read_to_tls_end(&mut s).expect("a clean end (close_notify)");
    assert!(answer.starts_with(b"HTTP/1.1 426 "));
    // An application-data record that does not decrypt, then one more for good measure.
    let bad = [0x17, 0x03, 0x03, 0x00, 0x20];
    for _ in 0..2 {
        s.sock.write_all(&bad).unwrap();
        s.sock.write_all(&[0x5a; 0x20]).unwrap();
        thread::sleep(Duration::from_millis(50));
    }
    // The server read and discarded them: nothing came back (no second alert).
    s.sock
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut rest = [0u8; 64];
    match s.sock.read(&mut rest) {
        Ok(0) => {}
        Ok(n) => panic!("the server sent {:?} after its close_notify", &rest[..n]),
        Err(e) => assert!(
            matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
            "{e}"
        ),
    }
    drop(s);
    // Still serving.
    let mut ws = wss(w.addr, &certs);
    echo(&mut ws, "still there");
    close(ws);
    let m1 = settled(&w);
    // (closed_since leaves out `http_answered`, the metrics requests' reason.)
    assert_eq!(
        m1.closed_since(&m0),
        attack_support::deltas(&[("peer_closed", 1)])
    );
    assert_eq!(m1.rejected_status("426") - m0.rejected_status("426"), 1);
    w.stop();
}

/// `len` bytes of one handshake message announcing 0xffff bytes (the most rustls joins), in
/// records of 16 KiB.
fn huge_hello_records(len: usize) -> Vec<u8> {
    let mut message = vec![1u8, 0x00, 0xff, 0xff];
    message.extend(std::iter::repeat_n(0x41, len - 4));
    let mut records = Vec::new();
    for part in message.chunks(16 * 1024) {
        records.extend([0x16, 3, 1]);
        records.extend((part.len() as u16).to_be_bytes());
        records.extend_from_slice(part);
    }
    records
}

/// A ClientHello announcing 64 KiB (the most rustls joins), sent in full records: rustls would
/// buffer it all (127 KiB of allocation per connection, measured by the `tls` fuzz target)
/// until the handshake deadline. The transport refuses more than 16 KiB of handshake input:
/// the connection fails at once (`tls_error`), with nothing but rustls's silence sent, while a
/// real client's handshake (well under the limit) completes.
#[test]
fn a_client_hello_over_16_kib_is_refused_at_once() {
    let Some(certs) = certs() else { return };
    let (w, m0) = tls_child_at_baseline(&certs, "tls-huge-hello", &[]);
    let records = huge_hello_records(20 * 1024);
    let mut clients: Vec<TcpStream> = (0..20)
        .map(|_| {
            let mut s = connect(w.addr, &Opts::default()).unwrap();
            s.write_all(&records).unwrap();
            s
        })
        .collect();
    for s in &mut clients {
        let start = Instant::now();
        let (got, took) = until_closed(s, start);
        assert!(got.is_empty(), "the server sent {got:?}");
        // Well before the 1 s handshake deadline.
        assert!(took < Duration::from_millis(800), "closed after {took:?}");
    }
    drop(clients);
    let mut ws = wss(w.addr, &certs);
    echo(&mut ws, "a real ClientHello is far under the limit");
    close(ws);
    let m1 = settled(&w);
    assert_eq!(
        handshakes(&m1, "tls_error") - handshakes(&m0, "tls_error"),
        20
    );
    assert_eq!(m1.closed_since(&m0).get("handshake_timeout"), None);
    w.stop();
}

/// The client's `close_notify`, then more records (a WebSocket message after it): the stream
/// ended at the close_notify, so what follows is never decrypted for the application (RFC 8446
/// 6.1: data after a closure alert is ignored); the connection ends, and the server goes on.
#[test]
fn data_after_the_clients_close_notify_is_ignored() {
    let Some(certs) = certs() else { return };
    let (w, m0) = tls_child_at_baseline(&certs, "tls-after-client-close-notify", &[]);
    let mut ws = wss(w.addr, &certs);
    echo(&mut ws, "before");
    ws.get_mut().conn.send_close_notify();
    ws.send(Message::text("after the close_notify")).unwrap();
    // The server ends the stream: its close_notify, then EOF; no echo of the second message.
    let end = read_to_tls_end(ws.get_mut());
    assert_eq!(
        end,
        Ok(Vec::new()),
        "the server sent more after the close_notify"
    );
    drop(ws);
    let m1 = settled(&w);
    assert_eq!(
        m1.get("wsloop_messages_received_total") - m0.get("wsloop_messages_received_total"),
        1.0
    );
    assert_eq!(
        m1.closed_since(&m0),
        attack_support::deltas(&[("abnormal", 1)])
    );
    w.stop();
}

/// A TLS 1.3 key-update flood (each KeyUpdate costs the server a key derivation, and asks for
/// its keys to change too, which it does once, before its next data): the record layer allows
/// 32 in a row without application data between them (src/io/records.rs, as rustls did), then
/// fails the connection with an alert; the server closes it
/// (`tls_error`) and goes on. What the server wrote in answer stays below what the client sent.
#[test]
fn a_key_update_flood_is_cut_off() {
    use std::io::Read;
    let Some(certs) = certs() else { return };
    let (w, m0) = tls_child_at_baseline(&certs, "tls-key-updates", &[]);
    let mut s = tls_over(
        connect(w.addr, &Opts::default()).unwrap(),
        &certs,
        &[&rustls::version::TLS13],
    );
    assert!(upgrade_over(&mut s, w.addr).starts_with("HTTP/1.1 101 "));
    let mut sent = 0;
    for _ in 0..200 {
        s.conn.refresh_traffic_keys().unwrap();
        let mut out = Vec::new();
        while s.conn.wants_write() {
            s.conn.write_tls(&mut out).unwrap();
        }
        sent += out.len();
        if s.sock.write_all(&out).is_err() {
            break; // closed meanwhile
        }
    }
    // What came back, raw, until the server's end.
    s.sock
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.sock.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    assert!(got.len() < sent, "{} bytes back for {sent} sent", got.len());
    drop(s);
    let m1 = settled(&w);
    assert_eq!(
        m1.closed_since(&m0),
        attack_support::deltas(&[("tls_error", 1)])
    );
    println!(
        "key-update flood: {sent} bytes of KeyUpdates sent, {} bytes back before the close",
        got.len()
    );
    w.stop();
}

/// Half a ClientHello and the client's FIN in one write (one edge): the read that returns the
/// bytes goes on to the FIN (the event says it is there), so the connection ends at once
/// instead of waiting for the handshake deadline with its descriptor and rustls's state.
#[test]
fn half_a_client_hello_then_fin_is_closed_at_once() {
    let Some(certs) = certs() else { return };
    let (w, m0) = tls_child_at_baseline(&certs, "tls-half-hello-fin", &[]);
    let hello = client_hello(&certs);
    let mut clients: Vec<(TcpStream, Instant)> = (0..20)
        .map(|_| {
            let mut s = connect(w.addr, &Opts::default()).unwrap();
            s.write_all(&hello[..hello.len() / 2]).unwrap();
            s.shutdown(std::net::Shutdown::Write).unwrap();
            (s, Instant::now())
        })
        .collect();
    for (s, start) in &mut clients {
        let (got, took) = until_closed(s, *start);
        assert!(got.is_empty(), "the server sent {got:?}");
        assert!(took < Duration::from_millis(800), "closed after {took:?}");
    }
    drop(clients);
    let m1 = settled(&w);
    assert_eq!(
        m1.closed_since(&m0),
        attack_support::deltas(&[("abnormal", 20)])
    );
    assert_eq!(
        handshakes(&m1, "abnormal") - handshakes(&m0, "abnormal"),
        20
    );
    w.stop();
}
