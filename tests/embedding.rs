//! Embedding wsloop safely: handler panics are contained, loop stalls are seen, the host can
//! drive the loop step by step, and cross-site WebSocket hijacking is refused by the origin
//! policy. All over real loopback sockets.

mod common;

use common::*;
use std::io::Write;
use std::thread;
use std::time::{Duration, Instant};
use tungstenite::client::IntoClientRequest;
use tungstenite::Message as TMsg;
use wsloop::{CloseReason, Config, Decision, Handler, Message, Server, UpgradeRequest, WebSocket};

fn echo_ok(ws: &mut Ws, text: &str) {
    ws.send(TMsg::text(text)).unwrap();
    match ws.read().unwrap() {
        TMsg::Text(t) => assert_eq!(t.as_str(), text),
        other => panic!("expected the echo of {text:?}, got {other:?}"),
    }
}

#[test]
fn a_panicking_handler_closes_only_its_connection_with_1011() {
    let server = TestServer::start(config());
    let mut a = raw_ws(server.addr);
    let mut b = ws(server.addr);
    let mut c = ws(server.addr);
    echo_ok(&mut b, "before");
    a.write_all(&frame(true, OP_TEXT, b"panic-me")).unwrap();
    let (code, _) = expect_close(&mut a);
    assert_eq!(code, 1011);
    expect_eof(&mut a);
    echo_ok(&mut b, "after");
    echo_ok(&mut c, "after too");
    // A new connection is served as well.
    let mut d = ws(server.addr);
    echo_ok(&mut d, "new");
    server.wait_closes(1);
    {
        let rec = server.rec();
        assert_eq!(rec.closes.len(), 1);
        assert_eq!(rec.closes[0].code, 1011);
        assert_eq!(rec.closes[0].reason, "handler_panic");
    }
    assert_eq!(server.stats().handler_panics, 1);
    for mut w in [b, c, d] {
        w.close(None).unwrap();
        while w.read().is_ok() {}
    }
    let stats = server.finish();
    assert_closed(
        &stats,
        &[(CloseReason::HandlerPanic, 1), (CloseReason::PeerClosed, 3)],
    );
    assert_eq!(stats.handler_panics, 1);
}

#[test]
fn a_panicking_upgrade_hook_answers_500() {
    let server = TestServer::start(config());
    let mut s = tcp(server.addr);
    let req = upgrade_request(server.addr).replacen("GET /chat ", "GET /panic-in-upgrade ", 1);
    s.write_all(req.as_bytes()).unwrap();
    let resp = read_response(&mut s);
    assert_eq!(resp.status, 500);
    expect_eof(&mut s);
    let mut ok = ws(server.addr);
    echo_ok(&mut ok, "still serving");
    ok.close(None).unwrap();
    while ok.read().is_ok() {}
    let stats = server.finish();
    assert_eq!(stats.handler_panics, 1);
    assert_eq!(stats.rejected_status[wsloop::metrics::status_index(500)], 1);
}

#[test]
fn with_catch_panics_off_the_panic_unwinds_out_of_run() {
    struct Boom;
    impl Handler for Boom {
        type Data = ();
        fn upgrade(&mut self, _: &UpgradeRequest<'_>) -> Decision<()> {
            Decision::accept(())
        }
        fn on_message(&mut self, _: &mut WebSocket<'_, ()>, _: Message<'_>) {
            panic!("the application prefers to abort");
        }
    }
    let mut server = Server::new(
        Config {
            catch_panics: false,
            ..config()
        },
        Boom,
    )
    .unwrap();
    let addr = server.listen("127.0.0.1:0".parse().unwrap()).unwrap();
    let loop_thread = thread::spawn(move || server.run());
    let mut s = raw_ws(addr);
    s.write_all(&frame(true, OP_TEXT, b"x")).unwrap();
    let joined = loop_thread.join();
    assert!(joined.is_err(), "the panic must propagate out of run()");
}

#[test]
fn a_blocking_handler_is_reported_as_a_stall_and_a_normal_run_is_not() {
    // A normal run first: a threshold well above any hiccup of this machine.
    let quiet = TestServer::start(Config {
        stall_threshold: Duration::from_millis(500),
        ..config()
    });
    let mut w = ws(quiet.addr);
    for i in 0..200 {
        echo_ok(&mut w, &format!("m{i}"));
    }
    assert_eq!(quiet.stats().stalls, 0);
    assert_eq!(quiet.stats().longest_stall_ns, 0);
    w.close(None).unwrap();
    while w.read().is_ok() {}
    quiet.finish();

    // A handler that blocks the loop for 400 ms against a 100 ms threshold.
    let server = TestServer::start(Config {
        stall_threshold: Duration::from_millis(100),
        ..config()
    });
    let mut w = ws(server.addr);
    echo_ok(&mut w, "sleep-ms 400");
    let stats = server.wait_stats("the stall to be counted", |s| s.stalls == 1);
    assert!(stats.longest_stall_ns >= 100_000_000, "{stats:?}");
    let text = server.handle.metrics().unwrap();
    assert!(text.contains("wsloop_loop_stalls_total 1\n"), "{text}");
    w.close(None).unwrap();
    while w.read().is_ok() {}
    server.finish();
}

#[test]
fn the_host_can_drive_the_loop_step_by_step() {
    struct Echo;
    impl Handler for Echo {
        type Data = ();
        fn upgrade(&mut self, _: &UpgradeRequest<'_>) -> Decision<()> {
            Decision::accept(())
        }
        fn on_message(&mut self, ws: &mut WebSocket<'_, ()>, msg: Message<'_>) {
            ws.send(msg);
        }
    }
    let mut server = Server::new(config(), Echo).unwrap();
    let addr = server.listen("127.0.0.1:0".parse().unwrap()).unwrap();
    let handle = server.handle();
    let client = thread::spawn(move || {
        let mut w = ws(addr);
        for i in 0..20 {
            echo_ok(&mut w, &format!("step {i}"));
        }
        w.close(None).unwrap();
        while w.read().is_ok() {}
    });
    // The host interleaves its own work (a counter ticking every turn) with busy-polling turns
    // (timeout zero) and short waits, until its client is done.
    let mut host_ticks = 0u64;
    let deadline = Instant::now() + WAIT;
    while !client.is_finished() {
        assert!(Instant::now() < deadline, "client did not finish");
        let timeout = if host_ticks % 2 == 0 {
            Duration::ZERO
        } else {
            Duration::from_millis(1)
        };
        assert!(server.turn(Some(timeout)).unwrap());
        host_ticks += 1;
    }
    client.join().unwrap();
    let stats = server.stats();
    assert_eq!(stats.messages_received, 20);
    assert!(host_ticks > 20);
    handle.shutdown();
    let deadline = Instant::now() + WAIT;
    while server.turn(Some(Duration::from_millis(10))).unwrap() {
        assert!(Instant::now() < deadline, "shutdown did not finish");
    }
}

fn origin_server(origins: &[&str], allow_missing: bool) -> TestServer {
    TestServer::start(Config {
        allowed_origins: origins.iter().map(|s| s.to_string()).collect(),
        allow_missing_origin: allow_missing,
        ..config()
    })
}

/// The status the server answers an upgrade with, carrying `origin` (None: no header).
fn upgrade_status(server: &TestServer, origin: Option<&str>) -> u16 {
    let mut req = format!("ws://{}/", server.addr)
        .into_client_request()
        .unwrap();
    if let Some(o) = origin {
        req.headers_mut().insert("Origin", o.parse().unwrap());
    }
    let stream = tcp(server.addr);
    match tungstenite::client(req, stream) {
        Ok((mut w, resp)) => {
            echo_ok(&mut w, "in");
            w.close(None).unwrap();
            while w.read().is_ok() {}
            resp.status().as_u16()
        }
        Err(tungstenite::HandshakeError::Failure(tungstenite::Error::Http(resp))) => {
            resp.status().as_u16()
        }
        Err(e) => panic!("unexpected handshake failure: {e}"),
    }
}

#[test]
fn allowed_origins_upgrade_and_others_get_403() {
    let server = origin_server(&["https://app.example.com", "https://*.example.org"], true);
    assert_eq!(
        upgrade_status(&server, Some("https://app.example.com")),
        101
    );
    assert_eq!(
        upgrade_status(&server, Some("https://chat.example.org")),
        101
    );
    assert_eq!(
        upgrade_status(&server, Some("https://evil.example.net")),
        403
    );
    assert_eq!(
        upgrade_status(&server, Some("https://example.org")),
        403,
        "wildcard is subdomains only"
    );
    assert_eq!(
        upgrade_status(&server, Some("http://app.example.com")),
        403,
        "scheme counts"
    );
    assert_eq!(
        upgrade_status(&server, None),
        101,
        "missing allowed by this policy"
    );
    let stats = server.finish();
    assert_eq!(stats.rejected_status[wsloop::metrics::status_index(403)], 3);
}

#[test]
fn missing_and_malformed_origins_are_refused_when_required() {
    let server = origin_server(&["https://app.example.com"], false);
    assert_eq!(upgrade_status(&server, None), 403);
    assert_eq!(upgrade_status(&server, Some("app.example.com")), 403);
    assert_eq!(
        upgrade_status(&server, Some("https://app.example.com/path")),
        403
    );
    assert_eq!(upgrade_status(&server, Some("null")), 403);
    // The reason is in the body.
    let mut s = tcp(server.addr);
    let req =
        upgrade_request(server.addr).replacen("\r\n\r\n", "\r\nOrigin: https://x.test\r\n\r\n", 1);
    s.write_all(req.as_bytes()).unwrap();
    let resp = read_response(&mut s);
    assert_eq!(resp.status, 403);
    assert!(resp.body.contains("origin not allowed"), "{}", resp.body);
    assert_eq!(
        upgrade_status(&server, Some("https://app.example.com")),
        101
    );
    server.finish();
}

/// The status of a raw upgrade request carrying the `Origin` header lines `origins`.
fn raw_origin_status(server: &TestServer, origins: &[&str]) -> u16 {
    let lines: String = origins.iter().map(|o| format!("Origin: {o}\r\n")).collect();
    let req = upgrade_request(server.addr).replacen("\r\n\r\n", &format!("\r\n{lines}\r\n"), 1);
    let mut s = tcp(server.addr);
    s.write_all(req.as_bytes()).unwrap();
    let head = read_head(&mut s);
    head[9..12].parse().expect("a status")
}

#[test]
fn a_duplicated_origin_is_refused_even_when_the_first_is_allowed() {
    let server = origin_server(&["https://app.example.com"], true);
    let allowed = "https://app.example.com";
    assert_eq!(raw_origin_status(&server, &[allowed]), 101);
    assert_eq!(
        raw_origin_status(&server, &[allowed, "https://evil.test"]),
        400
    );
    assert_eq!(raw_origin_status(&server, &[allowed, allowed]), 400);
    let stats = server.finish();
    assert_eq!(stats.rejected_status[wsloop::metrics::status_index(400)], 2);
    assert_eq!(stats.closed_by(CloseReason::Rejected(400)), 2);
}

#[test]
fn origins_whose_host_is_not_a_host_get_403_and_never_match_a_wildcard() {
    let server = origin_server(&["https://*.example.com", "https://app.example.org"], true);
    assert_eq!(upgrade_status(&server, Some("https://a.example.com")), 101);
    for bad in [
        "https://evil.com:.example.com",
        "https://[::1]:.example.com",
        "https://..example.com",
        "https://evil.com:443.example.com",
    ] {
        assert_eq!(raw_origin_status(&server, &[bad]), 403, "{bad}");
    }
    let stats = server.finish();
    assert_eq!(stats.rejected_status[wsloop::metrics::status_index(403)], 4);
}

#[test]
fn an_invalid_origin_pattern_is_a_startup_error() {
    struct Nop;
    impl Handler for Nop {
        type Data = ();
        fn upgrade(&mut self, _: &UpgradeRequest<'_>) -> Decision<()> {
            Decision::accept(())
        }
        fn on_message(&mut self, _: &mut WebSocket<'_, ()>, _: Message<'_>) {}
    }
    let err = Server::new(
        Config {
            allowed_origins: vec!["example.com".into()],
            ..config()
        },
        Nop,
    )
    .err()
    .expect("refused");
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
    assert!(err.to_string().contains("allowed_origins"), "{err}");
}
