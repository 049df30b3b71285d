//! The memory budget against the binary, as a child with a small budget (`--memory-budget`):
//! thousands of connections parking partial messages; hundreds sending without reading their
//! echoes; both at once. In each, the child's RSS stays below its baseline plus the budget plus
//! [`SLACK`]; a legitimate client is answered (echo or 503) within a second throughout; every
//! attacker ends with a clear answer (close 1013 or 503, or, for those the budget held, the
//! 1001 of the shutdown that ends the test); afterwards the accounted bytes are back to zero and
//! the descriptors to the baseline.
// Test code (see Cargo.toml's [lints]): it fails by panicking, and opens descriptors on purpose.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

#[allow(dead_code)]
mod attack_support;
mod child_support;
mod common;
mod rlimit_support;

use attack_support::*;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

/// The budget the child runs with.
const BUDGET: usize = 8 << 20;
/// What the child's RSS may grow beyond the budget (README, Memory): the per-connection state
/// of thousands of connections (a few hundred bytes each), the allocator's slack for buffers
/// freed and allocated again, and one read per connection past its share before it is counted
/// and shed (64 KiB at most each, freed at once). Measured: 8.2-8.9 MiB of growth in all, with
/// the 8 MiB budget.
const SLACK: usize = 8 << 20;
/// Descriptors the child may use.
const FD_LIMIT: u64 = 6000;

fn spawn(name: &str, extra: &[&str]) -> Wsloop {
    spawn_with(name, "2", extra)
}

fn spawn_with(name: &str, close_timeout: &str, extra: &[&str]) -> Wsloop {
    let budget = BUDGET.to_string();
    let mut args = vec![
        "--memory-budget",
        &budget,
        "--max-message-size",
        "65536",
        "--close-timeout",
        close_timeout,
        // Operators read the metrics on their own listener, which shedding does not refuse.
        "--metrics-listen",
        "127.0.0.1:0",
    ];
    if !extra.contains(&"--socket-send-buffer") {
        args.extend(["--socket-send-buffer", "65536"]);
    }
    args.extend_from_slice(extra);
    let soft = rlimit_support::raise_nofile_limit().expect("raise RLIMIT_NOFILE");
    assert!(
        soft >= 2 * FD_LIMIT,
        "this test needs {} descriptors",
        2 * FD_LIMIT
    );
    Wsloop::spawn_with_fd_limit(name, FD_LIMIT, &args)
}

/// A legitimate client's answer, each second while `stop` is not set: echoed or refused with
/// 503, within a second; returns how many of each.
fn legit_prober(addr: SocketAddr, stop: Arc<AtomicBool>) -> thread::JoinHandle<(usize, usize)> {
    thread::spawn(move || {
        let (mut echoed, mut refused) = (0, 0);
        let deadline = Instant::now() + Duration::from_secs(120);
        while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
            let start = Instant::now();
            match legit_echo(addr, None) {
                Legit::Echoed => echoed += 1,
                Legit::Refused(503) => refused += 1,
                other => panic!("a legitimate client got {other:?}"),
            }
            let took = start.elapsed();
            assert!(
                took < Duration::from_secs(1),
                "a legitimate client waited {took:?}"
            );
            thread::sleep(Duration::from_millis(200));
        }
        (echoed, refused)
    })
}

/// An attacker's connection: upgraded (or refused with 503 at once: the child is shedding).
fn attacker(addr: SocketAddr, rcvbuf: Option<usize>) -> Option<TcpStream> {
    let opts = Opts { src: None, rcvbuf };
    let mut s = connect(addr, &opts).expect("connect");
    s.write_all(&upgrade_request(addr)).expect("request");
    let head = read_head(&mut s).expect("an answer to the upgrade");
    match head.split(' ').nth(1) {
        Some("101") => Some(s),
        Some("503") => None,
        _ => panic!("unexpected answer {head:?}"),
    }
}

/// How an upgraded attacker's connection ended.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
enum End {
    /// A close frame with this code, after whatever frames came before it.
    Closed(u16),
    /// Reset: the server gave up on a client that did not read what it was sent.
    Reset,
    /// The end of the stream between frames, without a close frame (never expected).
    Eof(usize),
}

/// Read what the server sent an attacker until its close frame (skipping echoes) and EOF.
fn end_of(mut s: TcpStream) -> End {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 65536];
    loop {
        // Parse complete server frames from the front of `buf`.
        while buf.len() >= 2 {
            let (len, at) = match buf[1] & 0x7f {
                126 if buf.len() >= 4 => (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4),
                127 if buf.len() >= 10 => (
                    u64::from_be_bytes(buf[2..10].try_into().unwrap()) as usize,
                    10,
                ),
                126 | 127 => break,
                n => (n as usize, 2),
            };
            if buf.len() < at + len {
                break;
            }
            if buf[0] & 0x0f == 0x8 {
                return match len {
                    0 => End::Closed(1005),
                    _ => End::Closed(u16::from_be_bytes([buf[at], buf[at + 1]])),
                };
            }
            buf.drain(..at + len);
        }
        match s.read(&mut chunk) {
            // A reset, once what arrived before it is read, reads as the end of the stream, in
            // the middle of a frame the reset cut off.
            Ok(0) if !buf.is_empty() => return End::Reset,
            Ok(0) => return End::Eof(0),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return End::Reset,
            Err(e) => panic!("reading an attacker's connection: {e}"),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// The child's counted bytes, by kind.
fn memory_bytes(m: &Metrics) -> [f64; 3] {
    ["partial_messages", "send_queues", "publications"]
        .map(|k| m.get(&format!("wsloop_memory_bytes{{kind=\"{k}\"}}")))
}

/// After an attack: the attackers have gone; the budget counts nothing, the child holds no
/// connection, its descriptors are back at the baseline.
fn settled(w: &Wsloop) -> Metrics {
    w.wait_baseline();
    let m = w.wait_quiet();
    assert_eq!(memory_bytes(&m), [0.0; 3], "bytes still counted");
    assert_eq!(m.get("wsloop_memory_shedding"), 0.0);
    m
}

/// What an attack test watches while it runs: the child's RSS (sampled), a legitimate client
/// (probing every 200 ms), from the child's baseline.
struct Watch {
    rss0: usize,
    rss: Sampler,
    stop: Arc<AtomicBool>,
    prober: thread::JoinHandle<(usize, usize)>,
}

impl Watch {
    fn start(w: &Wsloop) -> Watch {
        let stop = Arc::new(AtomicBool::new(false));
        let pid = w.pid;
        Watch {
            rss0: rss_of(pid),
            rss: Sampler::every(Duration::from_millis(20), move || rss_of(pid)),
            prober: legit_prober(w.addr, stop.clone()),
            stop,
        }
    }

    /// The attack is in place: the child counted at most its budget, shed at least once, its
    /// RSS stayed within the budget plus [`SLACK`], and the legitimate client was answered
    /// throughout. Returns how often it was refused.
    fn check(self, w: &Wsloop, what: &str) -> usize {
        thread::sleep(Duration::from_millis(500));
        let m = w.metrics();
        let peak = self.rss.stop();
        self.stop.store(true, Ordering::Relaxed);
        let (echoed, refused) = self.prober.join().expect("the legitimate client");
        let counted: f64 = memory_bytes(&m).iter().sum();
        println!(
            "{what}: counted {} KiB of a {} KiB budget, {} shed episodes; RSS {} KiB -> peak {} \
             KiB; legitimate client echoed {echoed}, refused {refused}",
            counted as usize >> 10,
            BUDGET >> 10,
            m.get("wsloop_memory_shed_episodes_total"),
            self.rss0 >> 10,
            peak >> 10,
        );
        assert!(counted <= BUDGET as f64, "counted {counted} bytes");
        assert!(
            m.get("wsloop_memory_shed_episodes_total") >= 1.0,
            "never shed"
        );
        assert!(
            peak <= self.rss0 + BUDGET + SLACK,
            "RSS peaked at {} KiB from {} KiB",
            peak >> 10,
            self.rss0 >> 10
        );
        assert!(echoed + refused > 0);
        refused
    }
}

/// Every attacker got its answer: shed (1013, or reset if it did not read what it was sent),
/// finished (the close reply, for those the budget held), or refused at the upgrade (503); then
/// the child settles, having counted exactly those sheds and refusals.
fn check_ends(w: &Wsloop, ends: Vec<End>, refused: usize, attackers: usize, legit_refused: usize) {
    let shed = ends
        .iter()
        .filter(|e| matches!(e, End::Closed(1013) | End::Reset))
        .count();
    let finished = ends.iter().filter(|e| **e == End::Closed(1000)).count();
    let others: Vec<&End> = ends
        .iter()
        .filter(|e| !matches!(e, End::Closed(1013 | 1000) | End::Reset))
        .take(10)
        .collect();
    assert_eq!(
        shed + finished + refused,
        attackers,
        "other ends: {others:?}"
    );
    assert!(shed > 0, "nobody was shed");
    let m = settled(w);
    assert_eq!(m.closed("memory") as usize, shed);
    assert_eq!(
        m.get("wsloop_admission_rejections_total{limit=\"memory_budget\"}") as usize,
        refused + legit_refused
    );
}

#[test]
fn thousands_parking_partial_messages_are_shed_within_the_budget() {
    const ATTACKERS: usize = 2000;
    let w = spawn("memory-partial", &[]);
    let watch = Watch::start(&w);
    let (held, refused) = parkers(w.addr, ATTACKERS);
    let legit_refused = watch.check(&w, "partial messages, 2000 parkers");
    // The shed ones had their 1013 (their input is drained since); the others, held within
    // the budget, finish their message and close, and get the echo and the close reply.
    let ends = ends_of(held, &[0u8; 16_000 - PARKED]);
    check_ends(&w, ends, refused, ATTACKERS, legit_refused);
    w.stop();
}

fn rss_of(pid: u32) -> usize {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<usize>().ok())
        .unwrap_or(0)
        * 1024
}

/// Attackers that send 16 KiB messages and never read their echoes: each makes the server queue
/// up to the backpressure limit (drop policy: it stays open, sends over the limit dropped) on
/// top of what the kernel holds for it. 400 of them would hold 26 MB; the budget is 8 MiB. One
/// shed while bytes are queued for it is reset (it would not read a close frame).
fn non_readers(addr: SocketAddr, n: usize) -> (Vec<TcpStream>, usize) {
    let payload = vec![0x5au8; 16_384];
    let mut msg = frame_header(0x82, payload.len() as u64, 126);
    msg.extend(payload.iter().enumerate().map(|(i, b)| b ^ MASK[i % 4]));
    let mut held = Vec::new();
    let mut refused = 0;
    for _ in 0..n {
        match attacker(addr, Some(4096)) {
            Some(mut s) => {
                s.set_write_timeout(Some(Duration::from_millis(200)))
                    .unwrap();
                // Until its writes block (reading it is paused) or it is shed.
                for _ in 0..40 {
                    if s.write_all(&msg).is_err() {
                        break;
                    }
                }
                held.push(s);
            }
            None => refused += 1,
        }
    }
    (held, refused)
}

/// Read every attacker to its end concurrently (16 threads), after it writes `rest` (the end
/// of its message, for a parker) and a close frame.
fn ends_of(held: Vec<TcpStream>, rest: &[u8]) -> Vec<End> {
    let mut last = rest.to_vec();
    last.extend_from_slice(&common::close_frame(1000, ""));
    let last = Arc::new(last);
    let chunks: Vec<Vec<TcpStream>> = {
        let mut chunks: Vec<Vec<TcpStream>> = (0..16).map(|_| Vec::new()).collect();
        for (i, s) in held.into_iter().enumerate() {
            chunks[i % 16].push(s);
        }
        chunks
    };
    let threads: Vec<_> = chunks
        .into_iter()
        .map(|chunk| {
            let last = last.clone();
            thread::spawn(move || {
                chunk
                    .into_iter()
                    .map(|mut s| {
                        // Its side done: the server's answer to our close, if it was not shed.
                        let _ = s.write_all(&last);
                        end_of(s)
                    })
                    .collect::<Vec<End>>()
            })
        })
        .collect();
    threads
        .into_iter()
        .flat_map(|t| t.join().expect("a reader thread"))
        .collect()
}

#[test]
fn hundreds_not_reading_their_echoes_are_shed_within_the_budget() {
    const ATTACKERS: usize = 400;
    // Long enough for every shed attacker to read its way to the 1013 after the attack.
    let w = spawn_with("memory-queues", "30", &["--backpressure-policy", "drop"]);
    let watch = Watch::start(&w);
    let (held, refused) = non_readers(w.addr, ATTACKERS);
    let legit_refused = watch.check(&w, "send queues, 400 non-readers");
    check_ends(&w, ends_of(held, &[]), refused, ATTACKERS, legit_refused);
    w.stop();
}

/// Bytes of its 16,000-byte frame a parker sends.
const PARKED: usize = 15_000;

/// Parkers: each upgrades and sends most of a 16,000-byte frame of a message it never ends
/// (with 2,000 of them, 30 MB parked if nothing stopped it, against a budget of 8 MiB).
fn parkers(addr: SocketAddr, n: usize) -> (Vec<TcpStream>, usize) {
    let mut head = frame_header(0x82, 16_000, 126);
    head.extend(std::iter::repeat_n(0u8, PARKED));
    let mut held = Vec::new();
    let mut refused = 0;
    for _ in 0..n {
        match attacker(addr, None) {
            Some(mut s) => {
                let _ = s.write_all(&head);
                held.push(s);
            }
            None => refused += 1,
        }
    }
    (held, refused)
}

#[test]
fn parkers_and_non_readers_at_once_are_shed_within_the_budget() {
    const PARKERS: usize = 1000;
    const NON_READERS: usize = 200;
    let w = spawn_with("memory-both", "30", &["--backpressure-policy", "drop"]);
    let watch = Watch::start(&w);
    let addr = w.addr;
    let parking = thread::spawn(move || parkers(addr, PARKERS));
    let (non_reading, refused) = non_readers(addr, NON_READERS);
    let (parked, parked_refused) = parking.join().expect("the parkers");
    let legit_refused = watch.check(&w, "both, 1000 parkers and 200 non-readers");
    let mut ends = ends_of(non_reading, &[]);
    ends.extend(ends_of(parked, &[0u8; 16_000 - PARKED]));
    let refused = refused + parked_refused;
    check_ends(&w, ends, refused, PARKERS + NON_READERS, legit_refused);
    w.stop();
}

/// Connections that end in the same write that fills their queue (four 16 KiB messages and a
/// close frame, with a small kernel buffer and a client that does not read): ending does not
/// take them out of the budget. Those the loop sheds are reset at once.
#[test]
fn connections_ending_with_full_queues_are_shed_within_the_budget() {
    const ATTACKERS: usize = 600;
    let w = spawn_with("memory-closing", "30", &["--socket-send-buffer", "8192"]);
    let watch = Watch::start(&w);
    let payload = vec![0x5au8; 16_384];
    let mut burst = Vec::new();
    for _ in 0..4 {
        burst.extend_from_slice(&frame_header(0x82, payload.len() as u64, 126));
        burst.extend(payload.iter().enumerate().map(|(i, b)| b ^ MASK[i % 4]));
    }
    burst.extend_from_slice(&common::close_frame(1000, ""));
    let mut held = Vec::new();
    let mut refused = 0;
    for _ in 0..ATTACKERS {
        match attacker(w.addr, Some(4096)) {
            Some(mut s) => {
                s.set_write_timeout(Some(Duration::from_millis(200)))
                    .unwrap();
                let _ = s.write_all(&burst);
                held.push(s);
            }
            None => refused += 1,
        }
    }
    let legit_refused = watch.check(&w, "ending with full queues, 600 attackers");
    // The shed ones were reset; the others get their echoes and the answer to their close.
    check_ends(&w, ends_of(held, &[]), refused, ATTACKERS, legit_refused);
    w.stop();
}

/// A thousand subscribers that do not read, and publishers of 16 KiB messages: copies for
/// subscribers over their share are not made while the loop sheds (counted as dropped for
/// memory), rather than made and then shed, so the budget holds during the fan-out too.
#[test]
fn a_fan_out_to_subscribers_that_do_not_read_stays_within_the_budget() {
    const SUBSCRIBERS: usize = 1000;
    let w = spawn_with(
        "memory-fanout",
        "30",
        &["--pubsub", "--backpressure-policy", "drop"],
    );
    let watch = Watch::start(&w);
    let mut held = Vec::new();
    for _ in 0..SUBSCRIBERS {
        held.push(attacker(w.addr, Some(4096)).expect("a subscriber before any load"));
    }
    let payload = vec![0x5au8; 16_384];
    let mut msg = frame_header(0x82, payload.len() as u64, 126);
    msg.extend(payload.iter().enumerate().map(|(i, b)| b ^ MASK[i % 4]));
    let publishers: Vec<_> = (0..2)
        .map(|_| {
            let addr = w.addr;
            let msg = msg.clone();
            thread::spawn(move || {
                let mut p = attacker(addr, None).expect("a publisher");
                p.set_write_timeout(Some(Duration::from_millis(500)))
                    .unwrap();
                for _ in 0..40 {
                    if p.write_all(&msg).is_err() {
                        break;
                    }
                    thread::sleep(Duration::from_millis(5));
                }
                p
            })
        })
        .collect();
    let publishers: Vec<TcpStream> = publishers
        .into_iter()
        .map(|p| p.join().expect("a publisher"))
        .collect();
    watch.check(&w, "fan-out, 1000 subscribers that do not read");
    let m = w.metrics();
    assert!(
        m.get("wsloop_deliveries_dropped_total{reason=\"memory\"}") > 0.0,
        "no copy was spared"
    );
    drop(publishers);
    for s in held {
        reset(s);
    }
    settled(&w);
    w.stop();
}
