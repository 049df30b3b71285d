//! Helpers for the attack suite: the `wsloop` binary as a child process with a small fd limit,
//! its descriptors and CPU time read from `/proc`, its counters read from `GET /metrics`, and
//! clients that bind a source address, shrink their receive buffer or reset on close.
//!
//! Everything is bounded: every socket has read and write timeouts, every wait has a deadline,
//! and a child left running by a failing test is killed when its handle is dropped.

use crate::child_support::Proc;
use std::collections::BTreeMap;
use std::io::{self, ErrorKind, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Command, ExitStatus};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// Read and write timeout of every client socket in the suite.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the child's fd count may take to come back to its baseline.
pub const FD_SETTLE: Duration = Duration::from_secs(10);
/// Bound for the child to start (log its address and size its fd budget).
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// Bound for the child to exit after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);

pub fn localhost(last: u8) -> IpAddr {
    IpAddr::from([127, 0, 0, last])
}

/// The `wsloop` binary running as a child process.
pub struct Wsloop {
    proc: Proc,
    pub pid: u32,
    pub addr: SocketAddr,
    /// Descriptors open in the child after startup, before any client connected.
    pub baseline_fds: usize,
    /// Where `GET /metrics` requests come from (matters under per-address limits).
    pub metrics_src: IpAddr,
    /// Where they go: the WebSocket port (`--metrics-on-ws`), or `--metrics-listen`'s.
    metrics_addr: SocketAddr,
    name: String,
}

impl Wsloop {
    /// Start `wsloop --listen 127.0.0.1:0 --fd-limit 128` plus `args`, wait until it listens and
    /// has sized its fd budget, and measure its baseline descriptor count. The suite reads
    /// `/metrics` on the WebSocket port (`--metrics-on-ws`) unless `args` give the operators an
    /// address of their own (`--metrics-listen`), polls it faster than the default endpoint
    /// rate allows (`--endpoint-rate 1000`) unless `args` set one, and has the fd audit run
    /// every 200 ms (`--audit-interval 0.2`) unless `args` say otherwise.
    pub fn spawn(name: &str, args: &[&str]) -> Wsloop {
        Self::spawn_with_fd_limit(name, 128, args)
    }

    /// [`Wsloop::spawn`] with `--fd-limit fd_limit`.
    pub fn spawn_with_fd_limit(name: &str, fd_limit: u64, args: &[&str]) -> Wsloop {
        let limit = fd_limit.to_string();
        Self::spawn_args(name, &[&["--fd-limit", &limit][..], args].concat(), None)
    }

    /// `wsloop --listen 127.0.0.1:0`, the suite's defaults (see [`Wsloop::spawn`]) and `args`
    /// (no `--fd-limit` unless they say so: the binary then raises its soft limit to the hard
    /// one), started with a soft `RLIMIT_NOFILE` of `soft` (the shell's `ulimit -Sn`) when
    /// given.
    pub fn spawn_args(name: &str, args: &[&str], soft: Option<u64>) -> Wsloop {
        let mut defaults = Vec::new();
        if !args.contains(&"--metrics-listen") {
            defaults.push("--metrics-on-ws");
        }
        if !args.contains(&"--endpoint-rate") {
            defaults.extend(["--endpoint-rate", "1000"]);
        }
        if !args.contains(&"--audit-interval") {
            // Often, so that a test can wait for an audit after its attack (see `audited`).
            defaults.extend(["--audit-interval", "0.2"]);
        }
        let bin = env!("CARGO_BIN_EXE_wsloop");
        let mut cmd = match soft {
            None => Command::new(bin),
            Some(n) => {
                let mut sh = Command::new("sh");
                sh.args(["-c", &format!("ulimit -Sn {n} && exec \"$0\" \"$@\""), bin]);
                sh
            }
        };
        // stderr is drained for the child's whole life so that it never blocks on a full pipe.
        let mut proc = Proc::spawn(
            name,
            cmd.args(["--listen", "127.0.0.1:0"])
                .args(defaults)
                .args(args)
                .env("RUST_LOG", "info"),
        )
        .expect("spawn wsloop");
        let started = proc.wait_for("wsloop start", START_TIMEOUT, |log| {
            // ws://, or wss:// with --tls-cert and --tls-key.
            let addr = log.lines().find_map(|l| {
                l.split_once(" server listening on ws://")
                    .or_else(|| l.split_once(" server listening on wss://"))
                    .and_then(|(_, a)| a.trim().parse::<SocketAddr>().ok())
            });
            addr.filter(|_| log.contains("fd budget"))
        });
        let addr = started.unwrap_or_else(|status| {
            panic!(
                "{name}: wsloop exited at startup with {status:?}:\n{}",
                proc.log()
            )
        });
        let mut w = Wsloop {
            pid: proc.pid(),
            proc,
            addr,
            baseline_fds: 0,
            metrics_src: localhost(1),
            metrics_addr: addr,
            name: name.to_string(),
        };
        if args.contains(&"--metrics-listen") {
            w.metrics_addr = w.metrics_listener();
        }
        // The loop is in its first poll: every startup descriptor is open. Take the count once
        // it reads the same twice in a row.
        let mut last = w.fds();
        for _ in 0..50 {
            thread::sleep(Duration::from_millis(20));
            let now = w.fds();
            if now == last {
                break;
            }
            last = now;
        }
        w.baseline_fds = last;
        crate::child_support::assert_nothing_leaked_into(name, w.pid);
        w
    }

    /// Everything the child logged so far.
    pub fn log(&self) -> String {
        self.proc.log()
    }

    /// The address of its `--metrics-listen` listener, from its log (the last "metrics on"
    /// line: the WebSocket port's, with `--metrics-on-ws`, comes before it).
    pub fn metrics_listener(&self) -> SocketAddr {
        let log = self.log();
        log.lines()
            .rev()
            .filter_map(|l| l.split_once("metrics on http://"))
            .find_map(|(_, rest)| rest.split_once("/metrics")?.0.parse().ok())
            .unwrap_or_else(|| panic!("{}: no metrics listener in the log:\n{log}", self.name))
    }

    /// Descriptors open in the child now (entries of `/proc/<pid>/fd`), but for the one its fd
    /// audit thread holds while it lists `/proc/self/fd` (every `--audit-interval`, for well
    /// under a millisecond, longer on a loaded machine): a baseline taken during a listing
    /// would otherwise be one too high for ever, and no later count would come back to it.
    pub fn fds(&self) -> usize {
        let listing = PathBuf::from(format!("/proc/{}/fd", self.pid));
        let entries: Vec<std::fs::DirEntry> = std::fs::read_dir(&listing)
            .unwrap_or_else(|e| panic!("{}: reading /proc/{}/fd: {e}", self.name, self.pid))
            .flatten()
            .collect();
        // Only a count one over the baseline (or one taken before there is a baseline) can
        // be the audit's listing: read the links then, and only then (a poll that read
        // thousands of them would compete with the child for the machine).
        if self.baseline_fds != 0 && entries.len() != self.baseline_fds + 1 {
            return entries.len();
        }
        // A descriptor closed since the listing still counts, as `read_dir` saw it.
        entries
            .iter()
            .filter(|e| std::fs::read_link(e.path()).map_or(true, |t| t != listing))
            .count()
    }

    /// CPU seconds (user + system) the child has used so far.
    pub fn cpu_seconds(&self) -> f64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid)).unwrap();
        // Fields after the command name (which may contain spaces) start with field 3 (state).
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        let utime: u64 = f[14 - 3].parse().unwrap();
        let stime: u64 = f[15 - 3].parse().unwrap();
        (utime + stime) as f64 / clk_tck()
    }

    /// Resident memory of the child, in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid)).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }

    /// `GET /metrics` over a plain TCP connection.
    pub fn try_metrics(&self) -> io::Result<Metrics> {
        metrics_at(self.metrics_addr, self.metrics_src)
    }

    pub fn metrics(&self) -> Metrics {
        self.try_metrics()
            .unwrap_or_else(|e| panic!("{}: GET /metrics: {e}", self.name))
    }

    /// Wait (bounded) until the fd count is back to the baseline and a metrics request finds no
    /// connection held and no timer armed but its own (a loop that lags may still have
    /// connections in its backlog when the count is at the baseline); return those metrics.
    pub fn wait_quiet(&self) -> Metrics {
        let deadline = Instant::now() + FD_SETTLE;
        loop {
            self.wait_baseline();
            let m = self.try_metrics();
            match &m {
                Ok(m) if m.quiet() && !m.0.contains_key(OTHER_LOOP) => return m.clone(),
                Ok(m) if m.quiet() => {
                    // Several loops: the others' figures in these metrics may be up to 250 ms
                    // old (README, Threads); quiet then still quiet after that is quiet.
                    thread::sleep(Duration::from_millis(400));
                    if let Ok(again) = self.try_metrics() {
                        if again.quiet() {
                            return again;
                        }
                    }
                }
                Ok(m) => assert!(
                    Instant::now() < deadline,
                    "{}: connections still held or timers armed: {:?}, wsloop_timers {}",
                    self.name,
                    m.matching("wsloop_connections{"),
                    m.get("wsloop_timers")
                ),
                // Refused (a rate limit on the metrics address, say): ask again a little later.
                Err(e) => assert!(
                    Instant::now() < deadline,
                    "{}: GET /metrics: {e}",
                    self.name
                ),
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Scrape (bounded by [`FD_SETTLE`]) until `cond` holds; those metrics.
    pub fn wait_until(&self, what: &str, cond: impl Fn(&Metrics) -> bool) -> Metrics {
        let deadline = Instant::now() + FD_SETTLE;
        loop {
            if let Ok(m) = self.try_metrics() {
                if cond(&m) {
                    return m;
                }
            }
            assert!(
                Instant::now() < deadline,
                "{}: {what} not within {FD_SETTLE:?}",
                self.name
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// The metrics after an fd audit that ran wholly after `after` was scraped (bounded wait:
    /// the audit thread lists `/proc/self/fd` every `--audit-interval`, and the endpoints
    /// report its last result).
    pub fn audited(&self, after: &Metrics) -> Metrics {
        // An audit under way when `after` was scraped completes first: wait for the next one.
        let want = after.get("wsloop_fd_audits_total") + 2.0;
        self.wait_until("an fd audit to complete", |m| {
            m.get("wsloop_fd_audits_total") >= want
        })
    }

    /// Poll `/proc/<pid>/fd` (bounded) until the count is back to the baseline; return it.
    pub fn wait_baseline(&self) -> usize {
        self.wait_baseline_within(FD_SETTLE)
    }

    /// [`Wsloop::wait_baseline`], bounded by `bound`.
    pub fn wait_baseline_within(&self, bound: Duration) -> usize {
        let deadline = Instant::now() + bound;
        loop {
            let n = self.fds();
            if n == self.baseline_fds {
                return n;
            }
            if Instant::now() >= deadline {
                let list: Vec<String> = std::fs::read_dir(format!("/proc/{}/fd", self.pid))
                    .unwrap()
                    .flatten()
                    .take(40)
                    .map(|e| {
                        let t = std::fs::read_link(e.path()).unwrap_or_default();
                        format!("{}->{}", e.file_name().to_string_lossy(), t.display())
                    })
                    .collect();
                panic!(
                    "{}: fd count {n} did not return to the baseline {} within {bound:?}: {list:?}{}",
                    self.name,
                    self.baseline_fds,
                    if n > 40 { " ..." } else { "" }
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sample the child's fd count in the background, keeping the peak.
    pub fn fd_sampler(&self) -> Sampler {
        let pid = self.pid;
        Sampler::start(move || {
            std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
        })
    }

    /// Stop the child (SIGSTOP), and wait (bounded) until it has stopped: the kernel still
    /// completes connections into its backlog.
    pub fn freeze(&self) {
        self.proc.group.signal(rustix::process::Signal::STOP);
        let deadline = Instant::now() + FD_SETTLE;
        loop {
            let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid)).unwrap();
            // The state is the first field after the command name, which may hold spaces.
            if stat[stat.rfind(')').unwrap() + 2..].starts_with('T') {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{}: not stopped by SIGSTOP",
                self.name
            );
            thread::sleep(Duration::from_millis(1));
        }
    }

    /// Send the child SIGHUP.
    pub fn hangup(&self) {
        self.proc.group.signal(rustix::process::Signal::HUP);
    }

    /// Let a stopped child go on (SIGCONT).
    pub fn thaw(&self) {
        self.proc.group.signal(rustix::process::Signal::CONT);
    }

    /// SIGTERM, wait (bounded) for the exit, kill -9 as a fallback; the exit must be 0.
    pub fn stop(mut self) {
        let status = self.proc.terminate(STOP_TIMEOUT);
        assert!(
            status.as_ref().is_some_and(ExitStatus::success),
            "{}: wsloop did not exit 0 after SIGTERM: {status:?}\n{}",
            self.name,
            self.log_tail(40)
        );
    }

    pub fn log_tail(&self, lines: usize) -> String {
        self.proc.log_tail(lines)
    }
}

impl Drop for Wsloop {
    fn drop(&mut self) {
        if self.proc.running() {
            // A failing test: never leave the child running.
            self.proc.group.kill();
            eprintln!(
                "--- {} (pid {}) log tail:\n{}",
                self.name,
                self.pid,
                self.log_tail(30)
            );
        }
    }
}

/// `GET /metrics` from `src` over a plain TCP connection, parsed.
pub fn metrics_at(addr: SocketAddr, src: IpAddr) -> io::Result<Metrics> {
    let mut s = connect(addr, &Opts::from(src))?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: wsloop\r\n\r\n")?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        return Err(io::Error::other(format!("no response head: {text:?}")));
    };
    if !head.starts_with("HTTP/1.1 200 ") {
        return Err(io::Error::other(format!("metrics refused: {head:?}")));
    }
    let mut values = BTreeMap::new();
    for line in body
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (k, v) = line.rsplit_once(' ').expect("metric line");
        values.insert(k.to_string(), v.parse().expect("metric value"));
    }
    Ok(Metrics(values))
}

fn clk_tck() -> f64 {
    static TCK: OnceLock<f64> = OnceLock::new();
    *TCK.get_or_init(|| {
        let out = Command::new("getconf").arg("CLK_TCK").output();
        out.ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// A series only a server with more than one loop has.
const OTHER_LOOP: &str = "wsloop_per_loop_connections{loop=\"1\"}";

/// Parsed `GET /metrics` values, keyed by the series as rendered (`name{label="value"}`).
#[derive(Clone, Debug)]
pub struct Metrics(pub BTreeMap<String, f64>);

impl Metrics {
    pub fn get(&self, key: &str) -> f64 {
        *self
            .0
            .get(key)
            .unwrap_or_else(|| panic!("no metric {key} in {:?}", self.0.keys()))
    }
    pub fn closed(&self, reason: &str) -> u64 {
        self.get(&format!(
            "wsloop_connections_closed_total{{reason=\"{reason}\"}}"
        )) as u64
    }
    pub fn rejected_status(&self, status: &str) -> u64 {
        self.get(&format!(
            "wsloop_handshakes_rejected_total{{status=\"{status}\"}}"
        )) as u64
    }
    pub fn admission(&self, limit: &str) -> u64 {
        self.get(&format!(
            "wsloop_admission_rejections_total{{limit=\"{limit}\"}}"
        )) as u64
    }
    pub fn accept_errors(&self, errno: &str) -> u64 {
        self.get(&format!("wsloop_accept_errors_total{{errno=\"{errno}\"}}")) as u64
    }
    /// Nothing held but the scrape that rendered these metrics: one connection (in its
    /// handshake) and its one timer (the handshake deadline).
    pub fn quiet(&self) -> bool {
        self.held() == 1 && self.get("wsloop_timers") == 1.0
    }
    /// Connections held, over every state.
    pub fn held(&self) -> u64 {
        self.matching("wsloop_connections{")
            .iter()
            .map(|(_, v)| *v as u64)
            .sum()
    }
    pub fn matching(&self, prefix: &str) -> Vec<(String, f64)> {
        self.0
            .iter()
            .filter(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.clone(), *v))
            .collect()
    }
    /// Close reasons that moved since `before`, as (label, delta), leaving out `http_answered`
    /// (the metrics requests themselves).
    pub fn closed_since(&self, before: &Metrics) -> BTreeMap<String, u64> {
        self.moved_since(before, "wsloop_connections_closed_total{reason=\"")
            .into_iter()
            .filter(|(k, _)| k != "http_answered")
            .collect()
    }
    /// Every series starting with `prefix` that moved since `before`, keyed by its label value.
    pub fn moved_since(&self, before: &Metrics, prefix: &str) -> BTreeMap<String, u64> {
        self.matching(prefix)
            .into_iter()
            .filter_map(|(k, v)| {
                let d = v - before.0.get(&k).copied().unwrap_or(0.0);
                let label = k[prefix.len()..].trim_end_matches("\"}").to_string();
                (d != 0.0).then_some((label, d as u64))
            })
            .collect()
    }
}

/// Expected deltas as a map, for comparing with [`Metrics::closed_since`].
pub fn deltas(pairs: &[(&str, u64)]) -> BTreeMap<String, u64> {
    pairs
        .iter()
        .filter(|(_, n)| *n > 0)
        .map(|(k, n)| (k.to_string(), *n))
        .collect()
}

/// A background thread sampling a value every 10 ms, keeping the peak.
pub struct Sampler {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicUsize>,
    thread: Option<JoinHandle<()>>,
}

impl Sampler {
    pub fn start(sample: impl Fn() -> usize + Send + 'static) -> Sampler {
        Self::every(Duration::from_millis(10), sample)
    }

    pub fn every(period: Duration, sample: impl Fn() -> usize + Send + 'static) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicUsize::new(0));
        let (s, p) = (stop.clone(), peak.clone());
        let thread = thread::spawn(move || {
            // Bounded by the caller's `stop`, and in any case by a minute.
            let deadline = Instant::now() + Duration::from_secs(60);
            while !s.load(Ordering::Relaxed) && Instant::now() < deadline {
                p.fetch_max(sample(), Ordering::Relaxed);
                thread::sleep(period);
            }
        });
        Sampler {
            stop,
            peak,
            thread: Some(thread),
        }
    }

    /// The peak so far.
    pub fn peak(&self) -> usize {
        self.peak.load(Ordering::Relaxed)
    }

    /// Stop sampling and return the peak; a panic of the sampling thread fails the test.
    pub fn stop(mut self) -> usize {
        self.halt().expect("the sampling thread panicked");
        self.peak()
    }

    fn halt(&mut self) -> thread::Result<()> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().map_or(Ok(()), JoinHandle::join)
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        // Not stopped: a test failing already, whose own panic says why.
        let _ = self.halt();
    }
}

// ---------------------------------------------------------------------------------------------
// Clients

/// How a client socket is made.
#[derive(Clone, Copy, Debug, Default)]
pub struct Opts {
    /// Bind this source address before connecting.
    pub src: Option<IpAddr>,
    /// `SO_RCVBUF` before connecting (so that the window it advertises is small from the SYN).
    pub rcvbuf: Option<usize>,
}

impl From<IpAddr> for Opts {
    fn from(src: IpAddr) -> Opts {
        Opts {
            src: Some(src),
            rcvbuf: None,
        }
    }
}

/// A client connection with read and write timeouts.
pub fn connect(addr: SocketAddr, opts: &Opts) -> io::Result<TcpStream> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    if let Some(src) = opts.src {
        s.bind(&SocketAddr::new(src, 0).into())?;
    }
    if let Some(n) = opts.rcvbuf {
        s.set_recv_buffer_size(n)?;
    }
    s.connect_timeout(&addr.into(), IO_TIMEOUT)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    s.set_tcp_nodelay(true)?;
    Ok(s.into())
}

/// Close with a reset instead of a FIN (`SO_LINGER` 0).
pub fn reset(s: TcpStream) {
    let s = socket2::Socket::from(s);
    s.set_linger(Some(Duration::ZERO)).expect("SO_LINGER 0");
    drop(s);
}

/// What a client read before the connection ended or the read timed out.
#[derive(Debug)]
pub enum Answer {
    /// The server closed with a FIN after these bytes.
    Eof(Vec<u8>),
    /// The connection was reset after these bytes.
    Reset(Vec<u8>),
    /// Nothing more came within the timeout, after these bytes.
    TimedOut(Vec<u8>),
}

impl Answer {
    pub fn bytes(&self) -> &[u8] {
        match self {
            Answer::Eof(b) | Answer::Reset(b) | Answer::TimedOut(b) => b,
        }
    }
    pub fn status(&self) -> Option<u16> {
        let b = self.bytes();
        (b.len() >= 12 && b.starts_with(b"HTTP/1.1 "))
            .then(|| std::str::from_utf8(&b[9..12]).ok()?.parse().ok())
            .flatten()
    }
}

/// Read until EOF, a reset or `timeout` (overall); return what came and how long it took.
pub fn read_answer(s: &mut TcpStream, timeout: Duration) -> (Answer, Duration) {
    let start = Instant::now();
    let mut all = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = timeout.saturating_sub(start.elapsed());
        if left.is_zero() {
            return (Answer::TimedOut(all), start.elapsed());
        }
        s.set_read_timeout(Some(left)).unwrap();
        match s.read(&mut buf) {
            Ok(0) => return (Answer::Eof(all), start.elapsed()),
            Ok(n) => all.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return (Answer::TimedOut(all), start.elapsed())
            }
            Err(_) => return (Answer::Reset(all), start.elapsed()),
        }
    }
}

/// What a legitimate client got.
#[derive(Debug, PartialEq, Eq)]
pub enum Legit {
    /// Upgraded, echoed a message, closed cleanly.
    Echoed,
    /// The upgrade was answered with this HTTP status.
    Refused(u16),
    /// Anything else.
    Failed(String),
}

/// A legitimate tungstenite client: upgrade, echo one message, close handshake.
pub fn legit_echo(addr: SocketAddr, src: Option<IpAddr>) -> Legit {
    use tungstenite::{Error, HandshakeError, Message};
    let stream = match connect(addr, &Opts { src, rcvbuf: None }) {
        Ok(s) => s,
        Err(e) => return Legit::Failed(format!("connect: {e}")),
    };
    let (mut ws, _) = match tungstenite::client(format!("ws://{addr}/legit"), stream) {
        Ok(ok) => ok,
        Err(HandshakeError::Failure(Error::Http(resp))) => {
            return Legit::Refused(resp.status().as_u16())
        }
        Err(e) => return Legit::Failed(format!("handshake: {e}")),
    };
    let text = format!("legit client {:?}", Instant::now());
    if let Err(e) = ws.send(Message::text(text.clone())) {
        return Legit::Failed(format!("send: {e}"));
    }
    match ws.read() {
        Ok(Message::Text(t)) if t.as_str() == text => {}
        other => return Legit::Failed(format!("expected the echo, got {other:?}")),
    }
    if let Err(e) = ws.close(None) {
        return Legit::Failed(format!("close: {e}"));
    }
    closed_after_echo(&mut ws)
}

/// The end of a legitimate client's close handshake, once its close is sent: the server's
/// close, then the end of the connection.
fn closed_after_echo(ws: &mut tungstenite::WebSocket<TcpStream>) -> Legit {
    use tungstenite::{Error, Message};
    loop {
        match ws.read() {
            Ok(Message::Close(_)) => {}
            Ok(m) => return Legit::Failed(format!("after close: {m:?}")),
            Err(Error::ConnectionClosed) => return Legit::Echoed,
            Err(e) => return Legit::Failed(format!("closing: {e}")),
        }
    }
}

/// A legitimate tungstenite client that reads everything, but pipelines: it sends `n` binary
/// messages of `size` bytes back to back, then reads the `n` echoes, then closes.
pub fn legit_pipelined(addr: SocketAddr, n: usize, size: usize) -> Legit {
    use tungstenite::Message;
    let stream = match connect(addr, &Opts::default()) {
        Ok(s) => s,
        Err(e) => return Legit::Failed(format!("connect: {e}")),
    };
    let (mut ws, _) = match tungstenite::client(format!("ws://{addr}/pipelined"), stream) {
        Ok(ok) => ok,
        Err(e) => return Legit::Failed(format!("handshake: {e}")),
    };
    let msgs: Vec<Vec<u8>> = (0..n).map(|i| vec![i as u8; size]).collect();
    for m in &msgs {
        if let Err(e) = ws.write(Message::binary(m.clone())) {
            return Legit::Failed(format!("send: {e}"));
        }
    }
    if let Err(e) = ws.flush() {
        return Legit::Failed(format!("flush: {e}"));
    }
    for (i, m) in msgs.iter().enumerate() {
        match ws.read() {
            Ok(Message::Binary(b)) if b[..] == m[..] => {}
            other => return Legit::Failed(format!("echo {i} of {n}: {other:?}")),
        }
    }
    if let Err(e) = ws.close(None) {
        return Legit::Failed(format!("close: {e}"));
    }
    closed_after_echo(&mut ws)
}

/// The upgrade request of `tests/common`, for a raw client.
pub fn upgrade_request(addr: SocketAddr) -> Vec<u8> {
    format!(
        "GET /chat HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    .into_bytes()
}

/// Read an HTTP response head byte by byte (no frame bytes after it are consumed).
pub fn read_head(s: &mut TcpStream) -> io::Result<String> {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match s.read(&mut b) {
            Ok(0) => {
                return Err(io::Error::new(
                    ErrorKind::UnexpectedEof,
                    format!("EOF in head {:?}", String::from_utf8_lossy(&head)),
                ))
            }
            Ok(_) => head.push(b[0]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(String::from_utf8_lossy(&head).into_owned())
}

/// A raw client that completed the upgrade.
pub fn raw_ws(addr: SocketAddr, opts: &Opts) -> io::Result<TcpStream> {
    let mut s = connect(addr, opts)?;
    s.write_all(&upgrade_request(addr))?;
    let head = read_head(&mut s)?;
    if !head.starts_with("HTTP/1.1 101 ") {
        return Err(io::Error::other(format!("upgrade refused: {head:?}")));
    }
    Ok(s)
}

/// A masked client frame header for a payload of `len` bytes (`first`: FIN, RSV, opcode),
/// with the length encoded as given: 7-bit, 16-bit (`126`) or 64-bit (`127`).
pub fn frame_header(first: u8, len: u64, encoding: u8) -> Vec<u8> {
    let mut out = vec![first];
    match encoding {
        126 => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        }
        127 => {
            out.push(0x80 | 127);
            out.extend_from_slice(&len.to_be_bytes());
        }
        _ => out.push(0x80 | len as u8),
    }
    out.extend_from_slice(&MASK);
    out
}

pub const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

/// Run `f` on `n` threads with indices, collecting their results in order.
pub fn parallel<T: Send + 'static>(
    n: usize,
    f: impl Fn(usize) -> T + Send + Sync + 'static,
) -> Vec<T> {
    let f = Arc::new(f);
    let handles: Vec<_> = (0..n)
        .map(|i| {
            let f = f.clone();
            thread::spawn(move || f(i))
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}
