//! `tls`: arbitrary bytes as the TLS stream a client sends to the server side of a TLS
//! connection, driven as the loop drives its transport (`wsloop::fuzzing::TlsServer`: the
//! server's own rustls configuration and handshake, its own records after it, its read loop,
//! its sealed writes and its `close_notify`), over bytes in memory; what the server decrypts goes through the HTTP
//! upgrade parser (`Session::feed_head`, then `validate_upgrade`), as in the loop.
//!
//! Two modes. Raw (flags bit 0 clear): the stream bytes are the client's TLS bytes as they
//! are (a ClientHello, garbage, cleartext, a record cut anywhere). Client (bit 0 set): a real
//! rustls client (TLS 1.3, or 1.2 with bit 1; records of at most 64 bytes of plaintext with bit
//! 2) completes a handshake with the server first, then the operations make it send the stream
//! bytes as plaintext, or raw between its records, and update its keys or send `close_notify`.
//!
//! Properties: nothing panics. Memory: what the server holds after each of its calls (the heap
//! bytes it allocated and has not freed, measured by a counting allocator around every call)
//! stays under [`MEMORY_BOUND`] ([`OPEN_BOUND`] once the handshake completed), whatever the
//! input: the handshake's input (at most 16 KiB and one read), then a split record, the
//! ciphertext held for a full socket (one write's), and the connection's state; and a write,
//! however much it offers, makes the server hold at most one write's ciphertext more
//! ([`WRITE_LIMIT`] and its records' overhead). The loop thread's sealing buffer, shared by all
//! its connections, is not counted (its growth is taken out of each call's). No unauthenticated plaintext: in raw
//! mode no handshake completes and no byte is ever decrypted. Integrity, in client mode: the
//! server reads exactly what the client sent, in order (a prefix of it; all of it unless a raw
//! byte broke the stream or the stream ended first), and the client reads exactly what the
//! server's writes took (a prefix; all of it once the socket takes everything, unless the
//! server failed); a valid upgrade request sent by the client completes the head and passes
//! `validate_upgrade`. Output: the server writes only well-formed TLS records. Failure: once a
//! read failed with a TLS error, a write fails too (nothing is written after the alert).
//!
//! Input: `[flags, room, buf, n_ops]`, then `n_ops` operations of 3 bytes (see [`Op`]), then
//! the stream bytes. The socket's send buffer takes `64 * (room + 1)` bytes; the server reads
//! into a buffer of [`BUFS`]`[buf % 4]` bytes (at least the transport's smallest).
//!
//! The server's certificate and key, and the CA the client trusts, are made once per process
//! with the openssl CLI in a temporary folder. Without openssl the check prints a note and
//! does nothing, unless `CI` is set: then it panics.

use std::io::{ErrorKind, Read, Write};
use std::sync::{Arc, OnceLock};

use stats_alloc::{Region, StatsAlloc, INSTRUMENTED_SYSTEM};
use wsloop::fuzzing::{scratch_capacity, TlsServer, TlsServerConfig, MIN_READ_BUFFER, WRITE_LIMIT};
use wsloop::protocol::handshake::{validate_upgrade, Limits};
use wsloop::protocol::session::{Head, Session};

use super::connection::CANNED_REQUEST;
use super::util::Reader;

/// Every allocation of the process is counted, so that what the server holds can be measured
/// around each of its calls (one thread: the fuzzer's, or the replay child's).
#[global_allocator]
static GLOBAL: &StatsAlloc<std::alloc::System> = &INSTRUMENTED_SYSTEM;

/// The most heap bytes one server connection may hold after any of its calls while its
/// handshake is in progress: the transport refuses more than 16 KiB of handshake input
/// (`MAX_HANDSHAKE_INPUT`), so its input buffer holds that and one 4 KiB read (in an allocation
/// of up to 32 KiB); its handshake output, and rustls's state (certificate chain, transcript,
/// keys). Without that limit a ClientHello announcing 64 KiB made rustls hold 127 KiB.
pub const MEMORY_BOUND: isize = 80 * 1024;

/// The same once the handshake completed: a split record (less than 18 KiB, in an allocation
/// of up to twice that), one write's ciphertext held (32 KiB and overhead), the keys.
pub const OPEN_BOUND: isize = 96 * 1024;

/// What a write's held ciphertext may take beyond its plaintext: two records' overhead, and
/// the allocation's rounding.
pub const BOOKKEEPING: usize = 1024;

/// The server's read buffer sizes (the loop's is 64 KiB by default; the transport refuses
/// smaller than [`MIN_READ_BUFFER`]).
pub const BUFS: [usize; 4] = [MIN_READ_BUFFER, MIN_READ_BUFFER + 7, 40_000, 65536];

/// Most bytes of the stream an operation takes.
const MAX_TAKE: usize = 1 << 16;

#[derive(Clone, Copy, Debug)]
pub enum Op {
    /// The next `n` stream bytes: raw mode, as they are; client mode, as plaintext the client
    /// sends (in records).
    Data(usize),
    /// The next `n` stream bytes as they are (client mode: between the client's records).
    Raw(usize),
    /// The server writes `n` bytes of plaintext (as much as the transport takes).
    ServerWrite(usize),
    /// The socket's send buffer takes `64 * (n + 1)` bytes from now; the client reads what the
    /// server sent.
    Room(usize),
    /// The client updates its keys (TLS 1.3; nothing under 1.2).
    KeyUpdate,
    /// The client sends `close_notify`.
    CloseNotify,
    /// The server sends `close_notify`.
    ServerCloseNotify,
    /// The client's FIN.
    Eof,
}

pub struct Input<'a> {
    pub client: bool,
    pub tls12: bool,
    pub small_records: bool,
    pub room: usize,
    pub buf: usize,
    pub ops: Vec<Op>,
    pub stream: &'a [u8],
}

pub fn decode(data: &[u8]) -> Input<'_> {
    let mut r = Reader::new(data);
    let (flags, room, buf, n) = (r.u8(), r.u8(), r.u8(), r.u8());
    let ops = (0..n)
        .map(|_| {
            let kind = r.u8();
            let n = usize::from(r.u16());
            match kind % 10 {
                0..=2 => Op::Data(n),
                3 => Op::Raw(n),
                4 => Op::ServerWrite(n),
                5 => Op::Room(n),
                6 => Op::KeyUpdate,
                7 => Op::CloseNotify,
                8 => Op::ServerCloseNotify,
                _ => Op::Eof,
            }
        })
        .collect();
    Input {
        client: flags & 1 != 0,
        tls12: flags & 2 != 0,
        small_records: flags & 4 != 0,
        room: 64 * (usize::from(room) + 1),
        buf: BUFS[usize::from(buf % 4)],
        ops,
        stream: r.rest(),
    }
}

pub fn run(data: &[u8]) {
    let Some(pki) = pki() else { return };
    check(pki, &decode(data));
}

/// What the fuzzer's process shares: the server's configuration and the clients'.
pub struct Pki {
    server: TlsServerConfig,
    /// TLS 1.3 and TLS 1.2 clients, with full and with small records.
    clients: [[Arc<rustls::ClientConfig>; 2]; 2],
}

fn pki() -> Option<&'static Pki> {
    static PKI: OnceLock<Option<Pki>> = OnceLock::new();
    PKI.get_or_init(make_pki).as_ref()
}

fn under_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !matches!(v.as_str(), "" | "0" | "false"))
}

/// A CA and a server certificate for localhost (openssl CLI), loaded as the server loads them.
fn make_pki() -> Option<Pki> {
    let dir = std::env::temp_dir().join(format!("wsloop-fuzz-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a temporary folder");
    let ec = "-newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes";
    std::fs::write(
        dir.join("s.ext"),
        "subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\n",
    )
    .expect("write s.ext");
    for step in [
        format!("req -x509 {ec} -keyout ca.key -out ca.pem -days 2 -subj /CN=ca"),
        format!("req -new {ec} -keyout key.pem -out s.csr -subj /CN=localhost"),
        "x509 -req -in s.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out cert.pem -days 2 \
         -extfile s.ext"
            .to_string(),
    ] {
        let out = std::process::Command::new("openssl")
            .args(step.split(' '))
            .current_dir(&dir)
            .stdin(std::process::Stdio::null())
            .output();
        if !out.as_ref().is_ok_and(|o| o.status.success()) {
            let _ = std::fs::remove_dir_all(&dir);
            assert!(!under_ci(), "openssl {step}: {out:?} (and CI is set)");
            eprintln!("note: openssl is not available: the tls fuzz check does nothing");
            return None;
        }
    }
    let server = TlsServerConfig::load(&dir.join("cert.pem"), &dir.join("key.pem"))
        .expect("the server loads the test certificate");
    let ca = std::fs::read(dir.join("ca.pem")).expect("ca.pem");
    let _ = std::fs::remove_dir_all(&dir);
    let mut roots = rustls::RootCertStore::empty();
    use rustls::pki_types::pem::PemObject;
    for c in rustls::pki_types::CertificateDer::pem_slice_iter(&ca) {
        roots.add(c.expect("a PEM certificate")).expect("the CA");
    }
    let client = |tls12: bool, small: bool| {
        #[allow(deprecated)] // ring's provider, as the server's
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let version = match tls12 {
            true => &rustls::version::TLS12,
            false => &rustls::version::TLS13,
        };
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[version])
            .expect("the version")
            .with_root_certificates(roots.clone())
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        if small {
            config.max_fragment_size = Some(64 + 5);
        }
        Arc::new(config)
    };
    Some(Pki {
        server,
        clients: [
            [client(false, false), client(false, true)],
            [client(true, false), client(true, true)],
        ],
    })
}

/// The server under test, every call metered.
struct Metered {
    server: TlsServer,
    /// Heap bytes the server's calls allocated and have not freed.
    live: isize,
    peak: isize,
}

impl Metered {
    fn call<T>(&mut self, what: &str, f: impl FnOnce(&mut TlsServer) -> T) -> T {
        let scratch = scratch_capacity() as isize;
        let region = Region::new(GLOBAL);
        let out = f(&mut self.server);
        let c = region.change();
        // A realloc's growth (or shrinking) is in bytes_allocated (bytes_deallocated) already.
        self.live += c.bytes_allocated as isize
            - c.bytes_deallocated as isize
            - (scratch_capacity() as isize - scratch);
        self.peak = self.peak.max(self.live);
        let bound = match self.server.version() {
            Some(_) => OPEN_BOUND,
            None => MEMORY_BOUND,
        };
        assert!(
            self.live <= bound,
            "after {what} the server holds {} bytes (bound {bound})",
            self.live
        );
        out
    }
}

/// Everything one run saw.
struct Run {
    /// The plaintext the server decrypted, in order.
    decrypted: Vec<u8>,
    /// The HTTP head parser, fed the decrypted bytes until it completed or refused.
    head: Session,
    head_done: Option<bool>,
    /// A read failed with a TLS error (the connection is dead).
    failed: bool,
    /// The server sent its close_notify (what it reads is discarded).
    closing: bool,
    /// The server saw the end of the client's stream.
    eof: bool,
    /// Everything the server wrote to the socket, and the records parsed from it so far.
    sent: Vec<u8>,
    records_at: usize,
}

impl Run {
    /// The loop's readable edge: read until the socket is drained, the stream ended or a read
    /// failed; the decrypted bytes go to the head parser. Then the writable edge's flush.
    fn readable(&mut self, m: &mut Metered, buf: &mut [u8]) {
        while !self.failed && !self.eof {
            match m.call("read", |s| s.read(buf)) {
                Ok(0) => self.eof = true,
                Ok(n) => {
                    assert!(n <= buf.len());
                    // After our close_notify the loop discards what it reads (it lingers until
                    // the peer's EOF): nothing is decrypted any more.
                    if !self.closing {
                        self.decrypted.extend_from_slice(&buf[..n]);
                        self.parse_head(&buf[..n]);
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => {
                    if e.kind() == ErrorKind::InvalidData {
                        let w = m.call("write after a failure", |s| s.write(&[b"x"]));
                        assert!(w.is_err(), "a write after a TLS failure: {w:?}");
                    }
                    self.failed = true;
                }
            }
        }
        if !self.failed && m.server.holds() {
            let _ = m.call("flush", |s| s.flush());
        }
    }

    fn parse_head(&mut self, bytes: &[u8]) {
        if self.head_done.is_some() {
            return;
        }
        match self.head.feed_head(bytes, &Limits::default()) {
            Ok(Head::Partial) => {}
            Ok(Head::Complete { request, .. }) => {
                self.head_done = Some(validate_upgrade(&request).is_ok());
            }
            Err(_) => self.head_done = Some(false),
        }
    }

    /// Take what the server wrote; every complete record in it must be well formed.
    fn take_sent(&mut self, m: &mut Metered) -> usize {
        let before = self.sent.len();
        m.server.take_sent(&mut self.sent);
        while let Some(header) = self.sent.get(self.records_at..self.records_at + 5) {
            let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
            assert!(
                (20..=23).contains(&header[0]) && header[1] == 3 && len <= (1 << 14) + 2048,
                "a malformed record header from the server: {header:?}"
            );
            self.records_at += 5 + len;
        }
        before
    }
}

pub fn check(pki: &Pki, input: &Input) {
    let mut buf = vec![0u8; input.buf];
    let mut m = Metered {
        server: TlsServer::new(&pki.server, 64 * 1024).expect("a server connection"),
        live: 0,
        peak: 0,
    };
    let mut run = Run {
        decrypted: Vec::new(),
        head: Session::new(),
        head_done: None,
        failed: false,
        closing: false,
        eof: false,
        sent: Vec::new(),
        records_at: 0,
    };
    let mut client = input.client.then(|| {
        let config = pki.clients[input.tls12 as usize][input.small_records as usize].clone();
        let name = rustls::pki_types::ServerName::try_from("localhost").expect("a name");
        let mut c = rustls::ClientConnection::new(config, name).expect("a client");
        handshake(&mut c, &mut m, &mut run, &mut buf);
        c
    });
    m.server.set_room(input.room);
    let mut stream = Reader::new(input.stream);
    // What the client sent as plaintext, and whether the stream stays intact (no raw byte
    // between its records, no end before its data).
    let mut plaintext = Vec::new();
    let mut intact = true;
    let (mut client_closed, mut server_closed, mut ended) = (false, false, false);
    // What the server's writes took, and what the client read of it.
    let mut written = Vec::new();
    let mut read_back = Vec::new();
    for &op in &input.ops {
        match (op, client.as_mut()) {
            (Op::Data(n) | Op::Raw(n), None) => {
                m.server.receive(stream.bytes(n.min(MAX_TAKE)));
            }
            (Op::Data(n), Some(c)) => {
                let bytes = stream.bytes(n.min(MAX_TAKE));
                // After the client's FIN, or the server's close_notify, nothing more is read.
                intact &= !(ended || server_closed) || bytes.is_empty();
                if !client_closed {
                    match c.writer().write_all(bytes) {
                        Ok(()) => plaintext.extend_from_slice(bytes),
                        // The server's alert reached the client (after raw bytes broke the
                        // stream): the client is done.
                        Err(_) => (client_closed, intact) = (true, false),
                    }
                }
                ship(c, &mut m);
            }
            (Op::Raw(n), Some(c)) => {
                ship(c, &mut m);
                let bytes = stream.bytes(n.min(MAX_TAKE));
                intact &= bytes.is_empty();
                m.server.receive(bytes);
            }
            (Op::ServerWrite(n), _) => {
                // The loop writes nothing after its close_notify (the connection is ending).
                if !run.failed && !server_closed {
                    let data: Vec<u8> = (0..n).map(|i| (i * 31 + written.len()) as u8).collect();
                    // Whatever is offered, the transport seals one write's worth at a time and
                    // only once it flushed the last: what it holds grows by one write's
                    // ciphertext at most (the rest is with the socket).
                    let before = m.live;
                    let mut at = 0;
                    while at < data.len() {
                        match m.call("write", |s| s.write(&[&data[at..]])) {
                            Ok(0) | Err(_) => break,
                            Ok(k) => {
                                written.extend_from_slice(&data[at..at + k]);
                                at += k;
                            }
                        }
                    }
                    let grew = m.live - before;
                    assert!(
                        grew <= (WRITE_LIMIT + BOOKKEEPING) as isize,
                        "a write of {n} bytes left the server holding {grew} bytes more"
                    );
                }
            }
            (Op::Room(n), c) => {
                m.server.set_room(64 * (n + 1));
                let from = run.take_sent(&mut m);
                if let Some(c) = c {
                    deliver(c, &run.sent[from..], &mut read_back);
                }
                if !run.failed && m.server.holds() {
                    let _ = m.call("flush", |s| s.flush());
                }
            }
            (Op::KeyUpdate, Some(c)) => {
                let _ = c.refresh_traffic_keys();
                ship(c, &mut m);
            }
            (Op::CloseNotify, Some(c)) => {
                c.send_close_notify();
                client_closed = true;
                ship(c, &mut m);
            }
            (Op::ServerCloseNotify, _) => {
                server_closed = true;
                run.closing = true;
                m.call("close_notify", |s| s.close_notify());
            }
            (Op::Eof, c) => {
                if let Some(c) = c {
                    ship(c, &mut m);
                }
                m.server.receive_eof();
                ended = true;
            }
            (Op::KeyUpdate | Op::CloseNotify, None) => {}
        }
        run.readable(&mut m, &mut buf);
    }
    // The end: the client's FIN; the socket takes everything the server holds.
    if let Some(c) = client.as_mut() {
        ship(c, &mut m);
    }
    m.server.receive_eof();
    run.readable(&mut m, &mut buf);
    // Until the server holds nothing: what the socket holds goes to the client, the socket takes
    // 1 MiB more, the server flushes (the socket may have been nearly full).
    let from = run.sent.len();
    m.server.set_room(1 << 20);
    for _ in 0..8 {
        run.take_sent(&mut m);
        if run.failed || !m.server.holds() {
            break;
        }
        let _ = m.call("flush", |s| s.flush());
    }
    if std::env::var_os("WSLOOP_FUZZ_DEBUG").is_some() {
        eprintln!(
            "tls: {:?}; peak {} bytes held; {} decrypted, {} sent, failed {}, head {:?}",
            input.ops,
            m.peak,
            run.decrypted.len(),
            run.sent.len(),
            run.failed,
            run.head_done
        );
    }
    let Some(c) = client.as_mut() else {
        assert!(
            m.server.version().is_none() && run.decrypted.is_empty(),
            "raw bytes completed a handshake, or were decrypted ({} bytes)",
            run.decrypted.len()
        );
        return;
    };
    deliver(c, &run.sent[from..], &mut read_back);
    // Integrity both ways.
    assert!(
        plaintext.starts_with(&run.decrypted),
        "the server decrypted {} bytes that the client did not send in that order",
        run.decrypted.len()
    );
    if intact && !run.failed {
        assert_eq!(
            run.decrypted.len(),
            plaintext.len(),
            "the server did not read everything the client sent"
        );
    }
    assert!(
        written.starts_with(&read_back),
        "the client read {} bytes the server did not write in that order",
        read_back.len()
    );
    if !run.failed && intact {
        assert_eq!(read_back.len(), written.len(), "a write was lost");
    }
    // A valid upgrade request, sent whole and intact, is parsed as one.
    if intact && !run.failed && plaintext.starts_with(CANNED_REQUEST) {
        assert_eq!(
            run.head_done,
            Some(true),
            "the upgrade request was not parsed"
        );
    }
}

/// Client and server talk until both have completed the handshake (a real client always
/// does: anything else is a failure of the server).
fn handshake(c: &mut rustls::ClientConnection, m: &mut Metered, run: &mut Run, buf: &mut [u8]) {
    for _ in 0..16 {
        ship(c, m);
        run.readable(m, buf);
        let from = run.take_sent(m);
        let mut ignored = Vec::new();
        deliver(c, &run.sent[from..], &mut ignored);
        assert!(
            ignored.is_empty(),
            "plaintext from the server during the handshake"
        );
        if !c.is_handshaking() && m.server.version().is_some() {
            return;
        }
        assert!(!run.failed, "the server failed a real client's handshake");
    }
    panic!("no handshake after 16 rounds");
}

/// What the client has to send goes to the server's socket.
fn ship(c: &mut rustls::ClientConnection, m: &mut Metered) {
    let mut out = Vec::new();
    while c.wants_write() {
        c.write_tls(&mut out).expect("into a Vec");
    }
    m.server.receive(&out);
}

/// The client reads `bytes` from the server: its plaintext is appended to `got`. A TLS error
/// here (the server's alert) ends the client's reading.
fn deliver(c: &mut rustls::ClientConnection, mut bytes: &[u8], got: &mut Vec<u8>) {
    while !bytes.is_empty() {
        match c.read_tls(&mut bytes) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if c.process_new_packets().is_err() {
            return;
        }
        let mut chunk = [0u8; 4096];
        loop {
            match c.reader().read(&mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&chunk[..n]),
            }
        }
    }
}
