//! A `redis-server` as a child process, for the tests of the Redis bridge (`tests/redis.rs`,
//! and nginx in front of two instances in `tests/nginx.rs`): started on a free loopback port
//! without persistence, logging to a file of its own, killed when dropped. Without
//! `redis-server` on PATH a test prints a note and skips; under `CI` that is an error.
//!
//! Included by the test files that use it (`mod redis_support;`, after `mod child_support;`).
#![allow(dead_code)]

use crate::child_support::{missing, Proc, TempDir};
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
    let found = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join("redis-server"))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        missing(
            "redis",
            "redis-server",
            "not on PATH",
            "apt-get install redis-server",
        );
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
    _dir: TempDir,
}

impl Redis {
    pub fn start(bin: &PathBuf, port: u16) -> Redis {
        let p = port.to_string();
        let dir = TempDir::new("redis");
        let log = dir.path().join("redis.log");
        let proc = Proc::spawn(
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
                    "--logfile",
                ])
                .arg(&log),
        )
        .expect("spawn redis-server");
        let r = Redis {
            proc,
            port,
            log,
            _dir: dir,
        };
        let deadline = Instant::now() + BOUND;
        while r.command("PING").as_deref() != Some("+PONG") {
            assert!(
                Instant::now() < deadline && r.proc.running(),
                "redis-server did not answer PING on port {port}:\n{}",
                r.proc.log()
            );
            thread::sleep(Duration::from_millis(20));
        }
        r
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
        let deadline = Instant::now() + BOUND;
        while TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
            assert!(
                Instant::now() < deadline,
                "redis still answers after SIGKILL"
            );
            thread::sleep(Duration::from_millis(20));
        }
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
