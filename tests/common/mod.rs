//! Shared helpers for the loopback integration tests: a recording handler, a server running in
//! its own thread, raw-socket clients that speak (or break) RFC 6455 by hand, and bounded waits.
//!
//! Every client socket gets a read timeout, so a server bug fails a test instead of hanging it.
#![allow(dead_code)]

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle, ThreadId};
use std::time::{Duration, Instant};
use wsloop::{
    CloseCode, CloseReason, Config, ConnId, Decision, Handler, LoopHandle, Message, Server, Stats,
    UpgradeRequest, WebSocket,
};

/// Read timeout on every client socket: long enough for a loaded machine, short enough that a
/// missing answer fails the test quickly.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound for waiting on asynchronous effects (closes, counters).
pub const WAIT: Duration = Duration::from_secs(5);

/// A config with short timeouts, idle disabled (tests that want it set it).
pub fn config() -> Config {
    Config {
        max_message_size: 64 * 1024,
        handshake_timeout: Duration::from_secs(5),
        idle_timeout: Duration::ZERO,
        close_timeout: Duration::from_secs(1),
        shutdown_timeout: Duration::from_secs(2),
        // The tests scrape /metrics on the WebSocket port (off by default), often.
        serve_metrics: true,
        endpoint_rate: 0,
        ..Config::default()
    }
}

/// How the recording handler behaves.
#[derive(Clone, Default)]
pub struct Opts {
    /// Reject every upgrade with this status and reason.
    pub reject: Option<(u16, &'static str)>,
    /// Accept with this subprotocol.
    pub subprotocol: Option<String>,
    /// `on_open` sends each new connection's id here.
    pub opened: Option<mpsc::Sender<ConnId>>,
}

/// One `on_close` call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Closed {
    pub id: ConnId,
    pub data: u64,
    pub code: u16,
    pub reason: String,
}

/// Everything the handler saw.
#[derive(Default, Debug)]
pub struct Rec {
    /// Upgrade hook calls.
    pub upgrades: usize,
    /// `on_open` calls: the id and the per-connection data created at upgrade.
    pub opens: Vec<(ConnId, u64)>,
    pub closes: Vec<Closed>,
    pub messages: usize,
    pub pings: usize,
    pub pongs: usize,
    pub drains: usize,
    /// The loop thread, as seen in callbacks.
    pub loop_thread: Option<ThreadId>,
}

impl Rec {
    pub fn closes_of(&self, id: ConnId) -> Vec<Closed> {
        self.closes.iter().filter(|c| c.id == id).cloned().collect()
    }
}

/// Echoes every message, except the text commands `close-me` (close 4000 "bye"),
/// `terminate-me`, `panic-me` (panics) and `sleep-ms N` (blocks the loop for N ms, then echoes);
/// an upgrade to `/panic-in-upgrade` panics. Records every callback.
pub struct Recorder {
    rec: Arc<Mutex<Rec>>,
    opts: Opts,
    seq: u64,
}

impl Recorder {
    /// A recorder writing to `rec` (several may share one, as a cluster's loops do).
    pub fn new(rec: Arc<Mutex<Rec>>, opts: Opts) -> Recorder {
        Recorder { rec, opts, seq: 0 }
    }
}

fn lock(rec: &Mutex<Rec>) -> MutexGuard<'_, Rec> {
    rec.lock().unwrap_or_else(|e| e.into_inner())
}

impl Handler for Recorder {
    type Data = u64;

    fn upgrade(&mut self, req: &UpgradeRequest<'_>) -> Decision<u64> {
        lock(&self.rec).upgrades += 1;
        if req.path() == "/panic-in-upgrade" {
            panic!("upgrade hook panics on purpose");
        }
        if let Some((status, reason)) = self.opts.reject {
            return Decision::Reject { status, reason };
        }
        self.seq += 1;
        Decision::Accept {
            data: self.seq,
            subprotocol: self.opts.subprotocol.clone(),
        }
    }

    fn on_open(&mut self, ws: &mut WebSocket<'_, u64>) {
        let mut r = lock(&self.rec);
        r.opens.push((ws.id(), *ws.data()));
        r.loop_thread = Some(thread::current().id());
        if let Some(tx) = &self.opts.opened {
            let _ = tx.send(ws.id());
        }
    }

    fn on_message(&mut self, ws: &mut WebSocket<'_, u64>, msg: Message<'_>) {
        lock(&self.rec).messages += 1;
        match msg {
            Message::Text("close-me") => ws.close(CloseCode(4000), "bye"),
            Message::Text("terminate-me") => ws.terminate(),
            Message::Text("panic-me") => panic!("on_message panics on purpose"),
            Message::Text(t) if t.starts_with("sleep-ms ") => {
                let ms = t["sleep-ms ".len()..].parse().unwrap_or(0);
                thread::sleep(Duration::from_millis(ms));
                ws.send(msg);
            }
            _ => {
                ws.send(msg);
            }
        }
    }

    fn on_ping(&mut self, _ws: &mut WebSocket<'_, u64>, _payload: &[u8]) {
        lock(&self.rec).pings += 1;
    }

    fn on_pong(&mut self, _ws: &mut WebSocket<'_, u64>, _payload: &[u8]) {
        lock(&self.rec).pongs += 1;
    }

    fn on_drain(&mut self, _ws: &mut WebSocket<'_, u64>) {
        lock(&self.rec).drains += 1;
    }

    fn on_close(&mut self, id: ConnId, data: u64, code: CloseCode, reason: &str) {
        lock(&self.rec).closes.push(Closed {
            id,
            data,
            code: code.0,
            reason: reason.to_string(),
        });
    }
}

/// A server running in its own thread.
pub struct TestServer {
    pub addr: SocketAddr,
    pub handle: LoopHandle<Recorder>,
    pub rec: Arc<Mutex<Rec>>,
    done: mpsc::Receiver<Result<Option<Stats>, wsloop::Error>>,
    thread: Option<JoinHandle<()>>,
}

/// How the server thread drives the loop.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Drive {
    /// `Server::run()`.
    Run,
    /// `while server.turn(None)? {}` (what `run` does), then return the final stats, for tests
    /// that must count closes that happen during shutdown.
    Turn,
}

impl TestServer {
    pub fn start(config: Config) -> TestServer {
        Self::start_with(config, Opts::default())
    }

    pub fn start_with(config: Config, opts: Opts) -> TestServer {
        Self::start_full(config, opts, "127.0.0.1:0".parse().unwrap(), Drive::Run)
            .expect("listen on 127.0.0.1")
    }

    pub fn start_full(
        config: Config,
        opts: Opts,
        listen: SocketAddr,
        drive: Drive,
    ) -> Result<TestServer, wsloop::Error> {
        let rec = Arc::new(Mutex::new(Rec::default()));
        let handler = Recorder {
            rec: rec.clone(),
            opts,
            seq: 0,
        };
        let mut server = Server::new(config, handler)?;
        let addr = server.listen(listen)?;
        let handle = server.handle();
        let (tx, done) = mpsc::channel();
        let thread = thread::Builder::new()
            .name("wsloop-test-loop".into())
            .spawn(move || {
                let result = match drive {
                    Drive::Run => server.run().map(|()| None),
                    Drive::Turn => (|| {
                        while server.turn(None)? {}
                        Ok(Some(server.stats()))
                    })(),
                };
                let _ = tx.send(result);
            })
            .unwrap();
        Ok(TestServer {
            addr,
            handle,
            rec,
            done,
            thread: Some(thread),
        })
    }

    pub fn rec(&self) -> MutexGuard<'_, Rec> {
        lock(&self.rec)
    }

    /// Wait (bounded) until `cond` holds on the record.
    pub fn wait_rec(&self, what: &str, cond: impl Fn(&Rec) -> bool) {
        let deadline = Instant::now() + WAIT;
        loop {
            if cond(&self.rec()) {
                return;
            }
            if Instant::now() > deadline {
                panic!("timed out waiting for {what}; record: {:?}", *self.rec());
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Wait until `n` connections have opened and return the id of the `n`-th.
    pub fn wait_open(&self, n: usize) -> ConnId {
        self.wait_rec(&format!("{n} opens"), |r| r.opens.len() >= n);
        self.rec().opens[n - 1].0
    }

    /// Wait until `n` closes were recorded.
    pub fn wait_closes(&self, n: usize) {
        self.wait_rec(&format!("{n} closes"), |r| r.closes.len() >= n);
    }

    /// The loop's stats. Panics if it has ended, or does not answer within [`WAIT`] (a loop
    /// stuck in a turn fails the test instead of hanging it).
    pub fn stats(&self) -> Stats {
        let handle = self.handle.clone();
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            // The test may have given up waiting: then nobody wants the answer.
            let _ = tx.send(handle.stats());
        });
        rx.recv_timeout(WAIT)
            .expect("the loop did not answer a query: stuck in a turn?")
            .expect("loop is running")
    }

    /// Wait (bounded) until `cond` holds on the loop's stats, and return them.
    pub fn wait_stats(&self, what: &str, cond: impl Fn(&Stats) -> bool) -> Stats {
        let deadline = Instant::now() + WAIT;
        loop {
            let s = self.stats();
            if cond(&s) {
                return s;
            }
            if Instant::now() > deadline {
                panic!("timed out waiting for {what}: {s:?}");
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Wait (bounded) until no connection and no timer is left, and return the stats.
    pub fn wait_quiet(&self) -> Stats {
        self.wait_stats("no connection and no timer", |s| {
            s.connections == 0 && s.timers == 0
        })
    }

    /// Wait until the loop thread has returned; panics if it does not within `bound`.
    pub fn join(mut self, bound: Duration) -> Option<Stats> {
        let result = self
            .done
            .recv_timeout(bound)
            .expect("run() did not return in time");
        self.thread.take().unwrap().join().unwrap();
        result.expect("run() returned an error")
    }

    /// The end of every test: wait until no connection and no timer is left, check that every
    /// opened connection was closed exactly once with its own data, shut down, check that
    /// `run()` returned Ok, and return the stats taken before shutdown.
    pub fn finish(self) -> Stats {
        let stats = self.wait_quiet();
        check_open_close_pairs(&self.rec());
        self.handle.shutdown().expect("the loop is running");
        self.join(Duration::from_secs(10));
        stats
    }
}

impl TestServer {
    /// Wait until the first connection has closed, and check the code `on_close` got for it.
    pub fn wait_close_code(&self, code: u16) {
        self.wait_closes(1);
        assert_eq!(self.rec().closes[0].code, code);
    }

    /// [`TestServer::finish`], then check that the close reasons counted are exactly
    /// `expected` (see [`assert_closed`]).
    pub fn finish_closed(self, expected: &[(CloseReason, u64)]) -> Stats {
        let stats = self.finish();
        assert_closed(&stats, expected);
        stats
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        // A failing test must not leave its loop running (the test binary would not exit).
        if self.thread.is_some() {
            let _ = self.handle.shutdown();
        }
    }
}

/// Every opened connection got exactly one `on_close`, with its own data; nothing else did.
pub fn check_open_close_pairs(rec: &Rec) {
    for (id, data) in &rec.opens {
        let closes = rec.closes_of(*id);
        assert_eq!(
            closes.len(),
            1,
            "{id} closed {} times: {rec:?}",
            closes.len()
        );
        assert_eq!(closes[0].data, *data, "{id} closed with another's data");
    }
    assert_eq!(
        rec.closes.len(),
        rec.opens.len(),
        "on_close without on_open: {rec:?}"
    );
}

/// The close reasons counted are exactly `expected` (every other reason zero).
pub fn assert_closed(stats: &Stats, expected: &[(CloseReason, u64)]) {
    let mut want = [0u64; CloseReason::LABELS.len()];
    for (reason, n) in expected {
        want[reason.index()] += n;
    }
    let got: Vec<(&str, u64)> = CloseReason::LABELS
        .iter()
        .zip(stats.closed)
        .filter(|(_, n)| *n > 0)
        .map(|(l, n)| (*l, n))
        .collect();
    assert_eq!(stats.closed, want, "close reasons counted: {got:?}");
}

// ---------------------------------------------------------------------------------------------
// Clients

/// A TCP connection with a read and write timeout.
pub fn tcp(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
    s.set_write_timeout(Some(READ_TIMEOUT)).unwrap();
    s
}

/// As [`tcp`], with `SO_RCVBUF` set to `rcvbuf` before connecting, so that the window the
/// client advertises stays small and a server writing to it soon finds its socket full.
pub fn tcp_rcvbuf(addr: SocketAddr, rcvbuf: usize) -> TcpStream {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, None).expect("socket");
    s.set_recv_buffer_size(rcvbuf).expect("SO_RCVBUF");
    s.connect(&addr.into()).expect("connect");
    let s: TcpStream = s.into();
    s.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
    s.set_write_timeout(Some(READ_TIMEOUT)).unwrap();
    s
}

pub type Ws = tungstenite::WebSocket<TcpStream>;

/// A tungstenite client over a std socket with timeouts.
pub fn ws(addr: SocketAddr) -> Ws {
    ws_request(addr, format!("ws://{addr}/").as_str()).0
}

pub fn ws_request<R: tungstenite::client::IntoClientRequest>(
    addr: SocketAddr,
    req: R,
) -> (Ws, tungstenite::handshake::client::Response) {
    let config = tungstenite::protocol::WebSocketConfig::default()
        .max_message_size(Some(64 << 20))
        .max_frame_size(Some(64 << 20));
    tungstenite::client::client_with_config(req, tcp(addr), Some(config))
        .unwrap_or_else(|e| panic!("handshake failed: {e}"))
}

pub const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

pub fn upgrade_request(addr: SocketAddr) -> String {
    format!(
        "GET /chat HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
}

/// Upgrade with these `Sec-WebSocket-Extensions` lines; returns the socket and the response
/// head.
pub fn upgrade_offering(addr: SocketAddr, offers: &[&str]) -> (TcpStream, String) {
    let mut s = tcp(addr);
    s.set_nodelay(true).unwrap();
    let mut req = upgrade_request(addr);
    req.truncate(req.len() - 2);
    for o in offers {
        req.push_str(&format!("Sec-WebSocket-Extensions: {o}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    let head = read_head(&mut s);
    (s, head)
}

/// Read an HTTP response head byte by byte (so no frame bytes after it are consumed).
pub fn read_head(s: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match s.read(&mut b) {
            Ok(0) => panic!(
                "EOF inside response head: {:?}",
                String::from_utf8_lossy(&head)
            ),
            Ok(_) => head.push(b[0]),
            Err(e) => panic!(
                "reading response head: {e}; got {:?}",
                String::from_utf8_lossy(&head)
            ),
        }
    }
    String::from_utf8(head).expect("ASCII head")
}

/// A raw socket that completed the upgrade.
pub fn raw_ws(addr: SocketAddr) -> TcpStream {
    let mut s = tcp(addr);
    s.set_nodelay(true).unwrap();
    s.write_all(upgrade_request(addr).as_bytes()).unwrap();
    let head = read_head(&mut s);
    assert!(
        head.starts_with("HTTP/1.1 101 "),
        "upgrade refused: {head:?}"
    );
    s
}

pub const OP_CONT: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

/// A client frame: `first` is the first header byte (FIN, RSV, opcode), the payload is masked
/// with `mask` (or sent in the clear with `None`), and the length encoded minimally.
pub fn frame_raw(first: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut out = vec![first];
    let m = if mask.is_some() { 0x80 } else { 0 };
    let len = payload.len();
    if len < 126 {
        out.push(m | len as u8);
    } else if len <= 0xffff {
        out.push(m | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(m | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    match mask {
        Some(k) => {
            out.extend_from_slice(&k);
            out.extend(payload.iter().enumerate().map(|(i, b)| b ^ k[i % 4]));
        }
        None => out.extend_from_slice(payload),
    }
    out
}

/// A masked client frame.
pub fn frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    frame_raw(((fin as u8) << 7) | opcode, payload, Some(MASK))
}

/// Masked client frames, `(fin, opcode, payload)` each, one after the other (for one write).
pub fn frames(parts: &[(bool, u8, &[u8])]) -> Vec<u8> {
    parts
        .iter()
        .flat_map(|&(fin, opcode, payload)| frame(fin, opcode, payload))
        .collect()
}

/// A masked close frame with `code` and `reason`.
pub fn close_frame(code: u16, reason: &str) -> Vec<u8> {
    let mut p = code.to_be_bytes().to_vec();
    p.extend_from_slice(reason.as_bytes());
    frame(true, OP_CLOSE, &p)
}

/// A frame from the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub fin: bool,
    pub rsv: u8,
    pub opcode: u8,
    pub masked: bool,
    pub payload: Vec<u8>,
}

impl Frame {
    /// The close code and reason of a close frame (`None` for an empty payload).
    pub fn close(&self) -> Option<(u16, String)> {
        assert_eq!(
            self.opcode, OP_CLOSE,
            "expected a close frame, got {self:?}"
        );
        if self.payload.is_empty() {
            return None;
        }
        assert!(self.payload.len() >= 2, "1-byte close payload");
        let code = u16::from_be_bytes([self.payload[0], self.payload[1]]);
        let reason = String::from_utf8(self.payload[2..].to_vec()).expect("UTF-8 close reason");
        Some((code, reason))
    }
}

/// Read one frame from the server; panics on EOF or timeout.
pub fn read_frame(s: &mut TcpStream) -> Frame {
    let mut h = [0u8; 2];
    s.read_exact(&mut h)
        .unwrap_or_else(|e| panic!("reading frame header: {e}"));
    let mut len = (h[1] & 0x7f) as u64;
    if len == 126 {
        let mut b = [0u8; 2];
        s.read_exact(&mut b).unwrap();
        len = u16::from_be_bytes(b) as u64;
    } else if len == 127 {
        let mut b = [0u8; 8];
        s.read_exact(&mut b).unwrap();
        len = u64::from_be_bytes(b);
    }
    let masked = h[1] & 0x80 != 0;
    let mut key = [0u8; 4];
    if masked {
        s.read_exact(&mut key).unwrap();
    }
    let mut payload = vec![0u8; len as usize];
    s.read_exact(&mut payload)
        .unwrap_or_else(|e| panic!("reading {len}-byte payload: {e}"));
    if masked {
        for (i, b) in payload.iter_mut().enumerate() {
            *b ^= key[i % 4];
        }
    }
    Frame {
        fin: h[0] & 0x80 != 0,
        rsv: (h[0] >> 4) & 0x7,
        opcode: h[0] & 0x0f,
        masked,
        payload,
    }
}

/// Read one frame and check that it is a final, unmasked frame of `opcode`; return the payload.
pub fn expect_frame(s: &mut TcpStream, opcode: u8) -> Vec<u8> {
    let f = read_frame(s);
    assert!(f.fin && f.rsv == 0 && !f.masked, "bad server frame {f:?}");
    assert_eq!(f.opcode, opcode, "unexpected frame {f:?}");
    f.payload
}

/// Read the server's close frame; return its code and reason.
pub fn expect_close(s: &mut TcpStream) -> (u16, String) {
    let f = read_frame(s);
    assert!(f.fin && !f.masked, "bad close frame {f:?}");
    f.close().expect("close frame without a code")
}

/// Read until the server closes the connection. Returns what was read before EOF. Panics on a
/// timeout, and on a reset: the server must close with a FIN after its last bytes.
#[must_use = "the bytes before EOF: check them, or use expect_clean_eof"]
pub fn expect_eof(s: &mut TcpStream) -> Vec<u8> {
    let mut all = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return all,
            Ok(n) => all.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => panic!(
                "expected EOF, got {e} after {} bytes {:?}",
                all.len(),
                String::from_utf8_lossy(&all[..all.len().min(200)])
            ),
        }
    }
}

/// Read the server's EOF, with nothing before it (after its close frame, or a terminate).
pub fn expect_clean_eof(s: &mut TcpStream) {
    let rest = expect_eof(s);
    assert!(
        rest.is_empty(),
        "{} bytes before EOF, expected none: {:?}",
        rest.len(),
        String::from_utf8_lossy(&rest[..rest.len().min(200)])
    );
}

/// Read with tungstenite until the server closes the TCP connection; return the close frame
/// received on the way, if any. Panics on a message, a timeout or a reset.
pub fn read_until_closed(ws: &mut Ws) -> Option<tungstenite::protocol::CloseFrame> {
    let mut frame = None;
    loop {
        match ws.read() {
            Ok(tungstenite::Message::Close(f)) => frame = f,
            Ok(m) => panic!("unexpected message while waiting for the end: {m:?}"),
            Err(tungstenite::Error::ConnectionClosed) => return frame,
            Err(e) => panic!("reading until closed: {e}"),
        }
    }
}

/// The client closes (without a code) and reads to the end: the server must answer with a
/// close frame, then close the TCP connection. Panics on anything else: a message, a
/// timeout, a reset, or an end without the server's close frame.
pub fn close_client(ws: &mut Ws) {
    ws.close(None)
        .unwrap_or_else(|e| panic!("sending our close: {e}"));
    expect_close_reply(ws);
}

/// After the client's close: the server's close frame, then the end of the TCP connection (see
/// [`close_client`]).
pub fn expect_close_reply(ws: &mut Ws) {
    let mut answered = false;
    loop {
        match ws.read() {
            Ok(tungstenite::Message::Close(_)) => answered = true,
            Ok(m) => panic!("unexpected message while closing: {m:?}"),
            Err(tungstenite::Error::ConnectionClosed) => break,
            Err(e) => panic!("closing: {e}"),
        }
    }
    assert!(
        answered,
        "the server ended the connection without answering our close"
    );
}

// ---------------------------------------------------------------------------------------------
// Deadlines

/// The timer wheel's tick. The loop reads its clock in whole milliseconds, rounded down, so a
/// deadline `d` after an event fires no earlier than `d` minus one tick after it: the exact
/// lower bound of every deadline seen from outside.
pub const TICK: Duration = Duration::from_millis(1);
/// How much later than its deadline something may happen on a loaded machine (two shared,
/// noisy cores) before a test calls the deadline broken: generous.
pub const LATE: Duration = Duration::from_secs(2);

/// `took`, measured by a client from before the event a deadline counts from (a connect, the
/// last byte sent), is that deadline: not earlier (but for the tick), and at most [`LATE`]
/// later.
pub fn assert_deadline(what: &str, took: Duration, deadline: Duration) {
    assert!(
        took + TICK >= deadline,
        "{what}: after {took:?}, before its deadline of {deadline:?}"
    );
    assert!(
        took <= deadline + LATE,
        "{what}: after {took:?}, {:?} past its deadline of {deadline:?}",
        took - deadline
    );
}

/// An HTTP response read up to the server's EOF.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Read a complete response and the server's EOF; check `Content-Length` against the body.
pub fn read_response(s: &mut TcpStream) -> Response {
    let raw = expect_eof(s);
    let text = String::from_utf8(raw).expect("ASCII response");
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("incomplete response {text:?}"));
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap();
    assert!(
        status_line.starts_with("HTTP/1.1 "),
        "bad status line {status_line:?}"
    );
    let status = status_line[9..12].parse().expect("status code");
    let headers: Vec<(String, String)> = lines
        .map(|l| {
            let (n, v) = l.split_once(':').expect("header line");
            (n.trim().to_string(), v.trim().to_string())
        })
        .collect();
    let r = Response {
        status,
        headers,
        body: body.to_string(),
    };
    if let Some(len) = r.header("content-length") {
        assert_eq!(len.parse::<usize>().unwrap(), r.body.len(), "{r:?}");
    }
    r
}

/// Deterministic pseudo-random bytes.
pub fn bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Printable ASCII text of exactly `len` bytes.
pub fn text(len: usize, seed: u64) -> String {
    bytes(len, seed)
        .into_iter()
        .map(|b| (b' ' + b % 95) as char)
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Observability: a server with extra listeners, plain HTTP requests, the Prometheus text format

impl TestServer {
    /// As [`TestServer::start_with`], but `setup` runs on the server after it listens on
    /// 127.0.0.1:0 and before the loop starts (to add listeners, such as
    /// `Server::listen_metrics`); its result is returned with the server.
    pub fn start_setup<T>(
        config: Config,
        opts: Opts,
        setup: impl FnOnce(&mut Server<Recorder>) -> Result<T, wsloop::Error>,
    ) -> (TestServer, T) {
        let rec = Arc::new(Mutex::new(Rec::default()));
        let handler = Recorder {
            rec: rec.clone(),
            opts,
            seq: 0,
        };
        let mut server = Server::new(config, handler).expect("server");
        let addr = server
            .listen("127.0.0.1:0".parse().unwrap())
            .expect("listen on 127.0.0.1");
        let extra = setup(&mut server).expect("setup");
        let handle = server.handle();
        let (tx, done) = mpsc::channel();
        let thread = thread::Builder::new()
            .name("wsloop-test-loop".into())
            .spawn(move || {
                let _ = tx.send(server.run().map(|()| None));
            })
            .unwrap();
        let server = TestServer {
            addr,
            handle,
            rec,
            done,
            thread: Some(thread),
        };
        (server, extra)
    }
}

/// A plain `GET path` request (no upgrade).
pub fn get_request(addr: SocketAddr, path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: wsloop-tests\r\n\r\n")
}

/// Send `request` on a new connection and read the response up to the server's EOF.
pub fn http_request(addr: SocketAddr, request: &str) -> Response {
    let mut s = tcp(addr);
    http_on(&mut s, request)
}

/// Send `request` on a connected socket and read the response up to the server's EOF; the
/// socket stays open (the caller decides when its descriptor goes).
pub fn http_on(s: &mut TcpStream, request: &str) -> Response {
    s.write_all(request.as_bytes()).expect("send request");
    read_response(s)
}

/// `GET path` on a new connection.
pub fn http_get(addr: SocketAddr, path: &str) -> Response {
    http_request(addr, &get_request(addr, path))
}

/// One sample line of the Prometheus text format: `name{label="value",...} value`.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

/// One line of a text-format exposition, in order.
#[derive(Clone, Debug, PartialEq)]
pub enum PromLine {
    Help { name: String, text: String },
    Type { name: String, kind: String },
    Sample(Sample),
}

/// A parsed exposition (text format 0.0.4): its lines in order.
#[derive(Clone, Debug, Default)]
pub struct Exposition {
    pub lines: Vec<PromLine>,
}

/// Parse the text format strictly: `# HELP name text`, `# TYPE name kind`, other `#` comments
/// (skipped), and `name{labels} value` samples (no timestamps). Panics on anything else, naming
/// the line.
pub fn parse_metrics(text: &str) -> Exposition {
    let mut lines = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let fail = |why: &str| -> ! { panic!("metrics line {}: {why}: {line:?}", n + 1) };
        if line.is_empty() {
            fail("empty line");
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, text) = rest
                .split_once(' ')
                .unwrap_or_else(|| fail("HELP without text"));
            lines.push(PromLine::Help {
                name: name.to_string(),
                text: text.to_string(),
            });
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest
                .split_once(' ')
                .unwrap_or_else(|| fail("TYPE without kind"));
            lines.push(PromLine::Type {
                name: name.to_string(),
                kind: kind.to_string(),
            });
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        let name_end = line.find(['{', ' ']).unwrap_or_else(|| fail("no value"));
        let name = &line[..name_end];
        let valid_name = !name.is_empty()
            && !name.starts_with(|c: char| c.is_ascii_digit())
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':');
        if !valid_name {
            fail("bad metric name");
        }
        let mut rest = &line[name_end..];
        let mut labels = Vec::new();
        if let Some(after) = rest.strip_prefix('{') {
            rest = after;
            loop {
                if let Some(after) = rest.strip_prefix('}') {
                    rest = after;
                    break;
                }
                let (key, after) = rest.split_once("=\"").unwrap_or_else(|| fail("bad label"));
                let key_ok =
                    !key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
                if !key_ok {
                    fail("bad label name");
                }
                let mut value = String::new();
                let mut chars = after.char_indices();
                let end = loop {
                    match chars.next() {
                        Some((i, '"')) => break i,
                        Some((_, '\\')) => match chars.next() {
                            Some((_, 'n')) => value.push('\n'),
                            Some((_, c @ ('\\' | '"'))) => value.push(c),
                            _ => fail("bad escape in label value"),
                        },
                        Some((_, c)) => value.push(c),
                        None => fail("unterminated label value"),
                    }
                };
                labels.push((key.to_string(), value));
                rest = &after[end + 1..];
                if let Some(after) = rest.strip_prefix(',') {
                    rest = after;
                } else if !rest.starts_with('}') {
                    fail("expected , or } after a label");
                }
            }
        }
        let value = rest
            .strip_prefix(' ')
            .unwrap_or_else(|| fail("no space before the value"));
        if value.contains(' ') {
            fail("trailing fields (timestamps are not expected)");
        }
        let value: f64 = value.parse().unwrap_or_else(|_| fail("bad value"));
        lines.push(PromLine::Sample(Sample {
            name: name.to_string(),
            labels,
            value,
        }));
    }
    Exposition { lines }
}

impl Exposition {
    pub fn samples(&self) -> impl Iterator<Item = &Sample> {
        self.lines.iter().filter_map(|l| match l {
            PromLine::Sample(s) => Some(s),
            _ => None,
        })
    }

    /// The value of the sample `name` with exactly the labels `labels` (in any order), if any.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let mut found = self.samples().filter(|s| {
            s.name == name
                && s.labels.len() == labels.len()
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.iter().any(|(k2, v2)| k2 == k && v2 == v))
        });
        let first = found.next()?;
        assert!(found.next().is_none(), "duplicate sample {name}{labels:?}");
        Some(first.value)
    }

    /// As [`Exposition::get`]; panics if the sample is missing.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels)
            .unwrap_or_else(|| panic!("no sample {name}{labels:?} in the metrics"))
    }

    /// The `# TYPE` of family `name`, if declared.
    pub fn kind(&self, name: &str) -> Option<&str> {
        self.lines.iter().find_map(|l| match l {
            PromLine::Type { name: n, kind } if n == name => Some(kind.as_str()),
            _ => None,
        })
    }

    /// Every family declared with `# TYPE`, in order.
    pub fn families(&self) -> Vec<String> {
        self.lines
            .iter()
            .filter_map(|l| match l {
                PromLine::Type { name, .. } => Some(name.clone()),
                _ => None,
            })
            .collect()
    }
}
