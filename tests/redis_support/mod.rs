//! A `redis-server` as a child process, for the tests of the Redis bridge (`tests/redis.rs`,
//! and nginx in front of two instances in `tests/nginx.rs`): started on a free loopback port
//! without persistence, logging to a file of its own, killed when dropped; and a Redis Cluster
//! of such servers, created with `redis-cli --cluster create`. Without `redis-server` (or
//! `redis-cli`, for a cluster) on PATH a test prints a note and skips; under `CI` that is an
//! error.
//!
//! Included by the test files that use it (`mod redis_support;`, after `mod child_support;`).
#![allow(dead_code)]

use crate::child_support::{missing, Group, Proc, TempDir};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

/// How long Redis may take to start or stop on a loaded machine.
const BOUND: Duration = Duration::from_secs(20);

/// `redis-server`, or `None` (with a note) when it is missing outside CI.
pub fn redis_server() -> Option<PathBuf> {
    on_path("redis-server", "apt-get install redis-server")
}

/// `redis-cli` (Debian's redis-tools), or `None` (with a note) when it is missing outside CI.
pub fn redis_cli() -> Option<PathBuf> {
    on_path("redis-cli", "apt-get install redis-tools")
}

fn on_path(name: &str, install: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        missing("redis", name, "not on PATH", install);
    }
    found
}

/// A port free on 127.0.0.1 now (bound, then released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A `redis-server` on 127.0.0.1:`port`, without persistence; killed when dropped.
pub struct Redis {
    pub proc: Proc,
    pub port: u16,
    /// Its log file (in a temporary folder removed with it).
    log: PathBuf,
    /// How it was started (for [`Redis::restart`]).
    bin: PathBuf,
    extra: Vec<String>,
    /// Its folder (`--dir`: a cluster node's `nodes.conf`), removed with it.
    dir: TempDir,
}

impl Redis {
    pub fn start(bin: &PathBuf, port: u16) -> Redis {
        Redis::start_with(bin, port, &[])
    }

    /// With `extra` arguments (`--cluster-enabled yes`, ...).
    pub fn start_with(bin: &PathBuf, port: u16, extra: &[&str]) -> Redis {
        let dir = TempDir::new("redis");
        let log = dir.path().join("redis.log");
        let mut r = Redis {
            proc: Redis::spawn(bin, port, &dir, &log, extra),
            port,
            log,
            bin: bin.clone(),
            extra: extra.iter().map(|a| a.to_string()).collect(),
            dir,
        };
        r.await_ping();
        r
    }

    fn spawn(bin: &PathBuf, port: u16, dir: &TempDir, log: &PathBuf, extra: &[&str]) -> Proc {
        let p = port.to_string();
        Proc::spawn(
            "redis",
            Command::new(bin)
                .args([
                    "--port",
                    &p,
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                ])
                .arg("--dir")
                .arg(dir.path())
                .arg("--logfile")
                .arg(log)
                .args(extra),
        )
        .expect("spawn redis-server")
    }

    fn await_ping(&mut self) {
        let deadline = Instant::now() + BOUND;
        while self.command("PING").as_deref() != Some("+PONG") {
            assert!(
                Instant::now() < deadline && self.proc.running(),
                "redis-server did not answer PING on port {}:\n{}",
                self.port,
                self.proc.log()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL, wait until the port refuses connections, and start it again with the same
    /// arguments and folder (a cluster node comes back with its `nodes.conf`).
    pub fn restart(&mut self) {
        self.proc.group.kill();
        self.await_refused();
        let extra: Vec<&str> = self.extra.iter().map(String::as_str).collect();
        self.proc = Redis::spawn(&self.bin, self.port, &self.dir, &self.log, &extra);
        self.await_ping();
    }

    fn await_refused(&self) {
        let deadline = Instant::now() + BOUND;
        while TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
            assert!(
                Instant::now() < deadline,
                "redis still answers after SIGKILL"
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// What it logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// One inline command; the first line of the reply.
    pub fn command(&self, cmd: &str) -> Option<String> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        s.write_all(format!("{cmd}\r\n").as_bytes()).ok()?;
        let mut buf = [0u8; 512];
        let n = s.read(&mut buf).ok()?;
        let text = String::from_utf8_lossy(&buf[..n]).into_owned();
        text.lines().next().map(str::to_string)
    }

    /// SIGKILL, and wait until the port refuses connections.
    pub fn kill(mut self) {
        self.proc.group.kill();
        self.await_refused();
    }
}

/// A Redis Cluster of primaries without replicas, each a [`Redis`] on a free loopback port
/// with its cluster bus on another (`--cluster-port`), created with `redis-cli --cluster
/// create`; killed when dropped.
pub struct Cluster {
    pub nodes: Vec<Redis>,
}

impl Cluster {
    pub fn start(server: &PathBuf, cli: &PathBuf, primaries: usize) -> Cluster {
        let nodes: Vec<Redis> = (0..primaries)
            .map(|_| {
                let bus = free_port().to_string();
                let args = [
                    "--cluster-enabled",
                    "yes",
                    "--cluster-port",
                    &bus,
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    "5000",
                ];
                Redis::start_with(server, free_port(), &args)
            })
            .collect();
        let log = nodes[0].dir.path().join("create.log");
        let out = std::fs::File::create(&log).expect("create.log");
        let mut create = Group::spawn(
            Command::new(cli)
                .args(["--cluster", "create"])
                .args(nodes.iter().map(|r| format!("127.0.0.1:{}", r.port)))
                .arg("--cluster-yes")
                .stdin(std::process::Stdio::null())
                .stdout(out.try_clone().expect("create.log"))
                .stderr(out),
        )
        .expect("spawn redis-cli");
        let done = create.wait_exited(BOUND);
        let status = create.kill();
        let said = || std::fs::read_to_string(&log).unwrap_or_default();
        assert!(
            done && status.is_some_and(|s| s.success()),
            "redis-cli --cluster create: {status:?}\n{}",
            said()
        );
        let cluster = Cluster { nodes };
        cluster.await_ok();
        cluster
    }

    /// Wait (bounded) until every node says the cluster is ok.
    pub fn await_ok(&self) {
        let deadline = Instant::now() + BOUND;
        for r in &self.nodes {
            loop {
                let info = match RawRedis::connect(r.port).call(&[b"CLUSTER", b"INFO"]) {
                    Reply::Bulk(Some(b)) => String::from_utf8_lossy(&b).into_owned(),
                    other => format!("{other:?}"),
                };
                if info.contains("cluster_state:ok") {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "node {}: not ok within {BOUND:?}:\n{info}",
                    r.port
                );
                thread::sleep(Duration::from_millis(50));
            }
        }
    }

    /// The node (its index in `nodes`) that serves `channel`'s slot, and the slot, as the
    /// cluster says (`CLUSTER KEYSLOT`, `CLUSTER SLOTS`).
    pub fn owner(&self, channel: &str) -> (usize, i64) {
        let mut raw = RawRedis::connect(self.nodes[0].port);
        let Reply::Int(slot) = raw.call(&[b"CLUSTER", b"KEYSLOT", channel.as_bytes()]) else {
            panic!("CLUSTER KEYSLOT {channel}");
        };
        let Reply::Array(ranges) = raw.call(&[b"CLUSTER", b"SLOTS"]) else {
            panic!("CLUSTER SLOTS");
        };
        for range in ranges {
            if let Reply::Array(f) = range {
                if let [Reply::Int(start), Reply::Int(end), Reply::Array(primary), ..] = &f[..] {
                    if let [_, Reply::Int(port), ..] = &primary[..] {
                        if (*start..=*end).contains(&slot) {
                            let node = self.nodes.iter().position(|r| i64::from(r.port) == *port);
                            return (node.expect("a node of ours"), slot);
                        }
                    }
                }
            }
        }
        panic!("slot {slot} is served by no node");
    }
}

/// A client's next text message within `bound` (other frames skipped), if any; the client's
/// socket has a short read timeout, so that this can wait in steps.
pub fn next_text(ws: &mut tungstenite::WebSocket<TcpStream>, bound: Duration) -> Option<String> {
    let deadline = Instant::now() + bound;
    while Instant::now() < deadline {
        match ws.read() {
            Ok(tungstenite::Message::Text(t)) => return Some(t.to_string()),
            Ok(_) => {}
            Err(tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => panic!("client: {e}"),
        }
    }
    None
}

/// A reply from Redis (RESP2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Status(String),
    Error(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Array(Vec<Reply>),
}

/// A raw client of the Redis at 127.0.0.1:`port`: commands as arrays of bulk strings, replies
/// parsed; for what the bridge must withstand from someone else who can publish.
pub struct RawRedis {
    reader: std::io::BufReader<TcpStream>,
    writer: TcpStream,
}

impl RawRedis {
    pub fn connect(port: u16) -> RawRedis {
        let s = TcpStream::connect(("127.0.0.1", port)).expect("connect to redis");
        s.set_read_timeout(Some(BOUND)).unwrap();
        s.set_write_timeout(Some(BOUND)).unwrap();
        RawRedis {
            reader: std::io::BufReader::new(s.try_clone().unwrap()),
            writer: s,
        }
    }

    /// Send one command without waiting for its reply.
    pub fn send(&mut self, args: &[&[u8]]) {
        let mut out = format!("*{}\r\n", args.len()).into_bytes();
        for a in args {
            out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
            out.extend_from_slice(a);
            out.extend_from_slice(b"\r\n");
        }
        self.writer.write_all(&out).expect("write to redis");
    }

    /// The next reply (or message pushed to a subscriber).
    pub fn read(&mut self) -> Reply {
        use std::io::BufRead;
        let mut line = Vec::new();
        self.reader
            .read_until(b'\n', &mut line)
            .expect("read from redis");
        assert!(line.ends_with(b"\r\n"), "redis: {line:?}");
        let text = String::from_utf8_lossy(&line[1..line.len() - 2]).into_owned();
        let int = || text.parse::<i64>().expect("a length");
        match line[0] {
            b'+' => Reply::Status(text),
            b'-' => Reply::Error(text),
            b':' => Reply::Int(int()),
            b'$' if int() < 0 => Reply::Bulk(None),
            b'$' => {
                let mut b = vec![0; int() as usize + 2];
                self.reader.read_exact(&mut b).expect("read a bulk string");
                b.truncate(b.len() - 2);
                Reply::Bulk(Some(b))
            }
            b'*' => Reply::Array((0..int().max(0)).map(|_| self.read()).collect()),
            _ => panic!("redis: {line:?}"),
        }
    }

    /// One command and its reply.
    pub fn call(&mut self, args: &[&[u8]]) -> Reply {
        self.send(args);
        self.read()
    }

    /// `PUBLISH`: how many subscribers received it.
    pub fn publish(&mut self, channel: &str, payload: &[u8]) -> i64 {
        match self.call(&[b"PUBLISH", channel.as_bytes(), payload]) {
            Reply::Int(n) => n,
            other => panic!("PUBLISH {channel}: {other:?}"),
        }
    }

    /// Subscribers of `channel` now (`PUBSUB NUMSUB`).
    pub fn numsub(&mut self, channel: &str) -> i64 {
        self.subscribers("NUMSUB", channel)
    }

    /// Subscribers of the shard channel `channel` now (`PUBSUB SHARDNUMSUB`, Redis 7; on a
    /// cluster, ask the node that serves its slot).
    pub fn shardnumsub(&mut self, channel: &str) -> i64 {
        self.subscribers("SHARDNUMSUB", channel)
    }

    fn subscribers(&mut self, sub: &str, channel: &str) -> i64 {
        match self.call(&[b"PUBSUB", sub.as_bytes(), channel.as_bytes()]) {
            Reply::Array(a) if a.len() == 2 => match a[1] {
                Reply::Int(n) => n,
                _ => panic!("{sub} {channel}: {a:?}"),
            },
            other => panic!("{sub} {channel}: {other:?}"),
        }
    }

    /// Wait (bounded) until `channel` has `n` subscribers.
    pub fn wait_numsub(&mut self, channel: &str, n: i64) {
        self.wait_subscribers("NUMSUB", channel, n);
    }

    /// Wait (bounded) until the shard channel `channel` has `n` subscribers.
    pub fn wait_shardnumsub(&mut self, channel: &str, n: i64) {
        self.wait_subscribers("SHARDNUMSUB", channel, n);
    }

    fn wait_subscribers(&mut self, sub: &str, channel: &str, n: i64) {
        let deadline = Instant::now() + BOUND;
        loop {
            let now = self.subscribers(sub, channel);
            if now == n {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{channel}: {now} subscribers, not {n}"
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Subscribed (after `SUBSCRIBE`): the next message's payload on `channel`.
    pub fn next_message(&mut self, channel: &str) -> Vec<u8> {
        loop {
            if let Reply::Array(a) = self.read() {
                if let [Reply::Bulk(Some(kind)), Reply::Bulk(Some(chan)), Reply::Bulk(Some(p))] =
                    &a[..]
                {
                    if kind == b"message" && chan == channel.as_bytes() {
                        return p.clone();
                    }
                }
            }
        }
    }
}

/// A message in the bridge's wire format (README, "Several instances (Redis)"): magic and
/// version, instance, sequence number, opcode (1 text, 2 binary), payload.
pub fn wire(instance: u64, seq: u64, opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut m = b"ws\x01".to_vec();
    m.extend_from_slice(&instance.to_be_bytes());
    m.extend_from_slice(&seq.to_be_bytes());
    m.push(opcode);
    m.extend_from_slice(payload);
    m
}

impl RawRedis {
    /// The server's end of a connection (for [`FakeRedis`]).
    fn accepted(s: TcpStream) -> RawRedis {
        s.set_read_timeout(Some(BOUND)).unwrap();
        s.set_write_timeout(Some(BOUND)).unwrap();
        RawRedis {
            reader: std::io::BufReader::new(s.try_clone().unwrap()),
            writer: s,
        }
    }

    /// Write raw bytes (a reply, a message, or anything at all).
    pub fn write(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).expect("write to the bridge");
    }

    /// The next command, or `None` when the peer closed the connection (or went silent for
    /// the whole bound).
    pub fn command(&mut self) -> Option<Vec<Vec<u8>>> {
        use std::io::BufRead;
        if self.reader.fill_buf().map_or(true, |b| b.is_empty()) {
            return None;
        }
        match self.read() {
            Reply::Array(args) => Some(
                args.into_iter()
                    .map(|a| match a {
                        Reply::Bulk(Some(b)) => b,
                        other => panic!("not a command: {other:?}"),
                    })
                    .collect(),
            ),
            other => panic!("not a command: {other:?}"),
        }
    }
}

/// A stand-in for Redis on a free loopback port, to send the bridge what a real Redis never
/// does. A connection whose first command is a `SUBSCRIBE` (the bridge's subscriber) is handed
/// to the test ([`FakeRedis::subscriber`]); any other (the bridge's publisher) gets `+PONG` to
/// `PING` and `+OK` to anything else. Its listener stops when it is dropped.
pub struct FakeRedis {
    pub port: u16,
    subscribers: std::sync::mpsc::Receiver<(RawRedis, Vec<Vec<u8>>)>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl FakeRedis {
    pub fn start() -> FakeRedis {
        use std::sync::atomic::{AtomicBool, Ordering};
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let (tx, subscribers) = std::sync::mpsc::channel();
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        thread::spawn(move || {
            for s in listener.incoming() {
                if stopped.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(s) = s else { continue };
                let tx = tx.clone();
                thread::spawn(move || {
                    let mut con = RawRedis::accepted(s);
                    let mut first = true;
                    while let Some(cmd) = con.command() {
                        if first && cmd[0].eq_ignore_ascii_case(b"SUBSCRIBE") {
                            let _ = tx.send((con, cmd));
                            return;
                        }
                        first = false;
                        match cmd[0].eq_ignore_ascii_case(b"PING") {
                            true => con.write(b"+PONG\r\n"),
                            false => con.write(b"+OK\r\n"),
                        }
                    }
                });
            }
        });
        FakeRedis {
            port,
            subscribers,
            stop,
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// The next subscriber connection and its first command (within the bound).
    pub fn subscriber(&self) -> (RawRedis, Vec<Vec<u8>>) {
        self.subscriber_within(BOUND)
            .expect("the bridge's subscriber connected")
    }

    /// The next subscriber connection, if one comes within `wait`.
    pub fn subscriber_within(&self, wait: Duration) -> Option<(RawRedis, Vec<Vec<u8>>)> {
        self.subscribers.recv_timeout(wait).ok()
    }
}

impl Drop for FakeRedis {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        // Wake the listener's accept.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}
