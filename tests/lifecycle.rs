//! Connection lifecycle: close handshakes from either side, clients that vanish, idle and close
//! timeouts, the LoopHandle from other threads (including stale ids), and graceful shutdown.
// Test code (see Cargo.toml's [lints]): it fails by panicking, and opens descriptors on purpose.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

mod common;

use common::*;
use std::io::{ErrorKind, Write};
use std::net::TcpStream;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};
use tungstenite::protocol::frame::coding::CloseCode as TCode;
use tungstenite::protocol::CloseFrame;
use tungstenite::Message as TMsg;
use wsloop::{CloseCode, CloseReason, Config, ConnId, Message, QueueError, SendStatus};

/// Wait until the first connection has closed; `on_close` got `code` and `reason` for `id`.
fn wait_close_of(server: &TestServer, id: ConnId, code: u16, reason: &str) {
    server.wait_closes(1);
    let r = server.rec();
    let c = &r.closes_of(id)[0];
    assert_eq!((c.code, c.reason.as_str()), (code, reason));
}

fn expect_text(ws: &mut Ws, text: &str) {
    match ws.read() {
        Ok(TMsg::Text(t)) => assert_eq!(t.as_str(), text),
        other => panic!("expected text {text:?}, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Close handshakes

#[test]
fn client_starts_close_handshake() {
    let server = TestServer::start(config());
    let mut ws = ws(server.addr);
    let id = server.wait_open(1);
    ws.close(Some(CloseFrame {
        code: TCode::from(4321),
        reason: "done".into(),
    }))
    .unwrap();
    let echoed = read_until_closed(&mut ws).expect("server answered with a close frame");
    assert_eq!(u16::from(echoed.code), 4321);
    drop(ws);
    wait_close_of(&server, id, 4321, "done");
    server.finish_closed(&[(CloseReason::PeerClosed, 1)]);
}

#[test]
fn client_close_without_code_is_1005() {
    let server = TestServer::start(config());
    let mut s = raw_ws(server.addr);
    s.write_all(&frame(true, OP_CLOSE, b"")).unwrap();
    let f = read_frame(&mut s);
    assert_eq!(f.opcode, OP_CLOSE);
    assert_eq!(
        f.close(),
        None,
        "an empty close is answered with an empty close"
    );
    expect_clean_eof(&mut s);
    server.wait_close_code(1005);
    server.finish_closed(&[(CloseReason::PeerClosed, 1)]);
}

#[test]
fn server_starts_close_handshake() {
    let server = TestServer::start(config());
    let mut ws = ws(server.addr);
    let id = server.wait_open(1);
    ws.send(TMsg::text("close-me")).unwrap();
    let f = read_until_closed(&mut ws).expect("close frame");
    assert_eq!((u16::from(f.code), f.reason.as_str()), (4000, "bye"));
    drop(ws);
    wait_close_of(&server, id, 4000, "bye");
    server.finish_closed(&[(CloseReason::ClosedByServer, 1)]);
}

#[test]
fn server_close_reports_our_code_even_if_the_reply_differs() {
    // on_close's documented contract: "the peer's close code when it closed, ours when we did".
    let server = TestServer::start(config());
    let mut s = raw_ws(server.addr);
    s.write_all(&frame(true, OP_TEXT, b"close-me")).unwrap();
    assert_eq!(expect_close(&mut s), (4000, "bye".to_string()));
    // After our close, data from the client is not delivered.
    s.write_all(&frame(true, OP_TEXT, b"too late")).unwrap();
    s.write_all(&close_frame(1000, "ok")).unwrap();
    assert!(
        expect_eof(&mut s).is_empty(),
        "nothing after the close frame"
    );
    server.wait_closes(1);
    {
        let r = server.rec();
        assert_eq!(r.messages, 1);
        assert_eq!(
            (r.closes[0].code, r.closes[0].reason.as_str()),
            (4000, "bye")
        );
    }
    server.finish_closed(&[(CloseReason::ClosedByServer, 1)]);
}

#[test]
fn client_close_behind_a_backlog_delivers_everything_first() {
    // The client sends 16 MiB and its close without reading: the echoes queue up on the server
    // (loopback buffers absorb only a few MiB), the close reply goes behind them, and the
    // connection ends only once all of it is written.
    let mib = 1 << 20;
    let server = TestServer::start(Config {
        max_message_size: mib,
        max_backpressure: 64 * mib, // about ordering behind a backlog, not the limit
        ..config()
    });
    let mut s = raw_ws(server.addr);
    let msgs: Vec<Vec<u8>> = (0..16).map(|i| bytes(mib, 40 + i)).collect();
    let mut w = s.try_clone().unwrap();
    let out = msgs.clone();
    let writer = thread::spawn(move || {
        for m in &out {
            w.write_all(&frame(true, OP_BINARY, m)).unwrap();
        }
        w.write_all(&close_frame(4005, "enough")).unwrap();
    });
    writer.join().unwrap();
    for m in &msgs {
        assert!(expect_frame(&mut s, OP_BINARY) == *m, "echo differs");
    }
    assert_eq!(expect_close(&mut s).0, 4005);
    expect_clean_eof(&mut s);
    server.wait_close_code(4005);
    server.finish_closed(&[(CloseReason::PeerClosed, 1)]);
}

// ---------------------------------------------------------------------------------------------
// Clients that vanish

#[test]
fn client_half_close_still_receives_what_it_is_owed() {
    // A client sends a message and shuts down its sending side (FIN) without a close frame,
    // then reads: the echo of its last message arrives before the server closes.
    let server = TestServer::start(config());
    let mut s = raw_ws(server.addr);
    s.write_all(&frame(true, OP_TEXT, b"last words")).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(expect_frame(&mut s, OP_TEXT), b"last words");
    expect_clean_eof(&mut s);
    server.wait_close_code(1006);
    server.finish_closed(&[(CloseReason::Abnormal, 1)]);
}

#[test]
fn tungstenite_client_dropped_without_close_is_1006() {
    let server = TestServer::start(config());
    let mut ws = ws(server.addr);
    ws.send(TMsg::text("hello")).unwrap();
    expect_text(&mut ws, "hello");
    drop(ws);
    server.wait_closes(1);
    {
        let r = server.rec();
        assert_eq!(r.closes.len(), 1);
        assert_eq!(r.closes[0].code, 1006);
    }
    server.finish_closed(&[(CloseReason::Abnormal, 1)]);
}

#[test]
fn raw_client_dropped_mid_frame_is_1006() {
    let server = TestServer::start(config());
    let mut s = raw_ws(server.addr);
    server.wait_open(1);
    let f = frame(true, OP_BINARY, &bytes(1000, 1));
    s.write_all(&f[..300]).unwrap();
    drop(s);
    server.wait_close_code(1006);
    assert_eq!(server.rec().messages, 0);
    server.finish_closed(&[(CloseReason::Abnormal, 1)]);
}

#[test]
fn raw_client_reset_is_1006() {
    // Closing a socket with unread input makes the kernel send a reset: the echo is left unread.
    let server = TestServer::start(config());
    let mut s = raw_ws(server.addr);
    server.wait_open(1);
    s.write_all(&frame(true, OP_TEXT, b"unread echo")).unwrap();
    let mut buf = [0u8; 1];
    assert_eq!(s.peek(&mut buf).unwrap(), 1, "the echo arrived");
    drop(s);
    server.wait_close_code(1006);
    server.finish_closed(&[(CloseReason::Abnormal, 1)]);
}

#[test]
fn handler_terminate_drops_without_close_frame() {
    let server = TestServer::start(config());
    let mut s = raw_ws(server.addr);
    s.write_all(&frame(true, OP_TEXT, b"terminate-me")).unwrap();
    assert!(expect_eof(&mut s).is_empty(), "no close frame on terminate");
    server.wait_close_code(1006);
    server.finish_closed(&[(CloseReason::Terminated, 1)]);
}

// ---------------------------------------------------------------------------------------------
// Timeouts

#[test]
fn idle_client_gets_ping_then_close_1001() {
    let idle = Duration::from_millis(400);
    let server = TestServer::start(Config {
        idle_timeout: idle,
        ..config()
    });
    let start = Instant::now();
    let mut s = raw_ws(server.addr);
    assert_eq!(expect_frame(&mut s, OP_PING), b"");
    assert_deadline("the idle ping", start.elapsed(), idle / 2);
    assert_eq!(expect_close(&mut s).0, 1001);
    assert_deadline("the idle close", start.elapsed(), idle);
    expect_clean_eof(&mut s);
    drop(s);
    server.wait_close_code(1001);
    server.finish_closed(&[(CloseReason::IdleTimeout, 1)]);
}

#[test]
fn client_answering_pings_stays_connected() {
    let idle = Duration::from_millis(600);
    let server = TestServer::start(Config {
        idle_timeout: idle,
        ..config()
    });
    let mut last = Instant::now();
    let mut s = raw_ws(server.addr);
    // Each ping comes half an idle period after the last pong: five pings span more than two
    // idle periods.
    for i in 0..5 {
        let f = read_frame(&mut s);
        assert_eq!(f.opcode, OP_PING, "expected a ping, got {f:?}");
        assert_deadline(&format!("ping {i}"), last.elapsed(), idle / 2);
        last = Instant::now();
        s.write_all(&frame(true, OP_PONG, &f.payload)).unwrap();
    }
    s.write_all(&frame(true, OP_TEXT, b"still here")).unwrap();
    assert_eq!(expect_frame(&mut s, OP_TEXT), b"still here");
    assert!(server.rec().closes.is_empty());
    assert_eq!(server.rec().pongs, 5);
    s.write_all(&close_frame(1000, "")).unwrap();
    expect_close(&mut s);
    expect_clean_eof(&mut s);
    server.finish_closed(&[(CloseReason::PeerClosed, 1)]);
}

#[test]
fn messages_postpone_the_idle_ping_and_silence_brings_it_back() {
    // Every message moves the idle deadline; the timer filed at the old deadline fires early and
    // is filed again at the new one. A client that talks every 50 ms for four times the ping
    // delay (500 ms) is never pinged; once it falls silent it is pinged, then closed with 1001.
    let idle = Duration::from_secs(1);
    let server = TestServer::start(Config {
        idle_timeout: idle,
        ..config()
    });
    let mut s = raw_ws(server.addr);
    let until = std::time::Instant::now() + 2 * idle;
    let mut n = 0;
    let mut last = Instant::now();
    while std::time::Instant::now() < until {
        let msg = format!("tick {n}");
        last = Instant::now();
        s.write_all(&frame(true, OP_TEXT, msg.as_bytes())).unwrap();
        // A ping instead of the echo fails here.
        assert_eq!(expect_frame(&mut s, OP_TEXT), msg.as_bytes());
        n += 1;
        thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(server.stats().timers, 1, "the connection's one timer");
    // The deadlines count from the last message.
    assert_eq!(expect_frame(&mut s, OP_PING), b"");
    assert_deadline("the ping after the last message", last.elapsed(), idle / 2);
    assert_eq!(expect_close(&mut s).0, 1001);
    assert_deadline("the close after the last message", last.elapsed(), idle);
    expect_clean_eof(&mut s);
    drop(s);
    server.wait_closes(1);
    assert_eq!(server.rec().messages, n);
    let stats = server.finish();
    assert_closed(&stats, &[(CloseReason::IdleTimeout, 1)]);
}

#[test]
fn unanswered_server_close_times_out() {
    let close_timeout = Duration::from_millis(300);
    let server = TestServer::start(Config {
        close_timeout,
        ..config()
    });
    let mut s = raw_ws(server.addr);
    let start = Instant::now();
    s.write_all(&frame(true, OP_TEXT, b"close-me")).unwrap();
    assert_eq!(expect_close(&mut s), (4000, "bye".to_string()));
    // Never answered: the server gives up at the close timeout.
    expect_clean_eof(&mut s);
    assert_deadline(
        "the end of an unanswered close",
        start.elapsed(),
        close_timeout,
    );
    drop(s);
    server.wait_close_code(1006);
    server.finish_closed(&[(CloseReason::CloseTimeout, 1)]);
}

#[test]
fn max_lifetime_closes_a_busy_connection_with_1001_when_it_ends() {
    let lifetime = Duration::from_millis(500);
    let server = TestServer::start(Config {
        max_lifetime: lifetime,
        ..config()
    });
    let start = Instant::now();
    let mut s = raw_ws(server.addr);
    // Busy all along: messages do not extend a lifetime.
    let mut echoed = 0;
    let close = loop {
        assert!(
            start.elapsed() < lifetime + LATE,
            "no close after {echoed} echoes"
        );
        let msg = format!("message {echoed}");
        s.write_all(&frame(true, OP_TEXT, msg.as_bytes())).unwrap();
        let f = read_frame(&mut s);
        match f.opcode {
            OP_TEXT => assert_eq!(f.payload, msg.as_bytes()),
            OP_CLOSE => break f.close(),
            _ => panic!("unexpected frame {f:?}"),
        }
        echoed += 1;
        thread::sleep(Duration::from_millis(20));
    };
    assert_deadline(
        "the close at the end of the lifetime",
        start.elapsed(),
        lifetime,
    );
    assert_eq!(close, Some((1001, "maximum lifetime reached".to_string())));
    assert!(echoed >= 10, "{echoed} echoes in {lifetime:?}");
    // The client answers: the close handshake completes.
    s.write_all(&close_frame(1001, "")).unwrap();
    expect_clean_eof(&mut s);
    server.wait_close_code(1001);
    server.finish_closed(&[(CloseReason::MaxLifetime, 1)]);
}

#[test]
fn a_refused_client_is_held_at_most_a_second_and_released_at_its_eof() {
    // One connection at a time: the next is refused with 503. The server keeps a refused
    // connection (our side shut down) to read the request that may still come, so that
    // closing does not reset the connection before the answer is read: until the client's
    // EOF, and at most a second.
    let server = TestServer::start(Config {
        max_connections: 1,
        ..config()
    });
    let mut admitted = raw_ws(server.addr);
    let start = Instant::now();
    let mut refused = tcp(server.addr);
    let r = read_response(&mut refused);
    assert_eq!(
        (r.status, r.header("retry-after")),
        (503, Some("1")),
        "{r:?}"
    );
    // The client keeps its side open: the server lets the connection go after a second.
    server.wait_stats("the refused connection let go", |s| s.connections == 1);
    assert_deadline(
        "the refused connection let go",
        start.elapsed(),
        Duration::from_secs(1),
    );
    drop(refused);
    // A client that closes after the answer frees its slot at once.
    let start = Instant::now();
    let r = http_request(server.addr, &upgrade_request(server.addr));
    assert_eq!(r.status, 503);
    server.wait_stats("the closed refused connection let go", |s| {
        s.connections == 1
    });
    assert!(
        start.elapsed() < Duration::from_millis(900),
        "held after our EOF"
    );
    admitted.write_all(&close_frame(1000, "")).unwrap();
    assert_eq!(expect_close(&mut admitted).0, 1000);
    expect_clean_eof(&mut admitted);
    let stats = server.finish_closed(&[(CloseReason::Refused, 2), (CloseReason::PeerClosed, 1)]);
    assert_eq!(stats.refused[0], 2, "refused as 'server full'");
}

// ---------------------------------------------------------------------------------------------
// LoopHandle

#[test]
fn loop_handle_sends_posts_and_closes_from_another_thread() {
    let (opened, ids) = mpsc::channel();
    let server = TestServer::start_with(
        config(),
        Opts {
            opened: Some(opened),
            ..Opts::default()
        },
    );
    // Another thread learns the id from on_open through the channel and sends to it.
    let h = server.handle.clone();
    let sender = thread::spawn(move || {
        let id = ids.recv_timeout(WAIT).expect("on_open sent the id");
        h.try_send_text(id, "from a thread").unwrap();
        h.try_send_binary(id, vec![1, 2, 3]).unwrap();
        id
    });
    let mut ws = ws(server.addr);
    let id = sender.join().unwrap();
    assert_eq!(id, server.wait_open(1));
    expect_text(&mut ws, "from a thread");
    assert_eq!(ws.read().unwrap(), TMsg::binary(vec![1u8, 2, 3]));

    let (tx, rx) = mpsc::channel();
    server
        .handle
        .try_post(move |_h, ctx| {
            let sent = ctx.send(id, Message::Text("posted"));
            let data = ctx.data_mut(id).copied();
            tx.send((thread::current().id(), sent, data, ctx.open_ids()))
                .unwrap();
        })
        .unwrap();
    let (tid, sent, data, ids) = rx.recv_timeout(WAIT).expect("post ran");
    assert_eq!(Some(tid), server.rec().loop_thread, "post runs on the loop");
    assert_ne!(tid, thread::current().id());
    assert_eq!(sent, SendStatus::Queued);
    assert_eq!(data, Some(server.rec().opens[0].1));
    assert_eq!(ids, vec![id]);
    expect_text(&mut ws, "posted");
    assert_eq!(server.handle.query(|_, ctx| ctx.open_ids().len()), Some(1));

    server
        .handle
        .try_close(id, CloseCode(4001), "from handle")
        .unwrap();
    let f = read_until_closed(&mut ws).expect("close frame");
    assert_eq!(
        (u16::from(f.code), f.reason.as_str()),
        (4001, "from handle")
    );
    drop(ws);
    server.wait_close_code(4001);
    server.finish_closed(&[(CloseReason::ClosedByServer, 1)]);
}

#[test]
fn loop_handle_terminate() {
    let server = TestServer::start(config());
    let mut s = raw_ws(server.addr);
    let id = server.wait_open(1);
    server.handle.try_terminate(id).unwrap();
    assert!(expect_eof(&mut s).is_empty());
    server.wait_closes(1);
    server.finish_closed(&[(CloseReason::Terminated, 1)]);
}

#[test]
fn stale_id_never_reaches_the_connection_reusing_its_slot() {
    let server = TestServer::start(config());
    let mut a = ws(server.addr);
    let id_a = server.wait_open(1);
    a.close(None).unwrap();
    read_until_closed(&mut a);
    drop(a);
    server.wait_closes(1);

    let mut b = ws(server.addr);
    let id_b = server.wait_open(2);
    assert_ne!(id_a, id_b);
    assert_eq!(
        id_a.as_u64() & 0xffff_ffff,
        id_b.as_u64() & 0xffff_ffff,
        "B should reuse A's slot for this test to mean anything"
    );

    server.handle.try_send_text(id_a, "stale text").unwrap();
    server
        .handle
        .try_send_binary(id_a, b"stale binary".to_vec())
        .unwrap();
    server
        .handle
        .try_close(id_a, CloseCode(4002), "stale close")
        .unwrap();
    server.handle.try_terminate(id_a).unwrap();
    let (tx, rx) = mpsc::channel();
    server
        .handle
        .try_post(move |_h, ctx| {
            let r = (
                ctx.send(id_a, Message::Text("stale post")),
                ctx.close(id_a, CloseCode(4003), "stale"),
                ctx.data_mut(id_a).is_none(),
            );
            ctx.terminate(id_a);
            tx.send(r).unwrap();
        })
        .unwrap();
    assert_eq!(
        rx.recv_timeout(WAIT).unwrap(),
        (SendStatus::Closed, false, true)
    );
    // Commands run in order: had any stale one reached B, B would see it before this.
    server.handle.try_send_text(id_b, "fresh").unwrap();
    expect_text(&mut b, "fresh");
    b.send(TMsg::text("B still open")).unwrap();
    expect_text(&mut b, "B still open");
    assert_eq!(server.rec().closes.len(), 1);

    b.close(None).unwrap();
    read_until_closed(&mut b);
    drop(b);
    server.finish_closed(&[(CloseReason::PeerClosed, 2)]);
}

// ---------------------------------------------------------------------------------------------
// Backpressure: sends to a client that does not read

/// A raw client that completed the upgrade with a 4 KiB receive buffer, and will not read
/// until told: what the server sends it soon stays queued on the server.
fn non_reader(addr: std::net::SocketAddr) -> TcpStream {
    let mut s = tcp_rcvbuf(addr, 4096);
    s.write_all(upgrade_request(addr).as_bytes()).unwrap();
    assert!(read_head(&mut s).starts_with("HTTP/1.1 101 "));
    s
}

const LIMIT: usize = 64 * 1024;
const MSG: usize = 16 * 1024;

/// A message carrying its index in its first two bytes.
fn numbered(i: u16) -> Vec<u8> {
    let mut m = vec![0x5a; MSG];
    m[..2].copy_from_slice(&i.to_be_bytes());
    m
}

#[test]
fn a_send_over_the_limit_is_dropped_and_says_so() {
    let server = TestServer::start(Config {
        max_backpressure: LIMIT,
        backpressure_policy: wsloop::BackpressurePolicy::Drop,
        ..config()
    });
    let mut s = non_reader(server.addr);
    let id = server.wait_open(1);
    // In one posted closure every send goes to the connection's cork: the fifth 16 KiB
    // message finds more than 64 KiB queued, and so does every one after it.
    let statuses = server
        .handle
        .query(move |_, ctx| {
            (0..8u16)
                .map(|i| ctx.send(id, Message::Binary(&numbered(i))))
                .collect::<Vec<_>>()
        })
        .expect("the loop answers");
    let queued = SendStatus::Queued;
    let dropped = SendStatus::Dropped;
    assert_eq!(statuses[..4], [queued; 4], "{statuses:?}");
    assert_eq!(statuses[4..], [dropped; 4], "{statuses:?}");
    // The connection stays; what was queued arrives, in order, and nothing of what was not.
    for i in 0..4u16 {
        assert_eq!(expect_frame(&mut s, OP_BINARY), numbered(i));
    }
    // Drained, it takes sends again.
    let again = server
        .handle
        .query(move |_, ctx| ctx.send(id, Message::Text("drained")))
        .unwrap();
    assert_eq!(again, SendStatus::Queued);
    assert_eq!(expect_frame(&mut s, OP_TEXT), b"drained");
    let stats = server.stats();
    assert!(stats.queue_peak <= LIMIT + MSG + 4, "{stats:?}");
    s.write_all(&close_frame(1000, "")).unwrap();
    assert_eq!(expect_close(&mut s).0, 1000);
    expect_clean_eof(&mut s);
    server.finish_closed(&[(CloseReason::PeerClosed, 1)]);
}

/// `n` numbered 16 KiB messages through the handle, from another thread (each is `Ok`: the
/// handle's queue takes it; the loop decides), then wait until the loop has run them all.
fn flood_through_the_handle(server: &TestServer, id: ConnId, n: u16) {
    let h = server.handle.clone();
    thread::spawn(move || {
        for i in 0..n {
            h.try_send_binary(id, numbered(i))
                .expect("queued for the loop");
        }
    })
    .join()
    .expect("the producer");
    server.wait_stats("the loop to run the sends", |_| {
        server.handle.queued().commands == 0
    });
}

#[test]
fn loop_handle_sends_over_the_limit_are_dropped_with_the_drop_policy() {
    let server = TestServer::start(Config {
        max_backpressure: LIMIT,
        backpressure_policy: wsloop::BackpressurePolicy::Drop,
        handle_queue_bytes: 64 << 20,
        ..config()
    });
    let mut s = non_reader(server.addr);
    let id = server.wait_open(1);
    // Many: the kernel's buffers take a few MiB of a loopback connection whatever the
    // client's receive buffer (about 2.8 MiB here), before the server has to queue any.
    const N: u16 = 1000;
    flood_through_the_handle(&server, id, N);
    let stats = server.stats();
    assert!(
        stats.queue_peak <= LIMIT + MSG + 4,
        "queue peaked at {}",
        stats.queue_peak
    );
    // A first run of messages arrives in order (what the limit and the kernel's buffers held);
    // the rest, sent while more than the limit was queued, were dropped: the marker, sent once
    // the server's queue has drained (`on_drain`), comes right after the run.
    let mut got = Vec::new();
    let mut marked = false;
    let marker = loop {
        let deadline = Instant::now() + WAIT;
        while !marked {
            if server.rec().drains > 0 {
                server.handle.try_send_text(id, "marker").unwrap();
                marked = true;
            } else if s.set_nonblocking(true).is_ok() && s.peek(&mut [0]).is_ok() {
                break; // more of the run to read
            }
            assert!(Instant::now() < deadline, "the queue never drained");
            thread::sleep(Duration::from_millis(1));
        }
        s.set_nonblocking(false).unwrap();
        let f = read_frame(&mut s);
        if f.opcode == OP_TEXT {
            break f.payload;
        }
        assert_eq!(f.opcode, OP_BINARY);
        got.push(u16::from_be_bytes([f.payload[0], f.payload[1]]));
    };
    assert_eq!(marker, b"marker");
    let k = got.len() as u16;
    assert_eq!(got, (0..k).collect::<Vec<_>>(), "in order, without gaps");
    assert!(
        (LIMIT / MSG) as u16 <= k && k < N / 2,
        "{k} of {N} messages delivered past a 64 KiB limit"
    );
    s.write_all(&close_frame(1000, "")).unwrap();
    assert_eq!(expect_close(&mut s).0, 1000);
    expect_clean_eof(&mut s);
    server.finish_closed(&[(CloseReason::PeerClosed, 1)]);
}

#[test]
fn loop_handle_sends_over_the_limit_close_the_reader_with_1008() {
    let server = TestServer::start(Config {
        max_backpressure: LIMIT,
        close_timeout: Duration::from_secs(10),
        handle_queue_bytes: 64 << 20,
        ..config()
    });
    let mut s = non_reader(server.addr);
    let id = server.wait_open(1);
    flood_through_the_handle(&server, id, 1000);
    // On the wire: a run of messages in order, then the close frame, 1008, and nothing after.
    let mut got = 0u16;
    let close = loop {
        let f = read_frame(&mut s);
        if f.opcode == OP_CLOSE {
            break f.close();
        }
        assert_eq!(
            (f.opcode, &f.payload[..2]),
            (OP_BINARY, &got.to_be_bytes()[..])
        );
        got += 1;
    };
    assert_eq!(close, Some((1008, "backpressure limit".to_string())));
    assert!(
        (LIMIT / MSG) as u16 <= got && got < 500,
        "{got} of 1000 messages before the close"
    );
    // The server shut its side down after the close frame (FIN) and drains our input until
    // our EOF (or its close timeout): we answer, read its EOF, and leave.
    s.write_all(&close_frame(1008, "")).unwrap();
    expect_clean_eof(&mut s);
    drop(s);
    server.wait_close_code(1008);
    assert!(server.stats().queue_peak <= LIMIT + MSG + 4 + 127);
    server.finish_closed(&[(CloseReason::Backpressure, 1)]);
}

#[test]
fn pings_while_bytes_are_queued_get_one_pong_with_the_latest_payload() {
    // A client that does not read fills the kernel's buffers with echoes until the server
    // queues some (under a 16 MiB limit, so it is still read), then sends 2,000 pings in writes
    // of 100. While anything is queued for it, no pong is written: the pong owed takes each
    // ping's payload in turn, and goes out once, when the queue has drained.
    let server = TestServer::start(Config {
        max_backpressure: 16 << 20,
        ..config()
    });
    let mut s = non_reader(server.addr);
    let mut echoes = 0u16;
    while server.stats().queue_peak == 0 {
        for _ in 0..16 {
            s.write_all(&frame(true, OP_BINARY, &numbered(echoes)))
                .unwrap();
            echoes += 1;
        }
        assert!(echoes < 2000, "{echoes} echoes and nothing queued");
        thread::sleep(Duration::from_millis(5));
    }
    // In 20 writes, each read before the next is sent: 20 reads at least.
    let pings = 2000;
    for (n, batch) in (0..pings).collect::<Vec<u32>>().chunks(100).enumerate() {
        let bytes: Vec<u8> = batch
            .iter()
            .flat_map(|i| frame(true, OP_PING, format!("ping {i}").as_bytes()))
            .collect();
        s.write_all(&bytes).unwrap();
        server.wait_rec("a batch of pings read", |r| r.pings == (n + 1) * 100);
    }
    for i in 0..echoes {
        assert_eq!(expect_frame(&mut s, OP_BINARY), numbered(i), "echo {i}");
    }
    let last = format!("ping {}", pings - 1);
    assert_eq!(expect_frame(&mut s, OP_PONG), last.as_bytes());
    // Nothing more: the close is answered next.
    s.write_all(&close_frame(1000, "")).unwrap();
    assert_eq!(expect_close(&mut s).0, 1000);
    expect_clean_eof(&mut s);
    server.finish_closed(&[(CloseReason::PeerClosed, 1)]);
}

// ---------------------------------------------------------------------------------------------
// Graceful shutdown

#[test]
fn shutdown_closes_every_client_with_1001_and_refuses_new_ones() {
    let server = TestServer::start_full(
        config(),
        Opts::default(),
        "127.0.0.1:0".parse().unwrap(),
        Drive::Turn,
    )
    .unwrap();
    let mut clients: Vec<Ws> = (0..3).map(|_| ws(server.addr)).collect();
    server.wait_open(3);
    server.handle.shutdown().unwrap();
    let mut first = true;
    for ws in &mut clients {
        match ws.read() {
            Ok(TMsg::Close(Some(f))) => assert_eq!(f.code, TCode::Away),
            other => panic!("expected close 1001, got {other:?}"),
        }
        if first {
            // Shutdown has started (and two clients have not answered yet): no new connections.
            first = false;
            let e = TcpStream::connect(server.addr).expect_err("listener closed");
            assert_eq!(e.kind(), ErrorKind::ConnectionRefused);
        }
    }
    for ws in &mut clients {
        read_until_closed(ws); // flushes the reply, then sees the server's EOF
    }
    let rec = server.rec.clone();
    let stats = server.join(Duration::from_secs(10)).unwrap();
    drop(clients);
    let rec = rec.lock().unwrap();
    check_open_close_pairs(&rec);
    assert!(rec.closes.iter().all(|c| c.code == 1001), "{rec:?}");
    assert_eq!((stats.connections, stats.timers), (0, 0));
    assert_closed(&stats, &[(CloseReason::Shutdown, 3)]);
}

#[test]
fn shutdown_with_plain_run_returns() {
    let server = TestServer::start(config());
    let mut ws = ws(server.addr);
    let id = server.wait_open(1);
    server.handle.shutdown().unwrap();
    let f = read_until_closed(&mut ws).expect("close frame");
    assert_eq!(f.code, TCode::Away);
    let handle = server.handle.clone();
    server.join(Duration::from_secs(10));
    // The loop is gone: queries answer None, commands are refused.
    assert!(handle.stats().is_none());
    assert_eq!(handle.try_send_text(id, "nobody"), Err(QueueError::Closed));
    assert_eq!(handle.shutdown(), Err(QueueError::Closed));
}

#[test]
fn shutdown_gives_up_on_unresponsive_clients_after_shutdown_timeout() {
    let server = TestServer::start_full(
        Config {
            shutdown_timeout: Duration::from_millis(300),
            close_timeout: Duration::from_secs(30),
            ..config()
        },
        Opts::default(),
        "127.0.0.1:0".parse().unwrap(),
        Drive::Turn,
    )
    .unwrap();
    let mut silent = raw_ws(server.addr);
    let mut polite = ws(server.addr);
    server.wait_open(2);
    // A connection still in its handshake is dropped at once.
    let mut half = tcp(server.addr);
    half.write_all(b"GET / HTTP/1.1\r\n").unwrap();
    server.wait_stats("3 connections", |s| s.connections == 3);
    let start = Instant::now();
    server.handle.shutdown().unwrap();
    expect_clean_eof(&mut half);
    assert!(start.elapsed() < LATE, "the handshaking connection kept");
    assert_eq!(expect_close(&mut silent).0, 1001);
    assert_eq!(read_until_closed(&mut polite).unwrap().code, TCode::Away);
    expect_clean_eof(&mut silent);
    assert_deadline(
        "the silent client dropped",
        start.elapsed(),
        Duration::from_millis(300),
    );
    let rec = server.rec.clone();
    let stats = server.join(Duration::from_secs(10)).unwrap();
    let rec = rec.lock().unwrap();
    check_open_close_pairs(&rec);
    assert!(rec.closes.iter().all(|c| c.code == 1001), "{rec:?}");
    assert_eq!((stats.connections, stats.timers), (0, 0));
    assert_closed(&stats, &[(CloseReason::Shutdown, 3)]);
}
