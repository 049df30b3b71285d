//! TLS at its edges: what comes before the ClientHello, real browsers and Node over wss://,
//! and attacks on the binary with TLS on, each ending at the exact descriptor baseline.
//!
//! - `--proxy-protocol` in front of TLS: a trusted proxy's PROXY header (v1 and v2) comes in
//!   cleartext before the ClientHello, in the same write or not, whole or split; the handshake
//!   and the upgrade follow over the same socket. The per-address limits apply to the client
//!   the header names (a refused one is closed before any TLS work, with nothing sent); a bad
//!   or missing header is answered 400 in cleartext, as without TLS; an untrusted peer's
//!   header is no header but a bad ClientHello (an alert).
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
    let w = tls_child(
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
    let m0 = w.metrics();
    w.wait_baseline();
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
    w.wait_baseline();
    let m1 = w.wait_quiet();
    assert_eq!(m1.get("wsloop_tls_handshakes_in_progress"), 0.0);
    assert_eq!(handshakes(&m1, "ok") - handshakes(&m0, "ok"), 5);
    let since = m1.closed_since(&m0);
    assert_eq!(
        since,
        attack_support::deltas(&[
            ("peer_closed", 5),
            ("refused", 1),
            ("rejected", 2),
            ("tls_error", 1)
        ]),
    );
    assert_eq!(w.audited(&m1).get("wsloop_fd_audit_difference"), 0.0);
    w.stop();
}
