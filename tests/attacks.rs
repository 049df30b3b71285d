//! The attack suite: the `wsloop` binary runs as a child process with `--fd-limit 128`, and each
//! test attacks it over loopback (slowloris, idle flood, connection churn with resets at every
//! stage, slow readers, oversized heads and frames, fd exhaustion, per-address limits). After
//! each attack the child's descriptor count (`/proc/<pid>/fd`) must be back at exactly its
//! baseline, a legitimate client must have been served during the attack (or clearly refused
//! with 503 while every slot was taken, and served right after), and the close reasons counted
//! in `GET /metrics` must be the ones the attack earns.
//!
//! Every test targets 127.0.0.x only, bounds its connections and its time, and runs its own
//! child on its own port, so the tests run in parallel. `cargo test --test attacks --
//! --nocapture` prints what each attack measured.
// Test code (see Cargo.toml's [lints]): it fails by panicking, and opens descriptors on purpose.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

#[allow(dead_code)]
mod attack_support;
mod child_support;
mod common;
mod rlimit_support;

use attack_support::*;
use common::{
    assert_deadline, close_frame, frame, read_frame, LATE, OP_BINARY, OP_CLOSE, OP_CONT, OP_PING,
    OP_TEXT, TICK,
};
use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

/// Read the server's close frame, then its EOF (it closes TCP after a close, lingering until our
/// EOF after a protocol error). Returns the close code.
fn expect_close_then_eof(s: &mut TcpStream) -> u16 {
    let f = read_frame(s);
    assert_eq!(f.opcode, OP_CLOSE, "expected a close frame, got {f:?}");
    let (code, _) = f.close().expect("close frame with a code");
    let (answer, _) = read_answer(s, IO_TIMEOUT);
    assert!(
        matches!(answer, Answer::Eof(ref b) if b.is_empty()),
        "expected EOF after the close frame, got {answer:?}"
    );
    code
}

fn assert_echoes(w: &Wsloop, when: &str) {
    let got = legit_echo(w.addr, None);
    assert_eq!(got, Legit::Echoed, "legit client {when}");
}

/// Before an attack: the child's metrics, taken once its fd count is at the baseline.
fn at_baseline(w: &Wsloop) -> Metrics {
    let m0 = w.metrics();
    w.wait_baseline();
    m0
}

/// After an attack: wait (bounded) until the child is back at its baseline descriptors and
/// holds no connection; the close reasons counted since `m0` must be exactly `closed`, and an
/// fd audit run after that must find no difference. Returns the final fd count and the metrics.
fn settled(w: &Wsloop, m0: &Metrics, closed: &[(&str, u64)]) -> (usize, Metrics) {
    let end = w.wait_baseline();
    let m1 = w.wait_quiet();
    assert_eq!(m1.closed_since(m0), deltas(closed));
    assert_eq!(w.audited(&m1).get("wsloop_fd_audit_difference"), 0.0);
    (end, m1)
}

/// Wait (bounded by `bound`) until the child has counted a close for `reason`.
fn wait_closed(w: &Wsloop, reason: &str, bound: Duration, what: &str) {
    let deadline = Instant::now() + bound;
    while w.metrics().closed(reason) == 0 {
        assert!(Instant::now() < deadline, "{what}");
        thread::sleep(Duration::from_millis(20));
    }
}

/// The descriptor counts for a test's report line.
fn fds_report(w: &Wsloop, peak: usize, end: usize) -> String {
    format!("fds baseline {} peak {peak} final {end}", w.baseline_fds)
}

// ---------------------------------------------------------------------------------------------
// a. slowloris

#[test]
fn slowloris_ends_at_the_handshake_deadline() {
    const N: usize = 60;
    let w = Wsloop::spawn("slowloris", &["--handshake-timeout", "1"]);
    let m0 = at_baseline(&w);
    let fds = w.fd_sampler();
    let request = upgrade_request(w.addr);

    // Each attacker sends one byte of a valid upgrade request every 200 ms: the whole request
    // would take 30 s (its last byte is never sent), so it never completes; the 1 s deadline
    // must not move with the bytes.
    struct Trickler {
        s: TcpStream,
        start: Instant,
        sent: usize,
        got: Vec<u8>,
        /// When it ended, and whether with a FIN (else a reset).
        done: Option<(Duration, bool)>,
    }
    let mut socks: Vec<Trickler> = (0..N)
        .map(|_| {
            let start = Instant::now();
            let s = connect(w.addr, &Opts::default()).expect("connect");
            s.set_nonblocking(true).unwrap();
            Trickler {
                s,
                start,
                sent: 0,
                got: Vec::new(),
                done: None,
            }
        })
        .collect();
    let attack = Instant::now();
    let mut legit = None;
    let mut during = None;
    let mut buf = [0u8; 1024];
    while socks.iter().any(|t| t.done.is_none()) && attack.elapsed() < Duration::from_secs(8) {
        for t in socks.iter_mut().filter(|t| t.done.is_none()) {
            if t.sent < request.len() - 1 && t.s.write(&request[t.sent..t.sent + 1]).is_ok() {
                t.sent += 1;
            }
            loop {
                match t.s.read(&mut buf) {
                    Ok(0) => t.done = Some((t.start.elapsed(), true)),
                    Ok(n) => {
                        t.got.extend_from_slice(&buf[..n]);
                        continue;
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                    Err(_) => t.done = Some((t.start.elapsed(), false)),
                }
                break;
            }
        }
        if legit.is_none() && attack.elapsed() > Duration::from_millis(300) {
            // During the attack: every attacker is held, handshaking, and a real client is served.
            during = Some(w.metrics());
            legit = Some(legit_echo(w.addr, None));
        }
        thread::sleep(Duration::from_millis(200));
    }
    let peak = fds.stop();
    let during = during.expect("metrics during the attack");
    assert!(
        during.get("wsloop_connections{state=\"handshake\"}") >= N as f64,
        "attackers held during the attack: {:?}",
        during.matching("wsloop_connections{")
    );
    assert_eq!(legit, Some(Legit::Echoed), "legit client during slowloris");
    let mut slowest = Duration::ZERO;
    let mut most_sent = 0;
    for (i, t) in socks.iter().enumerate() {
        let (took, eof) = t
            .done
            .unwrap_or_else(|| panic!("attacker {i} still connected after 8 s"));
        let head = String::from_utf8_lossy(&t.got);
        assert!(head.starts_with("HTTP/1.1 408 "), "attacker {i}: {head:?}");
        assert!(
            eof,
            "attacker {i} was reset instead of getting 408 and a FIN"
        );
        // The deadline is 1 s from accept, whatever trickles in (the whole request would take
        // 30 s); seen 200 ms at worst after it happened (the attackers are polled every 200 ms).
        assert_deadline(&format!("attacker {i}'s 408"), took, Duration::from_secs(1));
        slowest = slowest.max(took);
        most_sent = most_sent.max(t.sent);
    }
    drop(socks);
    let (end, m1) = settled(
        &w,
        &m0,
        &[("handshake_timeout", N as u64), ("peer_closed", 1)],
    );
    assert_eq!(
        m1.rejected_status("408") - m0.rejected_status("408"),
        N as u64
    );
    assert_eq!(legit_echo(w.addr, None), Legit::Echoed);
    println!(
        "slowloris: {N} attackers, all answered 408 and closed by {slowest:?} after connect (at most {most_sent} of {} request bytes sent); {}; closed {:?}; 408s {}",
        request.len(),
        fds_report(&w, peak, end),
        m1.closed_since(&m0),
        m1.rejected_status("408") - m0.rejected_status("408"),
    );
    w.stop();
}

// ---------------------------------------------------------------------------------------------
// b. idle flood

#[test]
fn idle_flood_is_pinged_then_closed() {
    const N: usize = 40;
    let w = Wsloop::spawn("idle-flood", &["--idle-timeout", "1"]);
    let m0 = at_baseline(&w);
    let fds = w.fd_sampler();
    let start = Instant::now();
    // Each with the time just before its request: its idle deadlines count from its upgrade.
    let mut socks: Vec<(TcpStream, Instant)> = (0..N)
        .map(|_| {
            let t = Instant::now();
            (raw_ws(w.addr, &Opts::default()).expect("upgrade"), t)
        })
        .collect();
    let during = w.metrics();
    assert_eq!(during.get("wsloop_connections{state=\"open\"}"), N as f64);
    assert_echoes(&w, "during the idle flood");
    // They never send and never answer: each gets a ping half-way, then close 1001 and EOF.
    // (Read one after the other: the later ones' frames are read after they came, so only the
    // lower bounds are sharp for them.)
    let idle = Duration::from_secs(1);
    for (i, (s, t)) in socks.iter_mut().enumerate() {
        let ping = read_frame(s);
        assert_eq!(ping.opcode, OP_PING, "attacker {i}: {ping:?}");
        assert_deadline(&format!("attacker {i}'s ping"), t.elapsed(), idle / 2);
        let code = expect_close_then_eof(s);
        assert_eq!(code, 1001, "attacker {i}");
        assert_deadline(&format!("attacker {i}'s close"), t.elapsed(), idle);
    }
    let took = start.elapsed();
    drop(socks);
    let peak = fds.stop();
    let (end, m1) = settled(&w, &m0, &[("idle_timeout", N as u64), ("peer_closed", 1)]);
    assert_echoes(&w, "after the idle flood");
    println!(
        "idle flood: {N} silent upgrades pinged then closed 1001 within {took:?}; {}; closed {:?}",
        fds_report(&w, peak, end),
        m1.closed_since(&m0)
    );
    w.stop();
}

// ---------------------------------------------------------------------------------------------
// c. churn: connect, go some way, reset

#[derive(Clone, Copy, Debug)]
enum Stage {
    BeforeAnyByte,
    MidHeaders,
    AfterUpgrade,
    MidFrameHeader,
    MidPayload,
    MidClose,
}

impl Stage {
    /// The close reason the stage earns.
    fn reason(self) -> &'static str {
        match self {
            // The close frame is read (data comes before the reset) and answered: the client
            // closed, as far as the server can tell.
            Stage::MidClose => "peer_closed",
            _ => "abnormal",
        }
    }

    fn run(self, addr: std::net::SocketAddr) {
        let mut s = match self {
            Stage::BeforeAnyByte | Stage::MidHeaders => connect(addr, &Opts::default()),
            _ => raw_ws(addr, &Opts::default()),
        }
        .unwrap_or_else(|e| panic!("{self:?}: {e}"));
        let bytes = match self {
            Stage::BeforeAnyByte | Stage::AfterUpgrade => Vec::new(),
            Stage::MidHeaders => upgrade_request(addr)[..40].to_vec(),
            Stage::MidFrameHeader => vec![0x81],
            Stage::MidPayload => {
                let mut f = frame(true, OP_TEXT, &[b'x'; 100]);
                f.truncate(f.len() - 50);
                f
            }
            Stage::MidClose => close_frame(1000, "bye"),
        };
        if !bytes.is_empty() {
            s.write_all(&bytes).unwrap();
        }
        reset(s);
    }
}

#[test]
fn churn_with_resets_at_every_stage() {
    const PER_STAGE: usize = 334;
    const THREADS: usize = 8;
    let w = Wsloop::spawn("churn", &[]);
    let fds = w.fd_sampler();
    let mut total = 0;
    let mut report = Vec::new();
    for stage in [
        Stage::BeforeAnyByte,
        Stage::MidHeaders,
        Stage::AfterUpgrade,
        Stage::MidFrameHeader,
        Stage::MidPayload,
        Stage::MidClose,
    ] {
        let before = w.wait_quiet();
        let addr = w.addr;
        let done = Arc::new(AtomicBool::new(false));
        // A legitimate client keeps echoing while the stage runs.
        let legit = {
            let done = done.clone();
            thread::spawn(move || {
                let mut n = 0;
                let deadline = Instant::now() + Duration::from_secs(30);
                loop {
                    assert_eq!(legit_echo(addr, None), Legit::Echoed, "during {stage:?}");
                    n += 1;
                    if done.load(Ordering::Relaxed) || Instant::now() > deadline {
                        return n;
                    }
                    thread::sleep(Duration::from_millis(20));
                }
            })
        };
        let t = Instant::now();
        parallel(THREADS, move |i| {
            for _ in (i..PER_STAGE).step_by(THREADS) {
                stage.run(addr);
            }
        });
        let took = t.elapsed();
        done.store(true, Ordering::Relaxed);
        let echoes = legit.join().expect("legit client during churn");
        total += PER_STAGE;
        let after = w.wait_quiet();
        let closed = after.closed_since(&before);
        let mut want = vec![(stage.reason(), PER_STAGE as u64)];
        if stage.reason() == "peer_closed" {
            want[0].1 += echoes;
        } else {
            want.push(("peer_closed", echoes));
        }
        assert_eq!(closed, deltas(&want), "{stage:?}");
        assert_eq!(
            after.moved_since(&before, "wsloop_admission_rejections_total{limit=\""),
            deltas(&[]),
            "{stage:?}: nobody refused"
        );
        assert_eq!(
            after.moved_since(&before, "wsloop_accept_errors_total{errno=\""),
            deltas(&[]),
            "{stage:?}: accept errors"
        );
        report.push(format!(
            "{stage:?}: {PER_STAGE} in {took:?} -> {:?} (+{echoes} legit echoes)",
            closed
        ));
    }
    let peak = fds.stop();
    let end = w.wait_baseline();
    let m = w.wait_quiet();
    assert_eq!(w.audited(&m).get("wsloop_fd_audit_difference"), 0.0);
    assert_echoes(&w, "after the churn");
    println!(
        "churn: {total} connections reset; {}\n  {}",
        fds_report(&w, peak, end),
        report.join("\n  ")
    );
    w.stop();
}

/// At capacity, the slots of clients that have left are freed before anyone is refused: the
/// loop accepts at the end of a turn, after the resets that turn saw, and when one turn's
/// accepts fill every slot it lets the loop see their events before refusing whoever waits
/// behind them. The child is stopped (SIGSTOP) while three times `--max-connections` clients
/// connect and reset, and a legitimate client asks after them: let go, the server finds them
/// all in its backlog, every slot taken by a client that is gone.
#[test]
fn churn_at_capacity_frees_the_slots_of_clients_that_left_before_refusing_anyone() {
    const MAX: usize = 10;
    let w = Wsloop::spawn(
        "churn-at-capacity",
        &["--max-connections", &MAX.to_string()],
    );
    let m0 = at_baseline(&w);
    assert_eq!(m0.get("wsloop_connections_max"), MAX as f64);
    w.freeze();
    for i in 0..3 * MAX {
        reset(connect(w.addr, &Opts::default()).unwrap_or_else(|e| panic!("churner {i}: {e}")));
    }
    let mut legit = connect(w.addr, &Opts::default()).expect("connect");
    legit.write_all(&upgrade_request(w.addr)).unwrap();
    w.thaw();
    let head = read_head(&mut legit).expect("an answer");
    assert!(
        head.starts_with("HTTP/1.1 101 "),
        "the client behind the churn: {head:?}"
    );
    legit.write_all(&close_frame(1000, "")).unwrap();
    assert_eq!(expect_close_then_eof(&mut legit), 1000);
    drop(legit);
    let (end, m1) = settled(&w, &m0, &[("abnormal", 3 * MAX as u64), ("peer_closed", 1)]);
    assert_eq!(
        m1.moved_since(&m0, "wsloop_admission_rejections_total{limit=\""),
        deltas(&[]),
        "nobody refused"
    );
    println!(
        "churn at capacity: {} resets in the backlog at max connections {MAX}, the client behind them upgraded; fds baseline {} final {end}",
        3 * MAX,
        w.baseline_fds
    );
    w.stop();
}

// ---------------------------------------------------------------------------------------------
// d. slow readers

const MSG: usize = 16 * 1024;
const MAX_BACKPRESSURE: usize = 64 * 1024;
/// A queued 16 KiB echo: payload plus its 4-byte header.
const QUEUED_MSG: usize = MSG + 4;

/// Sample `wsloop_queued_bytes` every 20 ms; the peak is what the attack made the server hold.
fn queued_sampler(w: &Wsloop) -> Sampler {
    let addr = w.addr;
    Sampler::every(Duration::from_millis(20), move || {
        metrics_at(addr, localhost(1)).map_or(0, |m| m.get("wsloop_queued_bytes") as usize)
    })
}

/// A raw client that completed the upgrade with a small receive buffer (4 KiB).
fn small_window_client(w: &Wsloop) -> TcpStream {
    let opts = Opts {
        src: None,
        rcvbuf: Some(4096),
    };
    raw_ws(w.addr, &opts).expect("upgrade")
}

/// The end of a slow-reader attack: wait (bounded, 10 s) until the child has closed the reader
/// `s` for the first reason of `closed`; stop the queued-bytes sampler, let the reader go, stop
/// the fd sampler; then the closes since `m0` must be exactly `closed` (see [`settled`]), the
/// server must have queued something but never much over the limit, and a legitimate client
/// must be served. Returns the figures for the test's report line.
fn slow_reader_end(
    w: &Wsloop,
    m0: &Metrics,
    s: TcpStream,
    [queued, fds]: [Sampler; 2],
    who: &str,
    closed: &[(&str, u64)],
) -> String {
    let reason = closed[0].0;
    let ten_s = Duration::from_secs(10);
    wait_closed(w, reason, ten_s, &format!("{who} not closed for {reason}"));
    let peak_queued = queued.stop();
    drop(s);
    let peak = fds.stop();
    let (end, m1) = settled(w, m0, closed);
    assert!(
        peak_queued < MAX_BACKPRESSURE + 2 * QUEUED_MSG,
        "queued bytes peaked at {peak_queued}"
    );
    assert!(peak_queued > 0, "the server never had to queue");
    assert_echoes(w, &format!("after the {who}"));
    format!(
        "queued bytes peak {peak_queued} (limit {MAX_BACKPRESSURE}); {}; closed {:?}",
        fds_report(w, peak, end),
        m1.closed_since(m0)
    )
}

/// A client that does not read: its receive buffer is small, and it sends 16 KiB messages until
/// the server cuts it off (a write fails) or `stop` says so. Returns the messages sent.
fn flood_without_reading(s: &mut TcpStream, stop: impl Fn(usize) -> bool) -> usize {
    let payload = common::bytes(MSG, 7);
    let msg = frame(true, OP_BINARY, &payload);
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut sent = 0;
    while sent < 4000 && Instant::now() < deadline && !stop(sent) {
        if s.write_all(&msg).is_err() {
            break;
        }
        sent += 1;
    }
    sent
}

#[test]
fn slow_reader_is_closed_at_the_backpressure_limit() {
    let w = Wsloop::spawn(
        "slow-reader-close",
        &[
            "--max-message-size",
            "16384",
            "--max-backpressure",
            "65536",
            // Long: the reader reads its close frame after the flood, however slow the machine
            // (the flood itself may take up to 20 s on a loaded one; with 10 s, the queue's
            // time over the limit ran out before the reader read and it saw the stream cut).
            "--close-timeout",
            "60",
            "--write-stall-timeout",
            "60",
        ],
    );
    let m0 = at_baseline(&w);
    // A fast client that pipelines more than the limit but reads everything is no slow reader:
    // what the socket takes at once is not held against it.
    assert_eq!(
        legit_pipelined(w.addr, 8, MSG),
        Legit::Echoed,
        "pipelining client"
    );
    let fds = w.fd_sampler();
    let queued = queued_sampler(&w);
    let mut s = small_window_client(&w);
    let addr = w.addr;
    let legit = thread::spawn(move || {
        thread::sleep(Duration::from_millis(100));
        legit_echo(addr, None)
    });
    // Stop once the server is closing it (its queue went over the limit with the refused send
    // and the close frame): from then on its reads discard what we send.
    let sent = flood_without_reading(&mut s, |n| {
        n % 8 == 7
            && metrics_at(addr, localhost(1)).is_ok_and(|m| {
                m.get("wsloop_queued_bytes_largest") > MAX_BACKPRESSURE as f64
                    || m.closed("backpressure") > 0
            })
    });
    assert_eq!(legit.join().unwrap(), Legit::Echoed, "legit client during");
    // On the wire: the echoes queued before the limit, in order, then the close frame, 1008.
    let payload = common::bytes(MSG, 7);
    let mut echoes = 0;
    let close = loop {
        let f = read_frame(&mut s);
        match f.opcode {
            OP_BINARY => assert!(f.payload == payload, "echo {echoes} differs"),
            OP_CLOSE => break f.close(),
            _ => panic!("unexpected frame {f:?}"),
        }
        echoes += 1;
    };
    assert_eq!(close, Some((1008, "backpressure limit".to_string())));
    assert!(
        echoes < sent,
        "{echoes} echoes of {sent} messages: none refused"
    );
    // The server shut its side down after its close frame (FIN), and drains our input until
    // our EOF: we answer, read its EOF, and shut ours down.
    s.write_all(&close_frame(1008, "")).unwrap();
    let (end, _) = read_answer(&mut s, IO_TIMEOUT);
    assert!(matches!(end, Answer::Eof(ref b) if b.is_empty()), "{end:?}");
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let closed = [("backpressure", 1), ("peer_closed", 2)];
    let report = slow_reader_end(&w, &m0, s, [queued, fds], "slow reader", &closed);
    println!("slow reader (close): {sent} x 16 KiB sent; {report}");
    w.stop();
}

/// A reader that stops reading with its queue under the limit: the queue makes no progress, and
/// the write-stall timeout drops it (reading is not paused: the limit was not reached).
#[test]
fn reader_that_stops_reading_is_dropped_for_write_stall() {
    let w = Wsloop::spawn(
        "slow-reader-stall",
        &[
            "--max-message-size",
            "16384",
            "--max-backpressure",
            "16777216",
            "--write-stall-timeout",
            "1",
        ],
    );
    let m0 = at_baseline(&w);
    let fds = w.fd_sampler();
    let queued = queued_sampler(&w);
    let mut s = small_window_client(&w);
    // A live reader at first.
    for i in 0..3u8 {
        s.write_all(&frame(true, OP_BINARY, &[i; 100])).unwrap();
        let f = read_frame(&mut s);
        assert_eq!((f.opcode, f.payload), (OP_BINARY, vec![i; 100]));
    }
    // Then it stops reading, and sends until the server has had to queue something for it
    // (far under the limit); then it sends nothing more. The queue's last progress comes
    // between the first message of the flood and a moment after its last: the drop comes one
    // write-stall timeout after that.
    let addr = w.addr;
    let flood_start = Instant::now();
    let sent = flood_without_reading(&mut s, |n| {
        n % 4 == 3
            && metrics_at(addr, localhost(1))
                .is_ok_and(|m| m.get("wsloop_queued_bytes_largest") > 0.0)
    });
    let flood_end = Instant::now();
    let m = w.metrics();
    assert_eq!(
        m.get("wsloop_read_paused_connections"),
        0.0,
        "paused under the limit"
    );
    assert_echoes(&w, "while the reader stalls");
    wait_closed(&w, "write_stall", Duration::from_secs(10), "not dropped");
    let stall = Duration::from_secs(1);
    assert_deadline("the write-stall drop", flood_start.elapsed(), stall);
    assert!(
        flood_end.elapsed() <= stall + LATE,
        "dropped {:?} after the flood's last message",
        flood_end.elapsed()
    );
    let closed = [("write_stall", 1), ("peer_closed", 1)];
    let report = slow_reader_end(&w, &m0, s, [queued, fds], "stalled reader", &closed);
    println!("slow reader (write stall): {sent} x 16 KiB sent; {report}");
    w.stop();
}

/// A reader that stops reading with its queue over the limit (drop policy: sends over it are
/// dropped, the connection is not closed for them): reading it is paused at once, so nothing
/// more is queued however much it sends, and the write-stall timeout drops it as a reader that
/// did not bring its queue back under the limit in time (`backpressure`).
#[test]
fn reader_that_stops_reading_over_the_limit_is_paused_then_dropped() {
    let w = Wsloop::spawn(
        "slow-reader-over",
        &[
            "--max-message-size",
            "16384",
            "--max-backpressure",
            "65536",
            "--backpressure-policy",
            "drop",
            "--write-stall-timeout",
            "2",
        ],
    );
    let m0 = at_baseline(&w);
    let fds = w.fd_sampler();
    let queued = queued_sampler(&w);
    let mut s = small_window_client(&w);
    // It sends until reading it is paused; its later writes fill the kernel's buffers and then
    // block (flow control), and the 5 s write timeout ends the flood. The pause is watched from
    // a thread of its own (the flood's writes block while it lasts).
    let addr = w.addr;
    let paused = Sampler::every(Duration::from_millis(10), move || {
        metrics_at(addr, localhost(1))
            .map_or(0, |m| m.get("wsloop_read_paused_connections") as usize)
    });
    let flood_start = Instant::now();
    let sent = flood_without_reading(&mut s, |_| false);
    // Over the limit (paused) a few messages into the flood, and dropped one write-stall
    // timeout after that; the flood's blocked write fails then (its 5 s write timeout would
    // end it otherwise).
    let flood_took = flood_start.elapsed();
    let paused_peak = paused.stop();
    assert_eq!(paused_peak, 1, "reading the flooder was paused");
    assert_deadline("the backpressure drop", flood_took, Duration::from_secs(2));
    let m = w.metrics();
    let peak = m.get("wsloop_queued_bytes_peak") as usize;
    assert!(
        peak <= MAX_BACKPRESSURE + QUEUED_MSG + MAX_CONTROL_FRAME,
        "queue peaked at {peak}"
    );
    let closed = [("backpressure", 1)];
    let report = slow_reader_end(&w, &m0, s, [queued, fds], "paused reader", &closed);
    println!(
        "slow reader (drop + pause): {sent} x 16 KiB sent, reading paused; queue peak {peak}; {report}"
    );
    w.stop();
}

/// A reader too slow for what it asks: it sends 16 KiB messages as fast as the server takes
/// them and reads their echoes steadily (4 MB/s), but slower than they come. Reading it is
/// paused whenever its queue passes the limit (32 MiB here), and its reads make progress, but the
/// queue does not get back under half the limit within the write-stall timeout: it is dropped
/// (`backpressure`), where a deadline that every write's progress moved would keep it for ever.
#[test]
fn slow_but_steady_reader_is_dropped_when_its_queue_stays_over_the_limit() {
    const LIMIT: usize = 32 << 20;
    let w = Wsloop::spawn(
        "slow-steady",
        &[
            "--max-message-size",
            "16384",
            "--max-backpressure",
            &LIMIT.to_string(),
            "--backpressure-policy",
            "drop",
            "--write-stall-timeout",
            "3",
        ],
    );
    let m0 = at_baseline(&w);
    let fds = w.fd_sampler();
    let s = raw_ws(w.addr, &Opts::default()).expect("upgrade");
    let mut writer = s.try_clone().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let start = Instant::now();
    let flood = thread::spawn(move || {
        flood_without_reading(&mut writer, |_| stop2.load(Ordering::Relaxed))
    });
    // Read 256 KiB every 64 ms: steady progress, far slower than the echoes come.
    let (mut reader, mut got) = (s.try_clone().unwrap(), 0usize);
    let mut buf = vec![0u8; 256 * 1024];
    // Queue sizes seen while reading was paused: progress shows as a smaller one.
    let mut paused_queues = Vec::new();
    let mut first_paused = None;
    let ended = loop {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "never dropped; read {got} bytes"
        );
        thread::sleep(Duration::from_millis(64));
        match reader.read(&mut buf) {
            Ok(0) => break start.elapsed(),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => break start.elapsed(),
            Err(e) => panic!("reading the echoes: {e} after {got} bytes"),
            Ok(n) => got += n,
        }
        if let Ok(m) = w.try_metrics() {
            if m.get("wsloop_read_paused_connections") == 1.0 {
                first_paused.get_or_insert_with(Instant::now);
                paused_queues.push(m.get("wsloop_queued_bytes") as usize);
            }
        }
    };
    // Over the limit (paused) some time after the flood began, and before it was seen so: the
    // queue did not get under half the limit within the write-stall timeout from then.
    let stall = Duration::from_secs(3);
    assert!(
        ended + TICK >= stall,
        "dropped {ended:?} after the flood began"
    );
    let seen = first_paused.expect("reading was never paused");
    assert!(
        seen.elapsed() <= stall + LATE,
        "dropped {:?} after it was seen paused",
        seen.elapsed()
    );
    stop.store(true, Ordering::Relaxed);
    let sent = flood.join().unwrap();
    wait_closed(
        &w,
        "backpressure",
        Duration::from_secs(10),
        "not closed for backpressure",
    );
    assert!(!paused_queues.is_empty(), "reading was never paused");
    let progressed = paused_queues.windows(2).any(|q| q[1] < q[0]);
    assert!(progressed, "no progress while paused: {paused_queues:?}");
    assert!(
        paused_queues.iter().all(|&q| q > LIMIT / 2),
        "under half the limit while paused: {paused_queues:?}"
    );
    let peak = w.metrics().get("wsloop_queued_bytes_peak") as usize;
    assert!(peak <= LIMIT + QUEUED_MSG, "queue peaked at {peak}");
    drop((s, reader));
    let fd_peak = fds.stop();
    let (end, _) = settled(&w, &m0, &[("backpressure", 1)]);
    assert_echoes(&w, "after the slow reader");
    println!(
        "slow steady reader: {sent} x 16 KiB sent, {got} bytes read, dropped after {ended:?}; queue while paused {:?} .. {:?}, peak {peak}; {}",
        paused_queues.iter().min(),
        paused_queues.iter().max(),
        fds_report(&w, fd_peak, end)
    );
    w.stop();
}

/// Bytes in the kernel's send queues of the child's connections on `port` (the `tx_queue`
/// column of `/proc/PID/net/tcp` for established sockets with that local port, counting only
/// sockets the child holds: the table lists the whole network namespace's); with `receive`,
/// their receive queues instead (`rx_queue`).
fn kernel_queued(pid: u32, port: u16, receive: bool) -> usize {
    let mine: std::collections::HashSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                .filter_map(|l| {
                    let l = l.to_string_lossy().into_owned();
                    Some(l.strip_prefix("socket:[")?.strip_suffix(']')?.to_string())
                })
                .collect()
        })
        .unwrap_or_default();
    let Ok(table) = std::fs::read_to_string(format!("/proc/{pid}/net/tcp")) else {
        return 0;
    };
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let local_port = u16::from_str_radix(f[1].rsplit(':').next()?, 16).ok()?;
            let established = f[3] == "01";
            let mut queues = f[4].split(':');
            let tx = queues.next()?;
            let queued = match receive {
                false => tx,
                true => queues.next()?,
            };
            let queued = usize::from_str_radix(queued, 16).ok()?;
            let held = mine.contains(*f.get(9)?);
            (local_port == port && established && held).then_some(queued)
        })
        .sum()
}

fn kernel_send_queued(w: &Wsloop, port: u16) -> usize {
    kernel_queued(w.pid, port, false)
}

/// A reader that never reads makes the kernel hold what the server writes to it, outside
/// `max_backpressure`; `--socket-send-buffer` bounds that too (the kernel doubles the value).
#[test]
fn a_socket_send_buffer_bounds_what_a_reader_holds_in_the_kernel() {
    const SNDBUF: usize = 64 * 1024;
    let w = Wsloop::spawn(
        "send-buffer",
        &[
            "--max-message-size",
            "16384",
            "--socket-send-buffer",
            &SNDBUF.to_string(),
            "--write-stall-timeout",
            "2",
        ],
    );
    let m0 = at_baseline(&w);
    let mut s = small_window_client(&w);
    let port = w.addr.port();
    // Send until the server stops reading (its queue is over the limit), tracking the peak.
    let peak = std::cell::Cell::new(0);
    let sent = flood_without_reading(&mut s, |n| {
        if n % 8 == 7 {
            peak.set(peak.get().max(kernel_send_queued(&w, port)));
        }
        n >= 400
    });
    let peak = peak.get().max(kernel_send_queued(&w, port));
    assert!(peak > 0, "nothing was ever held in the kernel");
    // The kernel doubles SO_SNDBUF and accounts in skb sizes; unacknowledged bytes in flight
    // to the reader's (small) window add to it on a loaded machine: a bound of 8 times the
    // value, against the megabytes the kernel's auto-tuning gives a reader that does not read.
    assert!(
        peak <= 8 * SNDBUF,
        "the kernel held {peak} bytes for a reader that does not read"
    );
    drop(s);
    let (end, m1) = settled(&w, &m0, &[("backpressure", 1)]);
    println!(
        "send buffer: {sent} x 16 KiB sent, at most {peak} bytes held in the kernel (SO_SNDBUF {SNDBUF}); fds final {end}; closed {:?}",
        m1.closed_since(&m0)
    );
    w.stop();
}

/// A client that sends while the server does not read it (its queue over the backpressure
/// limit: it does not read its echoes) makes the kernel hold what it sends in the connection's
/// receive queue, outside the memory budget; `--socket-receive-buffer` bounds that (the kernel
/// doubles the value). Without it the kernel's auto-tuning, having seen the server read fast,
/// lets the queue grow far past the same bound: the control run shows the flag is what holds.
#[test]
fn a_socket_receive_buffer_bounds_what_an_unread_client_holds_in_the_kernel() {
    const RCVBUF: usize = 16 * 1024;
    let bound = 4 * RCVBUF;
    let mut peaks = Vec::new();
    for receive_buffer in [Some(RCVBUF), None] {
        let mut args = vec!["--max-message-size", "16384", "--write-stall-timeout", "3"];
        let value = RCVBUF.to_string();
        if receive_buffer.is_some() {
            args.extend(["--socket-receive-buffer", &value]);
        }
        let w = Wsloop::spawn("receive-buffer", &args);
        let m0 = at_baseline(&w);
        let mut s = small_window_client(&w);
        let (pid, port) = (w.pid, w.addr.port());
        let done = Arc::new(AtomicBool::new(false));
        let done2 = done.clone();
        // The receive queue fills once the server stops reading, while our writes block: a
        // thread of its own samples it.
        let sampler = thread::spawn(move || {
            let mut peak = 0;
            while !done2.load(Ordering::Relaxed) {
                peak = peak.max(kernel_queued(pid, port, true));
                thread::sleep(Duration::from_millis(5));
            }
            peak
        });
        // Until the server gives up on us (write stall: we never read), our writes block, or
        // 4,000 messages (64 MB) are out.
        let sent = flood_without_reading(&mut s, |_| false);
        done.store(true, Ordering::Relaxed);
        let peak = sampler.join().unwrap();
        drop(s);
        let (end, m1) = settled(&w, &m0, &[("backpressure", 1)]);
        println!(
            "receive buffer {receive_buffer:?}: {sent} x 16 KiB sent, at most {peak} bytes held in the kernel's receive queue; fds final {end}; closed {:?}",
            m1.closed_since(&m0)
        );
        w.stop();
        peaks.push(peak);
    }
    assert!(peaks[0] > 0, "nothing was ever held in the receive queue");
    assert!(
        peaks[0] <= bound,
        "the kernel held {} bytes from a client the server did not read (SO_RCVBUF {RCVBUF})",
        peaks[0]
    );
    assert!(
        peaks[1] > bound,
        "without the flag the kernel held only {} bytes: the test shows nothing",
        peaks[1]
    );
}

// ---------------------------------------------------------------------------------------------
// f. amplification: replies to input the client never reads

/// The longest control frame the server writes (a 2-byte header and 125 bytes of payload).
const MAX_CONTROL_FRAME: usize = 127;

/// The flood frame: a masked ping (mask 0) with 125 bytes of payload, 131 bytes in all.
fn ping_125() -> Vec<u8> {
    let mut f = vec![0x89, 0xfd, 0, 0, 0, 0];
    f.extend_from_slice(&[0x50; 125]);
    f
}

/// Send `n` pings in writes of 64 without reading a byte. Returns the writes made. A write may
/// wait while the server catches up (on a loaded machine, for seconds): 30 s is the bound.
fn ping_flood(s: &mut TcpStream, n: usize) -> usize {
    s.set_write_timeout(Some(Duration::from_secs(30))).unwrap();
    let batch = ping_125().repeat(64);
    let writes = n.div_ceil(64);
    for i in 0..writes {
        s.write_all(&batch)
            .unwrap_or_else(|e| panic!("write {i} of {writes} of the ping flood: {e}"));
    }
    writes
}

/// After a flood: send one text message and a close, and read everything up to the server's
/// close and EOF; returns the pongs read (each must answer a ping of the flood). The echo comes
/// before the close frame; pongs may come before or after the echo, never after the close.
fn pongs_then_echo_and_close(s: &mut TcpStream) -> usize {
    let mut end = frame(true, OP_TEXT, b"end of flood");
    end.extend(close_frame(1000, ""));
    s.write_all(&end).unwrap();
    let (mut pongs, mut echoed) = (0, false);
    loop {
        let f = read_frame(s);
        match f.opcode {
            0xa => {
                assert_eq!(f.payload, [0x50; 125], "a pong answers a ping of the flood");
                pongs += 1;
            }
            OP_TEXT => {
                assert_eq!(f.payload, b"end of flood");
                echoed = true;
            }
            OP_CLOSE => {
                assert!(echoed, "closed before the echo");
                assert_eq!(f.close().map(|c| c.0), Some(1000));
                break;
            }
            op => panic!("unexpected frame {op:#x} during a ping flood"),
        }
    }
    let (answer, _) = read_answer(s, IO_TIMEOUT);
    assert!(
        matches!(answer, Answer::Eof(ref b) if b.is_empty()),
        "{answer:?}"
    );
    pongs
}

/// Resident memory of the child, sampled every 20 ms; the peak is what the attack cost.
fn rss_sampler(w: &Wsloop) -> Sampler {
    let pid = w.pid;
    Sampler::every(Duration::from_millis(20), move || {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    })
}

/// `conns` clients each send `pings` pings of 125 bytes without reading; a legitimate client is
/// echoed all along. However many pings arrive between two writes, they get one pong, and only
/// once nothing is queued for the flooder: its queue never holds more than one pong, the
/// server's memory does not grow with the flood, and at the end each flooder reads a few pongs,
/// its echo and a clean close.
fn ping_flood_attack(name: &str, conns: usize, pings: usize) {
    // The flooder never reads, so the pong its socket did not take stays unsent: with the default
    // write-stall timeout (30 s) a flood that a loaded machine slows past it would be dropped as
    // stalled (a defence, but not the one this test is about).
    let w = Wsloop::spawn(
        name,
        &[
            "--max-backpressure",
            "65536",
            "--write-stall-timeout",
            "600",
        ],
    );
    let m0 = at_baseline(&w);
    let fds = w.fd_sampler();
    let rss0 = w.rss_kib() as usize;
    let rss = rss_sampler(&w);
    let addr = w.addr;
    let done = Arc::new(AtomicBool::new(false));
    let done2 = done.clone();
    let legit = thread::spawn(move || {
        let mut served = 0;
        while !done2.load(Ordering::Relaxed) {
            assert_eq!(
                legit_echo(addr, None),
                Legit::Echoed,
                "legit client during the flood"
            );
            served += 1;
            thread::sleep(Duration::from_millis(50));
        }
        served
    });
    let results = parallel(conns, move |_| {
        let opts = Opts {
            src: None,
            rcvbuf: Some(4096),
        };
        let mut s = raw_ws(addr, &opts).expect("upgrade");
        let writes = ping_flood(&mut s, pings);
        (writes, pongs_then_echo_and_close(&mut s))
    });
    done.store(true, Ordering::Relaxed);
    let served = legit.join().unwrap();
    let rss_peak = rss.stop();
    let peak = fds.stop();
    let m = w.metrics();
    let queued_peak = m.get("wsloop_queued_bytes_peak") as usize;
    assert!(
        queued_peak <= MAX_CONTROL_FRAME,
        "a ping flood made the server queue {queued_peak} bytes for one connection"
    );
    for &(writes, pongs) in &results {
        // At most one pong per read of the flood; a read holds at least part of one write.
        assert!(
            pongs <= 2 * writes,
            "{pongs} pongs for {writes} writes of 64 pings"
        );
    }
    let growth = rss_peak.saturating_sub(rss0);
    assert!(
        growth <= 1024 + 256 * conns,
        "RSS grew by {growth} KiB during a {conns}-connection ping flood"
    );
    assert!(served > 0, "the legitimate client was never served");
    // The flooders sent faster than the loop parses: their reading was put off to later turns
    // so that they could not hold the loop (the legitimate client was served meanwhile), and
    // each flooder yields at most once a turn: it is read again on the next turn, once.
    let yields = m.get("wsloop_read_yields_total") - m0.get("wsloop_read_yields_total");
    let turns = m.get("wsloop_loop_turns_total") - m0.get("wsloop_loop_turns_total");
    assert!(yields > 0.0, "no flooder ever yielded the loop");
    assert!(
        yields <= conns as f64 * turns,
        "{yields} yields in {turns} turns from {conns} flooders: read more than once a turn"
    );
    let closed = [("peer_closed", (conns + served) as u64)];
    let (end, _) = settled(&w, &m0, &closed);
    println!(
        "{name}: {conns} x {pings} pings; pongs and writes {results:?}; queue peak {queued_peak} B; RSS {rss0} -> peak {rss_peak} KiB; legit served {served}x; {}",
        fds_report(&w, peak, end)
    );
    w.stop();
}

#[test]
fn ping_flood_from_one_connection_that_never_reads() {
    ping_flood_attack("ping-flood-1", 1, 300_000);
}

#[test]
fn ping_flood_from_eight_connections_that_never_read() {
    ping_flood_attack("ping-flood-8", 8, 60_000);
}

/// Once the server has sent its close frame (here at the end of the connection's maximum
/// lifetime), pings get no answer: a flood then makes it write and queue nothing, and the close
/// timeout ends the connection.
#[test]
fn pings_after_the_servers_close_are_not_answered() {
    let w = Wsloop::spawn(
        "pings-after-close",
        &["--max-lifetime", "1", "--close-timeout", "2"],
    );
    let m0 = at_baseline(&w);
    let fds = w.fd_sampler();
    let opts = Opts {
        src: None,
        rcvbuf: Some(4096),
    };
    let upgrade = Instant::now();
    let mut s = raw_ws(w.addr, &opts).expect("upgrade");
    let f = read_frame(&mut s);
    assert_eq!(f.opcode, OP_CLOSE);
    assert_eq!(f.close().map(|c| c.0), Some(1001));
    assert_deadline(
        "the close at the end of the lifetime",
        upgrade.elapsed(),
        Duration::from_secs(1),
    );
    let start = Instant::now();
    // Until the close timeout drops us (a write fails) or 50,000 pings are out.
    let batch = ping_125().repeat(64);
    let mut sent = 0;
    while sent < 50_000 && s.write_all(&batch).is_ok() {
        sent += 64;
    }
    let (answer, _) = read_answer(&mut s, Duration::from_secs(10));
    assert!(
        matches!(answer, Answer::Eof(_) | Answer::Reset(_)),
        "the connection did not end: {answer:?}"
    );
    assert!(
        answer.bytes().is_empty(),
        "{} bytes after our close frame",
        answer.bytes().len()
    );
    let took = start.elapsed();
    // The close timeout (2 s) counts from our close frame, sent at the end of the lifetime.
    assert_deadline(
        "the end after our close",
        upgrade.elapsed(),
        Duration::from_secs(3),
    );
    wait_closed(
        &w,
        "max_lifetime",
        Duration::from_secs(10),
        "not closed for max_lifetime",
    );
    let m = w.metrics();
    assert_eq!(
        m.get("wsloop_queued_bytes_peak"),
        0.0,
        "something was queued"
    );
    assert_echoes(&w, "after the flood");
    drop(s);
    let peak = fds.stop();
    let (end, _) = settled(&w, &m0, &[("max_lifetime", 1), ("peer_closed", 1)]);
    println!(
        "pings after close: {sent} pings, nothing answered, ended after {took:?}; {}",
        fds_report(&w, peak, end)
    );
    w.stop();
}

// ---------------------------------------------------------------------------------------------
// e. oversize

#[test]
fn oversized_heads_and_frames_are_refused() {
    let w = Wsloop::spawn(
        "oversize",
        &[
            "--max-header-bytes",
            "1024",
            "--max-headers",
            "16",
            "--max-message-size",
            "16384",
        ],
    );
    let m0 = at_baseline(&w);
    let fds = w.fd_sampler();
    let addr = w.addr;

    // Heads: too many bytes, too many lines.
    let big = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(4000)
    );
    let mut many = String::from("GET / HTTP/1.1\r\nHost: x\r\n");
    for i in 0..40 {
        many.push_str(&format!("X-{i}: y\r\n"));
    }
    many.push_str("\r\n");
    assert!(many.len() < 1024);
    for (what, req) in [("head bytes", big), ("header lines", many)] {
        let mut s = connect(addr, &Opts::default()).unwrap();
        s.write_all(req.as_bytes()).unwrap();
        let (answer, _) = read_answer(&mut s, IO_TIMEOUT);
        assert!(matches!(answer, Answer::Eof(_)), "{what}: {answer:?}");
        assert_eq!(answer.status(), Some(431), "{what}: {answer:?}");
    }

    // Frames: each announces too much (or breaks the length rules) in its header alone.
    let mut frame_cases: Vec<(&str, Vec<u8>, u16)> = vec![
        ("16385 bytes", frame_header(0x82, 16385, 126), 1009),
        ("2^63-1 bytes", frame_header(0x82, (1 << 63) - 1, 127), 1009),
        (
            "2^64-1 bytes (MSB set)",
            frame_header(0x82, u64::MAX, 127),
            1002,
        ),
        ("ping of 126 bytes", frame_header(0x89, 126, 126), 1002),
    ];
    // A fragmented message that outgrows the limit on its second fragment.
    let mut frag = frame(false, OP_BINARY, &[1u8; 10_000]);
    frag.extend_from_slice(&frame_header(OP_CONT | 0x80, 10_000, 126));
    frame_cases.push(("fragments over 16384", frag, 1009));
    let rss0 = w.rss_kib();
    let mut codes = Vec::new();
    for (what, bytes, want) in &frame_cases {
        let mut s = raw_ws(addr, &Opts::default()).unwrap();
        s.write_all(bytes).unwrap();
        let code = expect_close_then_eof(&mut s);
        assert_eq!(code, *want, "{what}");
        codes.push(format!("{what}: {code}"));
    }
    let rss1 = w.rss_kib();
    // No buffer was sized after the announced lengths (2^63 would abort the process).
    assert!(
        rss1 < rss0 + 16 * 1024,
        "RSS grew from {rss0} KiB to {rss1} KiB"
    );
    assert_echoes(&w, "after the oversize attacks");
    let peak = fds.stop();
    let (end, m1) = settled(
        &w,
        &m0,
        &[
            ("rejected", 2),
            ("protocol_error", frame_cases.len() as u64),
            ("peer_closed", 1),
        ],
    );
    assert_eq!(m1.rejected_status("431") - m0.rejected_status("431"), 2);
    println!(
        "oversize: 2 heads -> 431; frames -> {codes:?}; RSS {rss0} -> {rss1} KiB; {}; closed {:?}",
        fds_report(&w, peak, end),
        m1.closed_since(&m0)
    );
    w.stop();
}

// ---------------------------------------------------------------------------------------------
// f. fd exhaustion

const ATTACKERS: usize = 256;
const PROBES: usize = 20;
/// How long a client beyond the limit may wait for its 503 (or EOF, or reset).
const ANSWER_BOUND: Duration = Duration::from_secs(2);

/// How one attacker fared in the first seconds of the storm.
#[derive(Debug)]
enum Fate {
    /// Nothing came and nothing ended: holding a slot (handshaking).
    Held,
    /// Upgraded (101) and holding a slot.
    Upgraded,
    /// Refused: 503 bytes (or nothing) then EOF or reset, after this long.
    Refused(Duration, Option<u16>),
}

fn fd_exhaustion(name: &str, upgrade: bool, threads: usize) {
    let threads_arg = threads.to_string();
    let w = Wsloop::spawn(
        name,
        &["--handshake-timeout", "30", "--threads", &threads_arg],
    );
    let m0 = w.metrics();
    let max = m0.get("wsloop_connections_max") as usize;
    let limit = m0.get("wsloop_fd_limit") as usize;
    assert_eq!(limit, 128);
    w.wait_baseline();
    let fds = w.fd_sampler();
    let cpu0 = w.cpu_seconds();
    let storm = Instant::now();

    // Twice the fd limit, held.
    let request = upgrade_request(w.addr);
    let mut attackers: Vec<(TcpStream, Instant)> = (0..ATTACKERS)
        .map(|i| {
            let mut s = connect(w.addr, &Opts::default())
                .unwrap_or_else(|e| panic!("attacker {i} cannot connect: {e}"));
            let t = Instant::now();
            if upgrade {
                s.write_all(&request).unwrap();
            }
            s.set_nonblocking(true).unwrap();
            (s, t)
        })
        .collect();
    // Watch every attacker for a little longer than the answer bound.
    let mut got: Vec<Vec<u8>> = vec![Vec::new(); ATTACKERS];
    let mut ended: Vec<Option<Duration>> = vec![None; ATTACKERS];
    let watch = Instant::now();
    let mut buf = [0u8; 4096];
    while watch.elapsed() < ANSWER_BOUND + Duration::from_millis(500) {
        for (i, (s, t)) in attackers.iter_mut().enumerate() {
            if ended[i].is_some() || got[i].starts_with(b"HTTP/1.1 101 ") {
                continue;
            }
            loop {
                match s.read(&mut buf) {
                    Ok(0) => ended[i] = Some(t.elapsed()),
                    Ok(n) => {
                        got[i].extend_from_slice(&buf[..n]);
                        continue;
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                    Err(_) => ended[i] = Some(t.elapsed()),
                }
                break;
            }
        }
        thread::sleep(Duration::from_millis(5));
    }
    let fates: Vec<Fate> = (0..ATTACKERS)
        .map(|i| {
            let status = (got[i].len() >= 12)
                .then(|| String::from_utf8_lossy(&got[i][9..12]).parse::<u16>().ok())
                .flatten();
            match (ended[i], status) {
                (Some(t), s) => Fate::Refused(t, s),
                (None, Some(101)) => Fate::Upgraded,
                (None, None) if got[i].is_empty() => Fate::Held,
                (None, s) => panic!("attacker {i}: answered {s:?} but not closed: {:?}", got[i]),
            }
        })
        .collect();
    let held = fates
        .iter()
        .filter(|f| matches!(f, Fate::Held | Fate::Upgraded))
        .count();
    let refused: Vec<(Duration, Option<u16>)> = fates
        .iter()
        .filter_map(|f| match f {
            Fate::Refused(t, s) => Some((*t, *s)),
            _ => None,
        })
        .collect();
    assert_eq!(held, max, "attackers holding a slot");
    if upgrade {
        assert!(!fates.iter().any(|f| matches!(f, Fate::Held)), "{fates:?}");
    }
    assert_eq!(refused.len(), ATTACKERS - max);
    for (i, (t, s)) in refused.iter().enumerate() {
        assert!(
            *t < ANSWER_BOUND,
            "refused attacker {i} answered after {t:?}"
        );
        assert_eq!(*s, Some(503), "refused attacker {i}");
    }
    let slowest_refusal = refused.iter().map(|r| r.0).max().unwrap_or_default();

    // While every slot is held: new clients get 503 (or EOF/reset) quickly, never silence.
    let mut probe_slowest = Duration::ZERO;
    for i in 0..PROBES {
        let mut s = connect(w.addr, &Opts::default()).expect("probe connects");
        // The server may have answered and closed already (a FIN): a write still goes through.
        s.write_all(&request).expect("the probe's request");
        let (answer, took) = read_answer(&mut s, ANSWER_BOUND);
        assert!(
            !matches!(answer, Answer::TimedOut(_)),
            "probe {i} got no answer within {ANSWER_BOUND:?}: {answer:?}"
        );
        assert_eq!(answer.status(), Some(503), "probe {i}: {answer:?}");
        probe_slowest = probe_slowest.max(took);
    }
    // A legitimate client gets a clear 503 while the attack holds every slot.
    assert_eq!(
        legit_echo(w.addr, None),
        Legit::Refused(503),
        "legit client while every slot is held"
    );
    while storm.elapsed() < Duration::from_millis(3500) {
        thread::sleep(Duration::from_millis(50));
    }
    let cpu = w.cpu_seconds() - cpu0;
    let wall = storm.elapsed().as_secs_f64();
    drop(attackers);
    let peak = fds.stop();
    // Accepting and refusing 276 clients is work of milliseconds; the rest of the storm is
    // quiet (nothing spins): under a tenth of a core.
    assert!(
        cpu < 0.1 * wall,
        "the child used {cpu:.2} s of CPU over a {wall:.2} s storm"
    );
    assert!(peak < limit, "fd peak {peak} reached the limit {limit}");

    // The attackers left: served again, every descriptor back.
    let end = w.wait_baseline();
    assert_eq!(
        legit_echo(w.addr, None),
        Legit::Echoed,
        "legit after the storm"
    );
    let m1 = w.wait_quiet();
    let refusals = (ATTACKERS - max + PROBES + 1) as u64;
    assert_eq!(
        m1.moved_since(&m0, "wsloop_admission_rejections_total{limit=\""),
        deltas(&[("max_connections", refusals)])
    );
    let closed = m1.closed_since(&m0);
    // Refused clients are held briefly (to read their request) while the fd budget allows,
    // and closed at once otherwise: either way every one is counted as closed, refused.
    assert_eq!(
        closed,
        deltas(&[
            ("abnormal", max as u64),
            ("refused", refusals),
            ("peer_closed", 1)
        ])
    );
    assert_eq!(
        m1.moved_since(&m0, "wsloop_accept_errors_total{errno=\""),
        deltas(&[])
    );
    assert_eq!(
        m1.accept_errors("EMFILE"),
        0,
        "the fd budget keeps accept clear of EMFILE"
    );
    assert_eq!(m1.get("wsloop_accept_paused"), 0.0);
    assert_eq!(w.audited(&m1).get("wsloop_fd_audit_difference"), 0.0);
    if threads > 1 {
        // Both loops took their share of the storm; the shares add up to the totals.
        let mut total = (0.0, 0.0);
        for i in 0..threads {
            let l = format!("{{loop=\"{i}\"}}");
            let accepted = m1.get(&format!("wsloop_per_loop_accepted_total{l}"));
            assert!(accepted > 0.0, "loop {i} accepted nothing");
            total.0 += m1.get(&format!("wsloop_per_loop_connections_max{l}"));
            total.1 += m1.get(&format!("wsloop_per_loop_fd_budget{l}"));
        }
        assert_eq!(total, (max as f64, m1.get("wsloop_fd_budget")));
    }
    println!(
        "fd exhaustion ({}, {threads} threads): {ATTACKERS} attackers vs fd limit {limit} (max connections {max}, fd budget {}): {held} held, {} refused with 503 (slowest {slowest_refusal:?}); {PROBES} probes refused with 503 (slowest {probe_slowest:?}); CPU {cpu:.2} s over {wall:.2} s; {}; closed {closed:?}; refusals {refusals}",
        if upgrade { "upgrades" } else { "connect only" },
        m0.get("wsloop_fd_budget"),
        refused.len(),
        fds_report(&w, peak, end)
    );
    w.stop();
}

#[test]
fn fd_exhaustion_connect_only() {
    fd_exhaustion("fd-exhaustion-connect", false, 1);
}

#[test]
fn fd_exhaustion_with_upgrades() {
    fd_exhaustion("fd-exhaustion-upgrade", true, 1);
}

/// The same storm against two loops on one port: the budget is split between them, both
/// fill their share, every descriptor of both is accounted for, and both stop on SIGTERM.
#[test]
fn fd_exhaustion_over_two_loops() {
    fd_exhaustion("fd-exhaustion-threads", true, 2);
}

// ---------------------------------------------------------------------------------------------
// g. per-address limits

/// Send an upgrade request from `src`; return the answer (read up to EOF, reset or 2 s).
fn attempt(w: &Wsloop, src: u8) -> Answer {
    let mut s = connect(w.addr, &Opts::from(localhost(src))).expect("connect");
    s.write_all(&upgrade_request(w.addr)).unwrap();
    read_answer(&mut s, Duration::from_secs(2)).0
}

/// Five upgraded connections from 127.0.0.2 (`what`: how the panic names them), then a sixth
/// attempt from there, which must be refused with `status` and EOF. Returns the five and the
/// sixth's answer.
fn five_then_refused(w: &Wsloop, what: &str, status: u16) -> (Vec<TcpStream>, Answer) {
    let held: Vec<TcpStream> = (0..5)
        .map(|i| {
            raw_ws(w.addr, &Opts::from(localhost(2)))
                .unwrap_or_else(|e| panic!("{what} {i} from 127.0.0.2: {e}"))
        })
        .collect();
    let sixth = attempt(w, 2);
    assert!(matches!(sixth, Answer::Eof(_)), "{sixth:?}");
    assert_eq!(sixth.status(), Some(status), "{sixth:?}");
    (held, sixth)
}

/// [`settled`] after a per-address attack: the one refused connection (by `limit`) is the only
/// admission refusal since `m0`, and the closes are `abnormal` connections the clients dropped,
/// the refused one and the legitimate client's.
fn settled_after_one_refusal(
    w: &Wsloop,
    m0: &Metrics,
    limit: &str,
    abnormal: u64,
) -> (usize, Metrics) {
    let closed = [("abnormal", abnormal), ("refused", 1), ("peer_closed", 1)];
    let (end, m1) = settled(w, m0, &closed);
    assert_eq!(
        m1.moved_since(m0, "wsloop_admission_rejections_total{limit=\""),
        deltas(&[(limit, 1)])
    );
    (end, m1)
}

#[test]
fn per_address_connection_limit() {
    let w = Wsloop::spawn("per-ip-limit", &["--max-connections-per-ip", "5"]);
    let m0 = at_baseline(&w);
    let (mut held, sixth) = five_then_refused(&w, "connection", 503);
    assert!(
        String::from_utf8_lossy(sixth.bytes()).contains("too many connections from your address")
    );
    // Other addresses are still admitted.
    assert_eq!(legit_echo(w.addr, Some(localhost(3))), Legit::Echoed);
    held.push(raw_ws(w.addr, &Opts::from(localhost(4))).expect("127.0.0.4 admitted"));
    let m = w.metrics();
    assert_eq!(
        m.admission("max_connections_per_ip") - m0.admission("max_connections_per_ip"),
        1
    );
    // One of 127.0.0.2's connections leaves: it may connect again.
    drop(held.remove(0));
    let five_s = Duration::from_secs(5);
    wait_closed(&w, "abnormal", five_s, "127.0.0.2's connection not closed");
    held.push(raw_ws(w.addr, &Opts::from(localhost(2))).expect("127.0.0.2 admitted again"));
    let fds_held = w.fds();
    drop(held);
    let (end, m1) = settled_after_one_refusal(&w, &m0, "max_connections_per_ip", 7);
    println!(
        "per-ip limit: 6th from 127.0.0.2 got 503, 127.0.0.3 and .4 admitted; fds baseline {} held {fds_held} final {end}; closed {:?}",
        w.baseline_fds,
        m1.closed_since(&m0)
    );
    w.stop();
}

/// One address over its per-IP limit connects again and again, reading nothing and closing
/// nothing. Each refusal (503) is held for a second at most, and only up to half of the
/// descriptors the budget keeps beyond `max_connections`: the other half stays free, so the
/// metrics listener answers `/healthz` and `/metrics` throughout (operators need it most when
/// the server is full), and a legitimate client from another address is served.
#[test]
fn refused_clients_cannot_take_the_operators_descriptors() {
    let w = Wsloop::spawn(
        "refusal-hold",
        &[
            "--max-connections-per-ip",
            "4",
            "--metrics-listen",
            "127.0.0.1:0",
            "--metrics-on-ws",
        ],
    );
    let admin = w
        .log()
        .lines()
        .filter_map(|l| l.split_once("metrics on http://")?.1.split_once("/metrics"))
        .filter_map(|(a, _)| a.parse::<std::net::SocketAddr>().ok())
        .find(|a| *a != w.addr)
        .expect("the metrics listener's address in the log");
    let m0 = at_baseline(&w);
    let (budget, max) = (m0.get("wsloop_fd_budget"), m0.get("wsloop_connections_max"));
    let cap = ((budget - max) / 2.0).floor();
    assert!(cap >= 1.0, "budget {budget}, max {max}");
    let fds = w.fd_sampler();
    let addr = w.addr;
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    // The operator scrapes the metrics listener all along; every answer must be a 200.
    let operator = thread::spawn(move || {
        let (mut served, mut peak_refusing) = (0, 0.0f64);
        while !stop2.load(Ordering::Relaxed) {
            let m = metrics_at(admin, localhost(1)).expect("/metrics on the metrics listener");
            peak_refusing = peak_refusing.max(m.get("wsloop_connections{state=\"refusing\"}"));
            let mut s = connect(admin, &Opts::default()).expect("connect to the metrics listener");
            s.write_all(b"GET /healthz HTTP/1.1\r\nHost: wsloop\r\n\r\n")
                .unwrap();
            let (answer, _) = read_answer(&mut s, IO_TIMEOUT);
            assert_eq!(
                answer.status(),
                Some(200),
                "/healthz during the flood: {answer:?}"
            );
            served += 1;
            thread::sleep(Duration::from_millis(10));
        }
        (served, peak_refusing)
    });
    // The attacker: its 4 admitted connections, then 600 more that are refused, held open.
    let mut held = Vec::new();
    for i in 0..604 {
        match connect(addr, &Opts::from(localhost(2))) {
            Ok(s) => held.push(s),
            Err(e) => panic!("connect {i}: {e}"),
        }
    }
    assert_echoes(&w, "while the refused connections are held");
    stop.store(true, Ordering::Relaxed);
    let (served, peak_refusing) = operator.join().unwrap();
    assert!(served > 0, "the operator was never answered");
    assert!(
        peak_refusing <= cap,
        "{peak_refusing} refused connections held at once (cap {cap})"
    );
    drop(held);
    let peak = fds.stop();
    let (end, m1) = settled(
        &w,
        &m0,
        &[("refused", 600), ("abnormal", 4), ("peer_closed", 1)],
    );
    println!(
        "refusal hold: 600 refusals from one address, at most {peak_refusing} held (cap {cap}); the operator answered {served} times; {}; closed {:?}",
        fds_report(&w, peak, end),
        m1.closed_since(&m0)
    );
    w.stop();
}

#[test]
fn per_address_connection_rate() {
    let mut w = Wsloop::spawn(
        "per-ip-rate",
        &[
            "--connection-rate-per-ip",
            "5",
            "--connection-burst-per-ip",
            "5",
        ],
    );
    // Metrics requests come from an address of their own, so they spend no attacker's tokens.
    w.metrics_src = localhost(9);
    let m0 = at_baseline(&w);
    let (mut held, sixth) = five_then_refused(&w, "quick connection", 429);
    assert!(String::from_utf8_lossy(sixth.bytes()).contains("Retry-After: 1"));
    assert_eq!(legit_echo(w.addr, Some(localhost(3))), Legit::Echoed);
    // After a second the bucket has refilled.
    thread::sleep(Duration::from_millis(1100));
    held.push(raw_ws(w.addr, &Opts::from(localhost(2))).expect("127.0.0.2 admitted again"));
    drop(held);
    let (end, m1) = settled_after_one_refusal(&w, &m0, "rate_per_ip", 6);
    println!(
        "per-ip rate: 6th quick connection from 127.0.0.2 got 429, 127.0.0.3 admitted, .2 admitted again after 1.1 s; fds baseline {} final {end}; closed {:?}",
        w.baseline_fds,
        m1.closed_since(&m0)
    );
    w.stop();
}

// ---------------------------------------------------------------------------------------------
// h. operator endpoint flood

/// Idle connections held during the endpoint flood: each /healthz used to list /proc/self/fd
/// twice on the loop thread, each /metrics once (about 1 ms per thousand descriptors).
const FLOOD_IDLE: usize = 10_000;
/// Clients asking for /healthz and /metrics at once, and what each asks in turn.
const FLOOD_CLIENTS: usize = 64;
const FLOOD_EACH: usize = 10;
/// The stall threshold and the legitimate client's round-trip bound during the flood: far
/// above a turn's length when requests cost microseconds, far below one turn of 64 requests
/// that each list 10,000 descriptors.
const FLOOD_STALL: Duration = Duration::from_millis(250);

#[test]
fn endpoint_flood_with_thousands_of_idle_connections_does_not_stall_the_loop() {
    let needed = FLOOD_IDLE + FLOOD_CLIENTS + 200;
    let hard = match rlimit_support::raise_nofile_limit() {
        Ok(soft) => soft as usize,
        Err(e) => panic!("cannot raise RLIMIT_NOFILE: {e}"),
    };
    if hard < needed {
        println!("endpoint flood: skipped, RLIMIT_NOFILE hard limit {hard} < {needed}");
        return;
    }
    let rate = wsloop::Config::default().endpoint_rate.to_string();
    let stall = format!("{}", FLOOD_STALL.as_secs_f64());
    // Room for the idle connections, the flood, and the eighth of the budget (at most 1024)
    // kept for answering refused clients.
    let fd_limit = (FLOOD_IDLE + FLOOD_CLIENTS + 1500) as u64;
    // The defaults, but for the endpoints on the public port too (the worst case), and no idle
    // timeout (the idle connections must stay for the whole test).
    let w = Wsloop::spawn_with_fd_limit(
        "endpoint-flood",
        fd_limit,
        &[
            "--metrics-listen",
            "127.0.0.1:0",
            "--metrics-on-ws",
            "--endpoint-rate",
            &rate,
            "--stall-threshold",
            &stall,
            "--idle-timeout",
            "0",
        ],
    );
    let admin = w.metrics_listener();
    let idle: Vec<TcpStream> = (0..FLOOD_IDLE)
        .map(|i| raw_ws(w.addr, &Opts::default()).unwrap_or_else(|e| panic!("idle {i}: {e}")))
        .collect();
    let m0 = metrics_at(admin, localhost(1)).expect("metrics before the flood");
    assert_eq!(
        m0.get("wsloop_connections{state=\"open\"}"),
        FLOOD_IDLE as f64
    );

    // A legitimate client echoes all through the flood, timing each round trip.
    let flooding = Arc::new(AtomicBool::new(true));
    let echoing = {
        let (addr, flooding) = (w.addr, flooding.clone());
        thread::spawn(move || {
            let mut s = raw_ws(addr, &Opts::default()).expect("legit client");
            s.set_nodelay(true).unwrap();
            let mut rtts = Vec::new();
            while flooding.load(Ordering::Relaxed) || rtts.len() < 20 {
                let sent = Instant::now();
                s.write_all(&frame(true, OP_TEXT, b"still here")).unwrap();
                let f = read_frame(&mut s);
                assert_eq!((f.opcode, &f.payload[..]), (OP_TEXT, &b"still here"[..]));
                rtts.push(sent.elapsed());
                thread::sleep(Duration::from_millis(5));
            }
            rtts
        })
    };
    let started = Instant::now();
    let (ws_addr, paths) = (w.addr, ["/healthz", "/metrics"]);
    let answers = parallel(FLOOD_CLIENTS, move |i| {
        let mut got = Vec::new();
        for j in 0..FLOOD_EACH {
            let addr = if (i + j) % 2 == 0 { ws_addr } else { admin };
            let path = paths[(i / 2 + j) % 2];
            let mut s = connect(addr, &Opts::default()).expect("connect");
            s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
                .expect("request");
            let (answer, _) = read_answer(&mut s, IO_TIMEOUT);
            got.push((addr == admin, answer.status()));
        }
        got
    });
    let flood_took = started.elapsed();
    flooding.store(false, Ordering::Relaxed);
    let rtts = echoing.join().expect("the legitimate client");
    let worst = rtts.iter().max().copied().unwrap_or_default();

    let answers: Vec<(bool, Option<u16>)> = answers.into_iter().flatten().collect();
    let count = |admin: bool, status: u16| {
        answers
            .iter()
            .filter(|a| **a == (admin, Some(status)))
            .count()
    };
    let (ws_ok, ws_limited, admin_ok, admin_limited) = (
        count(false, 200),
        count(false, 429),
        count(true, 200),
        count(true, 429),
    );
    assert_eq!(
        ws_ok + ws_limited + admin_ok + admin_limited,
        FLOOD_CLIENTS * FLOOD_EACH,
        "every request answered 200 or 429: {answers:?}"
    );
    // Each listener has a budget of its own: the flood on the public port left the operators'
    // address its share, and both refused what went over.
    assert!(ws_ok > 0 && admin_ok > 0, "{ws_ok} {admin_ok}");
    assert!(
        ws_limited > 0 && admin_limited > 0,
        "{ws_limited} {admin_limited}"
    );
    let m1 = metrics_at(admin, localhost(1)).expect("metrics after the flood");
    let limited = m1.get("wsloop_endpoint_rate_limited_total");
    assert_eq!(limited, (ws_limited + admin_limited) as f64);
    assert_eq!(
        m1.get("wsloop_loop_stalls_total"),
        0.0,
        "the watchdog saw a stall"
    );
    assert!(
        worst < FLOOD_STALL,
        "the legitimate client's echo took {worst:?} during the flood"
    );
    // Ten thousand closes, each followed by the debug build's consistency check of every
    // connection left: seconds, more on a loaded machine.
    drop(idle);
    w.wait_baseline_within(Duration::from_secs(60));
    w.wait_quiet();
    println!(
        "endpoint flood: {FLOOD_IDLE} idle connections, {} requests from {FLOOD_CLIENTS} clients in {flood_took:?}: public port {ws_ok} answered, {ws_limited} got 429; metrics port {admin_ok} answered, {admin_limited} got 429; {} echoes, worst round trip {worst:?}; no stall",
        FLOOD_CLIENTS * FLOOD_EACH,
        rtts.len()
    );
    w.stop();
}
