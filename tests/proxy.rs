//! Behind a proxy every connection comes from the proxy's address: the real client comes from
//! the PROXY protocol (v1, v2) or from X-Forwarded-For / Forwarded, but only when the TCP peer
//! is a trusted proxy. Per-address limits then apply to the real client.
// Test code (see Cargo.toml's [lints]): it fails by panicking, and opens descriptors on purpose.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

mod common;

use common::*;
use socket2::{Domain, Socket, Type};
use std::io::Write;
use std::net::{IpAddr, Ipv6Addr, SocketAddr, TcpStream};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};
use wsloop::{Config, Decision, Handler, Message, Server, UpgradeRequest, WebSocket};

/// Echoes, and reports the address the upgrade hook saw for each connection.
struct Seen(mpsc::Sender<SocketAddr>);

impl Handler for Seen {
    type Data = ();
    fn upgrade(&mut self, req: &UpgradeRequest<'_>) -> Decision<()> {
        let _ = self.0.send(req.peer_addr());
        Decision::accept(())
    }
    fn on_message(&mut self, ws: &mut WebSocket<'_, ()>, msg: Message<'_>) {
        ws.send(msg);
    }
}

struct Proxied {
    addr: SocketAddr,
    seen: mpsc::Receiver<SocketAddr>,
    handle: wsloop::LoopHandle<Seen>,
    /// The loop's thread: `run()`'s result, its error as text.
    thread: Option<thread::JoinHandle<Result<(), String>>>,
}

impl Proxied {
    fn start(config: Config) -> Proxied {
        let (tx, seen) = mpsc::channel();
        let mut server = Server::new(config, Seen(tx)).unwrap();
        let addr = server.listen("127.0.0.1:0".parse().unwrap()).unwrap();
        let handle = server.handle();
        let thread = Some(thread::spawn(move || {
            server.run().map_err(|e| e.to_string())
        }));
        Proxied {
            addr,
            seen,
            handle,
            thread,
        }
    }

    fn seen(&self) -> SocketAddr {
        self.seen.recv_timeout(WAIT).expect("the upgrade hook ran")
    }

    fn stats(&self) -> wsloop::Stats {
        self.handle.stats().expect("the loop is running")
    }

    /// The end of every test: the clients gone (`held` dropped first), wait (bounded) until no
    /// connection and no timer is left, shut down, and check that `run()` returned Ok. Returns
    /// the stats taken before the shutdown.
    fn finish(mut self, held: impl Sized) -> wsloop::Stats {
        drop(held);
        let deadline = Instant::now() + WAIT;
        let stats = loop {
            let s = self.stats();
            if s.connections == 0 && s.timers == 0 {
                break s;
            }
            assert!(Instant::now() < deadline, "not quiet: {s:?}");
            thread::sleep(Duration::from_millis(10));
        };
        self.handle.shutdown().expect("the loop is running");
        let t = self.thread.take().unwrap();
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || tx.send(t.join()));
        rx.recv_timeout(Duration::from_secs(10))
            .expect("run() did not return in time")
            .expect("the loop thread panicked")
            .expect("run() returned an error");
        stats
    }
}

impl Drop for Proxied {
    fn drop(&mut self) {
        // Only a failing test gets here with the loop running: stop it, and let the test's own
        // panic say what went wrong.
        if self.thread.is_some() {
            let _ = self.handle.shutdown();
        }
    }
}

fn proxy_config(trusted: &[&str], proxy_protocol: bool) -> Config {
    Config {
        trusted_proxies: trusted.iter().map(|s| s.to_string()).collect(),
        proxy_protocol,
        max_connections_per_ip: 1,
        ..config()
    }
}

/// A TCP connection from a chosen loopback source address.
fn from(src: &str, to: SocketAddr) -> TcpStream {
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    let src: SocketAddr = format!("{src}:0").parse().unwrap();
    s.bind(&src.into()).unwrap();
    s.connect(&to.into()).unwrap();
    let s: TcpStream = s.into();
    s.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
    s
}

fn v2_header(client: SocketAddr, server: SocketAddr) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.push(0x21); // version 2, PROXY
    h.push(0x11); // TCP over IPv4
    h.extend_from_slice(&12u16.to_be_bytes());
    let (IpAddr::V4(c), IpAddr::V4(s)) = (client.ip(), server.ip()) else {
        panic!("IPv4 only")
    };
    h.extend_from_slice(&c.octets());
    h.extend_from_slice(&s.octets());
    h.extend_from_slice(&client.port().to_be_bytes());
    h.extend_from_slice(&server.port().to_be_bytes());
    h
}

/// Send `preamble` then an upgrade request (with `extra` header lines); return the status.
fn upgrade_via(s: &mut TcpStream, addr: SocketAddr, preamble: &[u8], extra: &str) -> u16 {
    let mut bytes = preamble.to_vec();
    let req = match extra {
        "" => upgrade_request(addr),
        _ => upgrade_request(addr).replacen("\r\n\r\n", &format!("\r\n{extra}\r\n\r\n"), 1),
    };
    bytes.extend_from_slice(req.as_bytes());
    s.write_all(&bytes).unwrap();
    let head = read_head(s);
    head.split(' ').nth(1).unwrap().parse().unwrap()
}

fn echo_on(s: &mut TcpStream, text: &str) {
    s.write_all(&frame(true, OP_TEXT, text.as_bytes())).unwrap();
    assert_eq!(expect_frame(s, OP_TEXT), text.as_bytes());
}

#[test]
fn proxy_protocol_v1_and_v2_name_the_client() {
    let server = Proxied::start(proxy_config(&["127.0.0.1"], true));
    let mut a = from("127.0.0.1", server.addr);
    let v1 = b"PROXY TCP4 203.0.113.7 127.0.0.1 40001 9001\r\n";
    assert_eq!(upgrade_via(&mut a, server.addr, v1, ""), 101);
    assert_eq!(server.seen(), "203.0.113.7:40001".parse().unwrap());
    echo_on(&mut a, "through v1");

    let mut b = from("127.0.0.1", server.addr);
    let v2 = v2_header("198.51.100.9:40002".parse().unwrap(), server.addr);
    assert_eq!(upgrade_via(&mut b, server.addr, &v2, ""), 101);
    assert_eq!(server.seen(), "198.51.100.9:40002".parse().unwrap());
    echo_on(&mut b, "through v2");

    // The per-address limit (1) applies to the client the proxy names, not to the proxy.
    let mut c = from("127.0.0.1", server.addr);
    let again = b"PROXY TCP4 203.0.113.7 127.0.0.1 40003 9001\r\n";
    assert_eq!(upgrade_via(&mut c, server.addr, again, ""), 503);
    let stats = server.handle.stats().unwrap();
    assert_eq!(
        stats.refused[1], 1,
        "refused as max_connections_per_ip: {stats:?}"
    );

    // A PROXY header split across writes is read whole.
    let mut d = from("127.0.0.1", server.addr);
    d.write_all(b"PROXY TCP4 192.0.2.1 ").unwrap();
    thread::sleep(Duration::from_millis(50));
    assert_eq!(
        upgrade_via(&mut d, server.addr, b"127.0.0.1 40004 9001\r\n", ""),
        101
    );
    assert_eq!(server.seen(), "192.0.2.1:40004".parse().unwrap());
    echo_on(&mut d, "split header");
    server.finish((a, b, c, d));
}

#[test]
fn a_missing_or_bad_proxy_header_is_refused_and_untrusted_peers_cannot_send_one() {
    let server = Proxied::start(proxy_config(&["127.0.0.1"], true));
    // From the trusted proxy, a request without the header it promised: 400.
    let mut s = from("127.0.0.1", server.addr);
    assert_eq!(upgrade_via(&mut s, server.addr, b"", ""), 400);
    // An untrusted peer's PROXY header is not a PROXY header to us: a malformed request.
    let mut spoof = from("127.0.0.2", server.addr);
    let v1 = b"PROXY TCP4 203.0.113.7 127.0.0.1 40001 9001\r\n";
    assert_eq!(upgrade_via(&mut spoof, server.addr, v1, ""), 400);
    // And an untrusted peer without one is served under its own address.
    let mut plain = from("127.0.0.4", server.addr);
    assert_eq!(upgrade_via(&mut plain, server.addr, b"", ""), 101);
    assert_eq!(server.seen().ip(), "127.0.0.4".parse::<IpAddr>().unwrap());
    echo_on(&mut plain, "direct");
    server.finish((s, spoof, plain));
}

#[test]
fn forwarded_headers_count_only_from_trusted_proxies() {
    let server = Proxied::start(proxy_config(&["127.0.0.1"], false));
    let mut a = from("127.0.0.1", server.addr);
    let xff = "X-Forwarded-For: 203.0.113.50, 127.0.0.1";
    assert_eq!(upgrade_via(&mut a, server.addr, b"", xff), 101);
    assert_eq!(
        server.seen().ip(),
        "203.0.113.50".parse::<IpAddr>().unwrap()
    );
    // The proxy sets X-Forwarded-For (the default): a Forwarded header is the client's own
    // word, passed through by the proxy, and is not read.
    let mut b = from("127.0.0.1", server.addr);
    let fwd = "Forwarded: for=198.51.100.17;proto=http";
    assert_eq!(upgrade_via(&mut b, server.addr, b"", fwd), 101);
    assert_eq!(server.seen().ip(), "127.0.0.1".parse::<IpAddr>().unwrap());
    // Same client again through the proxy: the per-address limit (1) applies to it.
    let mut c = from("127.0.0.1", server.addr);
    assert_eq!(upgrade_via(&mut c, server.addr, b"", xff), 503);

    // A spoofed header from an untrusted peer is ignored: its own address counts.
    let mut spoof = from("127.0.0.3", server.addr);
    let lie = "X-Forwarded-For: 192.0.2.99";
    assert_eq!(upgrade_via(&mut spoof, server.addr, b"", lie), 101);
    assert_eq!(server.seen().ip(), "127.0.0.3".parse::<IpAddr>().unwrap());
    let mut again = from("127.0.0.3", server.addr);
    let other_lie = "X-Forwarded-For: 192.0.2.100";
    assert_eq!(
        upgrade_via(&mut again, server.addr, b"", other_lie),
        503,
        "the untrusted peer is limited by its own address whatever it claims"
    );
    server.finish((a, b, c, spoof, again));
}

#[test]
fn with_forwarded_configured_only_forwarded_is_read() {
    let server = Proxied::start(Config {
        forwarded_header: wsloop::config::ForwardedHeader::Forwarded,
        ..proxy_config(&["127.0.0.1"], false)
    });
    let mut a = from("127.0.0.1", server.addr);
    let both = "Forwarded: for=198.51.100.17;proto=http\r\nX-Forwarded-For: 192.0.2.1";
    assert_eq!(upgrade_via(&mut a, server.addr, b"", both), 101);
    assert_eq!(
        server.seen().ip(),
        "198.51.100.17".parse::<IpAddr>().unwrap()
    );
    let mut b = from("127.0.0.1", server.addr);
    let v6 = "Forwarded: for=\"[2001:db8::1]:4711\"";
    assert_eq!(upgrade_via(&mut b, server.addr, b"", v6), 101);
    assert_eq!(server.seen().ip(), "2001:db8::1".parse::<IpAddr>().unwrap());
    server.finish((a, b));
}

#[test]
fn proxy_settings_are_validated() {
    for (config, field) in [
        (proxy_config(&["not an address"], false), "trusted_proxies"),
        (proxy_config(&[], true), "proxy_protocol"),
    ] {
        let err = config.validate().unwrap_err();
        assert_eq!(err.field, field);
    }
}

/// [`upgrade_via`] with raw header bytes (`extra`, CRLF-separated lines, may be non-UTF-8).
fn upgrade_raw(s: &mut TcpStream, addr: SocketAddr, preamble: &[u8], extra: &[u8]) -> u16 {
    let mut bytes = preamble.to_vec();
    let req = upgrade_request(addr);
    let head = req.strip_suffix("\r\n\r\n").expect("a request head");
    bytes.extend_from_slice(head.as_bytes());
    if !extra.is_empty() {
        bytes.extend_from_slice(b"\r\n");
        bytes.extend_from_slice(extra);
    }
    bytes.extend_from_slice(b"\r\n\r\n");
    s.write_all(&bytes).unwrap();
    let head = read_head(s);
    head.split(' ').nth(1).unwrap().parse().unwrap()
}

/// Three upgrades held open through the trusted proxy, each carrying `extra`: the first is
/// admitted, the other two are refused with `status`.
fn one_then_refused(server: &Proxied, extra: &[u8], status: u16) -> Vec<TcpStream> {
    let mut held = Vec::new();
    for i in 0..3 {
        let mut s = from("127.0.0.1", server.addr);
        let got = upgrade_raw(&mut s, server.addr, b"", extra);
        let want = if i == 0 { 101 } else { status };
        assert_eq!(
            got,
            want,
            "connection {i} with {:?}",
            String::from_utf8_lossy(extra)
        );
        held.push(s);
    }
    held
}

#[test]
fn a_non_utf8_forwarded_for_entry_does_not_escape_the_connection_limit() {
    let server = Proxied::start(proxy_config(&["127.0.0.1"], false));
    // The client wrote "\xff", nginx appended the address it saw.
    let held = one_then_refused(&server, b"X-Forwarded-For: \xff, 10.0.0.5", 503);
    assert_eq!(server.seen().ip(), "10.0.0.5".parse::<IpAddr>().unwrap());
    let stats = server.handle.stats().unwrap();
    assert_eq!(stats.refused[1], 2, "max_connections_per_ip: {stats:?}");
    server.finish(held);
}

/// A client behind the proxy that takes a fresh address of its /64 for every connection is
/// still one client to the per-IP limits (`ipv6_prefix_len`, 64 by default); another /64 is
/// another client.
#[test]
fn addresses_of_one_ipv6_network_share_the_connection_limit() {
    let server = Proxied::start(proxy_config(&["127.0.0.1"], false));
    let mut held = Vec::new();
    for (i, (client, want)) in [
        ("2001:db8:1234:5678::1", 101),
        ("2001:db8:1234:5678::2", 503),
        ("2001:db8:1234:5678:9:8:7:6", 503),
        ("2001:db8:1234:5679::1", 101),
    ]
    .into_iter()
    .enumerate()
    {
        let mut s = from("127.0.0.1", server.addr);
        let header = format!("X-Forwarded-For: {client}");
        let got = upgrade_raw(&mut s, server.addr, b"", header.as_bytes());
        assert_eq!(got, want, "connection {i} from {client}");
        held.push(s);
    }
    let stats = server.handle.stats().unwrap();
    assert_eq!(stats.refused[1], 2, "max_connections_per_ip: {stats:?}");
    drop(held);
}

#[test]
fn a_non_utf8_earlier_forwarded_for_line_does_not_escape_the_rate_limit() {
    let server = Proxied::start(Config {
        max_connections_per_ip: 0,
        connection_rate_per_ip: 1,
        ..proxy_config(&["127.0.0.1"], false)
    });
    // As HAProxy does: the client's own line first, then the proxy's line of its own.
    let held = one_then_refused(
        &server,
        b"X-Forwarded-For: 198.51.100.1, \xff\r\nX-Forwarded-For: 10.0.0.6",
        429,
    );
    assert_eq!(server.seen().ip(), "10.0.0.6".parse::<IpAddr>().unwrap());
    let stats = server.handle.stats().unwrap();
    assert_eq!(stats.refused[2], 2, "rate_per_ip: {stats:?}");
    server.finish(held);
}

#[test]
fn a_non_utf8_forwarded_element_does_not_escape_the_connection_limit() {
    let server = Proxied::start(Config {
        forwarded_header: wsloop::config::ForwardedHeader::Forwarded,
        ..proxy_config(&["127.0.0.1"], false)
    });
    let held = one_then_refused(&server, b"Forwarded: for=\"\xff\", for=10.0.0.7", 503);
    assert_eq!(server.seen().ip(), "10.0.0.7".parse::<IpAddr>().unwrap());
    server.finish(held);
}

#[test]
fn a_request_naming_no_client_is_counted_under_the_proxy() {
    let server = Proxied::start(proxy_config(&["127.0.0.1"], false));
    // Nothing usable at the proxy's end of the chain, or no header at all: fail closed, the
    // proxy's own address is the key (never unlimited).
    for extra in [
        &b"X-Forwarded-For: \xff"[..],
        b"X-Forwarded-For: unknown",
        b"",
    ] {
        let held = one_then_refused(&server, extra, 503);
        assert_eq!(server.seen().ip(), "127.0.0.1".parse::<IpAddr>().unwrap());
        drop(held);
        // The slot is free again once the held connection has ended.
        let deadline = std::time::Instant::now() + WAIT;
        while server.handle.stats().unwrap().connections > 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "connections not released"
            );
            thread::sleep(Duration::from_millis(10));
        }
    }
    server.finish(());
    // The same through a PROXY header that names no client (v1 UNKNOWN).
    let server = Proxied::start(proxy_config(&["127.0.0.1"], true));
    let mut held = Vec::new();
    for want in [101, 503] {
        let mut s = from("127.0.0.1", server.addr);
        let got = upgrade_via(&mut s, server.addr, b"PROXY UNKNOWN\r\n", "");
        assert_eq!(got, want);
        held.push(s);
    }
    server.finish(held);
}

#[test]
fn ipv4_mapped_addresses_count_as_their_ipv4_address() {
    let server = Proxied::start(proxy_config(&["127.0.0.1"], false));
    let mut a = from("127.0.0.1", server.addr);
    let mapped = "X-Forwarded-For: ::ffff:10.0.0.9";
    assert_eq!(upgrade_via(&mut a, server.addr, b"", mapped), 101);
    assert_eq!(server.seen().ip(), "10.0.0.9".parse::<IpAddr>().unwrap());
    let mut b = from("127.0.0.1", server.addr);
    assert_eq!(
        upgrade_via(&mut b, server.addr, b"", "X-Forwarded-For: 10.0.0.9"),
        503,
        "10.0.0.9 holds its one connection already"
    );
    let mut c = from("127.0.0.1", server.addr);
    let bracketed = "X-Forwarded-For: [::ffff:10.0.0.9]:4000";
    assert_eq!(upgrade_via(&mut c, server.addr, b"", bracketed), 503);
    // A mapped trusted proxy in the chain is trusted: the client left of it counts.
    let mut d = from("127.0.0.1", server.addr);
    let chain = "X-Forwarded-For: 10.0.0.10, ::ffff:127.0.0.1";
    assert_eq!(upgrade_via(&mut d, server.addr, b"", chain), 101);
    assert_eq!(server.seen().ip(), "10.0.0.10".parse::<IpAddr>().unwrap());

    server.finish((a, b, c, d));
    // PROXY protocol sources too (v1 TCP6 and v2 over IPv6).
    let server = Proxied::start(proxy_config(&["127.0.0.1"], true));
    let mut e = from("127.0.0.1", server.addr);
    let v1 = b"PROXY TCP6 ::ffff:203.0.113.7 ::1 40001 9001\r\n";
    assert_eq!(upgrade_via(&mut e, server.addr, v1, ""), 101);
    assert_eq!(server.seen(), "203.0.113.7:40001".parse().unwrap());
    let mut f = from("127.0.0.1", server.addr);
    let v1 = b"PROXY TCP4 203.0.113.7 127.0.0.1 40002 9001\r\n";
    assert_eq!(upgrade_via(&mut f, server.addr, v1, ""), 503);
    let mut g = from("127.0.0.1", server.addr);
    let mut v2 = b"\r\n\r\n\0\r\nQUIT\n\x21\x21\x00\x24".to_vec();
    v2.extend_from_slice(&"::ffff:203.0.113.7".parse::<Ipv6Addr>().unwrap().octets());
    v2.extend_from_slice(&Ipv6Addr::LOCALHOST.octets());
    v2.extend_from_slice(&[0x9c, 0x43, 0x23, 0x29]);
    assert_eq!(upgrade_via(&mut g, server.addr, &v2, ""), 503);
    server.finish((e, f, g));
}

#[test]
fn a_refused_request_keeps_its_slot_only_while_its_client_keeps_the_connection() {
    let server = Proxied::start(proxy_config(&["127.0.0.1"], false));
    // A direct client (untrusted, counted at accept) whose request is malformed: 400.
    let mut bad = from("127.0.0.2", server.addr);
    assert_eq!(
        upgrade_via(&mut bad, server.addr, b"", "Sec-WebSocket-Key: twice"),
        400
    );
    // While it keeps its socket open, the answered connection lingers and holds its slot
    // (README, "Trusted proxies": one address cannot pile up lingering descriptors).
    let mut second = from("127.0.0.2", server.addr);
    assert_eq!(upgrade_via(&mut second, server.addr, b"", ""), 503);
    // Once it closes, the slot is free.
    drop(bad);
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let mut again = from("127.0.0.2", server.addr);
        match upgrade_via(&mut again, server.addr, b"", "") {
            101 => break,
            503 => assert!(std::time::Instant::now() < deadline, "slot not released"),
            other => panic!("{other}"),
        }
        thread::sleep(Duration::from_millis(20));
    }
    server.finish(second);
}
