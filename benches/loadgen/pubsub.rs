//! The topic modes of the load generator (run by `benches/pubsub.sh`), against a server where a
//! client's request path is its topic and every message it sends reaches every subscriber of
//! that topic, the sender included (`wsloop --pubsub`, `node benches/uws_echo.js --pubsub`):
//!
//! - `broadcast`: N clients in one topic; each round every client sends one message, and the
//!   round ends when every client has received all N (uWebSockets' `broadcast_test`). Rounds per
//!   second; every client must get exactly one message from each client per round.
//! - `fanout`: S subscribers and one publisher in one topic; the publisher sends as fast as the
//!   subscribers keep up, with at most `--window` messages not yet received by everyone.
//!   Deliveries per second, and the latency of each delivery (from the publisher's write to
//!   the subscriber's read; p50, p99, p99.9); every subscriber (the publisher too) must get
//!   every message, in order. `--rate R` publishes at most R messages a second (latency at a
//!   given load); `--addr-b` puts the odd-numbered subscribers on a second instance that
//!   shares the topic (through Redis: `benches/redis.sh`), the publisher staying on `--addr`.
//!   Before its first message the publisher sends probes until every client has one, so that
//!   the run starts once the topic reaches every client on both instances.
//!
//! Every message carries its origin (round and sender, or sequence number), so a message
//! missing, duplicated, reordered or from the wrong round is an error: the run fails (exit
//! status 1, no RESULT line) rather than report a number. With `--metrics-addr`, wsloop's
//! `wsloop_deliveries_dropped_total` is read at the end and must be 0.
//!
//! As the echo mode: one thread, one edge-triggered `Poll`, one shared receive buffer, frames
//! parsed in place; nothing is allocated per message.

use super::{
    client_frame, errors_field, human, open_all, read_some, write_some, Client, Common, CpuWindow,
    St, MASK, RECV_BUF,
};
use clap::Args;
use hdrhistogram::Histogram;
use mio::{Events, Poll};
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// The largest payload of these modes: server frames have a 2-byte header.
const MAX_SIZE: usize = 125;

#[derive(Args, Debug)]
pub struct PubsubCommon {
    #[command(flatten)]
    pub common: Common,
    /// Message size in bytes (the first 8 or 12 carry the message's origin).
    #[arg(short = 's', long, default_value_t = 20)]
    size: usize,
    /// Seconds of load before measuring (fanout: and until the first window has reached every
    /// subscriber).
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Seconds measured (broadcast: at least; the window ends with a round).
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    /// Seconds without progress after which the run fails (a message lost stalls it).
    #[arg(long, default_value_t = 10.0)]
    stall_timeout: f64,
    /// wsloop's metrics address (repeated: one per instance): its
    /// `wsloop_deliveries_dropped_total` must stay 0.
    #[arg(long)]
    metrics_addr: Vec<SocketAddr>,
}

#[derive(Args, Debug)]
pub struct BroadcastArgs {
    #[command(flatten)]
    pub p: PubsubCommon,
    /// Clients in the topic.
    #[arg(short = 'n', long, default_value_t = 100)]
    connections: usize,
}

#[derive(Args, Debug)]
pub struct FanoutArgs {
    #[command(flatten)]
    pub p: PubsubCommon,
    /// Subscribers, besides the publisher (which is one too).
    #[arg(short = 'n', long, default_value_t = 10_000)]
    subscribers: usize,
    /// Most messages published and not yet received by every subscriber. Each subscriber has
    /// at most this many frames of the server's in flight, so a window of W frames of F bytes
    /// never exceeds a backpressure limit above W * F (1000 * 22 bytes < 64 KiB by default).
    #[arg(long, default_value_t = 1000)]
    window: usize,
    /// A second instance serving the same topic (sharing it through Redis: benches/redis.sh):
    /// the odd-numbered subscribers connect to it, the publisher and the others to `--addr`.
    #[arg(long)]
    addr_b: Option<SocketAddr>,
    /// Publish at most this many messages per second (0: as fast as the window allows), for
    /// latency at a given load rather than at saturation.
    #[arg(long, default_value_t = 0)]
    rate: u64,
}

/// The sequence number of a probe: the publisher sends one every [`PROBE_EVERY`] until every
/// client has received one, and only then its first message, so that the run starts once every
/// server on the way delivers the topic (a second instance subscribes to the topic's Redis
/// channel a few milliseconds after its first subscriber arrives). A probe after a message is
/// an error (one publisher's messages arrive in order).
const PROBE: u64 = u64::MAX;
const PROBE_EVERY: Duration = Duration::from_millis(50);

/// Incremental parser of the server's frames: binary, unmasked, `size` bytes of payload each.
struct Frames {
    carry: [u8; 2 + MAX_SIZE],
    have: usize,
}

impl Frames {
    fn new() -> Self {
        Frames {
            carry: [0; 2 + MAX_SIZE],
            have: 0,
        }
    }

    /// Feed `data`; `payload` is called with each complete frame's payload.
    fn feed(
        &mut self,
        mut data: &[u8],
        size: usize,
        mut payload: impl FnMut(&[u8]) -> Result<(), String>,
    ) -> Result<(), String> {
        let flen = 2 + size;
        if self.have > 0 {
            let take = (flen - self.have).min(data.len());
            self.carry[self.have..self.have + take].copy_from_slice(&data[..take]);
            self.have += take;
            data = &data[take..];
            check_head(&self.carry[..self.have], size)?;
            if self.have < flen {
                return Ok(());
            }
            self.have = 0;
            payload(&self.carry[2..flen])?;
        }
        while data.len() >= flen {
            check_head(&data[..2], size)?;
            payload(&data[2..flen])?;
            data = &data[flen..];
        }
        if !data.is_empty() {
            check_head(data, size)?;
            self.carry[..data.len()].copy_from_slice(data);
            self.have = data.len();
        }
        Ok(())
    }
}

/// The start of a frame (one or more bytes) is a final binary frame of `size` bytes.
fn check_head(b: &[u8], size: usize) -> Result<(), String> {
    match b {
        [0x82] => Ok(()),
        [0x82, len, ..] if *len as usize == size => Ok(()),
        [0x88, len, rest @ ..] => Err(match (*len, rest) {
            (0, _) => "server closed the connection (1005)".into(),
            (_, [a, b, ..]) => format!(
                "server closed the connection ({})",
                u16::from_be_bytes([*a, *b])
            ),
            _ => "server closed the connection".into(),
        }),
        [0x88] => Ok(()), // a close frame whose length is still to come: decided next time
        _ => Err(format!(
            "unexpected frame header {:02x?} (want 82 {size:02x})",
            &b[..b.len().min(2)]
        )),
    }
}

/// Read everything `cl` has now (until a short read), feeding `frames`.
fn drain(
    cl: &mut Client,
    frames: &mut Frames,
    buf: &mut [u8],
    size: usize,
    mut payload: impl FnMut(&[u8]) -> Result<(), String>,
) -> Result<(), String> {
    loop {
        match read_some(&mut cl.sock, buf) {
            Ok(None) => return Ok(()),
            Ok(Some(0)) => return Err("EOF".into()),
            Ok(Some(n)) => {
                frames.feed(&buf[..n], size, &mut payload)?;
                if n < buf.len() {
                    return Ok(());
                }
            }
            Err(e) => return Err(format!("read: {e}")),
        }
    }
}

/// The clients of one topic, with their poll, receive buffer and frame parsers.
struct Room {
    poll: Poll,
    events: Events,
    buf: Vec<u8>,
    clients: Vec<Client>,
    frames: Vec<Frames>,
}

/// Open `n` connections on the topic, client `i` to `addrs[i % addrs.len()]`; every one must
/// open.
fn open_topic(c: &Common, addrs: &[SocketAddr], n: usize) -> Result<Room, String> {
    let mut poll = Poll::new().map_err(|e| e.to_string())?;
    let mut events = Events::with_capacity(4096);
    let mut buf = vec![0u8; RECV_BUF];
    let t0 = Instant::now();
    let (clients, errors) =
        open_all(&mut poll, &mut events, c, addrs, n, &mut buf).map_err(|e| e.to_string())?;
    let open = clients.iter().filter(|cl| cl.st == St::Open).count();
    eprintln!(
        "[{}] {open}/{n} connections open on {} in {:.2} s",
        c.label,
        c.path,
        t0.elapsed().as_secs_f64()
    );
    if open < n {
        return Err(format!(
            "{} of {n} connections did not open:{}",
            n - open,
            errors_field(&errors)
        ));
    }
    Ok(Room {
        poll,
        events,
        buf,
        clients,
        frames: (0..n).map(|_| Frames::new()).collect(),
    })
}

/// A masked binary client frame of `size` payload bytes whose first `head` are zero (to be
/// rewritten with [`set_masked`]), its length, and where its payload starts.
fn frame_template(head: usize, size: usize) -> (Vec<u8>, usize, usize) {
    let frame = client_frame(2, &payload_with(&vec![0; head], size));
    let len = frame.len();
    (frame, len, len - size)
}

/// A message's payload: `size` bytes, the first ones `head`, then a pattern.
fn payload_with(head: &[u8], size: usize) -> Vec<u8> {
    let mut p: Vec<u8> = (0..size).map(|i| b'a' + (i % 26) as u8).collect();
    p[..head.len()].copy_from_slice(head);
    p
}

/// Overwrite payload bytes `at..at + bytes.len()` of the masked client frame `frame` (whose
/// payload starts at `start`).
fn set_masked(frame: &mut [u8], start: usize, at: usize, bytes: &[u8]) {
    for (j, b) in bytes.iter().enumerate() {
        frame[start + at + j] = b ^ MASK[(at + j) % 4];
    }
}

/// The server's `wsloop_deliveries_dropped_total`, summed over its reasons, from `/metrics`.
fn dropped_deliveries(addr: SocketAddr) -> Result<u64, String> {
    let t = Duration::from_secs(5);
    let mut s = std::net::TcpStream::connect_timeout(&addr, t).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(t)).map_err(|e| e.to_string())?;
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut text = String::new();
    s.read_to_string(&mut text).map_err(|e| e.to_string())?;
    if !text.starts_with("HTTP/1.1 200") {
        return Err(format!(
            "GET /metrics: {}",
            text.lines().next().unwrap_or("")
        ));
    }
    let mut found = false;
    let mut sum = 0.0;
    for line in text.lines() {
        if line.starts_with("wsloop_deliveries_dropped_total") {
            found = true;
            sum += line
                .rsplit(' ')
                .next()
                .and_then(|v| v.parse::<f64>().ok())
                .ok_or_else(|| format!("unreadable metric line: {line}"))?;
        }
    }
    if !found {
        return Err("no wsloop_deliveries_dropped_total in /metrics".into());
    }
    Ok(sum as u64)
}

/// Append `server_dropped` (with `--metrics-addr`: summed over the instances); an error if any
/// delivery was dropped.
fn check_dropped(p: &PubsubCommon, line: &mut String) -> Result<(), String> {
    if p.metrics_addr.is_empty() {
        return Ok(());
    }
    let mut dropped = 0;
    for addr in &p.metrics_addr {
        dropped += dropped_deliveries(*addr).map_err(|e| format!("metrics {addr}: {e}"))?;
    }
    let _ = write!(line, " server_dropped={dropped}");
    if dropped > 0 {
        return Err(format!(
            "the server dropped {dropped} deliveries (wsloop_deliveries_dropped_total)"
        ));
    }
    Ok(())
}

fn check_size(size: usize, head: usize) -> Result<(), String> {
    if !(head..=MAX_SIZE).contains(&size) {
        return Err(format!("--size must be {head}..={MAX_SIZE}"));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Broadcast.

/// One client of the broadcast.
#[derive(Clone, Copy)]
struct Member {
    /// Messages received this round, and the sum of their senders' indices.
    got: usize,
    senders: u64,
    /// Bytes of this round's frame not written yet.
    unsent: usize,
}

pub fn broadcast(a: BroadcastArgs) -> Result<(), String> {
    let p = &a.p;
    let c = &p.common;
    let n = a.connections;
    check_size(p.size, 12)?;
    if n == 0 {
        return Err("-n must be at least 1".into());
    }
    let mut room = open_topic(c, &[c.addr], n)?;

    // Client i's frame: round (8 bytes, rewritten each round), then i (4 bytes).
    let (template, flen, start) = frame_template(12, p.size);
    let mut out: Vec<u8> = template.repeat(n);
    for i in 0..n {
        set_masked(&mut out[i * flen..], start, 8, &(i as u32).to_le_bytes());
    }
    let mut members = vec![
        Member {
            got: 0,
            senders: 0,
            unsent: 0
        };
        n
    ];
    let want_senders = (n as u64) * (n as u64 - 1) / 2;
    let mut hist = Histogram::<u64>::new_with_bounds(1, 600_000_000_000, 3)
        .map_err(|e| format!("histogram: {e}"))?;
    let stall = Duration::from_secs_f64(p.stall_timeout);

    let t0 = Instant::now();
    let measure_at = t0 + Duration::from_secs_f64(p.warmup);
    let end_at = measure_at + Duration::from_secs_f64(p.duration);
    let mut measured: Option<(Instant, u64, CpuWindow)> = None;
    let mut round: u64 = 0;
    let mut finished = 0usize;
    let mut round_start = Instant::now();
    let mut last_progress = round_start;

    // Each round: every client sends its frame, then reads until all have all n.
    let start_round = |round: u64,
                       clients: &mut [Client],
                       members: &mut [Member],
                       out: &mut [u8]|
     -> Result<(), String> {
        for (i, (cl, m)) in clients.iter_mut().zip(members.iter_mut()).enumerate() {
            let frame = &mut out[i * flen..(i + 1) * flen];
            set_masked(frame, start, 0, &round.to_le_bytes());
            *m = Member {
                got: 0,
                senders: 0,
                unsent: flen,
            };
            let w = write_some(&mut cl.sock, frame).map_err(|e| format!("client {i}: {e}"))?;
            m.unsent -= w;
        }
        Ok(())
    };
    start_round(round, &mut room.clients, &mut members, &mut out)?;

    loop {
        let now = Instant::now();
        if now.duration_since(last_progress) > stall {
            let short = members.iter().filter(|m| m.got < n).count();
            let missing: usize = members.iter().map(|m| n - m.got.min(n)).sum();
            return Err(format!(
                "round {round} stalled for {:.1} s: {short} clients are missing {missing} messages",
                stall.as_secs_f64()
            ));
        }
        room.poll
            .poll(&mut room.events, Some(Duration::from_millis(100)))
            .map_err(|e| e.to_string())?;
        for ev in room.events.iter() {
            let (i, _) = super::split_token(ev.token());
            let (cl, m) = (&mut room.clients[i], &mut members[i]);
            if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
                let before = m.got;
                drain(cl, &mut room.frames[i], &mut room.buf, p.size, |pl| {
                    let r = u64::from_le_bytes(pl[..8].try_into().expect("8 bytes"));
                    let s = u32::from_le_bytes(pl[8..12].try_into().expect("4 bytes"));
                    if r != round || s as usize >= n {
                        return Err(format!(
                            "a message of round {r} from client {s} in round {round}"
                        ));
                    }
                    m.got += 1;
                    m.senders += s as u64;
                    if m.got > n {
                        return Err(format!("more than {n} messages in round {round}"));
                    }
                    Ok(())
                })
                .map_err(|e| format!("client {i}: {e}"))?;
                if m.got > before {
                    last_progress = Instant::now();
                    if m.got == n {
                        if m.senders != want_senders {
                            return Err(format!(
                                "client {i}: {n} messages in round {round} but not one from each client"
                            ));
                        }
                        finished += 1;
                    }
                }
            }
            if ev.is_writable() && m.unsent > 0 {
                let frame = &out[(i + 1) * flen - m.unsent..(i + 1) * flen];
                m.unsent -=
                    write_some(&mut cl.sock, frame).map_err(|e| format!("client {i}: {e}"))?;
            }
        }
        if finished < n {
            continue;
        }
        // The round is complete.
        let now = Instant::now();
        if measured.is_some() {
            let _ = hist.record((now.duration_since(round_start).as_nanos() as u64).max(1));
        }
        round += 1;
        finished = 0;
        match &mut measured {
            None if now >= measure_at => {
                measured = Some((now, round, CpuWindow::start(c.server_pid)));
            }
            Some((from, r0, cpu)) if now >= end_at => {
                let rounds = round - *r0;
                let wall = now.duration_since(*from).as_secs_f64();
                let deliveries = rounds * (n as u64) * (n as u64);
                let mut line = format!(
                    "RESULT mode=broadcast server={} n={n} size={} rounds={rounds} seconds={wall:.2} rounds_per_s={:.1} deliveries_per_s={:.0} round_p50_ms={:.3} round_p99_ms={:.3} errors=0",
                    c.label,
                    p.size,
                    rounds as f64 / wall,
                    deliveries as f64 / wall,
                    hist.value_at_quantile(0.5) as f64 / 1e6,
                    hist.value_at_quantile(0.99) as f64 / 1e6,
                );
                cpu.finish_over(deliveries, wall, &mut line);
                check_dropped(p, &mut line)?;
                println!("{line}");
                eprintln!("[{}] {}", c.label, human(&line));
                return Ok(());
            }
            _ => {}
        }
        round_start = now;
        last_progress = now;
        start_round(round, &mut room.clients, &mut members, &mut out)?;
    }
}

// ---------------------------------------------------------------------------------------------
// Fan-out.

pub fn fanout(a: FanoutArgs) -> Result<(), String> {
    let p = &a.p;
    let c = &p.common;
    check_size(p.size, 8)?;
    let window = a.window.max(1) as u64;
    // Client 0 publishes; every client, the publisher included, receives.
    let total = a.subscribers + 1;
    let addrs: Vec<SocketAddr> = [Some(c.addr), a.addr_b].into_iter().flatten().collect();
    let mut room = open_topic(c, &addrs, total)?;

    let (template, flen, start) = frame_template(8, p.size);
    // The publisher's output: up to `window` frames, rewritten with their sequence numbers.
    let mut out: Vec<u8> = template.repeat(window as usize);
    let (mut out_from, mut out_to) = (0usize, 0usize);
    // Per client, the sequence number it expects next.
    let mut expect = vec![0u64; total];
    // Per message not yet received by everyone (by sequence number modulo the ring): how many
    // clients have received it, and when it was handed to the publisher's socket.
    let ring_len = (window as usize + 1).next_power_of_two();
    let mut ring = vec![0u32; ring_len];
    let mut sent_at = vec![Instant::now(); ring_len];
    let ring_mask = ring_len as u64 - 1;
    let (mut sent, mut done) = (0u64, 0u64);
    let stall = Duration::from_secs_f64(p.stall_timeout);
    // Latency of each delivery measured: from the publisher's write to the subscriber's read.
    let mut hist = Histogram::<u64>::new_with_bounds(1, 600_000_000_000, 3)
        .map_err(|e| format!("histogram: {e}"))?;

    // Probes until every client has one (see PROBE); then the messages, from `begun`.
    let mut probed = vec![false; total];
    let mut unprobed = total;
    let mut next_probe = Instant::now();
    let mut begun: Option<Instant> = None;
    // (when, deliveries and publications so far, the server's CPU then)
    let mut measuring: Option<(Instant, u64, u64, CpuWindow)> = None;
    let mut result: Option<String> = None;
    let mut received: u64 = 0;
    let mut last_progress = Instant::now();
    let mut publishing = true;

    loop {
        let now = Instant::now();
        let mut wait = Duration::from_millis(100);
        let Some(t0) = begun else {
            if unprobed == 0 {
                begun = Some(now);
                last_progress = now;
                continue;
            }
            if now.duration_since(last_progress) > stall {
                return Err(format!(
                    "{unprobed} of {total} clients received no probe within {:.1} s (the topic does not reach them)",
                    stall.as_secs_f64()
                ));
            }
            if out_from == out_to && now >= next_probe {
                set_masked(&mut out, start, 0, &PROBE.to_le_bytes());
                (out_from, out_to) = (0, flen);
                next_probe = now + PROBE_EVERY;
            }
            if out_from < out_to {
                out_from += write_some(&mut room.clients[0].sock, &out[out_from..out_to])
                    .map_err(|e| format!("publisher: {e}"))?;
            }
            room.poll
                .poll(&mut room.events, Some(PROBE_EVERY))
                .map_err(|e| e.to_string())?;
            for ev in room.events.iter() {
                let (i, _) = super::split_token(ev.token());
                if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
                    drain(
                        &mut room.clients[i],
                        &mut room.frames[i],
                        &mut room.buf,
                        p.size,
                        |pl| match u64::from_le_bytes(pl[..8].try_into().expect("8 bytes")) {
                            PROBE => Ok(()),
                            seq => Err(format!("message {seq} before any was published")),
                        },
                    )
                    .map_err(|e| format!("client {i}: {e}"))?;
                    if !probed[i] {
                        probed[i] = true;
                        unprobed -= 1;
                    }
                }
            }
            continue;
        };
        // Measured from the end of the warm-up, once the first window has reached everyone (the
        // burst that fills it is no steady state).
        let measure_at = t0 + Duration::from_secs_f64(p.warmup);
        if measuring.is_none() && result.is_none() && now >= measure_at && done >= window {
            measuring = Some((now, received, sent, CpuWindow::start(c.server_pid)));
        }
        let end = measuring
            .as_ref()
            .map(|m| m.0 + Duration::from_secs_f64(p.duration));
        if publishing && end.is_some_and(|end| now >= end) {
            publishing = false;
            let (from, r0, s0, cpu) = measuring.take().expect("measuring");
            let wall = now.duration_since(from).as_secs_f64();
            let deliveries = received - r0;
            let us = |q: f64| hist.value_at_quantile(q) as f64 / 1e3;
            let mut line = format!(
                "RESULT mode=fanout server={} n={} size={} window={window} rate={} seconds={wall:.2} published={} deliveries={deliveries} deliveries_per_s={:.0} published_per_s={:.0} p50_us={:.1} p99_us={:.1} p999_us={:.1} errors=0",
                c.label,
                a.subscribers,
                p.size,
                a.rate,
                sent - s0,
                deliveries as f64 / wall,
                (sent - s0) as f64 / wall,
                us(0.5),
                us(0.99),
                us(0.999),
            );
            cpu.finish_over(deliveries, wall, &mut line);
            result = Some(line);
        }
        if !publishing && done == sent && out_from == out_to {
            break;
        }
        if now.duration_since(last_progress) > stall {
            let behind = expect.iter().filter(|&&e| e < sent).count();
            let least = expect.iter().min().copied().unwrap_or(0);
            return Err(format!(
                "stalled for {:.1} s: {behind} of {total} clients have not received all {sent} messages (the furthest behind expects message {least})",
                stall.as_secs_f64()
            ));
        }
        // Publish what the window (and the rate) allows, once the previous batch is written.
        if publishing && out_from == out_to && sent < done + window {
            let mut k = done + window - sent;
            if a.rate > 0 {
                let due = (now.duration_since(t0).as_secs_f64() * a.rate as f64) as u64 + 1;
                k = k.min(due.saturating_sub(sent));
                if k == 0 {
                    let next = t0 + Duration::from_secs_f64(sent as f64 / a.rate as f64);
                    wait = wait.min(next.saturating_duration_since(now));
                }
            }
            let k = k as usize;
            for j in 0..k {
                let seq = sent + j as u64;
                set_masked(&mut out[j * flen..], start, 0, &seq.to_le_bytes());
                sent_at[(seq & ring_mask) as usize] = now;
            }
            sent += k as u64;
            (out_from, out_to) = (0, k * flen);
        }
        if out_from < out_to {
            out_from += write_some(&mut room.clients[0].sock, &out[out_from..out_to])
                .map_err(|e| format!("publisher: {e}"))?;
        }
        room.poll
            .poll(&mut room.events, Some(wait))
            .map_err(|e| e.to_string())?;
        let now = Instant::now();
        let record = measuring.is_some();
        for ev in room.events.iter() {
            let (i, _) = super::split_token(ev.token());
            if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
                let before = expect[i];
                let e = &mut expect[i];
                // The messages of one batch were sent at one time: one histogram entry for a
                // run of them (`record_n`), not one per message.
                let mut run: Option<(Instant, u64)> = None;
                let mut flush = |run: Option<(Instant, u64)>| {
                    if let (true, Some((at, n))) = (record, run) {
                        let ns = now.duration_since(at).as_nanos() as u64;
                        let _ = hist.record_n(ns.max(1), n);
                    }
                };
                drain(
                    &mut room.clients[i],
                    &mut room.frames[i],
                    &mut room.buf,
                    p.size,
                    |pl| {
                        let seq = u64::from_le_bytes(pl[..8].try_into().expect("8 bytes"));
                        if seq == PROBE && *e == 0 {
                            return Ok(()); // a late probe, before the first message
                        }
                        if seq != *e {
                            return Err(format!(
                                "message {seq} instead of {} (missing, duplicated or reordered)",
                                *e
                            ));
                        }
                        *e += 1;
                        let slot = (seq & ring_mask) as usize;
                        ring[slot] += 1;
                        match &mut run {
                            Some((at, n)) if *at == sent_at[slot] => *n += 1,
                            other => flush(other.replace((sent_at[slot], 1))),
                        }
                        Ok(())
                    },
                )
                .map_err(|e| format!("client {i}: {e}"))?;
                flush(run);
                if expect[i] > before {
                    received += expect[i] - before;
                    last_progress = Instant::now();
                }
            }
            // The publisher's output goes on at the top of the loop.
        }
        while done < sent && ring[(done & ring_mask) as usize] == total as u32 {
            ring[(done & ring_mask) as usize] = 0;
            done += 1;
        }
    }
    let mut line = result.expect("measured");
    let _ = write!(line, " verified={done}");
    check_dropped(p, &mut line)?;
    println!("{line}");
    eprintln!("[{}] {}", c.label, human(&line));
    drop(room);
    Ok(())
}
