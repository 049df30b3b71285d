//! Topics shared between instances through a real Redis (README, "Several instances (Redis)"):
//! two `wsloop --pubsub --redis` binaries as child processes share a `redis-server` the test
//! starts on a free loopback port (no persistence) and stops. A subscriber on one instance
//! receives, in order, what a client on the other publishes; Redis down at start, killed and
//! started again on the same port: local delivery goes on, the broker-up metric follows, and
//! cross-instance delivery resumes without restarting wsloop; the fd audit finds nothing
//! unaccounted for throughout. Without `redis-server` the tests print a note and skip (under
//! `CI` its absence is an error: `.ci/run` installs Debian's `redis-server`). The bounded
//! outgoing queue needs no Redis at all: it is tested in-process against a closed port.
// Test code (see Cargo.toml's [lints]): it fails by panicking, and opens descriptors on purpose.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

#[allow(dead_code)]
mod attack_support;
mod child_support;
mod common;
mod redis_support;
mod rlimit_support;

use attack_support::{Metrics, Wsloop};
use common::{tcp, Ws};
use redis_support::{
    free_port, next_text, redis_cli, redis_server, wire, Cluster, FakeRedis, RawRedis, Redis, Reply,
};
use std::io::{Read, Write};
use std::thread;
use std::time::{Duration, Instant};
use tungstenite::Message as WsMessage;

/// How long Redis, a reconnection or a message may take on a loaded machine.
const BOUND: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------------------------
// Redis as a child

// ---------------------------------------------------------------------------------------------
// wsloop instances and clients

/// `wsloop --pubsub --redis URL` (the suite's defaults: --fd-limit 128, metrics on the
/// WebSocket port, the fd audit every 200 ms).
fn instance(name: &str, url: &str) -> Wsloop {
    Wsloop::spawn(name, &["--pubsub", "--redis", url])
}

/// A client in `room` on `w`, with a short read timeout.
fn member(w: &Wsloop, room: &str) -> Ws {
    let req = format!("ws://{}/{room}", w.addr);
    let stream = tcp(w.addr);
    let (ws, _) = tungstenite::client::client(req.as_str(), stream).expect("upgrade");
    ws.get_ref()
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    ws
}

/// Every text message that arrives within `quiet` of the last one.
fn drain(ws: &mut Ws, quiet: Duration) -> Vec<String> {
    let mut got = Vec::new();
    while let Some(t) = next_text(ws, quiet) {
        got.push(t);
    }
    got
}

/// Publish probes from `publisher` until `subscriber` receives one (the other instance has
/// subscribed to the room's channel and Redis is up), bounded; then drain both. What arrives
/// before the first probe is skipped.
fn until_connected(publisher: &mut Ws, subscriber: &mut Ws, what: &str, logs: &[&Wsloop]) {
    let deadline = Instant::now() + BOUND;
    let mut i = 0;
    loop {
        publisher
            .send(WsMessage::text(format!("probe {i}")))
            .unwrap();
        i += 1;
        // Publications queued while Redis was away may arrive first (the bridge sends its
        // queue once Redis is back): wait for a probe.
        if let Some(t) = next_text(subscriber, Duration::from_millis(100)) {
            if t.starts_with("probe ") {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "{what}: no probe arrived within {BOUND:?}; broker metrics and logs:\n{}",
            logs.iter()
                .map(|w| {
                    let m = w.metrics().matching("wsloop_broker_");
                    format!("{m:?}\n{}", w.log_tail(15))
                })
                .collect::<Vec<_>>()
                .join("\n---\n")
        );
    }
    drain(subscriber, Duration::from_millis(300));
    drain(publisher, Duration::from_millis(300));
}

/// Instances `a` and `b` on `redis` (`b` with `b_args` too), a member of the room on `b` and a
/// publisher in it on `a`, connected through Redis (see [`until_connected`]).
fn pair(redis: &Redis, b_args: &[&str]) -> (Wsloop, Wsloop, Ws, Ws) {
    let url = redis.url();
    let a = instance("a", &url);
    let b = Wsloop::spawn("b", &[&["--pubsub", "--redis", &url][..], b_args].concat());
    let mut far = member(&b, "room");
    let mut publisher = member(&a, "room");
    until_connected(&mut publisher, &mut far, "b subscribed", &[&a, &b]);
    (a, b, far, publisher)
}

/// `GET /healthz` on the instance's WebSocket port: (status line, body).
fn healthz(w: &Wsloop) -> (String, String) {
    let mut s = tcp(w.addr);
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: wsloop\r\n\r\n")
        .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").expect("a response");
    (head.lines().next().unwrap().to_string(), body.to_string())
}

/// The fd audit ran after now and found every descriptor accounted for (the bridge's sockets
/// included, whatever state they are in).
fn audit_balances(w: &Wsloop, what: &str) -> Metrics {
    let m = w.audited(&w.metrics());
    assert_eq!(
        m.get("wsloop_fd_audit_difference"),
        0.0,
        "{what}: the fd audit found descriptors unaccounted for:\n{}",
        w.log_tail(20)
    );
    m
}

// ---------------------------------------------------------------------------------------------

#[test]
fn a_subscriber_on_one_instance_receives_in_order_what_a_client_on_the_other_publishes() {
    let Some(bin) = redis_server() else { return };
    let redis = Redis::start(&bin, free_port());
    let a = instance("a", &redis.url());
    let b = instance("b", &redis.url());
    let mut far = member(&b, "room");
    let mut near = member(&a, "room");
    let mut publisher = member(&a, "room");
    until_connected(
        &mut publisher,
        &mut far,
        "b subscribed through redis",
        &[&a, &b],
    );
    drain(&mut near, Duration::from_millis(300));
    let before = (a.metrics(), b.metrics());

    let n = 300;
    for i in 0..n {
        publisher.send(WsMessage::text(format!("m{i}"))).unwrap();
    }
    let want: Vec<String> = (0..n).map(|i| format!("m{i}")).collect();
    let mut got = Vec::new();
    while got.len() < n {
        match next_text(&mut far, BOUND) {
            Some(t) => got.push(t),
            None => panic!("b received {} of {n}: {:?}", got.len(), got.last()),
        }
    }
    assert_eq!(got, want, "b: every message, in the order published on a");
    // On a (the publisher's instance): each exactly once, though Redis sends a's own messages
    // back to it; and nothing more arrives on either.
    let local = drain(&mut near, Duration::from_millis(500));
    assert_eq!(local, want, "a: each message once, in order");
    assert_eq!(
        drain(&mut far, Duration::from_millis(500)),
        Vec::<String>::new()
    );

    let (ma, mb) = (a.metrics(), b.metrics());
    let sent = ma.get("wsloop_broker_sent_total") - before.0.get("wsloop_broker_sent_total");
    let received =
        mb.get("wsloop_broker_received_total") - before.1.get("wsloop_broker_received_total");
    assert_eq!(sent, n as f64, "a sent each publication to redis once");
    assert_eq!(received, n as f64, "b received each once");
    for (m, w) in [(&ma, "a"), (&mb, "b")] {
        assert_eq!(m.get("wsloop_broker_enabled"), 1.0, "{w}");
        assert_eq!(m.get("wsloop_broker_up"), 1.0, "{w}");
        assert_eq!(m.get("wsloop_broker_gaps_total"), 0.0, "{w}");
        assert_eq!(m.get("wsloop_broker_received_total") > 0.0, w == "b");
        assert!(
            m.get("wsloop_broker_rtt_seconds") > 0.0,
            "{w}: a PING answered"
        );
    }
    let (status, body) = healthz(&a);
    assert!(status.contains(" 200 "), "{status}");
    assert!(body.starts_with("ok\nbroker: up"), "{body:?}");
    // The bridge's two sockets are counted: the audit balances, and the count includes them.
    let m = audit_balances(&a, "connected");
    assert!(m.get("wsloop_fds_accounted") >= 2.0);
    // The last member of the room on b leaves: b unsubscribes from the channel (redis counts
    // a's subscriber only).
    drop(far);
    RawRedis::connect(redis.port).wait_numsub("wsloop:/room", 1);
    a.stop();
    b.stop();
}

#[test]
fn redis_down_at_start_killed_and_restarted_local_delivery_goes_on_and_sharing_resumes() {
    let Some(bin) = redis_server() else { return };
    let port = free_port();
    let url = format!("redis://127.0.0.1:{port}/");
    // Redis down at start: both serve their own rooms.
    let a = instance("a", &url);
    let b = instance("b", &url);
    let mut far = member(&b, "room");
    let mut near = member(&a, "room");
    let mut publisher = member(&a, "room");
    let local = |publisher: &mut Ws, near: &mut Ws, tag: &str| {
        for i in 0..20 {
            publisher
                .send(WsMessage::text(format!("{tag}{i}")))
                .unwrap();
        }
        let want: Vec<String> = (0..20).map(|i| format!("{tag}{i}")).collect();
        let got: Vec<String> = (0..20).map_while(|_| next_text(near, BOUND)).collect();
        assert_eq!(got, want, "local delivery on a ({tag})");
        drain(publisher, Duration::from_millis(200));
    };
    local(&mut publisher, &mut near, "down-at-start ");
    let m = a.metrics();
    assert_eq!(m.get("wsloop_broker_up"), 0.0);
    assert_eq!(m.get("wsloop_broker_enabled"), 1.0);
    let (status, body) = healthz(&a);
    assert!(status.contains(" 200 "), "{status}");
    assert!(body.starts_with("ok\nbroker: down"), "{body:?}");
    assert_eq!(
        next_text(&mut far, Duration::from_millis(300)),
        None,
        "no redis, no sharing"
    );
    audit_balances(&a, "redis down at start");

    // Redis comes up: both connect (with their backoff) and share the room.
    let redis = Redis::start(&bin, port);
    for w in [&a, &b] {
        w.wait_until("the broker up", |m| m.get("wsloop_broker_up") == 1.0);
    }
    until_connected(&mut publisher, &mut far, "after redis came up", &[&a, &b]);
    drain(&mut near, Duration::from_millis(300));
    audit_balances(&a, "redis up");

    // Redis killed: local delivery goes on, broker up is 0, descriptors balance.
    redis.kill();
    for w in [&a, &b] {
        w.wait_until("the broker down", |m| {
            // The publisher notices at its next PING or PUBLISH: publish to make it try.
            m.get("wsloop_broker_up") == 0.0
        });
    }
    local(&mut publisher, &mut near, "killed ");
    drain(&mut far, Duration::from_millis(300));
    let m = audit_balances(&a, "redis killed");
    assert_eq!(m.get("wsloop_broker_up"), 0.0);
    let (status, body) = healthz(&b);
    assert!(status.contains(" 200 "), "{status}");
    assert!(body.contains("broker: down"), "{body:?}");

    // Started again on the same port: the bridges reconnect and subscribe again to the room
    // (its members never left), without restarting wsloop.
    let redis = Redis::start(&bin, port);
    for w in [&a, &b] {
        w.wait_until("the broker up again", |m| {
            m.get("wsloop_broker_up") == 1.0 && m.get("wsloop_broker_reconnects_total") >= 1.0
        });
    }
    until_connected(&mut publisher, &mut far, "after redis restarted", &[&a, &b]);
    for i in 0..50 {
        publisher
            .send(WsMessage::text(format!("again {i}")))
            .unwrap();
    }
    let got: Vec<String> = (0..50).map_while(|_| next_text(&mut far, BOUND)).collect();
    let want: Vec<String> = (0..50).map(|i| format!("again {i}")).collect();
    assert_eq!(got, want, "b after the restart");
    audit_balances(&b, "redis restarted");
    drop(redis);
    a.stop();
    b.stop();
}

#[test]
fn redis_closing_the_subscriber_for_its_output_buffer_is_a_disconnect_and_lost_messages_are_gaps() {
    let Some(bin) = redis_server() else { return };
    let redis = Redis::start(&bin, free_port());
    // b drops what its frozen-then-flooded client cannot take, rather than closing it.
    let (a, b, mut far, mut publisher) = pair(&redis, &["--backpressure-policy", "drop"]);
    // A subscriber whose output buffer passes 64 KiB is disconnected by Redis at once.
    let set = "CONFIG SET client-output-buffer-limit \"pubsub 65536 0 0\"";
    assert_eq!(redis.command(set).as_deref(), Some("+OK"));
    // b is stopped (SIGSTOP) while a publishes 24 MiB, more than the kernel's socket buffers
    // between Redis and b hold: Redis's output buffer for b passes the limit, and Redis
    // closes b's subscriber connection.
    b.freeze();
    let big = "x".repeat(8 * 1024);
    let n = 3000;
    for i in 0..n {
        publisher
            .send(WsMessage::text(format!("{i} {big}")))
            .unwrap();
        // Its own echo (--pubsub), read in step so that it never backs up.
        assert!(next_text(&mut publisher, BOUND).is_some(), "echo {i}");
    }
    a.wait_until("a sent them all", |m| {
        m.get("wsloop_broker_sent_total") >= n as f64
    });
    b.thaw();
    // b reconnects, subscribes again, and counts what it lost in a's numbering as gaps.
    b.wait_until("b reconnected", |m| m.get("wsloop_broker_up") == 1.0);
    drain(&mut far, Duration::from_millis(500));
    until_connected(&mut publisher, &mut far, "b subscribed again", &[&a, &b]);
    let m = b.wait_until("the gap counted", |m| {
        m.get("wsloop_broker_gaps_total") > 0.0
    });
    assert!(
        m.get("wsloop_broker_gaps_total") <= n as f64,
        "{}",
        m.get("wsloop_broker_gaps_total")
    );
    // It was Redis that closed it, for its output buffer; b saw the end of the connection.
    assert!(
        redis.log().contains("output buffer limits"),
        "{}",
        redis.log()
    );
    assert!(
        b.log()
            .contains("redis subscriber: unexpected end of file; reconnecting"),
        "{}",
        b.log_tail(10)
    );
    audit_balances(&b, "after redis closed the subscriber");
    a.stop();
    b.stop();
}

/// The binary's default `--max-message-size`.
const MAX_MESSAGE: usize = 16 * 1024;

/// A metric's growth since `before`.
fn grown(before: &Metrics, now: &Metrics, key: &str) -> f64 {
    now.get(key) - before.get(key)
}

const TOO_LARGE: &str = "wsloop_broker_dropped_total{reason=\"too_large\"}";
const INVALID: &str = "wsloop_broker_dropped_total{reason=\"invalid\"}";

#[test]
fn a_redis_message_over_max_message_size_or_malformed_is_dropped_and_counted_and_the_next_one_delivered(
) {
    let Some(bin) = redis_server() else { return };
    let redis = Redis::start(&bin, free_port());
    let w = instance("a", &redis.url());
    let mut room = member(&w, "room");
    let mut raw = RawRedis::connect(redis.port);
    raw.wait_numsub("wsloop:/room", 1);
    let before = w.metrics();
    // Someone else who can publish on the channels: every payload is text, so that any that
    // got through would show.
    let id = 0x0bad_cafe_0000_0001;
    let x = |n: usize| "x".repeat(n).into_bytes();
    let too_large = [
        wire(id, 1, 1, &x(MAX_MESSAGE + 1)),
        wire(id, 2, 1, &x(8 << 20)),
    ];
    let invalid = [
        wire(id, 3, 9, b"ping"),            // an opcode other than text or binary
        wire(id, 3, 8, b"\x03\xe8"),        // a close frame's
        wire(id, 3, 1, b"\xff\xfe"),        // text that is not UTF-8
        wire(id, 0, 1, b"seq 0"),           // a sequence number of 0
        b"ws\x02 another version".to_vec(), // another version
        b"ws\x01short".to_vec(),            // shorter than the header
        vec![0xff; 50],                     // not ours at all
    ];
    for m in too_large.iter().chain(&invalid) {
        assert_eq!(raw.publish("wsloop:/room", m), 1);
    }
    // Right after: one exactly at the limit, and a short one.
    assert_eq!(
        raw.publish("wsloop:/room", &wire(id, 3, 1, &x(MAX_MESSAGE))),
        1
    );
    assert_eq!(raw.publish("wsloop:/room", &wire(id, 4, 1, b"after")), 1);
    let at_limit = next_text(&mut room, BOUND).expect("the message at the limit");
    assert_eq!(
        at_limit.len(),
        MAX_MESSAGE,
        "the first delivered is the one at the limit"
    );
    assert_eq!(next_text(&mut room, BOUND).as_deref(), Some("after"));
    assert_eq!(
        drain(&mut room, Duration::from_millis(300)),
        Vec::<String>::new()
    );
    let m = w.wait_until("the drops counted", |m| {
        grown(&before, m, "wsloop_broker_received_total") >= 2.0
    });
    assert_eq!(grown(&before, &m, TOO_LARGE), too_large.len() as f64);
    assert_eq!(grown(&before, &m, INVALID), invalid.len() as f64);
    assert_eq!(grown(&before, &m, "wsloop_broker_received_total"), 2.0);
    assert_eq!(grown(&before, &m, "wsloop_broker_gaps_total"), 0.0);
    // Logged once at info level, not once per drop (each is at debug level).
    let log = w.log();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("redis subscriber: dropped a message"))
        .collect();
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(
        lines[0].contains("on wsloop:/room (16405 bytes): too_large (0 more dropped"),
        "{lines:?}"
    );
    w.stop();
}

/// The most memory a process has held (`VmHWM`), in KiB.
fn peak_rss_kib(w: &Wsloop) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", w.pid)).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM")
}

/// A subscription confirmation and a message, as Redis writes them.
fn confirm(con: &mut RawRedis, channel: &str) {
    let c = channel.len();
    con.write(format!("*3\r\n$9\r\nsubscribe\r\n${c}\r\n{channel}\r\n:1\r\n").as_bytes());
}

fn message(con: &mut RawRedis, channel: &str, payload: &[u8]) {
    let c = channel.len();
    let head = format!(
        "*3\r\n$7\r\nmessage\r\n${c}\r\n{channel}\r\n${}\r\n",
        payload.len()
    );
    let mut m = head.into_bytes();
    m.extend_from_slice(payload);
    m.extend_from_slice(b"\r\n");
    con.write(&m);
}

/// A message from the stand-in `sub` on the room's channel, received by `room`.
fn relay(sub: &mut RawRedis, room: &mut Ws, msg: Vec<u8>) {
    message(sub, "wsloop:/room", &msg);
    let text = String::from_utf8_lossy(&msg[20..]).into_owned();
    assert_eq!(next_text(room, BOUND), Some(text));
}

#[test]
fn a_huge_or_malformed_stream_in_place_of_redis_costs_no_memory_and_is_a_reconnection() {
    // No redis-server needed: a stand-in that writes what a real one never would.
    let fake = FakeRedis::start();
    let w = instance("a", &fake.url());
    let mut room = member(&w, "room");
    let id = 0x0bad_cafe_0000_0002;
    let (mut sub, cmd) = fake.subscriber();
    assert_eq!(cmd, [&b"SUBSCRIBE"[..], b"wsloop:/room"]);
    confirm(&mut sub, "wsloop:/room");
    relay(&mut sub, &mut room, wire(id, 1, 1, b"first"));
    let before = w.metrics();
    let peak = peak_rss_kib(&w);

    // A 64 MiB message, written as fast as the bridge reads it, then a short one: the big one
    // is dropped as it arrives (never held: the process's peak memory does not grow by
    // anything near it), the next one delivered.
    let huge = 64 << 20;
    let head = wire(id, 2, 1, b"");
    let len = head.len() + huge;
    sub.write(format!("*3\r\n$7\r\nmessage\r\n$12\r\nwsloop:/room\r\n${len}\r\n").as_bytes());
    sub.write(&head);
    let chunk = vec![b'x'; 1 << 20];
    for _ in 0..huge / chunk.len() {
        sub.write(&chunk);
    }
    sub.write(b"\r\n");
    relay(&mut sub, &mut room, wire(id, 3, 1, b"after the huge one"));
    let m = w.metrics();
    assert_eq!(grown(&before, &m, TOO_LARGE), 1.0);
    assert_eq!(grown(&before, &m, "wsloop_broker_received_total"), 1.0);
    let grew = peak_rss_kib(&w).saturating_sub(peak);
    assert!(
        grew < 16 << 10,
        "the peak grew by {grew} KiB for a 64 MiB message"
    );

    // A RESP3 map (never sent to a RESP2 subscriber): a malformed stream, so a reconnection;
    // the subscription is made again and messages flow.
    sub.write(b"%1\r\n+a\r\n+b\r\n");
    assert_eq!(sub.command(), None, "the bridge closed the connection");
    let (mut sub, cmd) = fake.subscriber();
    assert_eq!(cmd, [&b"SUBSCRIBE"[..], b"wsloop:/room"]);
    confirm(&mut sub, "wsloop:/room");
    relay(&mut sub, &mut room, wire(id, 4, 1, b"after malformed"));

    // An unsubscription the bridge did not ask for, then an error reply: a reconnection each.
    sub.write(b"*3\r\n$11\r\nunsubscribe\r\n$12\r\nwsloop:/room\r\n:0\r\n");
    assert_eq!(sub.command(), None, "the bridge closed the connection");
    let (mut sub, _) = fake.subscriber();
    confirm(&mut sub, "wsloop:/room");
    sub.write(b"-ERR injected\r\n");
    assert_eq!(sub.command(), None, "the bridge closed the connection");
    // A subscription never confirmed: dropped after the bridge's I/O timeout (2 s).
    let (mut silent, _) = fake.subscriber();
    let asked = Instant::now();
    assert_eq!(silent.command(), None, "the bridge closed the connection");
    let (mut sub, cmd) = fake.subscriber();
    assert!(
        asked.elapsed() >= Duration::from_millis(1500),
        "{:?}",
        asked.elapsed()
    );
    assert_eq!(cmd, [&b"SUBSCRIBE"[..], b"wsloop:/room"]);
    confirm(&mut sub, "wsloop:/room");
    relay(&mut sub, &mut room, wire(id, 5, 1, b"after all that"));
    // The log reaches the test through a file: wait (bounded) for every line.
    let deadline = Instant::now() + BOUND;
    for said in [
        "redis subscriber: malformed reply from Redis: not a reply a subscribed connection gets; reconnecting",
        "redis subscriber: Redis unsubscribed wsloop:/room; reconnecting",
        "redis subscriber: ERR injected; reconnecting",
        "redis subscriber: no confirmation of SUBSCRIBE wsloop:/room; reconnecting",
    ] {
        while !w.log().contains(said) {
            assert!(Instant::now() < deadline, "{said}:\n{}", w.log_tail(20));
            thread::sleep(Duration::from_millis(20));
        }
    }
    let m = audit_balances(&w, "after the reconnections");
    // A Redis that sends garbage as soon as it is subscribed is asked again with the backoff
    // (100 ms, doubling), not in a tight loop: over 2.5 s, at most 6 connections (the backoff
    // alone allows 5 from the first).
    sub.write(b"%1\r\n");
    let until = Instant::now() + Duration::from_millis(2500);
    let mut again = 0;
    while let Some((mut s, _)) =
        fake.subscriber_within(until.saturating_duration_since(Instant::now()))
    {
        s.write(b"%1\r\n");
        again += 1;
        if Instant::now() >= until {
            break;
        }
    }
    assert!((1..=6).contains(&again), "{again} connections in 2.5 s");
    // The huge one's number (2) was never delivered: one gap, and nothing else lost.
    assert_eq!(grown(&before, &m, "wsloop_broker_gaps_total"), 1.0);
    w.stop();
}

#[test]
fn the_password_or_acl_user_in_the_url_authenticates_both_connections() {
    let Some(bin) = redis_server() else { return };
    let redis = Redis::start(&bin, free_port());
    let user = "ACL SETUSER bridge on >pw ~* &* +@all";
    assert_eq!(redis.command(user).as_deref(), Some("+OK"));
    let pass = "CONFIG SET requirepass secret";
    assert_eq!(redis.command(pass).as_deref(), Some("+OK"));
    let port = redis.port;
    // a as the default user with its password, b as an ACL user: shared both ways.
    let a = instance("a", &format!("redis://:secret@127.0.0.1:{port}/"));
    let b = instance("b", &format!("redis://bridge:pw@127.0.0.1:{port}/"));
    let (mut on_a, mut on_b) = (member(&a, "room"), member(&b, "room"));
    until_connected(&mut on_a, &mut on_b, "a to b", &[&a, &b]);
    until_connected(&mut on_b, &mut on_a, "b to a", &[&a, &b]);
    // A wrong password: refused (and retried); local delivery goes on, the broker is down.
    let c = instance("c", &format!("redis://:wrong@127.0.0.1:{port}/"));
    let mut on_c = member(&c, "room");
    let mut near = member(&c, "room");
    let deadline = Instant::now() + BOUND;
    while !c.log().contains("redis subscriber: cannot connect") {
        assert!(Instant::now() < deadline, "{}", c.log_tail(20));
        thread::sleep(Duration::from_millis(20));
    }
    assert!(
        c.log().contains("WRONGPASS") || c.log().contains("invalid password"),
        "{}",
        c.log_tail(20)
    );
    on_c.send(WsMessage::text("local")).unwrap();
    assert_eq!(next_text(&mut near, BOUND).as_deref(), Some("local"));
    assert_eq!(c.metrics().get("wsloop_broker_up"), 0.0);
    audit_balances(&c, "refused by redis");
    c.stop();
    a.stop();
    b.stop();
}

/// The instance id and sequence number `publisher` (on `w`) puts on its messages to `room`,
/// read off the channel by a subscriber of our own.
fn instance_id(redis: &Redis, publisher: &mut Ws, room: &str) -> (u64, u64) {
    let channel = format!("wsloop:/{room}");
    let mut spy = RawRedis::connect(redis.port);
    let reply = spy.call(&[b"SUBSCRIBE", channel.as_bytes()]);
    assert!(matches!(reply, Reply::Array(_)), "{reply:?}");
    publisher.send(WsMessage::text("seen by the spy")).unwrap();
    let m = spy.next_message(&channel);
    assert_eq!(&m[..3], b"ws\x01", "{m:?}");
    let word = |at: usize| u64::from_be_bytes(m[at..at + 8].try_into().unwrap());
    (word(3), word(11))
}

#[test]
fn a_forged_high_sequence_number_does_not_silence_the_real_publisher() {
    let Some(bin) = redis_server() else { return };
    let redis = Redis::start(&bin, free_port());
    let (a, b, mut far, mut publisher) = pair(&redis, &[]);
    let (id, seq) = instance_id(&redis, &mut publisher, "room");
    assert!(seq > 1, "the probes came before it: {seq}");
    drain(&mut far, Duration::from_millis(300));
    drain(&mut publisher, Duration::from_millis(300));
    let before = b.metrics();
    // A message forged with a's id and a number far ahead of a's: delivered like any other
    // (whoever can publish on the channels can send to the rooms).
    let mut raw = RawRedis::connect(redis.port);
    assert!(raw.publish("wsloop:/room", &wire(id, 1 << 62, 1, b"forged")) >= 2);
    assert_eq!(next_text(&mut far, BOUND).as_deref(), Some("forged"));
    // a's own next messages still arrive, every one, in order.
    let want: Vec<String> = (0..20).map(|i| format!("real {i}")).collect();
    for t in &want {
        publisher.send(WsMessage::text(t.as_str())).unwrap();
    }
    let got: Vec<String> = (0..20).map_while(|_| next_text(&mut far, BOUND)).collect();
    assert_eq!(got, want, "b: a's messages after the forged one");
    let m = b.metrics();
    // One gap (the jump to 2^62) and one reset (back to a's numbers), nothing more.
    assert_eq!(grown(&before, &m, "wsloop_broker_gaps_total"), 1.0);
    assert_eq!(
        grown(&before, &m, "wsloop_broker_sequence_resets_total"),
        1.0
    );
    assert_eq!(grown(&before, &m, "wsloop_broker_received_total"), 21.0);
    assert_eq!(grown(&before, &m, INVALID), 0.0);
    a.stop();
    b.stop();
}

#[test]
fn a_flood_of_random_instance_ids_keeps_the_sequence_table_bounded() {
    // The bound of the table (MAX_SEQUENCES in src/broker.rs).
    const BOUND_TABLE: f64 = 65_536.0;
    let Some(bin) = redis_server() else { return };
    let redis = Redis::start(&bin, free_port());
    // b drops what its members do not read in time rather than closing them.
    let (a, b, mut far, mut publisher) = pair(&redis, &["--backpressure-policy", "drop"]);
    let before = b.metrics();
    assert!(before.get("wsloop_broker_sequences_tracked") >= 1.0);
    // More distinct ids than the table holds, each with its first number, in binary messages
    // (skipped by `next_text`): pipelined a thousand at a time.
    let n = 65_536 + 4_096;
    let mut raw = RawRedis::connect(redis.port);
    for chunk in (0..n as u64).collect::<Vec<_>>().chunks(1000) {
        for i in chunk {
            let id = (i + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            raw.send(&[b"PUBLISH", b"wsloop:/room", &wire(id, 1, 2, b"flood")]);
        }
        for _ in chunk {
            assert!(matches!(raw.read(), Reply::Int(n) if n >= 2));
        }
    }
    let m = b.wait_until("the flood received", |m| {
        grown(&before, m, "wsloop_broker_received_total") >= n as f64
    });
    let tracked = m.get("wsloop_broker_sequences_tracked");
    assert!(tracked <= BOUND_TABLE, "{tracked} publishers tracked");
    assert!(tracked < n as f64, "forgotten: {tracked} tracked after {n}");
    assert_eq!(grown(&before, &m, "wsloop_broker_gaps_total"), 0.0);
    // a's messages still arrive in order, and were never counted as lost.
    let want: Vec<String> = (0..20).map(|i| format!("after {i}")).collect();
    for t in &want {
        publisher.send(WsMessage::text(t.as_str())).unwrap();
    }
    let got: Vec<String> = (0..20).map_while(|_| next_text(&mut far, BOUND)).collect();
    assert_eq!(got, want);
    let m = b.metrics();
    assert_eq!(grown(&before, &m, "wsloop_broker_gaps_total"), 0.0);
    assert!(m.get("wsloop_broker_sequences_tracked") <= BOUND_TABLE);
    a.stop();
    b.stop();
}

/// The outgoing queue while Redis is unreachable: bounded, the oldest dropped and counted
/// (in-process, against a port nothing listens on: no redis-server needed).
#[test]
fn the_outgoing_queue_keeps_the_newest_within_its_bound_while_redis_is_unreachable() {
    use wsloop::{
        Config, Decision, Handler, Message, RedisConfig, Server, UpgradeRequest, WebSocket,
    };
    struct Nobody;
    impl Handler for Nobody {
        type Data = ();
        fn upgrade(&mut self, _req: &UpgradeRequest<'_>) -> Decision<()> {
            Decision::accept(())
        }
        fn on_message(&mut self, _ws: &mut WebSocket<'_, ()>, _msg: Message<'_>) {}
    }
    let url = format!("redis://127.0.0.1:{}/", free_port());
    let config = Config {
        redis: Some(RedisConfig {
            queue_messages: 100,
            queue_bytes: 64 * 1024,
            ..RedisConfig::new(url)
        }),
        audit_interval: Duration::ZERO,
        ..common::config()
    };
    let mut server = Server::new(config, Nobody).unwrap();
    server.listen("127.0.0.1:0".parse().unwrap()).unwrap();
    let handle = server.handle();
    let t = thread::spawn(move || server.run());
    for i in 0..1000u32 {
        let msg = format!("{i:04}");
        while handle.try_publish(b"t", Message::Text(&msg)).is_err() {
            thread::sleep(Duration::from_millis(1));
        }
    }
    let deadline = Instant::now() + BOUND;
    let m = loop {
        let text = handle.metrics().expect("metrics");
        let m: Vec<(String, f64)> = text
            .lines()
            .filter(|l| l.starts_with("wsloop_broker_") || l.starts_with("wsloop_published"))
            .filter_map(|l| {
                let (k, v) = l.rsplit_once(' ')?;
                Some((k.to_string(), v.parse().ok()?))
            })
            .collect();
        let get = |k: &str| m.iter().find(|(n, _)| n == k).map_or(-1.0, |(_, v)| *v);
        // Handed to the bridge at the end of the turn that published them.
        let handed =
            get("wsloop_broker_queued") + get("wsloop_broker_dropped_total{reason=\"queue_full\"}");
        if get("wsloop_published_total") == 1000.0 && handed == 1000.0 {
            break m;
        }
        assert!(Instant::now() < deadline, "{m:?}");
        thread::sleep(Duration::from_millis(20));
    };
    let get = |k: &str| m.iter().find(|(n, _)| n == k).map_or(-1.0, |(_, v)| *v);
    assert_eq!(get("wsloop_broker_up"), 0.0);
    assert_eq!(get("wsloop_broker_queued"), 100.0, "{m:?}");
    assert_eq!(
        get("wsloop_broker_queued_bytes"),
        100.0 * 5.0,
        "topic + payload"
    );
    assert_eq!(
        get("wsloop_broker_dropped_total{reason=\"queue_full\"}"),
        900.0,
        "{m:?}"
    );
    assert_eq!(get("wsloop_broker_sent_total"), 0.0);
    handle.shutdown().unwrap();
    t.join().unwrap().unwrap();
}

#[test]
fn without_redis_configured_the_broker_metrics_stay_at_zero_and_healthz_says_ok() {
    let w = Wsloop::spawn("plain", &["--pubsub"]);
    let m = w.metrics();
    assert_eq!(m.get("wsloop_broker_enabled"), 0.0);
    assert_eq!(m.get("wsloop_broker_up"), 0.0);
    assert_eq!(healthz(&w).1, "ok\n");
    w.stop();
}

/// The fd budget's line in a wsloop log: (budget, descriptors open when it was measured).
fn budget_of(w: &Wsloop) -> (u64, u64) {
    let log = w.log();
    let line = log
        .lines()
        .find(|l| l.contains("fd budget "))
        .expect("the fd budget line");
    let number = |after: &str| -> u64 {
        let rest = &line[line.find(after).expect(after) + after.len()..];
        rest.split(|c: char| !c.is_ascii_digit())
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    let open = line.split(", ").nth(1).expect("open");
    (
        number("fd budget "),
        open.split(' ').next().unwrap().parse().unwrap(),
    )
}

#[test]
fn the_bridges_sockets_are_kept_out_of_the_connections_budget() {
    // Both with --fd-limit 128 and the default headroom of 32: the budget is 128 - open - 32 -
    // 1, less the bridge's two sockets (not connected yet when the budget is measured: Redis
    // is not even there).
    let url = format!("redis://127.0.0.1:{}/", free_port());
    let with = Wsloop::spawn("with", &["--pubsub", "--redis", &url]);
    let without = Wsloop::spawn("without", &["--pubsub"]);
    // With sharding: two sockets for each primary of a cluster, for at most 16 of them
    // (MAX_NODES in src/broker.rs).
    let shards = Wsloop::spawn("shards", &["--pubsub", "--redis", &url, "--redis-sharded"]);
    let (b_with, open_with) = budget_of(&with);
    let (b_without, open_without) = budget_of(&without);
    let (b_shards, open_shards) = budget_of(&shards);
    assert_eq!(b_without, 128 - open_without - 32 - 1, "{}", without.log());
    assert_eq!(b_with, 128 - open_with - 32 - 1 - 2, "{}", with.log());
    assert_eq!(
        b_shards,
        128 - open_shards - 32 - 1 - 32,
        "{}",
        shards.log()
    );
    with.stop();
    without.stop();
    shards.stop();
}

// ---------------------------------------------------------------------------------------------
// Sharded pub/sub (--redis-sharded): SPUBLISH and SSUBSCRIBE.

/// `wsloop --pubsub --redis URL --redis-sharded`.
fn sharded(name: &str, url: &str) -> Wsloop {
    Wsloop::spawn(name, &["--pubsub", "--redis", url, "--redis-sharded"])
}

/// Publish `n` messages to each room, interleaved, from its publisher; each far member must
/// receive its room's, every one, in order, and nothing else.
fn interleaved(pubs: &mut [Ws], fars: &mut [Ws], rooms: &[String], n: usize, tag: &str) {
    for i in 0..n {
        for (p, room) in pubs.iter_mut().zip(rooms) {
            p.send(WsMessage::text(format!("{tag} {room} {i}")))
                .unwrap();
        }
    }
    for (far, room) in fars.iter_mut().zip(rooms) {
        let want: Vec<String> = (0..n).map(|i| format!("{tag} {room} {i}")).collect();
        let got: Vec<String> = (0..n).map_while(|_| next_text(far, BOUND)).collect();
        assert_eq!(got, want, "{room}: every message, in order");
        assert_eq!(drain(far, Duration::from_millis(200)), Vec::<String>::new());
    }
    for p in pubs.iter_mut() {
        drain(p, Duration::from_millis(200));
    }
}

#[test]
fn sharded_pubsub_on_a_redis_without_cluster_mode_uses_shard_channels() {
    let Some(bin) = redis_server() else { return };
    let redis = Redis::start(&bin, free_port());
    let a = sharded("a", &redis.url());
    let b = sharded("b", &redis.url());
    let mut far = member(&b, "room");
    let mut publisher = member(&a, "room");
    until_connected(&mut publisher, &mut far, "b subscribed", &[&a, &b]);
    // Both bridges subscribed with SSUBSCRIBE, none with SUBSCRIBE.
    let mut raw = RawRedis::connect(redis.port);
    raw.wait_shardnumsub("wsloop:/room", 2);
    assert_eq!(raw.numsub("wsloop:/room"), 0);
    let rooms = ["room".to_string()];
    interleaved(
        std::slice::from_mut(&mut publisher),
        std::slice::from_mut(&mut far),
        &rooms,
        200,
        "m",
    );
    for (w, name) in [(&a, "a"), (&b, "b")] {
        let m = audit_balances(w, name);
        assert_eq!(m.get("wsloop_broker_up"), 1.0, "{name}");
        assert_eq!(m.get("wsloop_broker_gaps_total"), 0.0, "{name}");
    }
    // The last member on b leaves: b unsubscribes (SUNSUBSCRIBE).
    drop(far);
    raw.wait_shardnumsub("wsloop:/room", 1);
    a.stop();
    b.stop();
}

#[test]
fn sharded_pubsub_on_a_three_node_cluster_routes_each_topic_through_its_slots_primary() {
    let (Some(server), Some(cli)) = (redis_server(), redis_cli()) else {
        return;
    };
    let mut cluster = Cluster::start(&server, &cli, 3);
    // Rooms whose channels hash to slots served by each of the three primaries.
    let mut rooms: Vec<(String, usize, i64)> = Vec::new();
    for i in 0.. {
        let room = format!("room{i}");
        let (node, slot) = cluster.owner(&format!("wsloop:/{room}"));
        if rooms.iter().all(|r| r.1 != node) {
            rooms.push((room, node, slot));
        }
        if rooms.len() == 3 {
            break;
        }
    }
    let names: Vec<String> = rooms.iter().map(|r| r.0.clone()).collect();
    // Each instance knows the cluster by a different node.
    let a = sharded("a", &cluster.nodes[0].url());
    let b = sharded("b", &cluster.nodes[1].url());
    let mut fars: Vec<Ws> = names.iter().map(|r| member(&b, r)).collect();
    let mut pubs: Vec<Ws> = names.iter().map(|r| member(&a, r)).collect();
    for (i, room) in names.iter().enumerate() {
        until_connected(&mut pubs[i], &mut fars[i], room, &[&a, &b]);
    }
    // Each room's channel is a shard channel of the primary that serves its slot, with both
    // instances subscribed there; no node has a classic subscription.
    for (room, node, slot) in &rooms {
        let chan = format!("wsloop:/{room}");
        let mut raw = RawRedis::connect(cluster.nodes[*node].port);
        raw.wait_shardnumsub(&chan, 2);
        for r in &cluster.nodes {
            assert_eq!(
                RawRedis::connect(r.port).numsub(&chan),
                0,
                "{chan} (slot {slot})"
            );
        }
    }
    interleaved(&mut pubs, &mut fars, &names, 100, "m");
    let m = audit_balances(&a, "a on the cluster");
    assert_eq!(m.get("wsloop_broker_up"), 1.0);
    // Six connections: a publisher's and a subscriber's to each of the three primaries.
    assert!(m.get("wsloop_fds_accounted") >= 6.0);
    audit_balances(&b, "b on the cluster");

    // The primary of the first room is killed and started again (its nodes.conf kept): both
    // bridges find it again, subscribe again, and the rooms are shared again without
    // restarting wsloop; messages published meanwhile may be lost, never reordered.
    let (_, node, _) = rooms[0];
    cluster.nodes[node].restart();
    cluster.await_ok();
    for w in [&a, &b] {
        w.wait_until("the broker up again", |m| {
            m.get("wsloop_broker_up") == 1.0 && m.get("wsloop_broker_reconnects_total") >= 1.0
        });
    }
    for (i, room) in names.iter().enumerate() {
        until_connected(&mut pubs[i], &mut fars[i], room, &[&a, &b]);
    }
    interleaved(&mut pubs, &mut fars, &names, 50, "again");
    audit_balances(&a, "a after the restart");
    audit_balances(&b, "b after the restart");
    // The last member of the first room on b leaves: b unsubscribes from it on its primary.
    drop(fars.remove(0));
    RawRedis::connect(cluster.nodes[node].port)
        .wait_shardnumsub(&format!("wsloop:/{}", names[0]), 1);
    a.stop();
    b.stop();
}
