//! The process runs out of descriptors (something else in it leaked them all): accept fails with
//! EMFILE. The loop must answer the waiting clients with 503 (releasing its spare descriptor to
//! accept them), must not spin on the failing accept but retry on its backoff schedule (5 ms
//! doubling to 1 s) while clients wait in the backlog, must accept again as soon as one of its
//! own connections frees a descriptor, and must have its spare back for the next shortage.
//!
//! Alone in its test binary: it lowers this process's own RLIMIT_NOFILE and fills it.
// Test code (see Cargo.toml's [lints]): it fails by panicking, and opens descriptors on purpose.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

mod common;

use common::*;
use socket2::{Domain, Socket, Type};
use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::thread;
use std::time::{Duration, Instant};
use tungstenite::Message as TMsg;
use wsloop::{Config, Stats};

/// The soft limit while the server runs.
const LIMIT: u64 = 128;
/// The server's own descriptors (epoll, waker, listener, spare) are opened at or above this
/// number; lowering the soft limit to it leaves the spare unusable (see `the backlog`).
const CUT: u64 = 64;
/// The accept backoff: first delay and cap, in ms (README, Health).
const BACKOFF_MIN_MS: u64 = 5;
const BACKOFF_MAX_MS: u64 = 1000;
/// How long the schedule is watched with a client waiting in the backlog: past the first
/// retries, the doubling, and two retries at the cap.
const WATCH: Duration = Duration::from_millis(4800);

/// A client socket created now (while descriptors are available), connected later.
fn precreated() -> Socket {
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(3))).unwrap();
    s
}

/// Connect a precreated socket (no descriptor needed) and send an upgrade request.
fn connect_and_ask(s: Socket, addr: SocketAddr) -> TcpStream {
    s.connect(&addr.into()).unwrap();
    let mut s: TcpStream = s.into();
    s.write_all(upgrade_request(addr).as_bytes())
        .expect("send the request");
    s
}

/// Read the answer's first 12 bytes (`HTTP/1.1 NNN`), bounded by the socket's read timeout.
fn status_line(s: &mut TcpStream, who: &str) -> String {
    let mut head = [0u8; 12];
    s.read_exact(&mut head)
        .unwrap_or_else(|e| panic!("{who}: no answer: {e}"));
    String::from_utf8_lossy(&head).into_owned()
}

/// Take every descriptor left: files on /dev/null until the limit says no.
fn hog() -> Vec<File> {
    let mut hog = Vec::new();
    loop {
        match File::open("/dev/null") {
            Ok(f) => hog.push(f),
            Err(e) => {
                assert_eq!(e.raw_os_error(), Some(libc::EMFILE), "{e}");
                return hog;
            }
        }
        assert!(hog.len() < 2 * LIMIT as usize, "the limit did not hold");
    }
}

fn emfile_errors(s: &Stats) -> u64 {
    s.accept_errors[0]
}

/// When the `n`-th retry after the first failure may come at the earliest: each waits its
/// backoff (5 ms doubling, capped at 1 s) after the one before, less a tick.
fn earliest_retry(n: u32) -> Duration {
    let ms: u64 = (0..n)
        .map(|i| (BACKOFF_MIN_MS << i.min(20)).min(BACKOFF_MAX_MS) - 1)
        .sum();
    Duration::from_millis(ms)
}

#[test]
fn accept_sheds_on_emfile_backs_off_with_a_waiting_client_and_resumes_at_once() {
    let _ = env_logger::builder().is_test(true).try_init();
    wsloop::set_fd_limit(LIMIT).unwrap();
    // Fill every descriptor below CUT, so that the server's own land above it.
    let mut padding = Vec::new();
    while padding
        .last()
        .is_none_or(|f: &File| (f.as_raw_fd() as u64) < CUT - 1)
    {
        padding.push(File::open("/dev/null").unwrap());
    }
    let server = TestServer::start(Config {
        fd_headroom: 8,
        max_connections: 16,
        raise_fd_limit: false,
        audit_interval: Duration::ZERO,
        ..config()
    });
    // The loop is up and serving (its first turn sized the budget with the padding open).
    let mut first = ws(server.addr);
    first.send(TMsg::text("before")).unwrap();
    assert_eq!(first.read().unwrap(), TMsg::text("before"));
    drop(padding);
    // A connection whose descriptors, in the server and here, are below CUT.
    let mut closer = ws(server.addr);
    closer.send(TMsg::text("low")).unwrap();
    assert_eq!(closer.read().unwrap(), TMsg::text("low"));

    // 1. The spare answers the backlog. Something in the process takes every descriptor;
    // clients arriving now get 503 at once, not silence.
    let waiting: Vec<Socket> = (0..6).map(|_| precreated()).collect();
    let (reset_client, held, late) = (precreated(), precreated(), precreated());
    let mut hogged = hog();
    let mut answered = Vec::new();
    for (i, s) in waiting.into_iter().enumerate() {
        let start = Instant::now();
        let mut s = connect_and_ask(s, server.addr);
        assert_eq!(
            status_line(&mut s, "shed client"),
            "HTTP/1.1 503",
            "client {i}"
        );
        let took = start.elapsed();
        assert!(took < LATE, "client {i} answered after {took:?}");
        answered.push(s);
    }
    let stats = server.stats();
    assert!(emfile_errors(&stats) >= 1, "{stats:?}");
    assert_eq!(
        stats.refused[0], 6,
        "each refused as 'server full': {stats:?}"
    );
    // Two descriptors come back (the highest): a client is served, and with one left, accept
    // finds the backlog empty instead of failing (without a free descriptor it fails with
    // EMFILE even then): the shortage is over, and the backoff starts again from 5 ms.
    drop(hogged.pop());
    drop(hogged.pop());
    let mut reset = connect_and_ask(reset_client, server.addr);
    assert_eq!(status_line(&mut reset, "reset client"), "HTTP/1.1 101");
    server.wait_stats("accepting to go on", |s| !s.accept_paused);

    // 2. The backlog stays full. Lowered to CUT, the limit leaves every usable descriptor
    // taken, and the spare (above it) frees none: a client waits in the backlog, and the loop
    // retries on its schedule, neither spinning nor giving up.
    wsloop::set_fd_limit(CUT).unwrap();
    let before = emfile_errors(&server.stats());
    let t0 = Instant::now();
    let mut held = connect_and_ask(held, server.addr);
    let mut seen = Vec::new(); // (time since the connect, failed accepts since)
    while t0.elapsed() < WATCH {
        let n = emfile_errors(&server.stats()) - before;
        seen.push((t0.elapsed(), n));
        thread::sleep(Duration::from_millis(10));
    }
    let failures = |by: Duration| {
        seen.iter()
            .take_while(|(t, _)| *t <= by)
            .last()
            .map_or(0, |s| s.1)
    };
    for &(t, n) in &seen {
        // Exact: never more attempts than the schedule allows (the first, then one per backoff).
        let allowed = 1 + (1..).take_while(|&k| earliest_retry(k) <= t).count() as u64;
        assert!(
            n <= allowed,
            "{n} failed accepts {t:?} after the connect: {seen:?}"
        );
    }
    // Generous: the retries do come (9 by 1.5 s on schedule), and at the cap they go on once
    // a second (a backoff that kept doubling would make none between 2.6 s and 4.8 s).
    assert!(failures(Duration::from_millis(1500)) >= 6, "{seen:?}");
    assert!(
        failures(WATCH) > failures(Duration::from_millis(2600)),
        "no retry at the 1 s cap: {seen:?}"
    );
    let mut probe = [0u8; 1];
    held.set_nonblocking(true).unwrap();
    let e = held
        .read(&mut probe)
        .expect_err("the held client got an answer");
    assert_eq!(e.kind(), ErrorKind::WouldBlock, "it waits in the backlog");
    held.set_nonblocking(false).unwrap();

    // 3. One of the loop's own connections closes: it accepts at once, without waiting for
    // the next retry (up to a second away, right after one).
    let last = emfile_errors(&server.stats());
    let retried = Instant::now() + Duration::from_secs(3);
    while emfile_errors(&server.stats()) == last {
        assert!(Instant::now() < retried, "no retry within 3 s");
        thread::sleep(Duration::from_millis(2));
    }
    let closed = Instant::now();
    closer.close(None).unwrap();
    assert_eq!(status_line(&mut held, "the waiting client"), "HTTP/1.1 101");
    let took = closed.elapsed();
    assert!(
        took < Duration::from_millis(700),
        "accepted {took:?} after a connection closed: at a retry, not at once"
    );
    expect_close_reply(&mut closer);
    drop(closer);

    // 4. Descriptors come back: serving resumes, and the spare is back for the next shortage.
    drop(hogged);
    wsloop::set_fd_limit(LIMIT).unwrap();
    let mut again = ws(server.addr);
    again.send(TMsg::text("after")).unwrap();
    assert_eq!(again.read().unwrap(), TMsg::text("after"));
    let hogged = hog();
    let mut late = connect_and_ask(late, server.addr);
    assert_eq!(
        status_line(&mut late, "a client of the next shortage"),
        "HTTP/1.1 503",
        "the next shortage is answered with the spare"
    );
    drop(hogged);

    // Every client leaves: nothing is left held, and every descriptor is accounted for.
    for mut s in [held, reset] {
        let rest = read_head(&mut s);
        assert!(rest.ends_with("\r\n\r\n"), "{rest:?}");
        s.write_all(&close_frame(1000, "")).unwrap();
        assert_eq!(expect_close(&mut s).0, 1000);
        expect_clean_eof(&mut s);
    }
    // The shed clients were answered and closed at once, their requests unread: the end may
    // be a reset rather than a FIN, after the answer.
    for mut s in answered.into_iter().chain([late]) {
        let mut rest = Vec::new();
        match s.read_to_end(&mut rest) {
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
            Err(e) => panic!("a shed client: {e} after {rest:?}"),
        }
        let rest = String::from_utf8_lossy(&rest);
        assert!(
            rest.contains("server at capacity") || rest.is_empty(),
            "{rest:?}"
        );
    }
    close_client(&mut again);
    close_client(&mut first);
    drop((again, first));
    server.wait_quiet();
    assert_eq!(server.handle.query(|_, ctx| ctx.audit().unwrap()), Some(0));
    let stats = server.finish();
    assert!(!stats.accept_paused);
    println!(
        "emfile: {} failed accepts in all; schedule with a waiting client: {:?}; accepted {took:?} after a close",
        emfile_errors(&stats),
        seen.iter()
            .filter(|s| s.1 > 0)
            .fold(Vec::new(), |mut v: Vec<(Duration, u64)>, s| {
                if v.last().is_none_or(|l| l.1 != s.1) {
                    v.push(*s);
                }
                v
            })
    );
}
