//! Publish/subscribe: the API, the ordering guarantees, backpressure per subscriber, the close
//! path's unsubscribe under churn, delivery across a cluster's loops, and the metrics.
//!
//! The handler here speaks text commands: `sub T`, `unsub T`, `is T`, `topics` (each answered
//! with one text frame), `pub T PAYLOAD` (published to T's subscribers but the sender, no
//! answer), `send PAYLOAD` (sent back), `loop` (answered with the connection's loop index),
//! `close` (closed with 4000).
// Test code (see Cargo.toml's [lints]): it fails by panicking, and opens descriptors on purpose.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

mod common;
mod rlimit_support;

use common::*;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};
use wsloop::topics::{TopicError, MAX_TOPIC_LEN};
use wsloop::{
    BackpressurePolicy, CloseCode, Cluster, Config, ConnId, Decision, Handler, LoopHandle, Message,
    QueueError, Server, Stats, UpgradeRequest, WebSocket,
};

/// Subscriber counts reported through `on_subscription`: (topic, old, new).
type Changes = Arc<Mutex<Vec<(String, usize, usize)>>>;

struct Rooms {
    changes: Changes,
}

impl Handler for Rooms {
    type Data = ();
    fn upgrade(&mut self, _req: &UpgradeRequest<'_>) -> Decision<()> {
        Decision::accept(())
    }
    fn on_message(&mut self, ws: &mut WebSocket<'_, ()>, msg: Message<'_>) {
        let Message::Text(t) = msg else {
            return;
        };
        let (cmd, rest) = t.split_once(' ').unwrap_or((t, ""));
        let answer = match cmd {
            "sub" => match ws.subscribe(rest.as_bytes()) {
                Ok(new) => format!("sub {new}"),
                Err(TopicError::TooLong) => "sub too-long".into(),
                Err(TopicError::TooMany) => "sub too-many".into(),
            },
            "unsub" => format!("unsub {}", ws.unsubscribe(rest.as_bytes())),
            "is" => format!("is {}", ws.is_subscribed(rest.as_bytes())),
            "topics" => {
                let mut all: Vec<String> = ws
                    .topics()
                    .into_iter()
                    .map(|t| String::from_utf8(t).unwrap())
                    .collect();
                all.sort();
                format!("topics {}", all.join(","))
            }
            "pub" => {
                let (topic, payload) = rest.split_once(' ').unwrap_or((rest, ""));
                let _ = ws.publish(topic.as_bytes(), Message::Text(payload));
                return;
            }
            "send" => rest.to_string(),
            "loop" => format!("loop {}", ws.id().loop_index()),
            "close" => {
                ws.close(CloseCode(4000), "bye");
                return;
            }
            _ => return,
        };
        ws.send(Message::Text(&answer));
    }
    fn on_subscription(&mut self, topic: &[u8], old: usize, new: usize) {
        let topic = String::from_utf8_lossy(topic).into_owned();
        self.changes.lock().unwrap().push((topic, old, new));
    }
    fn on_close(&mut self, _id: ConnId, _data: (), _code: CloseCode, _reason: &str) {}
}

struct Running {
    addr: SocketAddr,
    handle: LoopHandle<Rooms>,
    changes: Changes,
    thread: thread::JoinHandle<Result<(), wsloop::Error>>,
}

fn start(config: Config) -> Running {
    let changes = Changes::default();
    let mut server = Server::new(
        config,
        Rooms {
            changes: changes.clone(),
        },
    )
    .expect("server");
    let addr = server.listen("127.0.0.1:0".parse().unwrap()).unwrap();
    let handle = server.handle();
    let thread = thread::spawn(move || server.run());
    Running {
        addr,
        handle,
        changes,
        thread,
    }
}

impl Running {
    fn stats(&self) -> Stats {
        self.handle.stats().expect("the loop runs")
    }

    /// Wait (bounded) for `cond` on the loop's counters.
    fn wait_stats(&self, what: &str, cond: impl Fn(&Stats) -> bool) -> Stats {
        let deadline = Instant::now() + WAIT;
        loop {
            let s = self.stats();
            if cond(&s) {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}: {s:?}"
            );
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// Shut down; the loop ends with every connection closed and every topic gone.
    fn finish(self) -> Stats {
        let last = self.stats();
        self.handle.shutdown().unwrap();
        let deadline = Instant::now() + Duration::from_secs(15);
        while !self.thread.is_finished() {
            assert!(Instant::now() < deadline, "the loop did not end");
            thread::sleep(Duration::from_millis(5));
        }
        self.thread.join().unwrap().expect("the loop ends cleanly");
        last
    }
}

fn send(s: &mut TcpStream, text: &str) {
    s.write_all(&frame(true, OP_TEXT, text.as_bytes())).unwrap();
}

fn recv(s: &mut TcpStream) -> String {
    String::from_utf8(expect_frame(s, OP_TEXT)).unwrap()
}

/// Send a command and read its answer (the next frame must be it).
fn ask(s: &mut TcpStream, text: &str) -> String {
    send(s, text);
    recv(s)
}

/// A connection subscribed to `topic`.
fn subscriber(addr: SocketAddr, topic: &str) -> TcpStream {
    let mut s = raw_ws(addr);
    assert_eq!(ask(&mut s, &format!("sub {topic}")), "sub true");
    s
}

#[test]
fn subscribe_unsubscribe_and_topics_answer_as_documented() {
    let srv = start(Config {
        max_topics_per_connection: 3,
        ..config()
    });
    let mut a = raw_ws(srv.addr);
    assert_eq!(ask(&mut a, "sub news"), "sub true");
    assert_eq!(ask(&mut a, "sub news"), "sub false", "already subscribed");
    assert_eq!(ask(&mut a, "is news"), "is true");
    assert_eq!(ask(&mut a, "is sport"), "is false");
    assert_eq!(ask(&mut a, "sub sport"), "sub true");
    assert_eq!(
        ask(&mut a, "sub "),
        "sub true",
        "the empty topic is a topic"
    );
    assert_eq!(ask(&mut a, "topics"), "topics ,news,sport");
    assert_eq!(ask(&mut a, "sub weather"), "sub too-many");
    assert_eq!(ask(&mut a, "unsub "), "unsub true");
    let longest = "x".repeat(MAX_TOPIC_LEN);
    assert_eq!(ask(&mut a, &format!("sub {longest}")), "sub true");
    assert_eq!(ask(&mut a, &format!("sub {longest}x")), "sub too-long");
    assert_eq!(ask(&mut a, &format!("unsub {longest}")), "unsub true");
    assert_eq!(ask(&mut a, "unsub sport"), "unsub true");
    assert_eq!(
        ask(&mut a, "unsub sport"),
        "unsub false",
        "not subscribed any more"
    );
    assert_eq!(ask(&mut a, "topics"), "topics news");

    let mut b = subscriber(srv.addr, "news");
    assert_eq!(srv.handle.num_subscribers(b"news"), Some(2));
    assert_eq!(srv.handle.num_subscribers(b"sport"), Some(0));
    let s = srv.stats();
    assert_eq!((s.topics, s.subscriptions), (1, 2));

    // Publishing a topic longer than the limit is refused before it is queued.
    let too_long = vec![b'x'; MAX_TOPIC_LEN + 1];
    assert_eq!(
        srv.handle.try_publish(&too_long, Message::Text("x")),
        Err(QueueError::TooLarge)
    );

    // Ending a connection takes it out of its topics (reported as for an unsubscribe).
    close_client(&mut a);
    srv.wait_stats("a's subscription gone", |s| s.subscriptions == 1);
    close_client(&mut b);
    let s = srv.wait_stats("every topic gone", |s| s.connections == 0);
    assert_eq!((s.topics, s.subscriptions), (0, 0));
    let changes = srv.changes.lock().unwrap().clone();
    let long = |t: &str| {
        if t.len() > 10 {
            "LONG".into()
        } else {
            t.to_string()
        }
    };
    let changes: Vec<_> = changes
        .into_iter()
        .map(|(t, o, n)| (long(&t), o, n))
        .collect();
    let want: Vec<(String, usize, usize)> = [
        ("news", 0, 1),
        ("sport", 0, 1),
        ("", 0, 1),
        ("", 1, 0),
        ("LONG", 0, 1),
        ("LONG", 1, 0),
        ("sport", 1, 0),
        ("news", 1, 2),
        ("news", 2, 1),
        ("news", 1, 0),
    ]
    .iter()
    .map(|(t, o, n)| (t.to_string(), *o, *n))
    .collect();
    assert_eq!(changes, want);
    srv.finish();
}

/// Close from the client side: our close frame, the server's answer, then EOF.
fn close_client(s: &mut TcpStream) {
    s.write_all(&close_frame(1000, "")).unwrap();
    loop {
        let f = read_frame(s);
        if f.opcode == OP_CLOSE {
            break;
        }
    }
    let _ = expect_eof(s);
}

#[test]
fn a_publish_reaches_every_subscriber_but_the_publisher_in_order() {
    let srv = start(config());
    let mut publisher = subscriber(srv.addr, "room");
    let mut members: Vec<TcpStream> = (0..3).map(|_| subscriber(srv.addr, "room")).collect();
    let mut outsider = subscriber(srv.addr, "other");
    let mut bare = raw_ws(srv.addr);
    const N: usize = 300;
    let mut batch = Vec::new();
    for i in 0..N {
        batch.extend_from_slice(&frame(true, OP_TEXT, format!("pub room m{i}").as_bytes()));
    }
    // All in one write: many publications in one read, delivered with one write per member.
    publisher.write_all(&batch).unwrap();
    for m in &mut members {
        for i in 0..N {
            assert_eq!(recv(m), format!("m{i}"));
        }
    }
    // The publisher got none of it: the first frame it reads is the answer to what it sends.
    assert_eq!(ask(&mut publisher, "send after"), "after");
    assert_eq!(ask(&mut outsider, "send after"), "after");
    assert_eq!(ask(&mut bare, "send after"), "after");
    let s = srv.stats();
    assert_eq!(s.published, N as u64);
    assert_eq!(s.deliveries, 3 * N as u64);
    assert_eq!(s.deliveries_dropped, [0, 0, 0, 0]);
    drop(members);
    srv.finish();
}

/// With permessage-deflate, a publication is compressed once for every subscriber that
/// negotiated it (with the full window): they get it with RSV1, inflating to the message; a
/// subscriber without the extension, or that asked for a smaller window, gets it plain; short
/// ones are plain for all. All in order.
#[test]
fn a_publication_is_compressed_once_for_every_subscriber_that_negotiated_it() {
    use wsloop::protocol::deflate::Inflater;
    let srv = start(Config {
        compression: wsloop::Compression::Shared,
        compression_threshold: 100,
        ..config()
    });
    let join = |offer: Option<&str>| {
        let (mut s, head) = upgrade_offering(srv.addr, offer.as_slice());
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        assert_eq!(ask(&mut s, "sub room"), "sub true");
        s
    };
    let mut zipped = [
        join(Some("permessage-deflate")),
        join(Some("permessage-deflate")),
    ];
    let mut small_window = join(Some("permessage-deflate; server_max_window_bits=10"));
    let mut plain = join(None);
    let mut publisher = raw_ws(srv.addr);
    const N: usize = 40;
    let messages: Vec<String> = (0..N)
        .map(|i| match i % 4 {
            3 => format!("short {i}"),
            _ => format!(
                "{i:03} {}",
                "the quick brown fox jumps over the lazy dog ".repeat(10)
            ),
        })
        .collect();
    let long = messages.iter().filter(|m| m.len() >= 100).count() as u64;
    let long_bytes: usize = messages.iter().map(String::len).filter(|&n| n >= 100).sum();
    let mut batch = Vec::new();
    for m in &messages {
        batch.extend_from_slice(&frame(true, OP_TEXT, format!("pub room {m}").as_bytes()));
    }
    publisher.write_all(&batch).unwrap();
    for s in zipped.iter_mut() {
        for (i, m) in messages.iter().enumerate() {
            let f = read_frame(s);
            assert_eq!(f.opcode, OP_TEXT, "message {i}");
            match m.len() >= 100 {
                true => {
                    assert_eq!(f.rsv, 4, "message {i} compressed");
                    assert!(f.payload.len() < m.len() / 2);
                    let mut out = Vec::new();
                    Inflater::new()
                        .inflate(&f.payload, &mut out, 1 << 20)
                        .unwrap();
                    assert_eq!(out, m.as_bytes(), "message {i}");
                }
                false => assert_eq!((f.rsv, &f.payload[..]), (0, m.as_bytes()), "message {i}"),
            }
        }
    }
    for s in [&mut small_window, &mut plain] {
        for (i, m) in messages.iter().enumerate() {
            let f = read_frame(s);
            assert_eq!(
                (f.rsv, f.opcode, &f.payload[..]),
                (0, OP_TEXT, m.as_bytes()),
                "message {i}"
            );
        }
    }
    let st = srv.stats();
    assert_eq!((st.published, st.deliveries), (N as u64, 4 * N as u64));
    assert_eq!(
        st.compressed_messages[1], long,
        "each long publication compressed once, for both subscribers"
    );
    assert_eq!(
        st.compression_bytes[2], long_bytes as u64,
        "and counted once"
    );
    srv.finish();
}

#[test]
fn sends_and_publishes_to_one_connection_arrive_in_the_order_they_were_made() {
    let srv = start(config());
    let mut member = subscriber(srv.addr, "room");
    let mut other = subscriber(srv.addr, "room");
    let member_id = {
        // The loop's only connections: find the member's id by asking it to send to itself.
        let ids = srv
            .handle
            .query(|_, ctx| ctx.open_ids())
            .expect("the loop runs");
        assert_eq!(ids.len(), 2);
        ids[0]
    };
    // A posted closure interleaving direct sends and publications.
    srv.handle
        .try_post(move |_, ctx| {
            for i in 0..50 {
                ctx.send(member_id, Message::Text(&format!("send {i}")));
                ctx.publish(b"room", Message::Text(&format!("pub {i}")))
                    .unwrap();
            }
        })
        .unwrap();
    for i in 0..50 {
        assert_eq!(recv(&mut member), format!("send {i}"));
        assert_eq!(recv(&mut member), format!("pub {i}"));
    }
    for i in 0..50 {
        assert_eq!(recv(&mut other), format!("pub {i}"));
    }
    // The same from another thread through the handle's queue.
    for i in 0..50 {
        srv.handle
            .try_send_text(member_id, format!("hsend {i}"))
            .unwrap();
        srv.handle
            .try_publish(b"room", Message::Text(&format!("hpub {i}")))
            .unwrap();
    }
    for i in 0..50 {
        assert_eq!(recv(&mut member), format!("hsend {i}"));
        assert_eq!(recv(&mut member), format!("hpub {i}"));
    }
    for i in 0..50 {
        assert_eq!(recv(&mut other), format!("hpub {i}"));
    }
    // Another connection's publication reaches the member before what the member's own
    // callback sends after it.
    send(&mut other, "pub room from-other");
    assert_eq!(ask(&mut other, "send sync"), "sync");
    assert_eq!(ask(&mut member, "send mine"), "from-other");
    assert_eq!(recv(&mut member), "mine");
    // Publications from several threads: each thread's own in its order.
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let h = srv.handle.clone();
            thread::spawn(move || {
                for i in 0..500 {
                    let msg = format!("t{t} {i}");
                    h.publish_timeout(b"room", Message::Text(&msg), WAIT)
                        .unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    for conn in [&mut member, &mut other] {
        let mut next = [0usize; 4];
        for _ in 0..2000 {
            let m = recv(conn);
            let (t, i) = m[1..].split_once(' ').unwrap();
            let (t, i): (usize, usize) = (t.parse().unwrap(), i.parse().unwrap());
            assert_eq!(i, next[t], "thread {t}'s publications out of order");
            next[t] += 1;
        }
    }
    srv.finish();
}

/// 1,000 subscribers of one topic, one of which stops reading: with `policy`, every other
/// subscriber gets every message, and what is held for the slow one stays within its limit.
/// Returns the slow one (its socket, with what the kernel holds for it unread) and the stats.
fn one_slow_subscriber_among_a_thousand(
    policy: BackpressurePolicy,
) -> (Running, TcpStream, Stats, Vec<TcpStream>) {
    const SUBSCRIBERS: usize = 1000;
    const MESSAGES: usize = 160;
    const SIZE: usize = 4096;
    const ROUND: usize = 4;
    raise_soft_fd_limit(2 * SUBSCRIBERS + 200);
    let limit = 64 * 1024;
    let srv = start(Config {
        max_backpressure: limit,
        backpressure_policy: policy,
        // Bounds what the kernel holds for the reader that stopped, so that the loop's own
        // queue fills within the test's volume.
        socket_send_buffer: 32 * 1024,
        // The slow one reads what it was sent (its 1008 last) only once the others are done:
        // a reader given up on at the close timeout with bytes still in the kernel is reset.
        close_timeout: Duration::from_secs(30),
        ..config()
    });
    let slow = {
        let mut s = tcp_rcvbuf(srv.addr, 4096);
        s.set_nodelay(true).unwrap();
        s.write_all(upgrade_request(srv.addr).as_bytes()).unwrap();
        assert!(read_head(&mut s).starts_with("HTTP/1.1 101 "));
        assert_eq!(ask(&mut s, "sub ticker"), "sub true");
        s
    };
    let fast: Vec<TcpStream> = (1..SUBSCRIBERS)
        .map(|_| subscriber(srv.addr, "ticker"))
        .collect();
    assert_eq!(srv.handle.num_subscribers(b"ticker"), Some(SUBSCRIBERS));

    // Readers: each thread reads its share of the fast subscribers without blocking on any.
    let received: Arc<Vec<AtomicUsize>> =
        Arc::new((0..fast.len()).map(|_| AtomicUsize::new(0)).collect());
    let failed = Arc::new(AtomicBool::new(false));
    let mut shares: Vec<Vec<(usize, TcpStream)>> = (0..8).map(|_| Vec::new()).collect();
    for (i, s) in fast.into_iter().enumerate() {
        s.set_nonblocking(true).unwrap();
        shares[i % 8].push((i, s));
    }
    let readers: Vec<_> = shares
        .into_iter()
        .map(|share| {
            let received = received.clone();
            let failed = failed.clone();
            thread::spawn(move || read_share(share, MESSAGES, SIZE, &received, &failed))
        })
        .collect();

    // Publish in rounds, at most two rounds ahead of the slowest fast reader, so that no fast
    // reader ever has more than its limit in flight; the slow one falls behind by everything.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut payload = vec![b'.'; SIZE];
    for round in 0..MESSAGES / ROUND {
        while received.iter().map(|r| r.load(SeqCst)).min().unwrap() + 2 * ROUND < round * ROUND {
            assert!(!failed.load(SeqCst), "a fast reader failed");
            assert!(Instant::now() < deadline, "the fast readers fell behind");
            thread::sleep(Duration::from_millis(1));
        }
        for i in round * ROUND..(round + 1) * ROUND {
            payload[..8].copy_from_slice(&(i as u64).to_be_bytes());
            srv.handle
                .publish_timeout(b"ticker", Message::Binary(&payload), WAIT)
                .unwrap();
        }
    }
    let fast: Vec<TcpStream> = readers
        .into_iter()
        .flat_map(|r| r.join().unwrap())
        .collect();
    assert!(!failed.load(SeqCst), "a fast subscriber missed a message");
    let stats = srv.stats();
    assert_eq!(stats.published, MESSAGES as u64);
    assert!(
        stats.deliveries_dropped[0] > 0,
        "the slow subscriber went over its limit: {stats:?}"
    );
    // What was held for the slow one never exceeded the limit by more than one message.
    assert!(
        stats.queue_peak <= limit + SIZE + 16,
        "queue peak {} over the limit {limit}",
        stats.queue_peak
    );
    (srv, slow, stats, fast)
}

/// Read `MESSAGES` binary frames of `size` bytes on each socket of `share`, numbered in order.
fn read_share(
    mut share: Vec<(usize, TcpStream)>,
    messages: usize,
    size: usize,
    received: &[AtomicUsize],
    failed: &AtomicBool,
) -> Vec<TcpStream> {
    let frame_len = 4 + size;
    let mut bufs: Vec<Vec<u8>> = share.iter().map(|_| Vec::new()).collect();
    let mut chunk = vec![0u8; 64 * 1024];
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let mut done = true;
        let mut progress = false;
        for ((i, s), buf) in share.iter_mut().zip(&mut bufs) {
            let got = received[*i].load(SeqCst);
            if got == messages {
                continue;
            }
            done = false;
            match s.read(&mut chunk) {
                Ok(0) => {
                    failed.store(true, SeqCst);
                    break;
                }
                Ok(n) => {
                    progress = true;
                    buf.extend_from_slice(&chunk[..n]);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => continue,
                Err(_) => {
                    failed.store(true, SeqCst);
                    break;
                }
            }
            let mut got = got;
            let mut at = 0;
            while buf.len() - at >= frame_len {
                let f = &buf[at..at + frame_len];
                // Binary, final, 16-bit length.
                let seq = u64::from_be_bytes(f[4..12].try_into().unwrap()) as usize;
                if f[0] != 0x82 || f[1] != 126 || seq != got {
                    failed.store(true, SeqCst);
                    break;
                }
                got += 1;
                at += frame_len;
            }
            buf.drain(..at);
            received[*i].store(got, SeqCst);
        }
        if done || failed.load(SeqCst) || Instant::now() > deadline {
            if !done {
                failed.store(true, SeqCst);
            }
            return share.into_iter().map(|(_, s)| s).collect();
        }
        if !progress {
            thread::sleep(Duration::from_millis(1));
        }
    }
}

fn raise_soft_fd_limit(want: usize) {
    let soft = rlimit_support::raise_nofile_limit().expect("raise RLIMIT_NOFILE");
    assert!(
        soft as usize >= want,
        "this test needs {want} descriptors; the hard limit is {soft}"
    );
}

/// The frames the slow subscriber's socket holds: binary messages numbered in increasing order
/// (some skipped under the drop policy), then whatever ends it.
fn drain_slow(mut slow: TcpStream) -> (Vec<usize>, Option<u16>) {
    slow.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut seqs = Vec::new();
    loop {
        let mut h = [0u8; 2];
        match slow.read_exact(&mut h) {
            Ok(()) => {}
            Err(_) => return (seqs, None),
        }
        let len = match h[1] & 0x7f {
            126 => {
                let mut b = [0u8; 2];
                slow.read_exact(&mut b).unwrap();
                u16::from_be_bytes(b) as usize
            }
            n => n as usize,
        };
        let mut p = vec![0u8; len];
        slow.read_exact(&mut p).unwrap();
        match h[0] & 0x0f {
            0x2 => seqs.push(u64::from_be_bytes(p[..8].try_into().unwrap()) as usize),
            0x8 => return (seqs, Some(u16::from_be_bytes([p[0], p[1]]))),
            0x1 => {} // an answer to its own command
            op => panic!("unexpected opcode {op}"),
        }
    }
}

#[test]
fn a_subscriber_that_stops_reading_loses_messages_under_the_drop_policy_and_no_one_else_does() {
    let (srv, slow, stats, _fast) = one_slow_subscriber_among_a_thousand(BackpressurePolicy::Drop);
    // Still subscribed: the drop policy keeps the connection.
    assert_eq!(srv.handle.num_subscribers(b"ticker"), Some(1000));
    assert_eq!(stats.closed_by(wsloop::CloseReason::Backpressure), 0);
    let (seqs, _) = drain_slow(slow);
    println!(
        "drop policy: the slow subscriber got {} of 160 messages; deliveries {}, dropped {:?}, queue peak {}",
        seqs.len(),
        stats.deliveries,
        stats.deliveries_dropped,
        stats.queue_peak
    );
    assert!(!seqs.is_empty() && seqs.len() < 160, "got {}", seqs.len());
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "the slow subscriber's messages are in order, some skipped: {seqs:?}"
    );
    assert_eq!(
        stats.deliveries + stats.deliveries_dropped[0],
        1000 * 160,
        "every delivery is made or counted as dropped"
    );
    srv.finish();
}

#[test]
fn a_subscriber_that_stops_reading_is_closed_with_1008_under_the_close_policy() {
    let (srv, slow, stats, _fast) = one_slow_subscriber_among_a_thousand(BackpressurePolicy::Close);
    let (seqs, code) = drain_slow(slow);
    // The fast ones got all 160 each; what was published to the slow one was delivered,
    // dropped for backpressure (the one that closed it) or dropped while it was closing, until
    // it ended (at the close timeout: on a loaded machine, before the last publications).
    let to_slow =
        stats.deliveries + stats.deliveries_dropped[0] + stats.deliveries_dropped[1] - 999 * 160;
    assert!(
        (seqs.len() as u64 + 1..=160).contains(&to_slow),
        "{to_slow} deliveries or drops for the slow subscriber, which read {}",
        seqs.len()
    );
    assert_eq!(stats.deliveries_dropped[0], 1, "the one that closed it");
    println!(
        "close policy: the slow subscriber got {} of 160 messages, then {code:?}; dropped {:?}, queue peak {}",
        seqs.len(),
        stats.deliveries_dropped,
        stats.queue_peak
    );
    // Ended once its close frame was read (or at the close timeout): out of its topic.
    srv.wait_stats("the slow subscriber closed", |s| {
        s.closed_by(wsloop::CloseReason::Backpressure) == 1
    });
    assert_eq!(srv.handle.num_subscribers(b"ticker"), Some(999));
    drop(_fast);
    srv.finish();
    assert!(
        seqs.windows(2).all(|w| w[1] == w[0] + 1) && seqs.first() == Some(&0),
        "what the slow subscriber got is a prefix of the messages, nothing skipped"
    );
    assert_eq!(code, Some(1008), "the close frame after them");
}

/// Many publications in one turn reach a subscriber as one run of consecutive frames, written
/// in one slice: what its socket does not take is still held within its limit (plus one
/// message), the rest dropped and counted, under both policies.
#[test]
fn a_burst_published_in_one_turn_to_a_reader_that_stopped_stays_within_its_limit() {
    const MESSAGES: usize = 100;
    const SIZE: usize = 4096;
    let limit = 64 * 1024;
    for policy in [BackpressurePolicy::Drop, BackpressurePolicy::Close] {
        let srv = start(Config {
            max_backpressure: limit,
            backpressure_policy: policy,
            socket_send_buffer: 32 * 1024,
            ..config()
        });
        let mut slow = tcp_rcvbuf(srv.addr, 4096);
        slow.write_all(upgrade_request(srv.addr).as_bytes())
            .unwrap();
        assert!(read_head(&mut slow).starts_with("HTTP/1.1 101 "));
        assert_eq!(ask(&mut slow, "sub burst"), "sub true");
        // 400 KiB published in one turn, more than the socket and the limit hold together.
        srv.handle
            .try_post(|_, ctx| {
                let mut payload = vec![b'.'; SIZE];
                for i in 0..MESSAGES {
                    payload[..8].copy_from_slice(&(i as u64).to_be_bytes());
                    ctx.publish(b"burst", Message::Binary(&payload)).unwrap();
                }
            })
            .unwrap();
        let stats = srv.wait_stats("the burst handed over or dropped", |s| {
            s.deliveries + s.deliveries_dropped[0] + s.deliveries_dropped[1] == MESSAGES as u64
        });
        assert!(
            stats.queue_peak <= limit + SIZE + 16,
            "{policy:?}: queue peak {} over the limit {limit}",
            stats.queue_peak
        );
        assert!(
            stats.deliveries_dropped[0] > 0,
            "{policy:?}: the burst went over the limit: {stats:?}"
        );
        let (seqs, code) = drain_slow(slow);
        assert!(
            seqs.first() == Some(&0) && seqs.windows(2).all(|w| w[0] < w[1]),
            "{policy:?}: in order, from the first: {seqs:?}"
        );
        assert_eq!(code, (policy == BackpressurePolicy::Close).then_some(1008));
        srv.finish();
    }
}

#[test]
fn nothing_is_published_to_a_connection_once_it_is_closing() {
    let srv = start(config());
    let mut closing = subscriber(srv.addr, "room");
    let mut member = subscriber(srv.addr, "room");
    let mut publisher = raw_ws(srv.addr);
    // The server starts the close handshake with the subscriber, which reads the close frame
    // but does not answer: the server waits (up to the close timeout) with it still subscribed.
    send(&mut closing, "close");
    let f = read_frame(&mut closing);
    assert_eq!(f.close(), Some((4000, "bye".into())));
    let mut batch = Vec::new();
    for i in 0..20 {
        batch.extend_from_slice(&frame(true, OP_TEXT, format!("pub room m{i}").as_bytes()));
    }
    publisher.write_all(&batch).unwrap();
    for i in 0..20 {
        assert_eq!(recv(&mut member), format!("m{i}"));
    }
    // Nothing after the close frame: the connection ends (at the close timeout) without a byte.
    let rest = expect_eof(&mut closing);
    assert!(
        rest.is_empty(),
        "{} bytes after the close frame",
        rest.len()
    );
    assert_eq!(
        srv.stats().deliveries_dropped[1],
        20,
        "counted as dropped: closing"
    );
    let s = srv.stats();
    assert_eq!(s.deliveries, 20);
    assert_eq!(s.deliveries_dropped[0], 0);
    srv.finish();
}

/// A connection that resets, leaving its slot to the next one at once.
fn reset(s: TcpStream) {
    let s = socket2::Socket::from(s);
    s.set_linger(Some(Duration::ZERO)).unwrap();
}

#[test]
fn churn_never_delivers_to_a_connection_that_did_not_subscribe() {
    let srv = start(config());
    let stop = Arc::new(AtomicBool::new(false));
    let publisher = {
        let (h, stop) = (srv.handle.clone(), stop.clone());
        thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(SeqCst) {
                match h.try_publish(b"room", Message::Text("x")) {
                    Ok(()) => n += 1,
                    Err(QueueError::Full) => thread::sleep(Duration::from_millis(1)),
                    Err(e) => panic!("publish: {e}"),
                }
                if n % 16 == 0 {
                    thread::sleep(Duration::from_micros(200));
                }
            }
            n
        })
    };
    let mut kept = Vec::new();
    for round in 0..60 {
        // Subscribers that leave (half with a reset, so that their slots are free at once)
        // while publications are in flight, and connections that never subscribe taking the
        // slots they leave.
        let subs: Vec<TcpStream> = (0..4).map(|_| subscriber(srv.addr, "room")).collect();
        for (i, mut s) in subs.into_iter().enumerate() {
            assert_eq!(recv(&mut s), "x", "a subscriber gets the publications");
            if i % 2 == 0 {
                reset(s);
            } else if round % 10 == 0 {
                kept.push(s);
            }
        }
        for _ in 0..4 {
            let mut bare = raw_ws(srv.addr);
            // Its first frame is the answer to its own request: nothing published came before.
            assert_eq!(ask(&mut bare, "send mine"), "mine");
            assert_eq!(ask(&mut bare, "topics"), "topics ");
            kept.push(bare);
        }
    }
    stop.store(true, SeqCst);
    let published = publisher.join().unwrap();
    assert!(published > 0);
    // The connections that never subscribed got nothing but their answers all along.
    for s in kept.iter_mut() {
        match ask(s, "send last").as_str() {
            "last" => {}
            "x" => {
                // A subscriber kept open: drain what it was published.
                while recv(s) != "last" {}
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    let s = srv.stats();
    assert_eq!(s.handler_panics, 0);
    drop(kept);
    let s2 = srv.wait_stats("every connection gone", |s| s.connections == 0);
    assert_eq!((s2.topics, s2.subscriptions), (0, 0));
    assert!(s.deliveries > 0);
    srv.finish();
}

#[test]
fn a_publish_on_any_loop_of_a_cluster_reaches_every_loop_in_order_with_one_wakeup_per_batch() {
    let changes = Changes::default();
    let shared = changes.clone();
    let cluster = Cluster::start(
        Config {
            threads: 2,
            ..config()
        },
        &["127.0.0.1:0".parse().unwrap()],
        None,
        move |_| Rooms {
            changes: shared.clone(),
        },
    )
    .expect("start the cluster");
    let addr = cluster.local_addrs()[0];
    // Two subscribers on each loop (the kernel spreads connections over the loops).
    let mut on: [Vec<TcpStream>; 2] = [Vec::new(), Vec::new()];
    let mut extra = Vec::new();
    let deadline = Instant::now() + WAIT;
    while on.iter().any(|l| l.len() < 2) {
        assert!(
            Instant::now() < deadline,
            "connections did not reach both loops"
        );
        let mut s = raw_ws(addr);
        let l: usize = ask(&mut s, "loop")[5..].parse().unwrap();
        match on[l].len() < 2 {
            true => {
                assert_eq!(ask(&mut s, "sub room"), "sub true");
                on[l].push(s);
            }
            false => extra.push(s),
        }
    }
    assert_eq!(cluster.num_subscribers(b"room"), Some(4));
    let [mut zero, mut one] = on;
    // A client on loop 0 publishes; every other subscriber, on both loops, gets it all in order.
    let mut batch = Vec::new();
    for i in 0..200 {
        batch.extend_from_slice(&frame(true, OP_TEXT, format!("pub room a{i}").as_bytes()));
    }
    zero[0].write_all(&batch).unwrap();
    for s in zero[1..].iter_mut().chain(one.iter_mut()) {
        for i in 0..200 {
            assert_eq!(recv(s), format!("a{i}"));
        }
    }
    // From another thread, through the cluster: every subscriber, in the order published.
    for i in 0..100 {
        cluster
            .try_publish(b"room", Message::Text(&format!("c{i}")))
            .unwrap();
    }
    for s in zero.iter_mut().chain(one.iter_mut()) {
        for i in 0..100 {
            assert_eq!(recv(s), format!("c{i}"));
        }
    }
    // A thousand publications in one turn of loop 1 wake loop 0 once.
    let before = cluster.stats();
    cluster.handles()[1]
        .try_post(|_, ctx| {
            for i in 0..1000 {
                ctx.publish(b"room", Message::Text(&format!("p{i}")))
                    .unwrap();
            }
        })
        .unwrap();
    for s in zero.iter_mut().chain(one.iter_mut()) {
        for i in 0..1000 {
            assert_eq!(recv(s), format!("p{i}"));
        }
    }
    let after = cluster.stats();
    assert_eq!(after[1].forward_wakeups - before[1].forward_wakeups, 1);
    assert_eq!(after[1].published - before[1].published, 1000);
    assert_eq!(
        after[0].published, before[0].published,
        "forwarded ones are not counted again"
    );
    let delivered: u64 = after.iter().map(|s| s.deliveries).sum();
    assert_eq!(delivered, 3 * 200 + 4 * 100 + 4 * 1000);
    // The metrics add the loops up (the other loop's figures may be up to 250 ms old).
    let deadline = Instant::now() + WAIT;
    let m = loop {
        let m = parse_metrics(&cluster.metrics().unwrap());
        if m.value("wsloop_deliveries_total", &[]) == delivered as f64 {
            break m;
        }
        assert!(Instant::now() < deadline, "the metrics never added up");
        thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(m.value("wsloop_subscriptions", &[]), 4.0);
    assert_eq!(
        m.value("wsloop_topics", &[]),
        2.0,
        "one topic, with subscribers on two loops"
    );
    assert_eq!(m.value("wsloop_deliveries_total", &[]), delivered as f64);
    for reason in ["backpressure", "closing", "overflow", "memory"] {
        assert_eq!(
            m.value("wsloop_deliveries_dropped_total", &[("reason", reason)]),
            0.0
        );
    }
    drop((zero, one, extra));
    cluster.shutdown();
    cluster.join().expect("the loops end cleanly");
    let changes = changes.lock().unwrap();
    assert_eq!(changes.iter().filter(|c| c.2 > c.1).count(), 4);
    assert_eq!(changes.iter().filter(|c| c.2 < c.1).count(), 4);
}

/// A small input can be a lot of work: one write of 8,000 empty messages, alternating between a
/// room of 50 and a room of one, is 204,000 deliveries, and since no member is owed two
/// consecutive publications, as many runs. Once a turn's publications reach their bound
/// (`MAX_OWED` runs), the rest of the publisher's input waits for the next turn (counted as a
/// read yield), so the loop serves everyone else in between; every member still gets every
/// message, in order.
#[test]
fn a_burst_of_publications_yields_the_loop_and_loses_nothing() {
    const MEMBERS: usize = 50;
    const MESSAGES: usize = 8000;
    let srv = start(config());
    let mut members: Vec<TcpStream> = (0..MEMBERS).map(|_| subscriber(srv.addr, "room")).collect();
    members.push(subscriber(srv.addr, "other"));
    let mut publisher = raw_ws(srv.addr);
    let mut bystander = raw_ws(srv.addr);
    let before = srv.stats();
    let mut burst = Vec::new();
    for i in 0..MESSAGES {
        let room = if i % 2 == 0 { "room" } else { "other" };
        burst.extend_from_slice(&frame(true, OP_TEXT, format!("pub {room} {i}").as_bytes()));
    }
    publisher.write_all(&burst).unwrap();
    assert_eq!(ask(&mut bystander, "send still here"), "still here");
    let readers: Vec<_> = members
        .drain(..)
        .enumerate()
        .map(|(k, mut m)| {
            thread::spawn(move || {
                let first = usize::from(k == MEMBERS);
                for i in (first..MESSAGES).step_by(2) {
                    assert_eq!(recv(&mut m), i.to_string());
                }
                m
            })
        })
        .collect();
    let members: Vec<TcpStream> = readers.into_iter().map(|r| r.join().unwrap()).collect();
    let s = srv.wait_stats("every publication made", |s| s.published == MESSAGES as u64);
    let deliveries = ((MEMBERS + 1) * MESSAGES / 2) as u64;
    assert_eq!(s.deliveries - before.deliveries, deliveries);
    let yields = s.read_yields - before.read_yields;
    let bound = wsloop::topics::MAX_OWED as u64;
    // One yield per bound's worth of runs (here one per delivery), but for the last part of
    // each read.
    assert!(
        yields >= 1 && yields + 1 >= deliveries / bound,
        "{yields} yields for {deliveries} deliveries"
    );
    drop(members);
    srv.finish();
}
