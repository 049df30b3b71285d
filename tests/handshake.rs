//! Handshake rejections over raw sockets: each gets its status, `Connection: close` and an
//! orderly close by the server; the upgrade hook's refusals and subprotocol choice; the
//! handshake timeout.
// Test code (see Cargo.toml's [lints]): it fails by panicking, and opens descriptors on purpose.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

mod common;

use common::*;
use std::io::Write;
use std::time::{Duration, Instant};
use tungstenite::client::IntoClientRequest;
use wsloop::{CloseReason, Config};

fn request(lines: &[&str]) -> Vec<u8> {
    let mut r = lines.join("\r\n");
    r.push_str("\r\n\r\n");
    r.into_bytes()
}

const GET: &str = "GET /chat HTTP/1.1";
const HOST: &str = "Host: example.com";
const UPGRADE: &str = "Upgrade: websocket";
const CONNECTION: &str = "Connection: Upgrade";
const VERSION: &str = "Sec-WebSocket-Version: 13";
const GOOD_KEY: &str = "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==";

/// Send `req` in one write, read the response up to the server's EOF, and check the parts every
/// refusal shares. Returns the response.
fn refused_by(server: &TestServer, req: &[u8], status: u16) -> Response {
    let mut s = tcp(server.addr);
    s.write_all(req).unwrap();
    let r = read_response(&mut s);
    assert_eq!(r.status, status, "{r:?}");
    let conn = r
        .header("connection")
        .unwrap_or_default()
        .to_ascii_lowercase();
    assert!(
        conn.split(',').any(|t| t.trim() == "close"),
        "Connection: close missing: {r:?}"
    );
    assert!(!r.body.is_empty(), "a refusal says why: {r:?}");
    r
}

/// A fresh server refuses `req` with `status`, counted as `reason`; no connection opened.
fn refused(req: &[u8], status: u16, reason: CloseReason) -> Response {
    let server = TestServer::start(config());
    let r = refused_by(&server, req, status);
    assert!(server.rec().opens.is_empty());
    let stats = server.finish();
    assert_closed(&stats, &[(reason, 1)]);
    r
}

#[test]
fn missing_key_is_400() {
    refused(
        &request(&[GET, HOST, UPGRADE, CONNECTION, VERSION]),
        400,
        CloseReason::Rejected(400),
    );
}

#[test]
fn bad_keys_are_400() {
    for key in [
        "Sec-WebSocket-Key: abc",
        "Sec-WebSocket-Key: !!!!!!!!!!!!!!!!!!!!!!==",
        "Sec-WebSocket-Key: AAAAAAAAAAAAAAAAAAAA", // 15 bytes
        "Sec-WebSocket-Key: AAAAAAAAAAAAAAAAAAAAAAAAA", // 25 chars
        "Sec-WebSocket-Key:",
    ] {
        refused(
            &request(&[GET, HOST, UPGRADE, CONNECTION, VERSION, key]),
            400,
            CloseReason::Rejected(400),
        );
    }
    // Two keys.
    refused(
        &request(&[GET, HOST, UPGRADE, CONNECTION, VERSION, GOOD_KEY, GOOD_KEY]),
        400,
        CloseReason::Rejected(400),
    );
}

#[test]
fn wrong_version_is_426_with_supported_version() {
    for version in ["Sec-WebSocket-Version: 8", "Sec-WebSocket-Version: 14"] {
        let r = refused(
            &request(&[GET, HOST, UPGRADE, CONNECTION, version, GOOD_KEY]),
            426,
            CloseReason::Rejected(426),
        );
        assert_eq!(r.header("sec-websocket-version"), Some("13"), "{r:?}");
    }
    // Missing version too.
    let r = refused(
        &request(&[GET, HOST, UPGRADE, CONNECTION, GOOD_KEY]),
        426,
        CloseReason::Rejected(426),
    );
    assert_eq!(r.header("sec-websocket-version"), Some("13"), "{r:?}");
}

#[test]
fn post_is_405() {
    let r = refused(
        &request(&[
            "POST /chat HTTP/1.1",
            HOST,
            UPGRADE,
            CONNECTION,
            VERSION,
            GOOD_KEY,
        ]),
        405,
        CloseReason::Rejected(405),
    );
    assert_eq!(r.header("allow"), Some("GET"));
}

#[test]
fn headers_over_8k_are_431() {
    let big = format!("X-Big: {}", "a".repeat(9000));
    refused(
        &request(&[GET, HOST, UPGRADE, CONNECTION, VERSION, GOOD_KEY, &big]),
        431,
        CloseReason::Rejected(431),
    );
    // Many small headers adding up to more than 8 KiB.
    let lines: Vec<String> = (0..60)
        .map(|i| format!("X-H{i}: {}", "b".repeat(150)))
        .collect();
    let mut req = vec![GET, HOST, UPGRADE, CONNECTION, VERSION, GOOD_KEY];
    req.extend(lines.iter().map(String::as_str));
    refused(&request(&req), 431, CloseReason::Rejected(431));
}

#[test]
fn endless_head_still_gets_431_and_fin() {
    // The client keeps sending header bytes (256 KiB) after the limit is passed: the 431 must
    // arrive and be followed by an orderly EOF, not a reset.
    let server = TestServer::start(config());
    let mut s = tcp(server.addr);
    let mut w = s.try_clone().unwrap();
    let mut req = format!("{GET}\r\n{HOST}\r\nX-Endless: ").into_bytes();
    req.extend(std::iter::repeat_n(b'z', 256 * 1024));
    // The server drains what follows its answer until our EOF: the whole write goes through.
    let t = std::thread::spawn(move || w.write_all(&req));
    let r = read_response(&mut s);
    assert_eq!(r.status, 431, "{r:?}");
    t.join()
        .expect("the writing thread")
        .expect("the rest of the head, drained by the server");
    drop(s);
    let stats = server.finish();
    assert_closed(&stats, &[(CloseReason::Rejected(431), 1)]);
}

#[test]
fn garbage_is_400() {
    refused(
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 garbage\r\n\r\n",
        400,
        CloseReason::Rejected(400),
    );
    refused(b"HELLO\r\n\r\n", 400, CloseReason::Rejected(400));
}

#[test]
fn plain_get_is_426() {
    let r = refused(
        &request(&["GET / HTTP/1.1", HOST, "Accept: text/html"]),
        426,
        CloseReason::HttpAnswered,
    );
    assert_eq!(r.header("upgrade"), Some("websocket"), "{r:?}");
}

#[test]
fn upgrade_hook_rejects_with_403() {
    let server = TestServer::start_with(
        config(),
        Opts {
            reject: Some((403, "origin not allowed")),
            ..Opts::default()
        },
    );
    let r = refused_by(&server, upgrade_request(server.addr).as_bytes(), 403);
    assert!(r.body.contains("origin not allowed"), "{r:?}");
    // tungstenite sees the refusal too.
    match tungstenite::client::client(format!("ws://{}/", server.addr), tcp(server.addr)) {
        Err(tungstenite::HandshakeError::Failure(tungstenite::Error::Http(resp))) => {
            assert_eq!(resp.status(), 403)
        }
        Err(e) => panic!("unexpected {e:?}"),
        Ok(_) => panic!("upgrade accepted"),
    }
    assert_eq!(server.rec().upgrades, 2);
    assert!(server.rec().opens.is_empty());
    let stats = server.finish();
    assert_eq!(stats.accepted, 2);
    assert_closed(&stats, &[(CloseReason::Rejected(403), 2)]);
}

#[test]
fn hook_chooses_an_offered_subprotocol() {
    let server = TestServer::start_with(
        config(),
        Opts {
            subprotocol: Some("superchat".into()),
            ..Opts::default()
        },
    );
    let mut req = format!("ws://{}/", server.addr)
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("Sec-WebSocket-Protocol", "chat, superchat".parse().unwrap());
    let (mut ws, resp) = ws_request(server.addr, req);
    assert_eq!(
        resp.headers()
            .get("sec-websocket-protocol")
            .map(|v| v.to_str().unwrap()),
        Some("superchat")
    );
    ws.send(tungstenite::Message::text("hi")).unwrap();
    assert_eq!(ws.read().unwrap(), tungstenite::Message::text("hi"));
    close_client(&mut ws);
    drop(ws);
    let stats = server.finish();
    assert_closed(&stats, &[(CloseReason::PeerClosed, 1)]);
}

#[test]
fn hook_choosing_a_subprotocol_not_offered_is_500() {
    let server = TestServer::start_with(
        config(),
        Opts {
            subprotocol: Some("superchat".into()),
            ..Opts::default()
        },
    );
    let req = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Protocol: chat\r\n\r\n"
    );
    refused_by(&server, req.as_bytes(), 500);
    // Offering no subprotocol at all.
    refused_by(&server, upgrade_request(server.addr).as_bytes(), 500);
    assert_eq!(server.rec().upgrades, 2);
    assert!(server.rec().opens.is_empty());
    let stats = server.finish();
    assert_closed(&stats, &[(CloseReason::Rejected(500), 2)]);
}

#[test]
fn handshake_timeout_is_408() {
    let deadline = Duration::from_millis(200);
    let server = TestServer::start(Config {
        handshake_timeout: deadline,
        ..config()
    });
    let start = Instant::now();
    let mut s = tcp(server.addr);
    s.write_all(b"GET /chat HTTP/1.1\r\nHost: x\r\nUpgrade: webso")
        .unwrap();
    let r = read_response(&mut s);
    assert_deadline("408 for a partial head", start.elapsed(), deadline);
    assert_eq!(r.status, 408, "{r:?}");
    assert!(r.header("connection").unwrap_or_default().contains("close"));
    drop(s);
    // A connection that sends nothing at all times out too.
    let start = Instant::now();
    let mut s = tcp(server.addr);
    assert_eq!(read_response(&mut s).status, 408);
    assert_deadline("408 for silence", start.elapsed(), deadline);
    drop(s);
    assert_eq!(server.rec().upgrades, 0);
    let stats = server.finish();
    assert_closed(&stats, &[(CloseReason::HandshakeTimeout, 2)]);
}

#[test]
fn trickled_head_does_not_extend_the_handshake_timeout() {
    // Bytes keep arriving (one every 50 ms) but the head never completes: the absolute
    // handshake timeout still fires.
    let deadline = Duration::from_millis(300);
    let server = TestServer::start(Config {
        handshake_timeout: deadline,
        ..config()
    });
    let start = Instant::now();
    let mut s = tcp(server.addr);
    s.set_nodelay(true).unwrap();
    let mut w = s.try_clone().unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let t = std::thread::spawn(move || {
        w.write_all(b"GET / HTTP/1.1\r\n")
            .expect("the request line");
        let mut sent = 0;
        // Until the server has answered and closed (then a write fails), or it is over.
        while !stop2.load(std::sync::atomic::Ordering::Relaxed) && w.write_all(b"X").is_ok() {
            sent += 1;
            std::thread::sleep(Duration::from_millis(50));
        }
        sent
    });
    let r = read_response(&mut s);
    assert_deadline("408 for a trickled head", start.elapsed(), deadline);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let sent = t.join().expect("the trickling thread");
    assert!(sent >= 5, "only {sent} bytes trickled in {deadline:?}");
    assert_eq!(r.status, 408);
    drop(s);
    let stats = server.finish();
    assert_closed(&stats, &[(CloseReason::HandshakeTimeout, 1)]);
}
