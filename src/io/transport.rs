//! The byte stream under a connection: a plain TCP socket, or TLS over one (rustls, driven
//! sans-IO). The loop reads, writes and shuts down through this type only, so that what lies
//! under a connection can change without the loop knowing. It owns the connection's descriptor:
//! dropping it closes the descriptor.
//!
//! Under TLS the loop's view stays the same: [`Transport::read`] returns decrypted bytes
//! (`WouldBlock` when none), [`Transport::write`] and [`Transport::write_vectored`] take
//! plaintext and return how much they took. rustls's own output buffer stays bounded: new
//! plaintext is taken only once the ciphertext rustls holds has gone to the socket, and at most
//! [`TLS_CHUNK`] bytes at a time, so rustls never holds more than one chunk plus its record
//! overhead (`set_buffer_limit` is the backstop). What it still holds when the socket is full
//! ([`Transport::holds`]) goes out on the next writable edge ([`Transport::flush`]), which the
//! loop calls even when its own queue is empty. Handshake messages rustls owes in answer to
//! what it read are written from the read path. A TLS failure (garbage, cleartext instead of a
//! ClientHello, a bad record, an alert) is an `InvalidData` error, which
//! [`CloseReason::of_io_error`](crate::reason::CloseReason::of_io_error) maps to `tls_error`;
//! the alert rustls queues is tried once before. The peer's `close_notify` reads as EOF; ours
//! goes out before our FIN ([`Transport::shutdown_write`]) and, when the connection is closed
//! without one, once before the descriptor closes ([`Transport::close_notify`]).

// The one owner of a connection's socket (Cargo.toml's [lints]): it closes when the
// connection's slot is freed on the close path, which counts it out of the fd ledger.
#![allow(clippy::disallowed_types)]

use mio::event::Source;
use mio::net::TcpStream;
use mio::{Interest, Registry, Token};
use rustls::{ServerConfig, ServerConnection};
use std::io::{self, ErrorKind, IoSlice, Read, Write};
use std::sync::Arc;

/// The most plaintext a TLS connection hands rustls at once: one full TLS record. rustls holds
/// at most this much ciphertext (plus the record's overhead) for a peer that does not read.
pub(crate) const TLS_CHUNK: usize = 16 * 1024;

/// rustls's own limit on its output buffer, a backstop above [`TLS_CHUNK`] (the transport never
/// reaches it: it hands rustls a chunk only once the buffer is empty).
pub(crate) const TLS_BUFFER_LIMIT: usize = TLS_CHUNK + 1024;

/// The most bytes a client may send while its handshake is in progress: its first flight (a
/// ClientHello of a few KiB at most, even with post-quantum key shares and session tickets;
/// twice after a HelloRetryRequest), then the read that holds its Finished (at most 4 KiB,
/// rustls's read size, even with application data behind it). Beyond it the connection fails
/// (`tls_error`) before rustls buffers more: it would otherwise hold a handshake message of up
/// to 64 KiB, and twice that in allocation, until the handshake deadline.
pub(crate) const MAX_HANDSHAKE_INPUT: usize = 16 * 1024;

/// The most ciphertext an established TLS connection may have handed rustls without anything
/// coming of it (plaintext, an answer, a completed handshake): more than any one record can be
/// (16 KiB of plaintext and at most 2 KiB of TLS 1.2 expansion, with its header), so only a
/// client joining a post-handshake handshake message (which rustls would buffer up to 64 KiB;
/// a client has none that large to send) or one trickling nothing but empty records reaches
/// it. Past it the connection fails (`tls_error`). During the handshake rustls's own limit
/// (64 KiB for a handshake message) applies, and the handshakes in progress are capped.
const TLS_PENDING_MAX: usize = 24 * 1024;

/// The most ciphertext one [`Transport::read`] hands rustls: a client whose records make little
/// or no plaintext (key updates between one-byte records, say) would otherwise keep one read
/// going until its socket drains, holding the loop. Past it the read stops, and
/// [`Transport::take_more`] tells the loop to read the connection again next turn.
const TLS_READ_MAX: usize = 256 * 1024;

/// The TLS versions a connection may use, as the metrics label them (index of
/// [`Transport::take_established`]).
pub(crate) const TLS_VERSIONS: [&str; 2] = ["1.2", "1.3"];

/// The cipher suites a connection may use (ring's, all of which the server offers), as the
/// metrics label them; a suite not listed (another provider's) is counted as the last, `other`.
pub(crate) const TLS_CIPHERS: [&str; 10] = [
    "TLS13_AES_256_GCM_SHA384",
    "TLS13_AES_128_GCM_SHA256",
    "TLS13_CHACHA20_POLY1305_SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384",
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256",
    "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384",
    "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256",
    "other",
];

/// An established TLS connection's version and cipher suite, as indexes of [`TLS_VERSIONS`]
/// and [`TLS_CIPHERS`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct TlsKind {
    pub(crate) version: usize,
    pub(crate) cipher: usize,
}

/// One connection's byte stream (non-blocking).
pub(crate) struct Transport {
    stream: TcpStream,
    /// TLS state, boxed: a plain connection pays one pointer for it.
    tls: Option<Box<Tls>>,
}

/// rustls's connection and what the transport knows about it.
pub(super) struct Tls {
    conn: ServerConnection,
    /// The peer's end of input was seen: its `close_notify`, or TCP's EOF.
    eof: bool,
    /// rustls failed (a bad record, an alert): nothing more is written.
    failed: bool,
    /// Our `close_notify` is queued (or was sent).
    closing: bool,
    /// The socket will be reset on close: nothing more is written.
    reset: bool,
    /// The handshake's completion was reported (see [`Transport::take_established`]).
    reported: bool,
    /// A PROXY header comes first (see [`Transport::expect_proxy_header`]): until
    /// [`Transport::start_tls`], bytes move as they are, both ways.
    raw: bool,
    /// What followed the PROXY header in the read that ended it: the start of the TLS stream,
    /// read by rustls before the socket (empty, and unallocated, otherwise; at most
    /// [`MAX_HANDSHAKE_INPUT`] and one byte).
    early: Vec<u8>,
    /// Bytes handed to rustls while the handshake was in progress (see
    /// [`MAX_HANDSHAKE_INPUT`]).
    handshake_in: u32,
    /// The plaintext bytes last handed to rustls at once (at most [`TLS_CHUNK`]): what it
    /// holds of the connection's output while it [wants to write](Transport::holds).
    chunk: usize,
    /// Ciphertext handed to rustls since it last made anything of what it read (plaintext, an
    /// answer to write, a step of the handshake): what it holds of the connection's input, a
    /// record or a handshake message being received (see [`Transport::tls_pending`]).
    pending: usize,
    /// The last read stopped at [`TLS_READ_MAX`] with the socket not drained.
    more: bool,
}

impl Transport {
    /// A transport over an accepted TCP connection (Nagle's algorithm off: the loop corks),
    /// with a kernel send buffer of `send_buffer` bytes (0: the kernel's auto-tuning).
    pub(crate) fn tcp(stream: TcpStream, send_buffer: usize) -> Transport {
        let _ = stream.set_nodelay(true);
        if send_buffer > 0 {
            let _ = socket2::SockRef::from(&stream).set_send_buffer_size(send_buffer);
        }
        Transport { stream, tls: None }
    }

    /// A TLS transport over an accepted TCP connection (see [`Transport::tcp`]), serving
    /// `config`. Fails only if rustls cannot make a connection of that configuration.
    pub(crate) fn tls(
        stream: TcpStream,
        send_buffer: usize,
        config: Arc<ServerConfig>,
    ) -> io::Result<Transport> {
        let tls = Tls::new(config)?;
        let mut t = Transport::tcp(stream, send_buffer);
        t.tls = Some(Box::new(tls));
        Ok(t)
    }

    /// TLS from a trusted proxy that starts each connection with a PROXY header, in cleartext
    /// before the ClientHello: until [`Transport::start_tls`] the transport reads and writes
    /// bytes as they are (the header, or a refusal of it), and the TLS handshake waits.
    pub(crate) fn expect_proxy_header(&mut self) {
        if let Some(tls) = self.tls.as_deref_mut() {
            tls.raw = true;
        }
    }

    /// The PROXY header has been read: what follows is the TLS stream, `rest` its start (the
    /// bytes of the last read after the header), which rustls reads before the socket. Returns
    /// whether such bytes wait: then the caller must read again without waiting for an edge
    /// (the socket may be drained). Nothing for plain TCP (`rest` is the caller's to parse).
    pub(crate) fn start_tls(&mut self, rest: &[u8]) -> bool {
        match self.tls.as_deref_mut() {
            Some(tls) if tls.raw => {
                tls.raw = false;
                // More than the handshake may take fails it anyway: one byte over is enough.
                let keep = rest.len().min(MAX_HANDSHAKE_INPUT + 1);
                tls.early = rest[..keep].to_vec();
                !rest.is_empty()
            }
            _ => false,
        }
    }

    /// The peer is being given up on (it did not read in time): if the kernel (or rustls)
    /// still holds bytes for it, the close that follows resets the connection instead of
    /// leaving the socket orphaned with them until the kernel's retries give up (minutes, and
    /// memory all along).
    pub(crate) fn abandon(&mut self) {
        use std::os::fd::AsFd;
        if self.holds() || crate::sys::unsent_bytes(self.stream.as_fd()).is_ok_and(|n| n > 0) {
            self.reset_on_close();
        }
    }

    /// The close that follows resets the connection (`SO_LINGER` 0): whatever the kernel holds
    /// for the peer is discarded at once.
    pub(crate) fn reset_on_close(&mut self) {
        if let Some(tls) = self.tls.as_deref_mut() {
            tls.reset = true;
        }
        let _ = socket2::SockRef::from(&self.stream).set_linger(Some(std::time::Duration::ZERO));
    }

    /// Read into `buf`: `Ok(0)` at the peer's EOF; `WouldBlock` when nothing is there. Fewer
    /// bytes than `buf` holds means the socket is drained for now (edge-triggered: new data
    /// raises a new edge). Plain TCP: one `recv`. TLS: the decrypted bytes, reading the socket
    /// until `buf` is full or the socket is drained, and writing what the handshake owes;
    /// `closed` (the event said the peer's FIN or reset is queued, which raises no edge of its
    /// own) makes it read the socket until it says so, instead of stopping at a short read.
    #[inline]
    pub(crate) fn read(&mut self, buf: &mut [u8], closed: bool) -> io::Result<usize> {
        match self.tls.as_deref_mut() {
            Some(tls) if !tls.raw => tls.read(&self.stream, buf, closed),
            // Plain TCP, or TLS before its PROXY header is read.
            _ => (&self.stream).read(buf),
        }
    }

    /// Write `bytes`; `Ok(0)` when the socket would block. Plain TCP: one `send`.
    #[inline]
    pub(crate) fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        if let Some(tls) = self.tls.as_deref_mut().filter(|t| !t.raw) {
            return tls.write(&self.stream, &[bytes]);
        }
        loop {
            match (&self.stream).write(bytes) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(0),
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Write `parts` (at most `MAX` of them: the rest are not written), in order; `Ok(0)` when
    /// the socket would block. Plain TCP: one `writev`.
    pub(crate) fn write_vectored<const MAX: usize>(
        &mut self,
        parts: &[&[u8]],
    ) -> io::Result<usize> {
        debug_assert!(parts.len() <= MAX);
        let n = parts.len().min(MAX);
        if let Some(tls) = self.tls.as_deref_mut().filter(|t| !t.raw) {
            return tls.write(&self.stream, &parts[..n]);
        }
        let mut slices = [IoSlice::new(&[]); MAX];
        for (slot, part) in slices.iter_mut().zip(parts) {
            *slot = IoSlice::new(part);
        }
        loop {
            match (&self.stream).write_vectored(&slices[..n]) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(0),
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// TLS: rustls holds ciphertext the socket has not taken yet (it goes out on a writable
    /// edge, through [`Transport::flush`]). Always false for plain TCP.
    #[inline]
    pub(crate) fn holds(&self) -> bool {
        self.tls.as_ref().is_some_and(|t| t.conn.wants_write())
    }

    /// What rustls holds of the connection's output (the plaintext of the chunk it was last
    /// handed, while it holds anything): counted in the send queue's bytes, against the
    /// backpressure limit and in the memory budget. 0 for plain TCP.
    #[inline]
    pub(crate) fn tls_held(&self) -> usize {
        match self.tls.as_deref() {
            Some(t) if t.conn.wants_write() => t.chunk,
            _ => 0,
        }
    }

    /// Whether the connection is TLS.
    #[inline]
    pub(crate) fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// What rustls holds of the connection's input: the ciphertext of a record (or, in the
    /// handshake, of a handshake message) not complete yet, counted from what was handed to it
    /// since it last made anything of its input (at most [`TLS_PENDING_MAX`] once established,
    /// 64 KiB and a read in the handshake). Counted with the connection's partial messages in
    /// the memory budget. 0 for plain TCP.
    #[inline]
    pub(crate) fn tls_pending(&self) -> usize {
        self.tls.as_deref().map_or(0, |t| t.pending)
    }

    /// Whether the last read stopped before the socket drained (TLS: it handed rustls
    /// [`TLS_READ_MAX`] bytes): the loop reads the connection again next turn, since no new
    /// edge will come for what is already there. Cleared by asking.
    #[inline]
    pub(crate) fn take_more(&mut self) -> bool {
        self.tls
            .as_deref_mut()
            .is_some_and(|t| std::mem::take(&mut t.more))
    }

    /// Whether rustls holds anything of the connection's (output to send, or input not
    /// complete yet): false for plain TCP.
    #[inline]
    pub(crate) fn tls_holds(&self) -> bool {
        self.tls
            .as_deref()
            .is_some_and(|t| t.pending > 0 || t.conn.wants_write())
    }

    /// Write what rustls holds (see [`Transport::holds`]), as far as the socket takes it.
    pub(crate) fn flush(&mut self) -> io::Result<()> {
        match self.tls.as_deref_mut() {
            None => Ok(()),
            Some(tls) => flush(&mut tls.conn, &self.stream).map(|_| ()),
        }
    }

    /// Shut down the sending side (a FIN after what is already written; under TLS, after our
    /// `close_notify`). Returns whether it took effect.
    pub(crate) fn shutdown_write(&mut self) -> bool {
        if let Some(tls) = self.tls.as_deref_mut() {
            tls.close_notify(&self.stream);
        }
        self.stream.shutdown(std::net::Shutdown::Write).is_ok()
    }

    /// TLS: before the descriptor closes, tell the peer the stream ended cleanly
    /// (`close_notify`, one try), unless it was sent already, the handshake never completed,
    /// rustls failed, or the connection is being reset. Nothing for plain TCP.
    pub(crate) fn close_notify(&mut self) {
        if let Some(tls) = self.tls.as_deref_mut() {
            if tls.reported && !tls.reset {
                tls.close_notify(&self.stream);
            }
        }
    }

    /// A TLS connection whose handshake has not completed (or not been reported complete by
    /// [`Transport::take_established`] yet).
    #[inline]
    pub(crate) fn handshaking(&self) -> bool {
        self.tls.as_ref().is_some_and(|t| !t.reported)
    }

    /// TLS: the handshake has completed since the last call: its version and cipher suite,
    /// once.
    #[inline]
    pub(crate) fn take_established(&mut self) -> Option<TlsKind> {
        let tls = self.tls.as_deref_mut()?;
        if tls.reported || tls.conn.is_handshaking() {
            return None;
        }
        tls.reported = true;
        Some(kind_of(&tls.conn))
    }

    /// TLS, handshake completed: its version and cipher suite.
    pub(crate) fn tls_kind(&self) -> Option<TlsKind> {
        let tls = self.tls.as_ref().filter(|t| t.reported)?;
        Some(kind_of(&tls.conn))
    }
}

fn kind_of(conn: &ServerConnection) -> TlsKind {
    let version = match conn.protocol_version() {
        Some(rustls::ProtocolVersion::TLSv1_2) => 0,
        _ => 1,
    };
    let name = conn
        .negotiated_cipher_suite()
        .and_then(|s| s.suite().as_str());
    let last = TLS_CIPHERS.len() - 1;
    let cipher = name.map_or(last, |n| {
        TLS_CIPHERS[..last]
            .iter()
            .position(|c| *c == n)
            .unwrap_or(last)
    });
    TlsKind { version, cipher }
}

/// A TLS failure as the loop sees it: `InvalidData` (no socket error has that kind).
fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(ErrorKind::InvalidData, e)
}

/// The socket as rustls reads it: first what followed a PROXY header (see
/// [`Transport::start_tls`]), then the socket, noting whether a read of the socket returned
/// fewer bytes than asked for (it is drained for now).
struct Probe<'a, S> {
    stream: &'a S,
    early: &'a mut Vec<u8>,
    short: bool,
}

impl<S> Read for Probe<'_, S>
where
    for<'s> &'s S: Read,
{
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if !self.early.is_empty() {
            let n = buf.len().min(self.early.len());
            buf[..n].copy_from_slice(&self.early[..n]);
            self.early.drain(..n);
            if self.early.is_empty() {
                *self.early = Vec::new(); // its memory back at once
            }
            return Ok(n);
        }
        loop {
            match self.stream.read(buf) {
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
                Ok(n) => {
                    self.short = n < buf.len();
                    return Ok(n);
                }
            }
        }
    }
}

/// A socket with nothing to read: rustls's read prepares its buffer, then finds nothing.
struct Dry;

impl Read for Dry {
    fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
        Err(ErrorKind::WouldBlock.into())
    }
}

/// Write what rustls holds until it holds nothing (true) or the socket would block (false).
fn flush<S>(conn: &mut ServerConnection, mut stream: &S) -> io::Result<bool>
where
    for<'s> &'s S: Write,
{
    while conn.wants_write() {
        match conn.write_tls(&mut stream) {
            Ok(0) => return Ok(false),
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(false),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

impl Tls {
    /// A server connection of `config`, its output bounded (see [`TLS_BUFFER_LIMIT`]).
    pub(super) fn new(config: Arc<ServerConfig>) -> io::Result<Tls> {
        let mut conn = ServerConnection::new(config).map_err(tls_error)?;
        conn.set_buffer_limit(Some(TLS_BUFFER_LIMIT));
        Ok(Tls {
            conn,
            eof: false,
            failed: false,
            closing: false,
            reset: false,
            reported: false,
            raw: false,
            early: Vec::new(),
            handshake_in: 0,
            chunk: 0,
            pending: 0,
            more: false,
        })
    }

    /// The handshake completed: its version's index in [`TLS_VERSIONS`].
    pub(super) fn version(&self) -> Option<usize> {
        (!self.conn.is_handshaking()).then(|| kind_of(&self.conn).version)
    }

    /// rustls holds ciphertext not written yet (see [`Transport::holds`]).
    pub(super) fn holds(&self) -> bool {
        self.conn.wants_write()
    }

    /// Write what rustls holds, as far as `stream` takes it (see [`Transport::flush`]).
    pub(super) fn flush<S>(&mut self, stream: &S) -> io::Result<bool>
    where
        for<'s> &'s S: Write,
    {
        flush(&mut self.conn, stream)
    }

    /// See [`Transport::read`]. `stream` is the connection's socket (or, for the fuzz target,
    /// bytes in memory: [`crate::io::fuzzing`]).
    pub(super) fn read<S>(&mut self, stream: &S, buf: &mut [u8], closed: bool) -> io::Result<usize>
    where
        for<'s> &'s S: Read + Write,
    {
        if self.closing {
            // Our close_notify went out: the connection lingers (after a failure, our answer
            // sent) and the loop discards what the peer still sends until its EOF. rustls
            // decrypts nothing more: fed a bad record now, it would answer with a second alert
            // after the close_notify, which it asserts never happens (a panic in debug builds).
            // The bytes pass as they are, for the loop to discard.
            let mut stream = stream;
            return loop {
                match stream.read(buf) {
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    other => break other,
                }
            };
        }
        let mut filled = 0;
        let mut fed = 0;
        // The socket returned fewer bytes than asked for during this call: drained for now.
        // (Only within one call: data that arrives later raises an edge, whose read must not
        // be refused by a stale flag.)
        let mut drained = false;
        loop {
            while filled < buf.len() && !self.eof {
                match self.conn.reader().read(&mut buf[filled..]) {
                    Ok(0) => self.eof = true, // the peer's close_notify
                    Ok(n) => filled += n,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    // TCP's EOF without close_notify: the WebSocket close handshake, not TLS,
                    // says whether the peer ended cleanly.
                    Err(e) if e.kind() == ErrorKind::UnexpectedEof => self.eof = true,
                    Err(e) => return Err(e),
                }
            }
            if filled == buf.len() || self.eof {
                return Ok(filled);
            }
            // A short read drained the socket, unless the peer's FIN or reset is queued behind
            // what it returned: then read on until the socket itself says it (a read that made
            // no plaintext, half a ClientHello say, would otherwise leave the connection
            // waiting for an edge that never comes).
            if drained && !closed {
                // Let rustls size its input buffer down to what it still holds (it does so
                // before a read, and a short read ended this one): a connection that sent a
                // full record then went quiet keeps 4 KiB, not the 16 KiB record's room.
                let _ = self.conn.read_tls(&mut Dry);
                return would_block(filled);
            }
            let mut probe = Probe {
                stream,
                early: &mut self.early,
                short: false,
            };
            let handshaking = self.conn.is_handshaking();
            match self.conn.read_tls(&mut probe) {
                Ok(0) => drained = true, // TCP's EOF: rustls's reader says it next
                Ok(n) => {
                    drained = probe.short;
                    self.pending += n;
                    fed += n;
                    if handshaking {
                        self.handshake_in = self.handshake_in.saturating_add(n as u32);
                        if self.handshake_in as usize > MAX_HANDSHAKE_INPUT {
                            // Far more than any client's first flight: refused before rustls
                            // buffers it (it would hold up to 64 KiB of one message, twice
                            // that in allocation, until the handshake deadline).
                            self.failed = true;
                            return Err(io::Error::new(
                                ErrorKind::InvalidData,
                                "TLS handshake input over its limit",
                            ));
                        }
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return would_block(filled),
                Err(e) => return Err(e),
            }
            match self.conn.process_new_packets() {
                Err(e) => {
                    // rustls queued an alert for the peer: one try to send it.
                    self.failed = true;
                    let mut out = stream;
                    let _ = self.conn.write_tls(&mut out);
                    return Err(tls_error(e));
                }
                Ok(io) => {
                    // An answer to write counts only in the handshake: once established,
                    // what rustls holds to write may be the connection's own output waiting
                    // for a peer that does not read.
                    let made = io.plaintext_bytes_to_read() > 0
                        || (handshaking && io.tls_bytes_to_write() > 0)
                        || handshaking != self.conn.is_handshaking();
                    if made {
                        self.pending = 0;
                    } else if self.pending > TLS_PENDING_MAX && !handshaking {
                        // A post-handshake handshake message being joined (rustls would
                        // hold up to 64 KiB of it), or nothing but empty records.
                        self.failed = true;
                        return Err(io::Error::new(
                            ErrorKind::InvalidData,
                            "more ciphertext than a record without any plaintext",
                        ));
                    }
                }
            }
            // What the handshake owes in answer (the rest goes out on a writable edge).
            flush(&mut self.conn, stream)?;
            if fed >= TLS_READ_MAX && !drained {
                // Enough for one read: the rest next turn (plaintext already decrypted is
                // returned first, by the loop's next read).
                self.more = true;
                return would_block(filled);
            }
        }
    }

    /// Take plaintext from `parts` into rustls, one chunk at a time and only while rustls has
    /// flushed everything it held to the socket; returns the bytes taken.
    pub(super) fn write<S>(&mut self, stream: &S, parts: &[&[u8]]) -> io::Result<usize>
    where
        for<'s> &'s S: Write,
    {
        if self.failed {
            return Err(io::Error::new(ErrorKind::InvalidData, "TLS failed"));
        }
        let total: usize = parts.iter().map(|p| p.len()).sum();
        let mut taken = 0;
        loop {
            if !flush(&mut self.conn, stream)? || taken == total {
                return Ok(taken);
            }
            let mut slices = [IoSlice::new(&[]); 64];
            let (mut k, mut room, mut skip) = (0, TLS_CHUNK, taken);
            for part in parts {
                if skip >= part.len() {
                    skip -= part.len();
                    continue;
                }
                let rest = &part[skip..];
                skip = 0;
                let n = rest.len().min(room);
                slices[k] = IoSlice::new(&rest[..n]);
                (k, room) = (k + 1, room - n);
                if room == 0 || k == slices.len() {
                    break;
                }
            }
            match self.conn.writer().write_vectored(&slices[..k])? {
                0 => return Ok(taken), // rustls's limit (before the handshake completed)
                n => (taken, self.chunk) = (taken + n, n),
            }
        }
    }

    /// Queue our `close_notify` (once) and try to write it; not while a PROXY header is awaited
    /// (no TLS has begun).
    pub(super) fn close_notify<S>(&mut self, stream: &S)
    where
        for<'s> &'s S: Write,
    {
        if !self.closing && !self.failed && !self.raw {
            self.closing = true;
            self.conn.send_close_notify();
            let _ = flush(&mut self.conn, stream);
        }
    }
}

/// What a read that found nothing more returns: the bytes it has, or `WouldBlock`.
fn would_block(filled: usize) -> io::Result<usize> {
    match filled {
        0 => Err(ErrorKind::WouldBlock.into()),
        n => Ok(n),
    }
}

impl Source for Transport {
    fn register(
        &mut self,
        registry: &Registry,
        token: Token,
        interests: Interest,
    ) -> io::Result<()> {
        self.stream.register(registry, token, interests)
    }

    fn reregister(
        &mut self,
        registry: &Registry,
        token: Token,
        interests: Interest,
    ) -> io::Result<()> {
        self.stream.reregister(registry, token, interests)
    }

    fn deregister(&mut self, registry: &Registry) -> io::Result<()> {
        self.stream.deregister(registry)
    }
}

#[cfg(test)]
mod tests {
    // A loopback pair, the openssl CLI and a scratch folder for the test's certificates.
    #![allow(clippy::disallowed_methods, clippy::disallowed_types)]
    use super::{Transport, TLS_CHUNK};
    use std::io::{ErrorKind, Read, Write};
    use std::path::{Path, PathBuf};
    use std::process::Command;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    /// A scratch folder, removed when dropped (a failing test too).
    struct Scratch(PathBuf);

    impl std::ops::Deref for Scratch {
        type Target = Path;
        fn deref(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// A CA and a server certificate for localhost, made with the openssl CLI in a fresh
    /// folder; `None` (with a note) without openssl, a failure under CI.
    fn pki() -> Option<Scratch> {
        let dir = std::env::temp_dir().join(format!(
            "wsloop-transport-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let dir = Scratch(dir);
        let ec = "-newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes";
        let steps = [
            format!("req -x509 {ec} -keyout ca.key -out ca.pem -days 2 -subj /CN=ca"),
            format!("req -new {ec} -keyout key.pem -out s.csr -subj /CN=localhost"),
            "x509 -req -in s.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out cert.pem \
             -days 2 -extfile s.ext"
                .to_string(),
        ];
        std::fs::write(
            dir.join("s.ext"),
            "subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\n",
        )
        .unwrap();
        for step in steps {
            let out = Command::new("openssl")
                .args(step.split(' '))
                .current_dir(&*dir)
                .output();
            match out {
                Ok(o) if o.status.success() => {}
                _ if std::env::var("CI")
                    .is_ok_and(|v| !matches!(v.as_str(), "" | "0" | "false")) =>
                {
                    panic!("openssl {step} failed ({out:?}) and CI is set")
                }
                _ => {
                    eprintln!("note: openssl is not available; skipping this transport test");
                    return None;
                }
            }
        }
        Some(dir)
    }

    fn client_config(dir: &Path) -> Arc<rustls::ClientConfig> {
        use rustls::pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls::pki_types::CertificateDer::pem_file_iter(dir.join("ca.pem")).unwrap() {
            roots.add(c.unwrap()).unwrap();
        }
        #[allow(deprecated)] // ring's provider, as the server's
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        Arc::new(config)
    }

    /// The server side of a TLS connection over loopback, with a small send buffer, past its
    /// handshake; and the client, which reads nothing unless told.
    fn established(
        dir: &Path,
    ) -> (
        Transport,
        rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream>,
    ) {
        let setup = crate::io::tls::load(
            &crate::config::TlsConfig::new(dir.join("cert.pem"), dir.join("key.pem")),
            0,
        )
        .unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        server.set_nonblocking(true).unwrap();
        let mut t = Transport::tls(
            mio::net::TcpStream::from_std(server),
            16 * 1024,
            setup.config,
        )
        .unwrap();
        // The client's handshake in a thread; the server's driven here, as the loop would.
        let config = client_config(dir);
        let hs = std::thread::spawn(move || {
            let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
            let conn = rustls::ClientConnection::new(config, name).unwrap();
            let mut s = rustls::StreamOwned::new(conn, client);
            s.sock
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            while s.conn.is_handshaking() {
                s.conn.complete_io(&mut s.sock).unwrap();
            }
            s
        });
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut buf = [0u8; 64];
        while t.take_established().is_none() {
            match t.read(&mut buf, false) {
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                other => panic!("{other:?}"),
            }
            let _ = t.flush();
            assert!(Instant::now() < deadline, "no handshake");
            std::thread::sleep(Duration::from_millis(1));
        }
        (t, hs.join().unwrap())
    }

    /// What rustls holds now (ciphertext), taken out of it.
    fn held(t: &mut Transport) -> usize {
        let mut out = Vec::new();
        let tls = t.tls.as_deref_mut().unwrap();
        while tls.conn.wants_write() {
            tls.conn.write_tls(&mut out).unwrap();
        }
        out.len()
    }

    /// A peer that does not read: the transport takes plaintext only while rustls has flushed
    /// what it held, a chunk at a time, so rustls never holds more than one chunk (plus its
    /// record's overhead), however much the caller offers; then it takes nothing until a flush.
    #[test]
    fn rustls_holds_at_most_one_chunk_for_a_peer_that_does_not_read() {
        let Some(dir) = pki() else { return };
        let (mut t, mut client) = established(&dir);
        let offer = vec![7u8; 8 << 20];
        let mut taken = 0;
        for _ in 0..1000 {
            let n = t
                .write_vectored::<2>(&[&offer[..1000], &offer[1000..]])
                .unwrap();
            taken += n;
            if n == 0 {
                break;
            }
        }
        assert!(t.holds(), "the socket never filled ({taken} bytes taken)");
        assert_eq!(
            t.write(&offer).unwrap(),
            0,
            "took more while rustls held some"
        );
        let held = held(&mut t);
        assert!(
            held > 0 && held <= TLS_CHUNK + 64,
            "rustls held {held} bytes"
        );
        // Everything taken arrives, in order, once the client reads (what rustls held was
        // taken out above, so stop at what the socket got).
        client
            .sock
            .set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let mut got = 0usize;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match client.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    assert!(buf[..n].iter().all(|&b| b == 7));
                    got += n;
                }
                Err(_) => break,
            }
        }
        assert!(got > 0 && got < taken, "got {got} of {taken}");
    }

    /// A read hands out every decrypted byte, into a buffer smaller than a record or larger
    /// than everything sent; the client's close_notify is the end (`Ok(0)`), repeatedly.
    #[test]
    fn reads_return_the_plaintext_and_the_peers_close_notify_as_eof() {
        let Some(dir) = pki() else { return };
        let (mut t, mut client) = established(&dir);
        let sent: Vec<u8> = (0..100_000u32).map(|i| (i * 7) as u8).collect();
        client.write_all(&sent).unwrap();
        client.conn.send_close_notify();
        client.flush().unwrap();
        let mut got = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(5);
        for size in [1usize, 7, 1000, 100_000].into_iter().cycle() {
            let mut buf = vec![0u8; size];
            match t.read(&mut buf, false) {
                Ok(0) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(1))
                }
                Err(e) => panic!("{e}"),
            }
            assert!(
                Instant::now() < deadline,
                "{} of {} bytes",
                got.len(),
                sent.len()
            );
        }
        assert!(got == sent, "{} bytes read, differing", got.len());
        assert_eq!(t.read(&mut [0u8; 16], false).unwrap(), 0);
    }
}
