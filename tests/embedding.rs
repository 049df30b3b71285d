//! Embedding wsloop safely: handler panics are contained, loop stalls are seen, the host can
//! drive the loop step by step, cross-site WebSocket hijacking is refused by the origin policy,
//! the `LoopHandle` queue is bounded and answers every producer, queries never hang, and a
//! server stops at once. All over real loopback sockets.
// Test code (see Cargo.toml's [lints]): it fails by panicking, and opens descriptors on purpose.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

mod common;

use common::*;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{mpsc, Arc, OnceLock};
use std::thread;
use std::time::{Duration, Instant};
use tungstenite::client::IntoClientRequest;
use tungstenite::Message as TMsg;
use wsloop::{
    CloseCode, CloseReason, Config, ConnId, Decision, Handler, LoopHandle, Message, QueueError,
    Server, UpgradeRequest, WebSocket,
};

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
    expect_clean_eof(&mut a);
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
        close_client(&mut w);
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
    let mut ok = ws(server.addr);
    echo_ok(&mut ok, "still serving");
    close_client(&mut ok);
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
    // A normal run first: a threshold well above any hiccup of a loaded machine.
    let quiet = TestServer::start(Config {
        stall_threshold: Duration::from_secs(2),
        ..config()
    });
    let mut w = ws(quiet.addr);
    for i in 0..200 {
        echo_ok(&mut w, &format!("m{i}"));
    }
    assert_eq!(quiet.stats().stalls, 0);
    assert_eq!(quiet.stats().longest_stall_ns, 0);
    close_client(&mut w);
    quiet.finish();

    // A handler that blocks the loop for a second against a 100 ms threshold: the watchdog,
    // looking every 25 ms, has 900 ms to see it, however loaded the machine.
    let server = TestServer::start(Config {
        stall_threshold: Duration::from_millis(100),
        ..config()
    });
    let mut w = ws(server.addr);
    echo_ok(&mut w, "sleep-ms 1000");
    let stats = server.wait_stats("the stall to be counted", |s| s.stalls >= 1);
    assert!(stats.longest_stall_ns >= 100_000_000, "{stats:?}");
    let text = server.handle.metrics().unwrap();
    let line = format!("wsloop_loop_stalls_total {}\n", stats.stalls);
    assert!(text.contains(&line), "{text}");
    close_client(&mut w);
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
        close_client(&mut w);
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
    handle.shutdown().unwrap();
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
            close_client(&mut w);
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
    assert!(
        matches!(&err, wsloop::Error::Config(c) if c.field == "allowed_origins"),
        "{err:?}"
    );
    assert!(err.to_string().contains("allowed_origins"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// The LoopHandle queue: bounded, and every producer told what became of its command.

/// A loop driven by the test thread (`turn`), so that the test decides when it drains.
fn manual(config: Config) -> (Server<Recorder>, SocketAddr, mpsc::Receiver<ConnId>) {
    let (opened, ids) = mpsc::channel();
    let opts = Opts {
        opened: Some(opened),
        ..Opts::default()
    };
    let mut server = Server::new(config, Recorder::new(Default::default(), opts)).unwrap();
    let addr = server.listen("127.0.0.1:0".parse().unwrap()).unwrap();
    (server, addr, ids)
}

/// Turn `server` until `done` holds (bounded).
fn turn_until(server: &mut Server<Recorder>, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        server.turn(Some(Duration::from_millis(5))).unwrap();
    }
}

/// Open a client on a manually driven server; its id and the client.
fn open_client(
    server: &mut Server<Recorder>,
    addr: SocketAddr,
    ids: &mpsc::Receiver<ConnId>,
) -> (ConnId, Ws) {
    let client = thread::spawn(move || ws(addr));
    let mut id = None;
    turn_until(server, "the client to open", || {
        id = id.or_else(|| ids.try_recv().ok());
        id.is_some() && client.is_finished()
    });
    (id.unwrap(), client.join().unwrap())
}

/// Queue 1-byte sends until the queue says it is full; how many it took.
fn fill(handle: &LoopHandle<Recorder>, id: ConnId) -> usize {
    for n in 0..100_000 {
        match handle.try_send_text(id, "x") {
            Ok(()) => {}
            Err(QueueError::Full) => return n,
            Err(e) => panic!("expected a full queue, got {e}"),
        }
    }
    panic!("100000 commands queued and the queue never said it was full");
}

#[test]
fn flooding_producers_stay_within_the_queue_bound_and_are_told_it_is_full() {
    const COMMANDS: usize = 200;
    const BYTES: usize = 64 * 1024;
    let server = TestServer::start(Config {
        handle_queue_commands: COMMANDS,
        handle_queue_bytes: BYTES,
        // A reader that falls behind loses messages, not its connection.
        max_backpressure: 16 << 20,
        backpressure_policy: wsloop::BackpressurePolicy::Drop,
        ..config()
    });
    // A live connection whose client reads everything, and one that has ended.
    let mut gone = ws(server.addr);
    let dead = server.wait_open(1);
    close_client(&mut gone);
    server.wait_closes(1);
    let mut reader = ws(server.addr);
    let live = server.wait_open(2);
    let received = thread::spawn(move || {
        let mut n = 0usize;
        while let Ok(m) = reader.read() {
            n += m.is_text() as usize;
        }
        n
    });

    // The loop blocked in a posted closure: the queue fills up, and says so.
    let (release, blocked) = mpsc::channel::<()>();
    server
        .handle
        .try_post(move |_, _| {
            let _ = blocked.recv_timeout(WAIT);
        })
        .unwrap();
    let kib = "k".repeat(1024);
    let mut queued = 0;
    let full = loop {
        match server.handle.try_send_text(live, kib.clone()) {
            Ok(()) if queued < 10_000 => queued += 1,
            Ok(()) => panic!("{queued} KiB queued and the queue never said it was full"),
            Err(e) => break e,
        }
    };
    assert_eq!(full, QueueError::Full);
    let q = server.handle.queued();
    assert!(q.bytes <= BYTES && q.bytes + 1024 > BYTES - 1024, "{q:?}");
    assert!(
        (50..64).contains(&queued),
        "{queued} 1 KiB sends fit in 64 KiB"
    );
    // A command that can never fit is told so, not "full".
    assert_eq!(
        server.handle.try_send_binary(live, vec![0u8; BYTES + 1]),
        Err(QueueError::TooLarge)
    );
    // The control commands still go through: a query waits behind the sends and is answered.
    let h = server.handle.clone();
    let query = thread::spawn(move || h.stats());
    release.send(()).unwrap();
    assert!(query.join().unwrap().is_some());

    // Three producers flood for a while: 1 KiB texts to the live connection and to the ended
    // one, and posted closures that each capture 1 KiB. A monitor samples the queue.
    let stop = Arc::new(AtomicBool::new(false));
    let producers: Vec<_> = (0..3)
        .map(|kind| {
            let h = server.handle.clone();
            let stop = stop.clone();
            thread::spawn(move || {
                let (mut ok, mut full) = (0u64, 0u64);
                let text = "t".repeat(1024);
                while !stop.load(Relaxed) {
                    let r = match kind {
                        0 => h.try_send_text(live, text.clone()),
                        1 => h.try_send_text(dead, text.clone()),
                        _ => {
                            let payload = [7u8; 1024];
                            h.try_post(move |_, _| assert_eq!(payload[1023], 7))
                        }
                    };
                    match r {
                        Ok(()) => ok += 1,
                        Err(QueueError::Full) => full += 1,
                        Err(e) => panic!("unexpected {e}"),
                    }
                }
                (ok, full)
            })
        })
        .collect();
    let h = server.handle.clone();
    let watching = stop.clone();
    let monitor = thread::spawn(move || {
        let mut samples = 0;
        while !watching.load(Relaxed) {
            let q = h.queued();
            assert!(q.commands <= COMMANDS && q.bytes <= BYTES, "{q:?}");
            samples += 1;
            thread::yield_now();
        }
        samples
    });
    thread::sleep(Duration::from_millis(700));
    // Queries are answered in the middle of the flood.
    assert!(server.handle.stats().is_some());
    stop.store(true, Relaxed);
    for p in producers {
        let (ok, full) = p.join().unwrap();
        assert!(ok > 0, "the loop drained some of the queue ({ok} queued)");
        assert!(
            full > 0,
            "a producer faster than the loop is told the queue is full"
        );
    }
    assert!(monitor.join().unwrap() > 0);
    let q = server.handle.queued();
    assert!(q.peak_commands <= COMMANDS, "{q:?}");
    assert!(q.peak_bytes <= BYTES, "{q:?}");
    assert!(q.refused > 0, "{q:?}");
    // Everything queued is run and its room freed; sends to the ended connection reached no one.
    let drained = wait_for("the queue to drain", || {
        let q = server.handle.queued();
        (q.commands == 0 && q.bytes == 0).then_some(q)
    });
    assert_eq!(drained.refused, q.refused);
    assert_eq!(server.rec().closes.len(), 1);
    let handle = server.handle.clone();
    handle.try_close(live, CloseCode::NORMAL, "done").unwrap();
    assert!(received.join().unwrap() > queued);
    server.finish();
}

fn expect_text(ws: &mut Ws, text: &str) {
    match ws.read() {
        Ok(TMsg::Text(t)) => assert_eq!(t.as_str(), text),
        other => panic!("expected text {text:?}, got {other:?}"),
    }
}

/// Poll `f` (bounded) until it returns something.
fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(t) = f() {
            return t;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_blocked_producer_waits_for_room_and_is_released_when_the_loop_drains() {
    let (mut server, addr, ids) = manual(Config {
        handle_queue_commands: 16,
        ..config()
    });
    let (id, mut client) = open_client(&mut server, addr, &ids);
    let handle = server.handle();
    // The loop does not turn: 16 commands fill the queue.
    assert_eq!(fill(&handle, id), 16);
    // A timeout producer waits its whole timeout (exact lower bound), then is told "full".
    let started = Instant::now();
    assert_eq!(
        handle.send_text_timeout(id, "late", Duration::from_millis(200)),
        Err(QueueError::Full)
    );
    assert!(started.elapsed() >= Duration::from_millis(200));
    // Another waits with a long timeout, and is still waiting while the loop does not turn.
    let h = handle.clone();
    let waiting = thread::spawn(move || h.send_text_timeout(id, "waited", Duration::from_secs(30)));
    thread::sleep(Duration::from_millis(100));
    assert!(!waiting.is_finished(), "returned while the queue was full");
    // A query is not refused for a full queue: it is answered behind the sends.
    let h = handle.clone();
    let query = thread::spawn(move || h.query(|_, ctx| ctx.open_ids()));
    // One turn runs the batch and frees its room: the waiting producer gets in (and the query,
    // once its thread has queued it, is answered).
    turn_until(&mut server, "the producer to be released", || {
        waiting.is_finished() && query.is_finished()
    });
    assert_eq!(waiting.join().unwrap(), Ok(()));
    assert_eq!(query.join().unwrap(), Some(vec![id]));
    for _ in 0..16 {
        expect_text(&mut client, "x");
    }
    turn_until(&mut server, "the queue to drain", || {
        handle.queued().commands == 0
    });
    expect_text(&mut client, "waited");
    // Full again; the loop ends: a waiting producer is released with "closed".
    assert_eq!(fill(&handle, id), 16);
    assert_eq!(handle.shutdown(), Ok(()));
    let h = handle.clone();
    let waiting = thread::spawn(move || h.send_text_timeout(id, "never", Duration::from_secs(30)));
    // The client reads what it is sent, then the shutdown's close (1001) and the end.
    let client = thread::spawn(move || {
        let mut texts = 0;
        loop {
            match client.read() {
                Ok(TMsg::Text(_)) => texts += 1,
                Ok(TMsg::Close(f)) => assert_eq!(f.map(|f| u16::from(f.code)), Some(1001)),
                Err(tungstenite::Error::ConnectionClosed) => return texts,
                other => panic!("the client, at shutdown: {other:?}"),
            }
        }
    });
    let deadline = Instant::now() + WAIT;
    while server.turn(Some(Duration::from_millis(5))).unwrap() {
        assert!(Instant::now() < deadline, "shutdown did not finish");
    }
    let texts = client.join().expect("the client");
    assert!(
        texts >= 16,
        "{texts} messages of the 16 queued before the shutdown"
    );
    let r = waiting.join().unwrap();
    // It got in when the last batch ran (the loop then closed the connection), or the loop ended
    // first: never a wait to the end of its 30 s.
    assert!(matches!(r, Ok(()) | Err(QueueError::Closed)), "{r:?}");
    assert_eq!(handle.try_send_text(id, "after"), Err(QueueError::Closed));
    assert_eq!(handle.queued().commands, 0, "{:?}", handle.queued());
}

#[test]
fn queries_after_the_loop_has_ended_answer_none_at_once() {
    let (mut server, _addr, _ids) = manual(config());
    let handle = server.handle();
    handle.shutdown().unwrap();
    let deadline = Instant::now() + WAIT;
    while server.turn(Some(Duration::from_millis(5))).unwrap() {
        assert!(Instant::now() < deadline, "shutdown did not finish");
    }
    // The server is not dropped: the host still holds it after turn() returned false.
    let (tx, rx) = mpsc::channel();
    let h = handle.clone();
    thread::spawn(move || {
        let _ = tx.send((h.stats(), h.metrics().is_none()));
    });
    let (stats, no_metrics) = rx
        .recv_timeout(Duration::from_secs(5))
        .expect("stats() after the loop ended returns at once");
    assert!(stats.is_none() && no_metrics);
    assert_eq!(handle.try_post(|_, _| {}), Err(QueueError::Closed));
    drop(server);
}

/// Answers `query` with the handle of its own loop, from `on_message`.
struct SelfQuery {
    handle: Arc<OnceLock<LoopHandle<SelfQuery>>>,
}

impl Handler for SelfQuery {
    type Data = ();
    fn upgrade(&mut self, _: &UpgradeRequest<'_>) -> Decision<()> {
        Decision::accept(())
    }
    fn on_message(&mut self, ws: &mut WebSocket<'_, ()>, _: Message<'_>) {
        let open = self
            .handle
            .get()
            .unwrap()
            .query(|_, ctx| ctx.open_ids().len());
        ws.send_text(&format!("{open:?}"));
    }
}

#[test]
fn a_query_on_the_loop_thread_panics_clearly_instead_of_deadlocking() {
    let cell = Arc::new(OnceLock::new());
    let mut server = Server::new(
        config(),
        SelfQuery {
            handle: cell.clone(),
        },
    )
    .unwrap();
    let addr = server.listen("127.0.0.1:0".parse().unwrap()).unwrap();
    let handle = server.handle();
    assert!(cell.set(handle.clone()).is_ok(), "the handle is set once");
    let looping = thread::spawn(move || server.run());
    // From a callback: the panic is caught, the connection closed with 1011.
    let mut s = raw_ws(addr);
    s.write_all(&frame(true, OP_TEXT, b"how many?")).unwrap();
    assert_eq!(expect_close(&mut s).0, 1011);
    // From a posted closure: the same, and the panic message says why.
    let (tx, rx) = mpsc::channel();
    let h = handle.clone();
    handle
        .try_post(move |_, _| {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| h.stats()));
            let msg = r
                .err()
                .and_then(|p| p.downcast_ref::<&str>().map(|s| s.to_string()));
            let _ = tx.send(msg);
        })
        .unwrap();
    let msg = rx
        .recv_timeout(WAIT)
        .expect("the posted closure returned: no deadlock")
        .expect("the query panicked");
    assert!(msg.contains("loop's own thread"), "{msg}");
    // The loop goes on, and answers other threads' queries.
    let (tx, rx) = mpsc::channel();
    let h = handle.clone();
    thread::spawn(move || {
        let _ = tx.send(h.stats());
    });
    let stats = rx
        .recv_timeout(WAIT)
        .expect("the loop still answers")
        .unwrap();
    assert_eq!(stats.handler_panics, 1);
    handle.shutdown().unwrap();
    looping.join().unwrap().unwrap();
}

#[test]
fn dropping_a_server_with_an_hour_long_stall_threshold_returns_at_once() {
    let config = Config {
        stall_threshold: Duration::from_secs(3600),
        ..config()
    };
    let (server, _addr, _ids) = manual(config.clone());
    thread::sleep(Duration::from_millis(50)); // the watchdog thread is waiting by now
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        drop(server);
        let _ = tx.send(());
    });
    rx.recv_timeout(Duration::from_secs(5))
        .expect("the drop returns without waiting for the watchdog's period");
    // The same for a server that ran and shut down.
    let (mut server, _addr, _ids) = manual(config);
    let handle = server.handle();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        while server.turn(Some(Duration::from_millis(5))).unwrap() {}
        drop(server);
        let _ = tx.send(());
    });
    thread::sleep(Duration::from_millis(50));
    handle.shutdown().unwrap();
    rx.recv_timeout(Duration::from_secs(5))
        .expect("run and drop return promptly after shutdown");
}
