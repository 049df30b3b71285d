//! WebSocket load generator for `benches/compare.sh`, modelled on uWebSockets' own load test.
//!
//! One process, one thread, one mio `Poll` (edge-triggered), so that it costs about as little per
//! message as the server it measures: every client frame is built and masked once up front and
//! only re-sent, server frames are parsed without copying, and one `recv` drains a socket
//! (a short read means drained; a later arrival raises a new edge).
//!
//! Modes (all against 127.0.0.1-style addresses given with `--addr`; every run is bounded in time):
//!
//! - `echo`: N connections; each sends a message of S bytes and waits for its echo, or keeps K
//!   in flight (`--pipeline K`). After `--warmup` seconds it measures for `--duration` seconds
//!   (or exactly `--count` echoes, for profiling runs): echoes per second, latency p50, p99
//!   and p99.9 (hdrhistogram), errors, and, with `--server-pid`, the server's user and system
//!   CPU per echo from `/proc/<pid>/stat`.
//! - `handshake`: C concurrent cycles of connect, upgrade, close handshake; cycles per second.
//! - `idle`: opens N connections, waits, and reports the server's RSS growth per connection
//!   (`/proc/<pid>/status` VmRSS with the connections held, minus before, divided by N).
//! - `broadcast` and `fanout`: the topic rows of `benches/pubsub.sh` (see `loadgen/pubsub.rs`):
//!   N clients of one topic each sending one message per round (rounds per second), and one
//!   publisher with S subscribers (deliveries per second); every message is verified.
//! - `report FILE...`: reads `RESULT` lines written by the other modes (with a `server=` label)
//!   and prints Markdown tables of medians and of the ratio wsloop/peer per row.
//!
//! With `--tls-ca FILE` the echo, handshake and idle modes speak wss:// (rustls with the `ring`
//! provider, trusting the CA certificates in FILE, a full handshake per connection; see
//! `loadgen/tls.rs`) and their RESULT lines say `tls=VERSION`; plain connections pay one branch
//! per read or write call for it.
//!
//! Each measuring mode prints one line `RESULT key=value ...` on stdout and a readable summary
//! on stderr. Run by `cargo bench` (with `--bench`), it does nothing and exits.
// Benchmark code (see Cargo.toml's [lints]): it stops on the first error, and opens descriptors on purpose.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

#[path = "../tests/rlimit_support/mod.rs"]
mod rlimit_support;

use clap::{Args, Parser, Subcommand};
use hdrhistogram::Histogram;
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;
use std::io::{self, ErrorKind, Read, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

// Not benches/pubsub.rs, which cargo would take for a bench target of its own.
#[path = "loadgen/pubsub.rs"]
mod pubsub;

// permessage-deflate for echo and idle (`--deflate`), and the JSON message (`--json`).
#[path = "loadgen/deflate.rs"]
mod deflate;

// wss:// (`--tls-ca`): rustls's client connection under `Client`.
#[path = "loadgen/tls.rs"]
mod tls;

/// The fixed `Sec-WebSocket-Key` of every client (RFC 6455's example) and its accept value.
const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
const ACCEPT: &[u8] = b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";
/// The masking key of every client frame (non-zero, so servers do real unmasking work).
const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];
/// Receive buffer, shared by all connections.
const RECV_BUF: usize = 256 * 1024;
/// Largest response head accepted for the upgrade.
const MAX_HEAD: usize = 4096;

#[derive(Parser, Debug)]
#[command(about = "WebSocket load generator for wsloop's benchmarks (see benches/compare.sh)")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Echo load: N connections, messages of S bytes, K in flight per connection.
    Echo(EchoArgs),
    /// Handshake rate: concurrent cycles of connect, upgrade, close.
    Handshake(HandshakeArgs),
    /// Idle memory: hold N upgraded connections and report the server's RSS per connection.
    Idle(IdleArgs),
    /// Topics: N clients in one topic, each sending one message per round; rounds per second.
    Broadcast(pubsub::BroadcastArgs),
    /// Topics: one publisher and N subscribers in one topic; deliveries per second.
    Fanout(pubsub::FanoutArgs),
    /// Summarise RESULT lines (files written by compare.sh) as Markdown tables.
    Report {
        /// Files with RESULT lines.
        files: Vec<String>,
        /// The server the others are compared with.
        #[arg(long, default_value = "wsloop")]
        base: String,
    },
}

#[derive(Args, Debug, Clone)]
struct Common {
    /// Server address (loopback only).
    #[arg(long, default_value = "127.0.0.1:9001")]
    addr: SocketAddr,
    /// Request path of the upgrade.
    #[arg(long, default_value = "/")]
    path: String,
    /// The server's process id: CPU time (/proc/PID/stat) and RSS (/proc/PID/status).
    #[arg(long)]
    server_pid: Option<u32>,
    /// Label of the server in the RESULT line.
    #[arg(long, default_value = "unknown")]
    label: String,
    /// Most connections in the middle of connect + upgrade at once.
    #[arg(long, default_value_t = 256)]
    connect_batch: usize,
    /// Seconds allowed for opening all connections.
    #[arg(long, default_value_t = 60.0)]
    setup_timeout: f64,
    /// wss://: speak TLS (rustls, ring; full handshakes, no resumption) and trust the CA
    /// certificates in this PEM file (echo, handshake and idle modes).
    #[arg(long)]
    tls_ca: Option<PathBuf>,
    /// With --tls-ca: the server name sent (SNI) and checked in its certificate.
    #[arg(long, default_value = "localhost")]
    tls_name: String,
}

#[derive(Args, Debug)]
struct EchoArgs {
    #[command(flatten)]
    common: Common,
    /// Connections.
    #[arg(short = 'n', long, default_value_t = 100)]
    connections: usize,
    /// Message size in bytes.
    #[arg(short = 's', long, default_value_t = 20)]
    size: usize,
    /// Messages in flight per connection.
    #[arg(short = 'k', long, default_value_t = 1)]
    pipeline: usize,
    /// Seconds of load before measuring.
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Seconds measured.
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    /// Instead of a duration: send exactly this many messages in total (no warm-up), wait for
    /// their echoes, and stop (for callgrind and strace runs).
    #[arg(long)]
    count: Option<u64>,
    /// Send text frames (the server validates UTF-8) instead of binary ones.
    #[arg(long)]
    text: bool,
    /// The message is a deterministic JSON document of at least S bytes (a chat timeline
    /// update; it compresses about 3x), sent as text, instead of a repeating a-z pattern.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    deflate: deflate::DeflateArgs,
    /// Do not compare echoed payloads with what was sent (lengths and opcodes are still checked).
    #[arg(long)]
    no_verify: bool,
    /// Client threads, each with its own poll and an equal share of the connections (for
    /// servers on several cores).
    #[arg(long, default_value_t = 1)]
    threads: usize,
}

#[derive(Args, Debug)]
struct HandshakeArgs {
    #[command(flatten)]
    common: Common,
    /// Cycles in progress at once.
    #[arg(short = 'c', long, default_value_t = 50)]
    concurrency: usize,
    /// Seconds of cycles before measuring.
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Seconds measured.
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
}

#[derive(Args, Debug)]
struct IdleArgs {
    #[command(flatten)]
    common: Common,
    /// Connections held.
    #[arg(short = 'n', long, default_value_t = 10000)]
    connections: usize,
    /// Seconds to wait with the connections open before reading the server's RSS.
    #[arg(long, default_value_t = 2.0)]
    settle: f64,
    #[command(flatten)]
    deflate: deflate::DeflateArgs,
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--bench") {
        // `cargo bench` runs every bench target with --bench: this one needs a server.
        println!("loadgen: nothing to do under `cargo bench`; benches/compare.sh runs it");
        return ExitCode::SUCCESS;
    }
    let cli = Cli::parse();
    if !matches!(cli.cmd, Cmd::Report { .. }) {
        // Each connection is a descriptor: take the hard limit (20000 here) for 10000 of them.
        if let Err(e) = rlimit_support::raise_nofile_limit() {
            eprintln!("loadgen: cannot raise RLIMIT_NOFILE: {e}");
        }
    }
    let result = match cli.cmd {
        Cmd::Broadcast(pubsub::BroadcastArgs { ref p, .. })
        | Cmd::Fanout(pubsub::FanoutArgs { ref p, .. })
            if p.common.tls_ca.is_some() =>
        {
            Err("--tls-ca: the topic modes speak plain ws:// only".into())
        }
        Cmd::Echo(a) => echo(a),
        Cmd::Handshake(a) => handshake(a),
        Cmd::Idle(a) => idle(a),
        Cmd::Broadcast(a) => pubsub::broadcast(a),
        Cmd::Fanout(a) => pubsub::fanout(a),
        Cmd::Report { files, base } => report(&files, &base),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("loadgen: {e}");
            ExitCode::FAILURE
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Measurements of the server process and of ourselves.

/// Server CPU time so far (user, system) in seconds, from /proc/PID/stat.
fn proc_cpu(pid: u32) -> Option<(f64, f64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest[0] is field 3 (state); utime and stime are fields 14 and 15.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    let hz = rustix::param::clock_ticks_per_second() as f64;
    Some((utime / hz, stime / hz))
}

/// Server CPU time so far in seconds, user and system together, to the nanosecond: the sum of
/// /proc/PID/task/*/schedstat (utime and stime in /proc/PID/stat only count 10 ms ticks).
fn proc_cpu_precise(pid: u32) -> Option<f64> {
    let mut ns: u64 = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .ok()?
        .flatten()
    {
        let stat = std::fs::read_to_string(task.path().join("schedstat")).ok()?;
        ns += stat.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(ns as f64 / 1e9)
}

/// Server resident set size in KiB (VmRSS from /proc/PID/status).
fn proc_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// Our own CPU time so far (user + system, all threads) in seconds.
fn self_cpu() -> f64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ProcessCPUTime);
    t.tv_sec as f64 + t.tv_nsec as f64 / 1e9
}

/// CPU of the server and of the load generator over one measured window.
struct CpuWindow {
    pid: Option<u32>,
    server0: Option<(f64, f64)>,
    precise0: Option<f64>,
    self0: f64,
    t0: Instant,
}

impl CpuWindow {
    fn start(pid: Option<u32>) -> Self {
        CpuWindow {
            pid,
            server0: pid.and_then(proc_cpu),
            precise0: pid.and_then(proc_cpu_precise),
            self0: self_cpu(),
            t0: Instant::now(),
        }
    }

    /// Append server_user_s, server_sys_s, server_cpu_pct, per-op µs (from schedstat; from
    /// /proc/PID/stat: user, system, both) and client_cpu_pct.
    fn finish(&self, ops: u64, out: &mut String) {
        self.finish_over(ops, self.t0.elapsed().as_secs_f64(), out);
    }

    /// As [`CpuWindow::finish`], with percentages over `wall` seconds.
    fn finish_over(&self, ops: u64, wall: f64, out: &mut String) {
        let client = self_cpu() - self.self0;
        if let (Some(c0), Some(c1)) = (self.precise0, self.pid.and_then(proc_cpu_precise)) {
            let _ = write!(
                out,
                " server_cpu_us_per_op={:.3}",
                (c1 - c0) * 1e6 / ops.max(1) as f64
            );
        }
        if let (Some((u0, s0)), Some((u1, s1))) = (self.server0, self.pid.and_then(proc_cpu)) {
            let (u, s) = (u1 - u0, s1 - s0);
            let per = |x: f64| x * 1e6 / ops.max(1) as f64;
            let _ = write!(
                out,
                " server_user_s={u:.2} server_sys_s={s:.2} server_cpu_pct={:.0} server_user_us_per_op={:.3} server_sys_us_per_op={:.3} server_stat_us_per_op={:.3}",
                (u + s) * 100.0 / wall,
                per(u),
                per(s),
                per(u + s)
            );
        }
        let _ = write!(out, " client_cpu_pct={:.0}", client * 100.0 / wall);
    }
}

// ---------------------------------------------------------------------------------------------
// Connections.

/// Where a client connection is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum St {
    /// `connect` in progress.
    Connecting,
    /// Upgrade request (partly) written, waiting for the 101.
    Upgrading,
    /// Upgraded.
    Open,
    /// Close frame sent, waiting for the server's (handshake mode).
    Closing,
    /// Finished or failed; the socket is gone or about to be.
    Dead,
}

/// Incremental parser of server frames (unmasked) that expects data frames of one opcode and
/// length, optionally checking the payload against the pattern that was sent.
#[derive(Default)]
struct Rx {
    hdr: [u8; 10],
    hdr_len: usize,
    /// Payload bytes still to come in the current frame (`None`: between frames).
    remaining: Option<usize>,
    /// Offset of the next payload byte within the frame.
    off: usize,
    /// The opcode of the frame being read.
    op: u8,
}

/// What one frame or the end of the input brought.
enum RxError {
    Protocol(String),
    Closed(u16),
}

impl Rx {
    /// Consume `data`; returns how many complete frames of `want_op` and `want_len` it ended.
    /// A close frame from the server ends with `RxError::Closed` (its code, 1005 when none).
    fn feed(
        &mut self,
        mut data: &[u8],
        want_op: u8,
        want_len: usize,
        pattern: Option<&[u8]>,
    ) -> Result<u64, RxError> {
        let mut done = 0;
        while !data.is_empty() {
            let Some(remaining) = self.remaining else {
                let take = (10 - self.hdr_len).min(data.len());
                self.hdr[self.hdr_len..self.hdr_len + take].copy_from_slice(&data[..take]);
                let have = self.hdr_len + take;
                let Some((fin, op, len, hlen)) = parse_server_header(&self.hdr[..have])? else {
                    self.hdr_len = have;
                    data = &data[take..];
                    continue;
                };
                // `hlen` bytes of `hdr` are the header; the rest came from `data` too early.
                data = &data[hlen - self.hdr_len..];
                self.hdr_len = 0;
                if op == 8 {
                    self.op = 8;
                    self.off = 0;
                    self.remaining = Some(len);
                    if len == 0 {
                        return Err(RxError::Closed(1005));
                    }
                    continue;
                }
                if !fin || op != want_op || len != want_len {
                    return Err(RxError::Protocol(format!(
                        "unexpected frame: fin {fin} opcode {op} length {len} (want {want_op}, {want_len})"
                    )));
                }
                self.op = op;
                self.off = 0;
                if len == 0 {
                    done += 1;
                } else {
                    self.remaining = Some(len);
                }
                continue;
            };
            let take = remaining.min(data.len());
            let piece = &data[..take];
            if self.op == 8 {
                // Close payload: the code is its first two bytes.
                let code = match (self.off, piece) {
                    (0, [a, b, ..]) => u16::from_be_bytes([*a, *b]),
                    _ => 1005,
                };
                return Err(RxError::Closed(code));
            }
            if let Some(p) = pattern {
                if piece != &p[self.off..self.off + take] {
                    return Err(RxError::Protocol("echoed payload differs".into()));
                }
            }
            self.off += take;
            data = &data[take..];
            if take == remaining {
                self.remaining = None;
                done += 1;
            } else {
                self.remaining = Some(remaining - take);
            }
        }
        Ok(done)
    }
}

/// (fin, opcode, payload length, header length) of a server frame at the start of `b`, `None`
/// if `b` is too short.
#[allow(clippy::type_complexity)]
fn parse_server_header(b: &[u8]) -> Result<Option<(bool, u8, usize, usize)>, RxError> {
    if b.len() < 2 {
        return Ok(None);
    }
    if b[1] & 0x80 != 0 {
        return Err(RxError::Protocol("masked server frame".into()));
    }
    let fin = b[0] & 0x80 != 0;
    let op = b[0] & 0x0f;
    Ok(match b[1] & 0x7f {
        126 if b.len() >= 4 => Some((fin, op, u16::from_be_bytes([b[2], b[3]]) as usize, 4)),
        127 if b.len() >= 10 => {
            let len = u64::from_be_bytes(b[2..10].try_into().expect("8 bytes"));
            Some((fin, op, len as usize, 10))
        }
        126 | 127 => None,
        n => Some((fin, op, n as usize, 2)),
    })
}

/// One masked client frame carrying `payload`.
fn client_frame(op: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0x80 | op];
    match payload.len() {
        n if n < 126 => f.push(0x80 | n as u8),
        n if n <= 0xffff => {
            f.push(0x80 | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(0x80 | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    f.extend_from_slice(&MASK);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ MASK[i % 4]));
    f
}

fn upgrade_request(c: &Common) -> Vec<u8> {
    upgrade_request_offering(c, None)
}

/// The upgrade request, with a `Sec-WebSocket-Extensions` offer if `extensions` is given.
fn upgrade_request_offering(c: &Common, extensions: Option<&str>) -> Vec<u8> {
    let ext = extensions
        .map(|e| format!("Sec-WebSocket-Extensions: {e}\r\n"))
        .unwrap_or_default();
    format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n{ext}\r\n",
        c.path, c.addr
    )
    .into_bytes()
}

/// Check a complete response head: `HTTP/1.1 101` with our accept key.
fn check_101(head: &[u8]) -> Result<(), String> {
    let line_end = head.iter().position(|&b| b == b'\r').unwrap_or(head.len());
    let status = String::from_utf8_lossy(&head[..line_end]);
    if !status.starts_with("HTTP/1.1 101") {
        return Err(format!("upgrade refused: {status}"));
    }
    if !head.windows(ACCEPT.len()).any(|w| w == ACCEPT) {
        return Err("wrong Sec-WebSocket-Accept".into());
    }
    Ok(())
}

/// One `send`; `Ok(0)` when the socket would block.
fn write_some(sock: &mut TcpStream, bytes: &[u8]) -> io::Result<usize> {
    loop {
        match sock.write(bytes) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(0),
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}

/// One `recv`; `Ok(None)` when the socket would block, `Ok(Some(0))` at EOF.
fn read_some(sock: &mut TcpStream, buf: &mut [u8]) -> io::Result<Option<usize>> {
    loop {
        match sock.read(buf) {
            Ok(n) => return Ok(Some(n)),
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(None),
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}

/// A connection being opened or open.
struct Client {
    sock: TcpStream,
    /// wss://: rustls's connection over `sock` (boxed: a plain connection pays a pointer, and
    /// one branch per read or write call).
    tls: Option<Box<rustls::ClientConnection>>,
    st: St,
    /// Bytes of the upgrade request written so far.
    req_off: usize,
    /// The response head as it arrives.
    head: Vec<u8>,
    rx: Rx,
    /// Output: `unsent` bytes of the periodic frame stream, starting `phase` bytes into a frame.
    unsent: usize,
    phase: usize,
    /// When each message in flight was queued, oldest first.
    sent_at: VecDeque<Instant>,
    /// The connection has been counted as finished (failed or closed).
    counted: bool,
}

impl Client {
    /// Start connecting to `addr` (over TLS with `tls`).
    fn connect(
        addr: SocketAddr,
        poll: &Poll,
        token: Token,
        tls: Option<&tls::Tls>,
    ) -> io::Result<Client> {
        let tls = tls.map(tls::Tls::connection).transpose()?;
        let mut sock = TcpStream::connect(addr)?;
        // As the servers do: no Nagle delay for small frames (pipelined mode would stall on
        // delayed ACKs otherwise).
        sock.set_nodelay(true)?;
        poll.registry()
            .register(&mut sock, token, Interest::READABLE | Interest::WRITABLE)?;
        Ok(Client {
            sock,
            tls,
            st: St::Connecting,
            req_off: 0,
            head: Vec::new(),
            rx: Rx::default(),
            unsent: 0,
            phase: 0,
            sent_at: VecDeque::new(),
            counted: false,
        })
    }

    /// [`read_some`] on the connection (decrypted bytes under TLS).
    #[inline]
    fn read_some(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        match self.tls.as_deref_mut() {
            None => read_some(&mut self.sock, buf),
            Some(conn) => tls::read(conn, &mut self.sock, buf),
        }
    }

    /// [`write_some`] on the connection (under TLS: the plaintext rustls took).
    #[inline]
    fn write_some(&mut self, bytes: &[u8]) -> io::Result<usize> {
        match self.tls.as_deref_mut() {
            None => write_some(&mut self.sock, bytes),
            Some(conn) => tls::write(conn, &mut self.sock, bytes),
        }
    }

    /// TLS: rustls holds ciphertext the socket has not taken yet. False for plain connections.
    #[inline]
    fn tls_holds(&self) -> bool {
        self.tls.as_ref().is_some_and(|c| c.wants_write())
    }

    /// TLS: write what rustls holds, as far as the socket takes it.
    fn tls_flush(&mut self) -> io::Result<()> {
        match self.tls.as_deref_mut() {
            None => Ok(()),
            Some(conn) => tls::flush(conn, &mut self.sock).map(|_| ()),
        }
    }

    /// The TLS version in use ("1.3"), `None` for plain connections.
    fn tls_version(&self) -> Option<&'static str> {
        self.tls.as_deref().and_then(tls::version)
    }

    /// Drive connect and upgrade on an event. Returns Ok(true) once the connection is open;
    /// `leftover` receives bytes that followed the 101 head.
    fn drive_upgrade(
        &mut self,
        request: &[u8],
        buf: &mut [u8],
        leftover: &mut Vec<u8>,
    ) -> Result<bool, String> {
        if self.st == St::Connecting {
            if let Some(e) = self.sock.take_error().map_err(|e| e.to_string())? {
                return Err(format!("connect: {e}"));
            }
            match self.sock.peer_addr() {
                Ok(_) => self.st = St::Upgrading,
                Err(e) if e.kind() == ErrorKind::NotConnected => return Ok(false),
                Err(e) => return Err(format!("connect: {e}")),
            }
        }
        // TLS: the ClientHello, the handshake's answers and the request, as the socket takes them.
        self.tls_flush().map_err(|e| format!("TLS write: {e}"))?;
        if self.req_off < request.len() {
            let n = self
                .write_some(&request[self.req_off..])
                .map_err(|e| format!("write upgrade: {e}"))?;
            self.req_off += n;
            if self.req_off < request.len() {
                return Ok(false);
            }
        }
        loop {
            match self.read_some(buf).map_err(|e| format!("read 101: {e}"))? {
                None => return Ok(false),
                Some(0) => return Err("EOF before the upgrade response".into()),
                Some(n) => {
                    self.head.extend_from_slice(&buf[..n]);
                    if let Some(end) = self.head.windows(4).position(|w| w == b"\r\n\r\n") {
                        check_101(&self.head[..end + 4])?;
                        leftover.clear();
                        leftover.extend_from_slice(&self.head[end + 4..]);
                        // The head stays for a caller that reads its headers (open_all_with).
                        self.head.truncate(end + 4);
                        self.st = St::Open;
                        return Ok(true);
                    }
                    if self.head.len() > MAX_HEAD {
                        return Err("upgrade response head too long".into());
                    }
                }
            }
        }
    }
}

impl Drop for Client {
    /// TLS: our `close_notify` before the socket closes, as a well-behaved client sends it.
    fn drop(&mut self) {
        if let Some(conn) = self.tls.as_deref_mut() {
            tls::close_notify(conn, &mut self.sock);
        }
    }
}

fn token_of(i: usize, gen: u32) -> Token {
    Token(i | (gen as usize) << 32)
}

fn split_token(t: Token) -> (usize, u32) {
    (t.0 & 0xffff_ffff, (t.0 >> 32) as u32)
}

/// Open `n` connections (at most `batch` in progress at once), client `i` to
/// `addrs[i % addrs.len()]`. Returns the clients (failed ones are `Dead`) and the errors by kind.
fn open_all(
    poll: &mut Poll,
    events: &mut Events,
    c: &Common,
    addrs: &[SocketAddr],
    n: usize,
    buf: &mut [u8],
) -> io::Result<(Vec<Client>, BTreeMap<String, u64>)> {
    let request = upgrade_request(c);
    open_all_with(poll, events, c, addrs, n, buf, &request, &mut |_, _| Ok(()))
}

/// Reads the 101 head of connection `i`; an error fails the connection.
type HeadCheck<'a> = dyn FnMut(usize, &[u8]) -> Result<(), String> + 'a;

/// [`open_all`] with this upgrade `request`; `check(i, head)` reads each 101 head and may fail
/// the connection (its error counted by kind).
#[allow(clippy::too_many_arguments)]
fn open_all_with(
    poll: &mut Poll,
    events: &mut Events,
    c: &Common,
    addrs: &[SocketAddr],
    n: usize,
    buf: &mut [u8],
    request: &[u8],
    check: &mut HeadCheck,
) -> io::Result<(Vec<Client>, BTreeMap<String, u64>)> {
    let tls = tls::Tls::of(c).map_err(io::Error::other)?;
    let mut clients: Vec<Client> = Vec::with_capacity(n);
    let mut errors = BTreeMap::new();
    let mut in_progress = 0usize;
    let mut open = 0usize;
    let mut leftover = Vec::new();
    let deadline = Instant::now() + Duration::from_secs_f64(c.setup_timeout);
    let fail = |cl: &mut Client, what: String, errors: &mut BTreeMap<String, u64>| {
        cl.st = St::Dead;
        *errors.entry(what).or_insert(0) += 1;
    };
    while open + (errors.values().sum::<u64>() as usize) < n {
        while clients.len() < n && in_progress < c.connect_batch.max(1) {
            let i = clients.len();
            match Client::connect(addrs[i % addrs.len()], poll, token_of(i, 0), tls.as_ref()) {
                Ok(cl) => {
                    clients.push(cl);
                    in_progress += 1;
                }
                Err(e) => return Err(io::Error::new(e.kind(), format!("connect #{i}: {e}"))),
            }
        }
        let now = Instant::now();
        if now >= deadline {
            for cl in clients
                .iter_mut()
                .filter(|c| c.st != St::Open && c.st != St::Dead)
            {
                fail(cl, "setup timeout".into(), &mut errors);
            }
            let missing = n - clients.len();
            if missing > 0 {
                *errors.entry("not started".into()).or_insert(0) += missing as u64;
            }
            break;
        }
        poll.poll(
            events,
            Some((deadline - now).min(Duration::from_millis(100))),
        )?;
        for ev in events.iter() {
            let (i, _) = split_token(ev.token());
            let cl = &mut clients[i];
            if cl.st == St::Open || cl.st == St::Dead {
                continue;
            }
            match cl.drive_upgrade(request, buf, &mut leftover) {
                Ok(false) => {}
                Ok(true) => {
                    in_progress -= 1;
                    let head = std::mem::take(&mut cl.head);
                    if !leftover.is_empty() {
                        fail(cl, "bytes after the 101".into(), &mut errors);
                    } else if let Err(e) = check(i, &head) {
                        fail(cl, e, &mut errors);
                    } else {
                        open += 1;
                    }
                }
                Err(e) => {
                    in_progress -= 1;
                    fail(cl, e, &mut errors);
                }
            }
        }
    }
    Ok((clients, errors))
}

/// ` tls=VERSION` for a RESULT line when the connections spoke TLS, nothing otherwise.
fn tls_field(version: Option<&str>) -> String {
    version.map(|v| format!(" tls={v}")).unwrap_or_default()
}

fn errors_field(errors: &BTreeMap<String, u64>) -> String {
    let total: u64 = errors.values().sum();
    let mut s = format!(" errors={total}");
    if total > 0 {
        let kinds: Vec<String> = errors
            .iter()
            .map(|(k, v)| format!("{}:{v}", k.replace([' ', '='], "_")))
            .collect();
        let _ = write!(s, " error_kinds={}", kinds.join(","));
    }
    s
}

// ---------------------------------------------------------------------------------------------
// Echo.

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Phase {
    Warmup,
    Measure,
}

/// What one echo worker measured.
struct EchoOut {
    open: usize,
    /// The TLS version of the connections (`None`: plain).
    tls: Option<&'static str>,
    measured: u64,
    hist: Histogram<u64>,
    errors: BTreeMap<String, u64>,
    /// With --deflate: echo frames, those compressed, their bytes on the wire (measured
    /// window), and the open connections whose server keeps its context and that do not.
    deflate: Option<DeflateOut>,
}

#[derive(Default)]
struct DeflateOut {
    frames: u64,
    compressed: u64,
    wire_in: u64,
    takeover: usize,
    no_takeover: usize,
}

/// The echo mode's message: S bytes of a-z, or (`--json`) a JSON document of at least S bytes;
/// and the frame that carries it (compressed, with RSV1, under `--deflate`).
fn echo_message(a: &EchoArgs) -> Result<(Vec<u8>, Vec<u8>), String> {
    let op = if a.text || a.json { 1 } else { 2 };
    let msg: Vec<u8> = if a.json {
        deflate::json_message(a.size)
    } else {
        (0..a.size).map(|i| b'a' + (i % 26) as u8).collect()
    };
    let frame = if a.deflate.deflate {
        let mut f = client_frame(op, &deflate::compress(&msg)?);
        f[0] |= 0x40;
        f
    } else {
        client_frame(op, &msg)
    };
    Ok((msg, frame))
}

/// Length of a server frame's header for a payload of `len` bytes.
fn server_header_len(len: usize) -> usize {
    match len {
        0..=125 => 2,
        126..=0xffff => 4,
        _ => 10,
    }
}

/// The echo mode: `--threads` workers, each with its own `Poll` and its share of the
/// connections, measuring the same window (they open their connections, then start together).
fn echo(a: EchoArgs) -> Result<(), String> {
    let c = &a.common;
    let threads = a.threads.max(1);
    if a.count.is_some() && threads > 1 {
        return Err("--count runs on one thread".into());
    }
    if a.connections < threads {
        return Err("fewer connections than threads".into());
    }
    // Every worker opens its connections; then the clock starts for all of them at once.
    let opened = std::sync::Barrier::new(threads + 1);
    let go = std::sync::Barrier::new(threads + 1);
    let start_cell = std::sync::Mutex::new(None::<Instant>);
    let warmup = if a.count.is_some() { 0.0 } else { a.warmup };
    let (msg, frame) = echo_message(&a)?;
    let outs = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                let n = a.connections / threads + (t < a.connections % threads) as usize;
                let (a, opened, go, start_cell) = (&a, &opened, &go, &start_cell);
                let (msg, frame) = (&msg, &frame);
                scope.spawn(move || {
                    echo_worker(a, n, msg, frame, &|| {
                        opened.wait();
                        go.wait();
                        start_cell.lock().unwrap().expect("start time")
                    })
                })
            })
            .collect();
        opened.wait();
        let start = Instant::now();
        *start_cell.lock().unwrap() = Some(start);
        go.wait();
        // The server's CPU over the measured window (a count run measures from the start).
        let measure_at = start + Duration::from_secs_f64(warmup);
        std::thread::sleep(measure_at.saturating_duration_since(Instant::now()));
        let cpu = CpuWindow::start(c.server_pid);
        let outs: Vec<Result<EchoOut, String>> = workers
            .into_iter()
            .map(|w| w.join().unwrap_or_else(|_| Err("worker panicked".into())))
            .collect();
        (outs, cpu)
    });
    let (outs, cpu) = outs;
    let mut total = EchoOut {
        open: 0,
        tls: None,
        measured: 0,
        hist: Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)
            .map_err(|e| format!("histogram: {e}"))?,
        errors: BTreeMap::new(),
        deflate: a.deflate.deflate.then(DeflateOut::default),
    };
    for out in outs {
        let out = out?;
        total.open += out.open;
        total.tls = total.tls.or(out.tls);
        total.measured += out.measured;
        if let (Some(t), Some(d)) = (total.deflate.as_mut(), out.deflate) {
            t.frames += d.frames;
            t.compressed += d.compressed;
            t.wire_in += d.wire_in;
            t.takeover += d.takeover;
            t.no_takeover += d.no_takeover;
        }
        total
            .hist
            .add(&out.hist)
            .map_err(|e| format!("histogram: {e}"))?;
        for (k, v) in out.errors {
            *total.errors.entry(k).or_insert(0) += v;
        }
    }
    let wall = match a.count {
        Some(_) => cpu.t0.elapsed().as_secs_f64(),
        None => a.duration,
    };
    let (measured, hist, still_open) = (total.measured, &total.hist, total.open);
    let k = a.pipeline.max(1);
    let mut line = format!(
        "RESULT mode=echo server={} n={} size={} k={} open={still_open} seconds={wall:.2} echoes={measured} msgs_per_s={:.0} p50_us={:.1} p99_us={:.1} p999_us={:.1} max_us={:.1}",
        c.label,
        a.connections,
        msg.len(),
        k,
        measured as f64 / wall,
        hist.value_at_quantile(0.50) as f64 / 1e3,
        hist.value_at_quantile(0.99) as f64 / 1e3,
        hist.value_at_quantile(0.999) as f64 / 1e3,
        hist.max() as f64 / 1e3,
    );
    if threads > 1 {
        let _ = write!(line, " client_threads={threads}");
    }
    // Bytes on the wire per message, each way: whole frames (client frames with their mask).
    let _ = write!(line, " wire_out_per_msg={}", frame.len());
    match &total.deflate {
        None => {
            let _ = write!(
                line,
                " wire_in_per_msg={}",
                server_header_len(msg.len()) + msg.len()
            );
        }
        Some(d) => {
            let _ = write!(
                line,
                " wire_in_per_msg={:.1} deflate=1 compressed_in_pct={:.1} server_takeover_conns={} server_no_takeover_conns={}",
                d.wire_in as f64 / d.frames.max(1) as f64,
                d.compressed as f64 * 100.0 / d.frames.max(1) as f64,
                d.takeover,
                d.no_takeover
            );
        }
    }
    line.push_str(&tls_field(total.tls));
    line.push_str(&errors_field(&total.errors));
    cpu.finish_over(measured, wall, &mut line);
    println!("{line}");
    eprintln!("[{}] {}", c.label, human(&line));
    Ok(())
}

/// One echo worker: open `n` connections, call `ready` (which returns the shared start time),
/// load them with `frame` (carrying `pattern`) until the end of the window.
fn echo_worker(
    a: &EchoArgs,
    n: usize,
    pattern: &[u8],
    frame: &[u8],
    ready: &dyn Fn() -> Instant,
) -> Result<EchoOut, String> {
    let k = a.pipeline.max(1);
    let op = if a.text || a.json { 1 } else { 2 };
    let size = pattern.len();
    let flen = frame.len();
    // K + 1 frames back to back: any window of up to K frames' bytes starting inside the first
    // frame is one contiguous slice.
    let stream: Vec<u8> = frame.repeat(k + 1);
    let verify = (!a.no_verify).then_some(pattern);
    // With --deflate, echoes are read (and inflated) by `zs`, and each 101 must accept the offer.
    let mut zs = a
        .deflate
        .deflate
        .then(|| deflate::Echoes::new(n, pattern, op, !a.no_verify));

    let mut events = Events::with_capacity(4096);
    let mut buf = vec![0u8; RECV_BUF];
    // Every worker meets the others at `ready` even when its setup failed (one that returned
    // before would leave them waiting for it for ever), and then stops.
    let setup = echo_open(a, n, &mut events, &mut buf, zs.as_mut());
    let start = ready();
    let (mut poll, mut clients, mut errors) = setup?;

    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)
        .map_err(|e| format!("histogram: {e}"))?;
    let mut measured: u64 = 0;
    // Count mode: messages left to send in total.
    let mut budget: Option<u64> = a.count;
    let mut outstanding: u64 = 0;
    let mut phase = if a.count.is_some() {
        Phase::Measure
    } else {
        Phase::Warmup
    };
    let measure_at =
        start + Duration::from_secs_f64(if a.count.is_some() { 0.0 } else { a.warmup });
    let end_at = measure_at + Duration::from_secs_f64(a.duration);
    let hard_end = start + Duration::from_secs_f64(a.warmup + a.duration + 120.0);

    // Start: K messages on every open connection.
    let now = Instant::now();
    for (i, cl) in clients.iter_mut().enumerate() {
        if cl.st != St::Open {
            continue;
        }
        let mut q = k as u64;
        if let Some(b) = budget.as_mut() {
            q = q.min(*b);
            *b -= q;
        }
        for _ in 0..q {
            cl.sent_at.push_back(now);
        }
        outstanding += q;
        cl.unsent = q as usize * flen;
        if let Err(e) = flush(cl, &stream, flen) {
            dead(cl, &mut poll, &mut errors, format!("write: {e}"), i);
        }
    }

    loop {
        let now = Instant::now();
        if a.count.is_none() {
            if phase == Phase::Warmup && now >= measure_at {
                phase = Phase::Measure;
                hist.reset();
                measured = 0;
                if let Some(z) = zs.as_mut() {
                    z.reset_counts();
                }
            }
            if phase == Phase::Measure && now >= end_at {
                break;
            }
        } else if outstanding == 0 {
            break;
        }
        if now >= hard_end {
            *errors.entry("run timeout".into()).or_insert(0) += 1;
            break;
        }
        let wait = if a.count.is_some() {
            Duration::from_millis(100)
        } else if phase == Phase::Warmup {
            measure_at - now
        } else {
            end_at - now
        };
        poll.poll(&mut events, Some(wait.min(Duration::from_millis(100))))
            .map_err(|e| e.to_string())?;
        for ev in events.iter() {
            let (i, _) = split_token(ev.token());
            let cl = &mut clients[i];
            if cl.st != St::Open {
                continue;
            }
            if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
                let mut completed = 0u64;
                let mut failure = None;
                loop {
                    match cl.read_some(&mut buf) {
                        Ok(None) => break,
                        Ok(Some(0)) => {
                            failure = Some("EOF".to_string());
                            break;
                        }
                        Ok(Some(n)) => {
                            let fed = match zs.as_mut() {
                                None => cl.rx.feed(&buf[..n], op, size, verify),
                                Some(z) => z.feed(i, &buf[..n]),
                            };
                            match fed {
                                Ok(d) => completed += d,
                                Err(RxError::Protocol(e)) => failure = Some(e),
                                Err(RxError::Closed(code)) => {
                                    failure = Some(format!("server closed with {code}"))
                                }
                            }
                            if failure.is_some() || n < buf.len() {
                                break;
                            }
                        }
                        Err(e) => {
                            failure = Some(format!("read: {e}"));
                            break;
                        }
                    }
                }
                if completed > 0 {
                    let t = Instant::now();
                    for _ in 0..completed {
                        if let Some(sent) = cl.sent_at.pop_front() {
                            if phase == Phase::Measure {
                                let ns = t.duration_since(sent).as_nanos() as u64;
                                let _ = hist.record(ns.max(1));
                            }
                        }
                    }
                    outstanding -= completed;
                    if phase == Phase::Measure {
                        measured += completed;
                    }
                    let mut again = completed;
                    if let Some(b) = budget.as_mut() {
                        again = again.min(*b);
                        *b -= again;
                    }
                    for _ in 0..again {
                        cl.sent_at.push_back(t);
                    }
                    outstanding += again;
                    cl.unsent += again as usize * flen;
                }
                if let Some(f) = failure {
                    outstanding -= cl.sent_at.len() as u64;
                    dead(cl, &mut poll, &mut errors, f, i);
                    continue;
                }
            }
            if cl.unsent > 0 || cl.tls_holds() {
                if let Err(e) = flush(cl, &stream, flen) {
                    outstanding -= cl.sent_at.len() as u64;
                    dead(cl, &mut poll, &mut errors, format!("write: {e}"), i);
                }
            }
        }
    }
    let open = clients.iter().filter(|cl| cl.st == St::Open).count();
    let tls = clients.iter().find_map(Client::tls_version);
    drop(clients);
    let deflate = zs.map(|z| {
        let (takeover, no_takeover) = z.answers();
        DeflateOut {
            frames: z.frames,
            compressed: z.compressed,
            wire_in: z.wire_in,
            takeover,
            no_takeover,
        }
    });
    Ok(EchoOut {
        open,
        tls,
        measured,
        hist,
        errors,
        deflate,
    })
}

/// A worker's poll, its clients and the errors by kind.
type Opened = (Poll, Vec<Client>, BTreeMap<String, u64>);

/// An echo worker's connections: `n` opened (with `--deflate`, each 101 read by `zs`, and
/// every connection must have accepted the offer); an error if none opened.
fn echo_open(
    a: &EchoArgs,
    n: usize,
    events: &mut Events,
    buf: &mut [u8],
    zs: Option<&mut deflate::Echoes>,
) -> Result<Opened, String> {
    let c = &a.common;
    let mut poll = Poll::new().map_err(|e| e.to_string())?;
    let setup_start = Instant::now();
    let deflate = zs.is_some();
    let (clients, errors) = match zs {
        None => open_all(&mut poll, events, c, &[c.addr], n, buf),
        Some(z) => {
            let request = upgrade_request_offering(c, a.deflate.offer());
            open_all_with(
                &mut poll,
                events,
                c,
                &[c.addr],
                n,
                buf,
                &request,
                &mut |i, head| {
                    z.opened(i, deflate::parse_answer(head)?);
                    Ok(())
                },
            )
        }
    }
    .map_err(|e| e.to_string())?;
    if deflate && !errors.is_empty() {
        return Err(format!(
            "--deflate: connections failed to open with permessage-deflate: {errors:?}"
        ));
    }
    let setup_s = setup_start.elapsed().as_secs_f64();
    let open = clients.iter().filter(|cl| cl.st == St::Open).count();
    let suite = clients
        .iter()
        .find_map(|cl| {
            let conn = cl.tls.as_ref()?;
            let group = conn.negotiated_key_exchange_group()?.name();
            Some(format!(
                ", TLS {:?} {group:?}",
                conn.negotiated_cipher_suite()?.suite()
            ))
        })
        .unwrap_or_default();
    eprintln!(
        "[{}] echo: {open}/{n} connections open in {setup_s:.2} s{suite}",
        c.label
    );
    if open == 0 {
        return Err(format!("no connection opened: {errors:?}"));
    }
    Ok((poll, clients, errors))
}

/// Write as much of the client's queued frames as the socket takes (under TLS, and what rustls
/// still holds of them).
fn flush(cl: &mut Client, stream: &[u8], flen: usize) -> io::Result<()> {
    while cl.unsent > 0 {
        let n = cl.write_some(&stream[cl.phase..cl.phase + cl.unsent])?;
        if n == 0 {
            return Ok(());
        }
        cl.unsent -= n;
        cl.phase = (cl.phase + n) % flen;
    }
    cl.tls_flush()
}

fn dead(
    cl: &mut Client,
    poll: &mut Poll,
    errors: &mut BTreeMap<String, u64>,
    what: String,
    i: usize,
) {
    if !cl.counted {
        cl.counted = true;
        if errors.get(&what).is_none() {
            eprintln!("loadgen: connection {i}: {what}");
        }
        *errors.entry(what).or_insert(0) += 1;
    }
    cl.st = St::Dead;
    cl.sent_at.clear();
    cl.unsent = 0;
    let _ = poll.registry().deregister(&mut cl.sock);
}

/// The RESULT line without its prefix, for stderr.
fn human(line: &str) -> String {
    line.trim_start_matches("RESULT ").replace(' ', "  ")
}

// ---------------------------------------------------------------------------------------------
// Handshake rate.

fn handshake(a: HandshakeArgs) -> Result<(), String> {
    let c = &a.common;
    let request = upgrade_request(c);
    let tls = tls::Tls::of(c)?;
    let mut tls_version = None;
    // Close frame with code 1000.
    let close = client_frame(8, &1000u16.to_be_bytes());
    let mut poll = Poll::new().map_err(|e| e.to_string())?;
    let mut events = Events::with_capacity(4096);
    let mut buf = vec![0u8; RECV_BUF];
    let conc = a.concurrency.max(1);
    let mut slots: Vec<Option<(Client, Instant)>> = (0..conc).map(|_| None).collect();
    let mut gens = vec![0u32; conc];
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)
        .map_err(|e| format!("histogram: {e}"))?;
    let mut cycles: u64 = 0;
    let start = Instant::now();
    let measure_at = start + Duration::from_secs_f64(a.warmup);
    let end_at = measure_at + Duration::from_secs_f64(a.duration);
    let mut measuring = false;
    let mut cpu = CpuWindow::start(c.server_pid);
    let mut window_start = start;
    let mut leftover = Vec::new();
    let mut consecutive_connect_errors = 0u32;

    loop {
        let now = Instant::now();
        if !measuring && now >= measure_at {
            measuring = true;
            hist.reset();
            cycles = 0;
            errors.clear();
            cpu = CpuWindow::start(c.server_pid);
            window_start = now;
        }
        if now >= end_at {
            break;
        }
        // Refill empty slots.
        for (i, slot) in slots.iter_mut().enumerate() {
            if slot.is_none() {
                gens[i] = gens[i].wrapping_add(1);
                match Client::connect(c.addr, &poll, token_of(i, gens[i]), tls.as_ref()) {
                    Ok(cl) => {
                        consecutive_connect_errors = 0;
                        *slot = Some((cl, Instant::now()));
                    }
                    Err(e) => {
                        *errors.entry(format!("connect: {e}")).or_insert(0) += 1;
                        consecutive_connect_errors += 1;
                    }
                }
            }
        }
        if consecutive_connect_errors > 10_000 {
            return Err(format!("connect keeps failing: {errors:?}"));
        }
        poll.poll(
            &mut events,
            Some((end_at - now).min(Duration::from_millis(100))),
        )
        .map_err(|e| e.to_string())?;
        for ev in events.iter() {
            let (i, gen) = split_token(ev.token());
            if gen != gens[i] {
                continue;
            }
            let Some((cl, began)) = slots[i].as_mut() else {
                continue;
            };
            let outcome: Result<bool, String> = match cl.st {
                St::Connecting | St::Upgrading => {
                    match cl.drive_upgrade(&request, &mut buf, &mut leftover) {
                        Ok(true) if !leftover.is_empty() => Err("bytes after the 101".into()),
                        Ok(true) => match cl.write_some(&close) {
                            Ok(n) if n == close.len() => {
                                cl.st = St::Closing;
                                Ok(false)
                            }
                            Ok(_) => Err("close frame not written at once".into()),
                            Err(e) => Err(format!("write close: {e}")),
                        },
                        Ok(false) => Ok(false),
                        Err(e) => Err(e),
                    }
                }
                St::Closing => loop {
                    match cl.read_some(&mut buf) {
                        Ok(None) => break Ok(false),
                        Ok(Some(0)) => break Err("EOF before the close frame".into()),
                        Ok(Some(n)) => match cl.rx.feed(&buf[..n], 2, 0, None) {
                            Err(RxError::Closed(_)) => break Ok(true),
                            Err(RxError::Protocol(e)) => break Err(e),
                            Ok(0) => continue,
                            Ok(_) => break Err("data frame instead of close".into()),
                        },
                        Err(e) => break Err(format!("read close: {e}")),
                    }
                },
                St::Open | St::Dead => Ok(false),
            };
            match outcome {
                Ok(false) => {}
                Ok(true) => {
                    if measuring {
                        cycles += 1;
                        let _ = hist.record((began.elapsed().as_nanos() as u64).max(1));
                    }
                    tls_version = tls_version.or(cl.tls_version());
                    slots[i] = None;
                }
                Err(e) => {
                    *errors.entry(e).or_insert(0) += 1;
                    slots[i] = None;
                }
            }
        }
    }
    let wall = window_start.elapsed().as_secs_f64();
    let mut line = format!(
        "RESULT mode=handshake server={} c={conc} seconds={wall:.2} cycles={cycles} per_s={:.0} p50_us={:.1} p99_us={:.1} p999_us={:.1}",
        c.label,
        cycles as f64 / wall,
        hist.value_at_quantile(0.50) as f64 / 1e3,
        hist.value_at_quantile(0.99) as f64 / 1e3,
        hist.value_at_quantile(0.999) as f64 / 1e3,
    );
    line.push_str(&tls_field(tls_version));
    line.push_str(&errors_field(&errors));
    cpu.finish(cycles, &mut line);
    println!("{line}");
    eprintln!("[{}] {}", c.label, human(&line));
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Idle memory.

fn idle(a: IdleArgs) -> Result<(), String> {
    let c = &a.common;
    let pid = c
        .server_pid
        .ok_or("idle needs --server-pid to read the server's RSS")?;
    let before = proc_rss_kib(pid).ok_or("cannot read the server's VmRSS")?;
    let mut poll = Poll::new().map_err(|e| e.to_string())?;
    let mut events = Events::with_capacity(4096);
    let mut buf = vec![0u8; RECV_BUF];
    // With --deflate every 101 must accept the offer (nothing is sent, so nothing is inflated).
    let request = upgrade_request_offering(c, a.deflate.offer());
    let deflate = a.deflate.deflate;
    let (clients, errors) = open_all_with(
        &mut poll,
        &mut events,
        c,
        &[c.addr],
        a.connections,
        &mut buf,
        &request,
        &mut |_, head| {
            if deflate {
                deflate::parse_answer(head)?;
            }
            Ok(())
        },
    )
    .map_err(|e| e.to_string())?;
    if deflate && !errors.is_empty() {
        return Err(format!(
            "--deflate: connections failed to open with permessage-deflate: {errors:?}"
        ));
    }
    let open = clients.iter().filter(|cl| cl.st == St::Open).count();
    // Hold them: nothing is sent; any event would be the server closing on us.
    let until = Instant::now() + Duration::from_secs_f64(a.settle);
    let mut closed = 0;
    while Instant::now() < until {
        poll.poll(&mut events, Some(Duration::from_millis(100)))
            .map_err(|e| e.to_string())?;
        closed += events.iter().filter(|e| e.is_read_closed()).count();
    }
    let after = proc_rss_kib(pid).ok_or("cannot read the server's VmRSS")?;
    let per = (after as f64 - before as f64) * 1024.0 / open.max(1) as f64;
    let mut line = format!(
        "RESULT mode=idle server={} n={} open={open} rss_before_kib={before} rss_after_kib={after} bytes_per_conn={per:.0} closed_by_server={closed} deflate={}",
        c.label, a.connections, deflate as u8
    );
    line.push_str(&tls_field(clients.iter().find_map(Client::tls_version)));
    line.push_str(&errors_field(&errors));
    drop(clients);
    println!("{line}");
    eprintln!("[{}] {}", c.label, human(&line));
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Report.

/// One RESULT line as key/value pairs.
type Row = BTreeMap<String, String>;

fn parse_results(files: &[String]) -> Result<Vec<Row>, String> {
    let mut rows = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(f).map_err(|e| format!("{f}: {e}"))?;
        for line in text.lines() {
            let Some(rest) = line.strip_prefix("RESULT ") else {
                continue;
            };
            let row: Row = rest
                .split_whitespace()
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            rows.push(row);
        }
    }
    Ok(rows)
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let m = v.len() / 2;
    Some(if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    })
}

fn fmt_num(x: f64) -> String {
    if x >= 1000.0 {
        format!("{x:.0}")
    } else if x >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.3}")
    }
}

/// A Markdown table: one line per row key (`key` fields), for each server the median of `field`
/// over its runs, and the ratio base/peer of the medians (the title says which way is better).
fn table(
    rows: &[Row],
    mode: &str,
    key: &[&str],
    field: &str,
    title: &str,
    better: &str,
    base: &str,
) -> String {
    let mut servers: Vec<String> = Vec::new();
    let mut groups: BTreeMap<Vec<u64>, BTreeMap<String, Vec<f64>>> = BTreeMap::new();
    let mut errs: BTreeMap<Vec<u64>, BTreeMap<String, u64>> = BTreeMap::new();
    for r in rows
        .iter()
        .filter(|r| r.get("mode").map(String::as_str) == Some(mode))
    {
        let Some(server) = r.get("server") else {
            continue;
        };
        let Some(v) = r.get(field).and_then(|v| v.parse::<f64>().ok()) else {
            continue;
        };
        let k: Vec<u64> = key
            .iter()
            .map(|f| r.get(*f).and_then(|v| v.parse().ok()).unwrap_or(0))
            .collect();
        if !servers.contains(server) {
            servers.push(server.clone());
        }
        groups
            .entry(k.clone())
            .or_default()
            .entry(server.clone())
            .or_default()
            .push(v);
        let e: u64 = r.get("errors").and_then(|v| v.parse().ok()).unwrap_or(0);
        *errs
            .entry(k)
            .or_default()
            .entry(server.clone())
            .or_default() += e;
    }
    if groups.is_empty() {
        return String::new();
    }
    // The base first, then the peers in order of appearance.
    servers.sort_by_key(|s| s != base);
    let peers: Vec<&String> = servers.iter().filter(|s| *s != base).collect();
    let mut out = format!("\n### {title} ({better})\n\n|");
    for k in key {
        let _ = write!(out, " {k} |");
    }
    for s in &servers {
        let _ = write!(out, " {s} |");
    }
    for p in &peers {
        let _ = write!(out, " {base}/{p} |");
    }
    out.push_str(" runs | errors |\n|");
    for _ in 0..key.len() + servers.len() + peers.len() + 2 {
        out.push_str("---|");
    }
    out.push('\n');
    for (k, by_server) in &groups {
        out.push('|');
        for v in k {
            let _ = write!(out, " {v} |");
        }
        let med: BTreeMap<&String, Option<f64>> = servers
            .iter()
            .map(|s| (s, by_server.get(s).and_then(|v| median(v.clone()))))
            .collect();
        for s in &servers {
            match med[s] {
                Some(m) => {
                    let _ = write!(out, " {} |", fmt_num(m));
                }
                None => out.push_str(" - |"),
            }
        }
        for p in &peers {
            match (med.get(&base.to_string()).copied().flatten(), med[*p]) {
                (Some(b), Some(v)) if v > 0.0 => {
                    let _ = write!(out, " {:.2} |", b / v);
                }
                _ => out.push_str(" - |"),
            }
        }
        let runs: Vec<String> = servers
            .iter()
            .map(|s| by_server.get(s).map_or(0, Vec::len).to_string())
            .collect();
        let e: Vec<String> = servers
            .iter()
            .map(|s| errs[k].get(s).copied().unwrap_or(0).to_string())
            .collect();
        let _ = writeln!(out, " {} | {} |", runs.join("/"), e.join("/"));
    }
    out
}

fn report(files: &[String], base: &str) -> Result<(), String> {
    let rows = parse_results(files)?;
    if rows.is_empty() {
        return Err("no RESULT lines".into());
    }
    const LOWER: &str = "lower is better";
    const HIGHER: &str = "higher is better";
    const CONTEXT: &str = "for context";
    let echo: &[&str] = &["size", "n", "k"];
    // (mode, row key, field, title, which way is better)
    let bcast: &[&str] = &["n"];
    let fanout: &[&str] = &["n", "window", "rate"];
    let tables: [(&str, &[&str], &str, &str, &str); 29] = [
        (
            "echo",
            echo,
            "msgs_per_s",
            "Echo messages per second",
            HIGHER,
        ),
        (
            "echo",
            echo,
            "server_user_us_per_op",
            "Server user CPU per echo, µs",
            LOWER,
        ),
        (
            "echo",
            echo,
            "server_sys_us_per_op",
            "Server system CPU per echo, µs",
            LOWER,
        ),
        (
            "echo",
            echo,
            "server_cpu_us_per_op",
            "Server CPU (user + system, from schedstat) per echo, µs",
            LOWER,
        ),
        (
            "echo",
            echo,
            "server_cpu_pct",
            "Server CPU, % of one core",
            CONTEXT,
        ),
        (
            "echo",
            echo,
            "client_cpu_pct",
            "Load generator CPU, % of one core",
            CONTEXT,
        ),
        (
            "echo",
            echo,
            "wire_out_per_msg",
            "Bytes on the wire per message, client to server (frame with header and mask)",
            LOWER,
        ),
        (
            "echo",
            echo,
            "wire_in_per_msg",
            "Bytes on the wire per echo, server to client (frame with header)",
            LOWER,
        ),
        ("echo", echo, "p50_us", "Latency p50, µs", LOWER),
        ("echo", echo, "p99_us", "Latency p99, µs", LOWER),
        ("echo", echo, "p999_us", "Latency p99.9, µs", LOWER),
        (
            "idle",
            &["n"],
            "bytes_per_conn",
            "Idle memory per connection, bytes of server RSS",
            LOWER,
        ),
        (
            "handshake",
            &["c"],
            "per_s",
            "Handshakes (connect, upgrade, close) per second",
            HIGHER,
        ),
        (
            "handshake",
            &["c"],
            "server_user_us_per_op",
            "Server user CPU per handshake, µs",
            LOWER,
        ),
        (
            "handshake",
            &["c"],
            "server_sys_us_per_op",
            "Server system CPU per handshake, µs",
            LOWER,
        ),
        (
            "handshake",
            &["c"],
            "server_cpu_us_per_op",
            "Server CPU (user + system) per handshake, µs",
            LOWER,
        ),
        (
            "handshake",
            &["c"],
            "p99_us",
            "Handshake latency p99, µs",
            LOWER,
        ),
        (
            "broadcast",
            bcast,
            "rounds_per_s",
            "Broadcast: rounds per second (N clients in one topic, each sends one message per round)",
            HIGHER,
        ),
        (
            "broadcast",
            bcast,
            "deliveries_per_s",
            "Broadcast: deliveries per second (N x N per round)",
            HIGHER,
        ),
        (
            "broadcast",
            bcast,
            "server_stat_us_per_op",
            "Broadcast: server CPU per delivery (utime + stime, /proc/PID/stat), µs",
            LOWER,
        ),
        (
            "broadcast",
            bcast,
            "server_cpu_us_per_op",
            "Broadcast: server CPU per delivery (schedstat), µs",
            LOWER,
        ),
        (
            "broadcast",
            bcast,
            "client_cpu_pct",
            "Broadcast: load generator CPU, % of one core",
            CONTEXT,
        ),
        (
            "fanout",
            fanout,
            "deliveries_per_s",
            "Fan-out: deliveries per second (one publisher, N subscribers + the publisher)",
            HIGHER,
        ),
        (
            "fanout",
            fanout,
            "p50_us",
            "Fan-out: latency p50 from the publisher's write to a subscriber's read, µs",
            LOWER,
        ),
        (
            "fanout",
            fanout,
            "p99_us",
            "Fan-out: latency p99, µs",
            LOWER,
        ),
        (
            "fanout",
            fanout,
            "server_stat_us_per_op",
            "Fan-out: server CPU per delivery (utime + stime, /proc/PID/stat), µs",
            LOWER,
        ),
        (
            "fanout",
            fanout,
            "server_cpu_us_per_op",
            "Fan-out: server CPU per delivery (schedstat), µs",
            LOWER,
        ),
        (
            "fanout",
            fanout,
            "server_cpu_pct",
            "Fan-out: server CPU, % of one core",
            CONTEXT,
        ),
        (
            "fanout",
            fanout,
            "client_cpu_pct",
            "Fan-out: load generator CPU, % of one core",
            CONTEXT,
        ),
    ];
    let mut out = String::new();
    for (mode, key, field, title, better) in tables {
        out.push_str(&table(&rows, mode, key, field, title, better, base));
    }
    println!("{out}");
    Ok(())
}
